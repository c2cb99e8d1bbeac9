"""What the training step and the training task must do that no end result shows at once: the
feature noise reaches the step and changes with it, and the final test runs on the best checkpoint."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from tests import fake_layouts
from tests.framework_helpers import TINY, compose_train
from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.tasks.train import train


def module(noise: float = 0.3) -> UFlowModule:
    torch.manual_seed(0)
    return UFlowModule(
        backbone={"name": "resnet18", "input_size": 64, "pretrained": False, "layers": [1, 2, 3]},
        flow={"flow_steps": 1, "feature_noise": noise},
        threshold={"_target_": "uflow_exp.thresholds.NFATreeThreshold"},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3},
        eval_size=64,
    )


def encoded_features(m: UFlowModule, step: int, monkeypatch) -> list[torch.Tensor]:
    """The features the training step hands to the flow at global step ``step``."""
    seen = []
    monkeypatch.setattr(
        m.model, "encode", lambda f, jac=True: seen.append(f) or ([x.mean() for x in f], torch.zeros(2))
    )
    monkeypatch.setattr("uflow_exp.models.uflow.lightning_module.nll_loss", lambda z, j: sum(z))
    m._trainer = SimpleNamespace(global_step=step, global_rank=0, training=True)
    m.log = lambda *a, **k: None
    m.train()
    m.training_step({"image": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
                     "label": torch.zeros(2)}, 0)  # fmt: skip
    m._trainer = None
    return seen[0]


def test_the_training_step_adds_noise_drawn_anew_at_each_step(monkeypatch):
    m = module().eval()  # clean features first: a module starts in training mode
    clean = m.model.normalize(
        m.model.extract(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    )
    first, again, second = (encoded_features(m, step, monkeypatch) for step in (0, 0, 1))
    for c, a, b, d in zip(clean, first, again, second, strict=True):
        assert abs((a - c).std().item() - 0.3) < 0.03  # the recipe's noise, std 0.3, on the clean features
        assert torch.equal(a, b)  # the same step draws the same noise (a resumed run repeats it)
        assert not torch.equal(a, d)  # the next step draws other noise


def test_the_final_test_runs_on_the_best_checkpoint(tmp_path, monkeypatch):
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=64)
    tested = []
    original = L.Trainer.test

    def spy(self, *args, **kwargs):
        tested.append(kwargs.get("ckpt_path"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "test", spy)
    train(
        compose_train(
            [*TINY, "dataset=mvtec", f"dataset.root={root}", "trainer.max_epochs=2"], tmp_path / "run"
        )
    )
    (best,) = (p for p in (tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    assert tested == [str(best)]


def test_the_threshold_is_calibrated_once_per_kept_checkpoint_not_every_epoch(tmp_path, monkeypatch):
    """The fit's validations skip the tree NFA's level; the last and the best checkpoint each get
    theirs at the end, stored in the file, and evaluate calibrates a checkpoint that has none."""
    import hydra

    from uflow_exp.tasks.evaluate import evaluate
    from uflow_exp.thresholds import NFATreeThreshold

    calls = []
    original = NFATreeThreshold.calibrate
    monkeypatch.setattr(NFATreeThreshold, "calibrate", lambda self: calls.append(1) or original(self))
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=8, size=64)
    data = ["dataset=mvtec", f"dataset.root={root}", "dataset.num_workers=0"]
    # "best" = the largest validation loss: an earlier epoch than the last, so two flows to calibrate
    overrides = [
        "trainer.max_epochs=3",
        "threshold.log_nfa_threshold=-1e6",
        "callbacks.model_checkpoint.mode=max",
    ]
    cfg = compose_train([*TINY, *data, *overrides], tmp_path / "run")
    metrics = train(cfg)
    kept = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert len({torch.load(path, weights_only=True)["global_step"] for path in kept}) == 2
    assert len(calls) == 2  # last.ckpt and the best epoch's file; not once per epoch
    datamodule = hydra.utils.instantiate(cfg.dataset)
    datamodule.setup("fit")
    for path in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        module = UFlowModule.from_checkpoint(str(path)).eval()
        with torch.inference_mode():
            largest = max(
                float(module.predict_step(b)["significance"].max()) for b in datamodule.val_dataloader()
            )
        assert float(module.threshold.calibrated_level) == pytest.approx(largest, rel=1e-5, abs=1e-4), (
            path.name
        )
    # a checkpoint without a level (saved mid-fit) is calibrated by evaluate, to the same level
    best = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    checkpoint = torch.load(best, weights_only=True)
    checkpoint["state_dict"]["threshold.calibrated_level"] = torch.tensor(float("nan"))
    torch.save(checkpoint, tmp_path / "uncalibrated.ckpt")
    eval_cfg = [*data, "logger=csv", "trainer=cpu", f"ckpt_path={tmp_path / 'uncalibrated.ckpt'}"]
    evaluated = evaluate(compose_train(eval_cfg, tmp_path / "eval", "eval"))
    assert evaluated["test/threshold_level"] == pytest.approx(metrics["test/threshold_level"], rel=1e-6)


def test_anomalous_images_without_masks_do_not_calibrate_the_level(tmp_path):
    """val_split=test on image labels only: an anomalous image's empty mask must not make it normal."""
    import hydra

    root = fake_layouts.make_folder(tmp_path / "data", n_normal=10, n_abnormal=3, size=64, mask_dir=None)
    data = ["dataset=folder", f"dataset.root={root}", "dataset.num_workers=0", "dataset.val_split=test"]
    cfg = compose_train([*TINY, *data, "threshold.log_nfa_threshold=-1e6"], tmp_path / "run")
    train(cfg)
    module = UFlowModule.from_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt")).eval()
    datamodule = hydra.utils.instantiate(cfg.dataset)
    datamodule.setup("fit")
    normal, anomalous = [], []
    with torch.inference_mode():
        for batch in datamodule.val_dataloader():
            significance = module.predict_step(batch)["significance"].flatten(1).amax(1)
            normal += significance[batch["label"] == 0].tolist()
            anomalous += significance[batch["label"] == 1].tolist()
    assert len(normal) == 2 and len(anomalous) == 3 and max(anomalous) > max(normal)  # the squares stand out
    assert float(module.threshold.calibrated_level) == pytest.approx(max(normal), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("scales", [None, 1, 2])
def test_the_image_score_is_the_maximum_of_the_coarsest_scales_map(scales, tmp_path):
    from hydra.utils import instantiate

    from tests.framework_helpers import TINY, compose_train
    from uflow_exp.metrics import AnomalyMetrics
    from uflow_exp.models.uflow.anomaly_map import relative_map

    setting = f"model.image_score_scales={'null' if scales is None else scales}"
    cfg = compose_train([*TINY, setting, "threshold.calibrate_on_normal=false"], tmp_path)
    module = instantiate(cfg.model).eval()
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        out = module.predict_step({"image": images})
        z, _ = module.model(images)
    assert len(z) == 3  # resnet18's three levels, finest first
    expected = module.model.anomaly_map(z if scales is None else z[-scales:], 64).flatten(1).amax(1)
    assert torch.allclose(out["image_score"], expected)
    # the map keeps every scale (shown against each image's level: model.map_relative_quantile)
    relative = relative_map(module.model.anomaly_map(z, 64), module.map_relative_quantile)
    assert torch.allclose(out["anomaly_map"], relative)
    if scales is not None:
        assert not torch.allclose(out["image_score"], out["anomaly_map"].flatten(1).amax(1))
    # and evaluation ranks images by it
    metrics = AnomalyMetrics()
    labels = torch.tensor([0, 1, 0, 1])
    metrics.update(out["anomaly_map"], torch.zeros(4, 1, 64, 64, dtype=torch.bool), labels=labels,
                   score_map=out["image_score"][:, None])  # fmt: skip
    scores, _ = metrics.image_auroc.scores_and_labels()
    assert torch.equal(scores, out["image_score"])
