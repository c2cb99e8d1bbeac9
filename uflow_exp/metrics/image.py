"""Image-level metrics."""

from __future__ import annotations

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from uflow_exp.metrics._common import as_image_batch, warn_undefined


class ImageAUROC(Metric):
    """Exact AUROC of the per-image maximum anomaly score against "mask has any anomalous pixel".

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

    def update(self, anomaly_map: Tensor, gt_mask: Tensor) -> None:
        scores, gt = as_image_batch(anomaly_map, gt_mask)
        self.scores.append(scores.flatten(1).amax(dim=1).float())
        self.labels.append(gt.flatten(1).any(dim=1).long())

    def compute(self) -> Tensor:
        # After a DDP sync the list states are already concatenated tensors.
        if isinstance(self.labels, list) and not self.labels:
            return warn_undefined("Image AUROC", "no images were seen")
        scores, labels = dim_zero_cat(self.scores), dim_zero_cat(self.labels)
        n_anomalous = int(labels.sum())
        if n_anomalous in (0, labels.numel()):
            return warn_undefined("Image AUROC", "the test images are not a mix of anomalous and normal ones")
        return binary_auroc(scores, labels, validate_args=False)
