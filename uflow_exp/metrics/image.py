"""Image-level metrics."""

from __future__ import annotations

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from uflow_exp.metrics._common import warn_undefined


def best_recall(scores: Tensor, labels: Tensor, false_alarms: int) -> float:
    """The largest share of anomalous images (label 1) that any threshold on the image scores flags
    ("score above t") while flagging at most ``false_alarms`` normal images; NaN without anomalous
    images. It reads the test labels: an oracle to compare a threshold with, not a threshold."""
    anomalous, normal = scores[labels == 1], scores[labels == 0].sort(descending=True).values
    if not len(anomalous):
        return float("nan")
    if false_alarms >= len(normal):
        return 1.0
    # t may not flag the (false_alarms + 1)-th highest normal score
    return float((anomalous > normal[false_alarms]).double().mean())


class ImageAUROC(Metric):
    """Exact AUROC of the per-image maximum anomaly score against each image's label (1 anomalous).

    Labels come from the data set's records, never from the masks: an anomalous image may come
    without a mask (image-level labels only), and its empty mask must not make it normal.

    Keeps one score and one label per image (test sets have hundreds of images, so exactness is cheap) and
    delegates the area to torchmetrics' ``binary_auroc``; only the single-class case is handled here, where
    torchmetrics would return a meaningless 0 instead of NaN.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, anomaly_map: Tensor, labels: Tensor) -> None:
        if labels.shape != anomaly_map.shape[:1]:
            raise ValueError(
                f"labels must be one per image {tuple(anomaly_map.shape[:1])}, got {tuple(labels.shape)}"
            )
        self.scores.append(anomaly_map.detach().flatten(1).amax(dim=1).float())
        self.labels.append(labels.detach().long().to(self.scores[-1].device))

    def scores_and_labels(self) -> tuple[Tensor, Tensor]:
        """Every image's score and label seen so far, over all processes (call on every rank)."""
        with self.sync_context(should_unsync=True):
            return dim_zero_cat(self.scores), dim_zero_cat(self.labels)

    def compute(self) -> Tensor:
        # After a DDP sync the list states are already concatenated tensors.
        if isinstance(self.labels, list) and not self.labels:
            return warn_undefined("Image AUROC", "no images were seen")
        scores, labels = dim_zero_cat(self.scores), dim_zero_cat(self.labels)
        n_anomalous = int(labels.sum())
        if n_anomalous in (0, labels.numel()):
            return warn_undefined("Image AUROC", "the test images are not a mix of anomalous and normal ones")
        # torchmetrics' float32 trapezoid can overshoot by an ulp (1.0000001 on 10 + 20 perfect images)
        return binary_auroc(scores, labels, validate_args=False).clamp(0.0, 1.0)
