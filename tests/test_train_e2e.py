"""Tiny end-to-end runs of the train task on each data layout, and what a run leaves behind."""

import json
import math

import numpy as np
import pytest
import torch

from tests import fake_layouts
from tests.framework_helpers import TINY, compose_train
from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.tasks.train import train

TEST_METRICS = {"test/image_auroc", "test/pixel_auroc", "test/pixel_aupro", "test/miou", "test/pixel_f1"}


def layout_overrides(name: str, root) -> list[str]:
    if name == "textures":
        return [
            "dataset=textures",
            f"dataset.cache_dir={root}",
            "dataset.n_train=6",
            "dataset.n_test_good=2",
            "dataset.n_test_defect=3",
            "dataset.generated_size=64",
        ]
    if name == "mvtec":
        return ["dataset=mvtec", f"dataset.root={fake_layouts.make_mvtec(root, n_train=6, size=64)}"]
    if name == "btad":
        return ["dataset=btad", f"dataset.root={fake_layouts.make_btad(root, n_train=6, size=64)}"]
    if name == "lgg_mri":
        return ["dataset=lgg_mri", f"dataset.root={fake_layouts.make_lgg(root, n_patients=4, size=64)}"]
    if name == "stc":
        return [
            "dataset=stc",
            f"dataset.root={fake_layouts.make_stc(root, height=64, width=64)}",
            f"dataset.cache_dir={root / 'cache'}",
            "dataset.frame_stride=1",
        ]
    if name == "folder":
        return [
            "dataset=folder",
            f"dataset.root={fake_layouts.make_folder(root, n_normal=8, n_abnormal=3, size=64)}",
            "dataset.mask_dir=masks",
        ]
    raise ValueError(name)


@pytest.mark.parametrize("layout", ["textures", "mvtec", "btad", "lgg_mri", "stc", "folder"])
def test_one_epoch_on_each_layout(layout, tmp_path):
    # the image score as the map's maximum and the standard normal's map: the defaults (the coarsest
    # scales' map, a base mixture) were chosen on real data; on a one-epoch random-weight model of six
    # images the first ranks a test image wrong and the second is fitted to a few hundred latents
    # (tests/test_base_mixture.py runs it)
    overrides = [*TINY, *layout_overrides(layout, tmp_path / "data"), "model.image_score_scales=null"]
    overrides.append("flow.base_mixture_components=0")
    metrics = train(compose_train(overrides, tmp_path / "run"))
    assert TEST_METRICS <= set(metrics)
    assert math.isfinite(metrics["val/loss"]) and math.isfinite(metrics["train/loss"])
    if layout != "textures":  # a bright square in noise: one epoch finds it (0.95-0.99 pixel AUROC)
        assert metrics["test/pixel_auroc"] > 0.8 and metrics["test/image_auroc"] > 0.8
    assert metrics["time/train_images_per_s"] > 0  # the training loop's own rate, beside time/fit_s
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(written) == set(metrics)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    panels = sorted((tmp_path / "run" / "test_images").glob("*.png"))
    assert tmp_path / "run" / "test_images" / "curves.png" in panels and len(panels) >= 2


def test_image_level_labels_only(tmp_path):
    # A folder of anomalous images without masks: image AUROC from the labels, no pixel metrics at all.
    root = fake_layouts.make_folder(tmp_path / "data", n_normal=8, n_abnormal=3, size=64, mask_dir=None)
    metrics = train(compose_train([*TINY, "dataset=folder", f"dataset.root={root}"], tmp_path / "run"))
    assert 0.0 <= metrics["test/image_auroc"] <= 1.0
    # image-level metrics only: no pixel metric computed on empty masks
    image_level = {
        "test/image_auroc",
        "test/false_alarm_rate",
        "test/detection_precision",
        "test/detection_recall",
        "test/threshold_level",
        "test/false_alarm_rate_ci_low",
        "test/false_alarm_rate_ci_high",
        "test/oracle_recall_at_false_alarms",
        "test/promised_false_alarm_rate",
    }
    assert {key for key in metrics if key.startswith("test/")} == image_level


def test_checkpoint_loads_weights_only_and_keeps_the_threshold(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=64)
    cfg = compose_train(
        [*TINY, "dataset=mvtec", f"dataset.root={root}", "threshold=normal_quantile"], tmp_path / "run"
    )
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    torch.load(ckpt, map_location="cpu", weights_only=True)  # plain hyper-parameters only
    module = UFlowModule.from_checkpoint(str(ckpt))
    value = float(module.threshold.value)
    assert 0.0 < value <= 1.0  # calibrated on the normal validation images, stored in the checkpoint


def test_missing_data_root_fails_before_training(tmp_path):
    cfg = compose_train([*TINY, "dataset=mvtec", f"dataset.root={tmp_path / 'nowhere'}"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nan_loss_stops_with_a_message(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=64)
    cfg = compose_train(
        [*TINY, "dataset=mvtec", f"dataset.root={root}", "model.optimizer.lr=1e30"], tmp_path / "run"
    )
    cfg.trainer.max_epochs = 3
    with pytest.raises(FloatingPointError, match="learning rate"):
        train(cfg)


def test_feature_cache_gives_the_same_losses(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=8, size=64)
    results = {}
    for cache in ("false", "true", "disk"):  # true: in memory for data this small
        cfg = compose_train(
            [
                *TINY,
                "dataset=mvtec",
                f"dataset.root={root}",
                f"feature_cache={cache}",
                f"feature_cache_dir={tmp_path / f'features_{cache}'}",
                "trainer.max_epochs=3",
                "test=false",
            ],
            tmp_path / f"run_{cache}",
        )
        results[cache] = train(cfg)
    for cache in ("true", "disk"):
        for key in ("train/loss", "val/loss"):
            assert results[cache][key] == pytest.approx(results["false"][key], rel=1e-5), (cache, key)
    assert not (tmp_path / "features_true").exists()
    (folder,) = (tmp_path / "features_disk").iterdir()
    assert folder.name.startswith("mvtec-bottle-resnet18-L123-64-")
    assert np.load(folder / "filled.npy").all()  # 6 train + 2 val images, each computed and flagged


def test_a_cached_run_decodes_each_image_once_and_lists_the_files_once(tmp_path, monkeypatch):
    from uflow_exp.data import AnomalyDataset, datamodule

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, n_test_good=2, n_test_defect=2, size=64)
    decoded, listed = [], []
    load_image, find_records = AnomalyDataset.load_image, datamodule.LAYOUTS["mvtec"].find_records
    monkeypatch.setattr(
        AnomalyDataset,
        "load_image",
        lambda self, record: decoded.append(record.image) or load_image(self, record),
    )
    monkeypatch.setattr(
        datamodule.LAYOUTS["mvtec"], "find_records", lambda *a, **k: listed.append(1) or find_records(*a, **k)
    )
    overrides = [*TINY, "dataset=mvtec", f"dataset.root={root}", "trainer.max_epochs=3"]
    train(compose_train([*overrides, "feature_cache=memory"], tmp_path / "run"))
    train_val = {p for p in decoded if "/train/" in str(p)}
    assert len(train_val) == 6 and len(decoded) == 6 + 4  # 3 epochs: each training image once, test once
    assert len(listed) == 1
    decoded.clear()
    train(compose_train([*overrides, "feature_cache=false"], tmp_path / "uncached"))
    assert len(decoded) > 3 * 6  # without the cache every epoch decodes


@pytest.mark.parametrize("limit", ["1", "0.4"])  # a count of batches, a share of them
def test_a_limited_run_caches_exactly_the_training_images_its_epochs_read(tmp_path, monkeypatch, limit):
    from uflow_exp.data import AnomalyDataModule
    from uflow_exp.feature_cache import FeatureCache

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=20, size=64)
    stored, read, modules = [], [], []
    fill, lookup, fit_datasets = FeatureCache.fill, FeatureCache.read, AnomalyDataModule.fit_datasets
    monkeypatch.setattr(
        AnomalyDataModule, "fit_datasets", lambda self: modules.append(self) or fit_datasets(self)
    )

    def recording_fill(self, batches, extract):
        return fill(self, ((keys, images) for keys, images in batches if not stored.extend(keys)), extract)

    monkeypatch.setattr(FeatureCache, "fill", recording_fill)
    monkeypatch.setattr(
        FeatureCache, "read", lambda self, key, tile=None: read.append(key) or lookup(self, key, tile)
    )
    overrides = [*TINY, "dataset=mvtec", f"dataset.root={root}", "dataset.batch_size=2", "test=false"]
    overrides += ["trainer.max_epochs=3", f"trainer.limit_train_batches={limit}", "feature_cache=memory"]
    train(compose_train(overrides, tmp_path / "run"))
    validation = {str(record.image) for record in modules[0].val_dataset.records}
    trained_on = set(read) - validation
    # 16 training images, 2 per batch, 1 batch (or 40 % of 8 batches: 3) per epoch, 3 epochs: 6 or 18
    # draws, some of them repeats; the 4 validation images are read whole every epoch
    assert len(validation) == 4 and validation <= set(read)
    assert 2 < len(trained_on) <= (6 if limit == "1" else 15)
    assert sorted(stored) == sorted(trained_on | validation)  # each cached once, none never read


def test_a_float16_feature_cache_moves_losses_and_maps_by_little(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=8, size=64)
    results = {}
    for dtype in ("float32", "float16"):
        # the standard normal's map: a base mixture refitted to the float16 features of eight tiny
        # images moves the map by far more than the features do
        overrides = [*TINY, "dataset=mvtec", f"dataset.root={root}", "trainer.max_epochs=3"]
        overrides.append("flow.base_mixture_components=0")
        results[dtype] = train(compose_train([*overrides, f"feature_cache_dtype={dtype}"], tmp_path / dtype))
    for key in ("train/loss", "val/loss"):
        assert results["float16"][key] == pytest.approx(results["float32"][key], rel=1e-3), key
        assert results["float16"][key] != results["float32"][key], key  # the float16 store was used
    for key in ("test/pixel_auroc", "test/image_auroc"):
        assert results["float16"][key] == pytest.approx(results["float32"][key], abs=0.01), key


def _published_tree_run(tmp_path):
    """A one-epoch run on a small MVTec-layout set under the published tree NFA, its level left to the
    calibration (a one-epoch model's normal images then score apart; with the default switches they all
    score the same, below level 0): (data root, its overrides, the run's metrics, last.ckpt)."""
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=64)
    data = ["dataset=mvtec", f"dataset.root={root}", "dataset.num_workers=0"]
    published = [
        "threshold.clip_lower_tail=false",
        "threshold.tests_by_size=false",
        "threshold.log_nfa_threshold=-1e6",
    ]
    trained = train(compose_train([*TINY, *data, *published], tmp_path / "run"))
    return root, data, trained, tmp_path / "run" / "checkpoints" / "last.ckpt"


def test_evaluate_reproduces_the_test_metrics_of_training(tmp_path):
    from uflow_exp.tasks.evaluate import evaluate

    _, data, trained, ckpt = _published_tree_run(tmp_path)
    cfg = compose_train([*data, "logger=csv", "trainer=cpu", f"ckpt_path={ckpt}"], tmp_path / "eval", "eval")
    evaluated = evaluate(cfg)
    # the test metrics, and how fast the test ran (as training reports it)
    assert set(evaluated) == {k for k in trained if k.startswith("test/")} | {"time/test_images_per_s"}
    assert evaluated.pop("time/test_images_per_s") > 0
    for key, value in evaluated.items():
        assert value == pytest.approx(trained[key], rel=1e-6, nan_ok=True), key


def test_evaluate_without_a_data_set_takes_the_checkpoints_run_and_says_so(tmp_path, caplog):
    import shutil

    from uflow_exp.tasks.evaluate import evaluate, run_dataset
    from uflow_exp.utils.checks import ConfigValueError

    root, _, trained, ckpt = _published_tree_run(tmp_path)
    caplog.set_level("INFO")
    evaluated = evaluate(
        compose_train(["logger=csv", "trainer=cpu", f"ckpt_path={ckpt}"], tmp_path / "eval", "eval")
    )
    assert f"data set of the checkpoint's run: mvtec (root {root}" in caplog.text
    for key in ("test/pixel_auroc", "test/image_auroc", "test/miou"):
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-6), key
    # a run from before dataset.val_whole_groups validated on single images: so does its evaluation
    config = tmp_path / "old" / "config_resolved.yaml"
    config.parent.mkdir()
    config.write_text("dataset:\n  layout: lgg_mri\n  val_split: train\n")
    assert run_dataset(config.parent / "checkpoints" / "last.ckpt").val_whole_groups is False
    assert run_dataset(ckpt).val_whole_groups is True  # a run of today's config keeps its own
    # a checkpoint away from its run folder: the data set must be named
    alone = shutil.copy(ckpt, tmp_path / "alone.ckpt")
    cfg = compose_train(["logger=csv", "trainer=cpu", f"ckpt_path={alone}"], tmp_path / "eval2", "eval")
    with pytest.raises(ConfigValueError, match="names no data set and .*config_resolved.yaml .* is missing"):
        evaluate(cfg)


def test_evaluate_rethresholds_a_checkpoint_without_retraining(tmp_path):
    from uflow_exp.tasks.evaluate import evaluate

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=64)
    data = ["dataset=mvtec", f"dataset.root={root}", "dataset.num_workers=0"]
    quantile = train(compose_train([*TINY, *data, "threshold=normal_quantile"], tmp_path / "quantile"))
    train(compose_train([*TINY, *data, "threshold=nfa_tree"], tmp_path / "nfa"))
    ckpt = tmp_path / "nfa" / "checkpoints" / "last.ckpt"
    rethresholded = [*data, "logger=csv", "trainer=cpu", f"ckpt_path={ckpt}", "threshold=normal_quantile"]
    evaluated = evaluate(compose_train(rethresholded, tmp_path / "eval", "eval"))
    # calibrated on the same validation images by the same weights: what training with it gave
    for key in ("test/miou", "test/pixel_f1", "test/false_alarm_rate", "test/detection_recall"):
        assert evaluated[key] == pytest.approx(quantile[key], rel=1e-6, nan_ok=True), key
    assert "NormalQuantileThreshold" in (tmp_path / "eval" / "config_resolved.yaml").read_text()
    # and draws the mode's masks in test panels, as training does
    panels = sorted(p.name for p in (tmp_path / "eval" / "test_images").glob("*.png"))
    assert "curves.png" in panels and len(panels) > 1


def test_evaluate_recalibrates_at_a_false_alarm_rate_and_reports_what_it_promises(tmp_path):
    from uflow_exp.tasks.evaluate import evaluate
    from uflow_exp.thresholds import conformal_rank

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=20, n_test_good=4, size=64)
    data = ["dataset=mvtec", f"dataset.root={root}", "dataset.num_workers=0"]
    # the published tree NFA, its level left to the calibration: a one-epoch model's normal images then
    # score apart (with the default switches they all score the same, below level 0)
    published = [
        "threshold.clip_lower_tail=false",
        "threshold.tests_by_size=false",
        "threshold.log_nfa_threshold=-1e6",
    ]
    trained = train(compose_train([*TINY, *data, *published], tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    scores = UFlowModule.from_checkpoint(str(ckpt)).threshold.normal_scores
    n = len(scores)  # 4 normal validation images: the default promises 1/5
    assert n == 4 and trained["test/promised_false_alarm_rate"] == pytest.approx(1 / 5)
    command = [*data, "logger=csv", "trainer=cpu", f"ckpt_path={ckpt}", "threshold.false_alarm_rate=0.5"]
    evaluated = evaluate(compose_train(command, tmp_path / "eval", "eval"))
    k = conformal_rank(n, 0.5)  # ceil(5 * 0.5) = 3: at most 2/5 of new normal images flagged
    assert evaluated["test/promised_false_alarm_rate"] == pytest.approx((n + 1 - k) / (n + 1))
    assert len(set(scores.tolist())) == n and float(scores[k - 1]) < float(scores[-1])
    assert evaluated["test/threshold_level"] == pytest.approx(float(scores[k - 1]), rel=1e-5)
    for key in ("false_alarm_rate", "false_alarm_rate_ci_low", "false_alarm_rate_ci_high",
                "oracle_recall_at_false_alarms"):  # fmt: skip
        assert 0 <= evaluated[f"test/{key}"] <= 1, key
    assert evaluated["test/false_alarm_rate_ci_low"] <= evaluated["test/false_alarm_rate"]
    assert "false_alarm_rate: 0.5" in (tmp_path / "eval" / "config_resolved.yaml").read_text()


def test_evaluate_takes_a_checkpoint_of_the_authors_release(tmp_path):
    import argparse

    from uflow_exp.tasks.evaluate import evaluate

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=64)
    data = ["dataset=mvtec", f"dataset.root={root}", "dataset.num_workers=0"]
    # the threshold the authors' checkpoints are evaluated with: their tree NFA, none of our corrections
    reference = ["threshold=nfa_tree", "threshold.clip_lower_tail=false", "threshold.tests_by_size=false"]
    reference += ["threshold.calibrate_on_normal=false", "threshold.refine_fraction=null"]
    # the authors' release holds their flow: no positional conditions
    trained = train(compose_train([*TINY, *data, *reference, "flow=reference"], tmp_path / "run"))
    ours = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # Their layout: a Lightning module holding the model as `model`, metric buffers beside it, and
    # hyper-parameters pickled as Python objects.
    state = {k: v for k, v in ours["state_dict"].items() if k.startswith("model.")}
    state["aupro.fpr"] = torch.zeros(3)
    release = tmp_path / "release.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(backbone="resnet18")}, release)

    described = [
        *data,
        "backbone=resnet18",
        "backbone.input_size=64",
        "flow.flow_steps=2",
        "model.eval_size=64",
    ]
    cfg = compose_train([*described, "trainer=cpu", f"ckpt_path={release}"], tmp_path / "eval", "eval")
    with pytest.raises(ValueError, match="trust_checkpoint=true"):
        evaluate(cfg)
    cfg.trust_checkpoint = True
    evaluated = evaluate(cfg)
    for key, value in evaluated.items():
        if key.startswith("test/"):
            assert value == pytest.approx(trained[key], rel=1e-6, nan_ok=True), key

    del state["model.feature_extractor.extractor.conv1.weight"]
    torch.save({"state_dict": state}, release)
    with pytest.raises(KeyError, match="backbone"):
        evaluate(cfg)


def test_the_default_threshold_level_is_the_largest_significance_of_the_validation_normal_images(tmp_path):
    import hydra

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=8, size=64)
    data = ["dataset=mvtec", f"dataset.root={root}", "dataset.num_workers=0"]
    # a floor far below any significance, so that the level is the calibrated one, whatever its sign
    cfg = compose_train([*TINY, *data, "threshold.log_nfa_threshold=-1e6"], tmp_path)
    assert cfg.threshold.calibrate_on_normal  # the default
    metrics = train(cfg)
    module = UFlowModule.from_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt")).eval()
    datamodule = hydra.utils.instantiate(cfg.dataset)
    datamodule.setup("fit")
    with torch.inference_mode():
        seen = [module.predict_step(batch)["significance"] for batch in datamodule.val_dataloader()]
    largest = max(float(s.max()) for s in seen)
    assert float(module.threshold.calibrated_level) == pytest.approx(largest, rel=1e-5, abs=1e-4)
    assert module.threshold.level == pytest.approx(largest, rel=1e-5, abs=1e-4)
    assert metrics["test/threshold_level"] == pytest.approx(module.threshold.level)  # the level that ran


@pytest.mark.parametrize("limit", ["trainer.max_epochs=3", "trainer.max_steps=4"])
def test_the_learning_rate_decays_step_by_step_over_the_whole_run(limit, tmp_path):
    """LinearLR spans the run's optimizer steps, whichever of max_epochs and max_steps ends it: the
    last step ends at end_factor x lr, and the logged epoch rates fall within an epoch too."""
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=10, size=64)  # 8 train: 2 batches of 4
    overrides = [*TINY, "dataset=mvtec", f"dataset.root={root}", "trainer.max_epochs=3", limit, "test=false"]
    cfg = compose_train(overrides, tmp_path / "run")
    train(cfg)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    steps = 4 if "max_steps" in limit else 6
    (scheduler,) = last["lr_schedulers"]
    assert scheduler["total_iters"] == scheduler["last_epoch"] == steps
    (group,) = last["optimizer_states"][0]["param_groups"]
    assert group["lr"] == pytest.approx(cfg.model.optimizer.lr * cfg.model.scheduler.end_factor)


@pytest.mark.parametrize("max_steps", [3, 1])
def test_a_step_limit_mid_epoch_validates_and_checkpoints_the_last_step(max_steps, tmp_path):
    """trainer.max_steps ends the run inside an epoch (8 images in batches of 4: 2 steps per epoch),
    or before the first epoch ends: the last step is still validated, checkpointed and tested."""
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=10, size=64)
    overrides = [*TINY, "dataset=mvtec", f"dataset.root={root}", "trainer.max_epochs=5"]
    metrics = train(compose_train([*overrides, f"trainer.max_steps={max_steps}"], tmp_path / "run"))
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == max_steps
    assert metrics["test/pixel_auroc"] == metrics["test/pixel_auroc"]  # tested on a checkpoint


def test_logged_hyperparameters_are_the_run_config_nested_with_the_runs_seed(tmp_path):
    """Lightning flattened the data module's and model's arguments beside the run config: the data
    split's seed (0) replaced the run's seed (42) at the top of the W&B / CSV record."""
    import yaml

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=64)
    train(compose_train([*TINY, "dataset=mvtec", f"dataset.root={root}", "test=false"], tmp_path / "run"))
    (hparams,) = (tmp_path / "run").rglob("hparams.yaml")
    logged = yaml.safe_load(hparams.read_text())
    assert logged["seed"] == 42 and logged["dataset"]["seed"] == 0
    assert not {"batch_size", "root", "backbone_name", "metric_bins", "eval_size"} & set(logged)


def test_a_resumed_run_records_its_checkpoint_and_continues_its_wandb_run(tmp_path):
    from omegaconf import OmegaConf

    from uflow_exp.tasks.train import continue_records

    run = tmp_path / "run"
    import os

    old = run / "wandb" / "offline-run-20261205_080000-old111"
    old.mkdir(parents=True)
    (run / "wandb" / "offline-run-20261205_090000-abc123").mkdir()
    os.utime(old, (1e9, 1e9))  # the interrupted run's first W&B folder is the older
    cfg = OmegaConf.create({"ckpt_path": "last", "logger": {"wandb": {"project": "p"}}})
    continue_records(cfg, str(run / "checkpoints" / "last.ckpt"), run)
    assert cfg.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    assert (cfg.logger.wandb.id, cfg.logger.wandb.resume) == ("abc123", "allow")
    csv_only = OmegaConf.create({"ckpt_path": "last", "logger": {"csv": {}}})
    continue_records(csv_only, "x.ckpt", run)
    assert csv_only.ckpt_path == "x.ckpt" and "wandb" not in csv_only.logger
