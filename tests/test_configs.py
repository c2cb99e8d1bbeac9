"""Every option of every config group composes, and what it names can be built."""

import os
from pathlib import Path

import hydra
import hydra.errors
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.framework_helpers import TINY, compose_train
from uflow_exp.utils import CONFIG_DIR, instantiate_dict

CONF = Path(CONFIG_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("option", options("dataset"))
def test_dataset_options_instantiate(option, tmp_path):
    cfg = compose_train([*TINY, f"dataset={option}", f"dataset.root={tmp_path}"], tmp_path)
    datamodule = hydra.utils.instantiate(cfg.dataset)
    assert datamodule.layout == option
    assert datamodule.image_size == (64, 64)


@pytest.mark.parametrize("option", [o for o in options("backbone") if o != "mcait"])
def test_backbone_options_build_the_model(option, tmp_path):
    cfg = compose_train(
        [*TINY, f"backbone={option}", "backbone.pretrained=false", "backbone.input_size=64"], tmp_path
    )
    module = hydra.utils.instantiate(cfg.model)
    assert module.model.feature_extractor.input_shape == (64, 64)


@pytest.mark.slow
def test_mcait_option_builds_the_model(tmp_path):
    cfg = compose_train(
        [*TINY, "backbone=mcait", "backbone.pretrained=false", "backbone.input_size=448"], tmp_path
    )
    assert hydra.utils.instantiate(cfg.model).model.feature_extractor.channels == [768, 384]


def test_mcait_at_256_fails_before_any_compute(tmp_path):
    cfg = compose_train(
        [*TINY, "backbone=mcait", "backbone.pretrained=false", "backbone.input_size=256"], tmp_path
    )
    with pytest.raises(hydra.errors.InstantiationException, match="mcait.*448"):
        hydra.utils.instantiate(cfg.model)


@pytest.mark.parametrize("option", options("threshold"))
def test_threshold_options_instantiate(option, tmp_path):
    cfg = compose_train([*TINY, f"threshold={option}"], tmp_path)
    threshold = hydra.utils.instantiate(cfg.threshold)
    assert type(threshold).__module__ == "uflow_exp.thresholds"


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options(option, tmp_path):
    cfg = compose_train([*TINY, f"trainer={option}"], tmp_path)
    if cfg.trainer.accelerator == "gpu":  # no GPU here: check the target and the values only
        assert hydra.utils.get_class(cfg.trainer._target_).__name__ == "Trainer"
        return
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert trainer.max_epochs == 1


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_instantiate(option, tmp_path):
    cfg = compose_train([*TINY, f"logger={option}"], tmp_path)
    loggers = instantiate_dict(cfg.logger)
    assert len(loggers) == (3 if option == "many" else 1)


@pytest.mark.parametrize("option", options("callbacks"))
def test_callback_options_instantiate(option, tmp_path):
    cfg = compose_train([f"callbacks={option}"], tmp_path)
    callbacks = instantiate_dict(cfg.callbacks)
    assert len(callbacks) == len([c for c in (cfg.callbacks or {}).values() if c])


@pytest.mark.parametrize("option", options("debug"))
def test_debug_options_compose(option, tmp_path):
    cfg = compose_train([*TINY, f"debug={option}"], tmp_path)
    assert cfg.task_name == "debug"


@pytest.mark.parametrize("option", [o for o in options("experiment") if o != "paper"])
def test_published_experiments_compose_on_the_paper_recipe(option, tmp_path):
    cfg = compose_train([f"experiment={option}"], tmp_path)
    assert cfg.dataset.layout == option
    assert cfg.backbone.name == "mcait" and cfg.backbone.input_size == 448
    assert (cfg.flow.feature_noise, cfg.flow.train_norm_affine) == (0.0, True)
    assert cfg.threshold._target_.endswith("NFATreeThreshold")


def test_default_is_the_real_data_recipe_on_embedded_data(tmp_path):
    cfg = compose_train([], tmp_path)
    assert (cfg.dataset.layout, cfg.backbone.name, cfg.trainer.max_epochs) == (
        "textures",
        "efficientnet_lite0",
        30,
    )
    assert (cfg.flow.feature_noise, cfg.flow.train_norm_affine) == (0.3, False)
    assert cfg.model.optimizer.lr == pytest.approx(2e-3)
    assert cfg.threshold._target_.endswith("NFATreeThreshold")
    assert (cfg.threshold.clip_lower_tail, cfg.threshold.tests_by_size) == (True, True)
    assert cfg.threshold.calibrate_on_normal and cfg.threshold.scales == 3
    # the recipe does not depend on the data set: a user's own data gets it too
    mvtec = compose_train(["dataset=mvtec", "dataset.root=/data"], tmp_path)
    assert (mvtec.flow, mvtec.model.optimizer, mvtec.backbone) == (
        cfg.flow,
        cfg.model.optimizer,
        cfg.backbone,
    )


def test_paper_recipe_on_any_backbone(tmp_path):
    cfg = compose_train(["experiment=paper", "backbone=resnet18"], tmp_path)
    assert (cfg.trainer.max_epochs, cfg.model.optimizer.lr, cfg.flow.feature_noise) == (200, 1e-4, 0.0)
    assert cfg.backbone.layers == [1, 2, 3]
    # the authors' flow and map: no positions, no pooling, the standard normal base
    assert (cfg.flow.position_channels, cfg.flow.feature_pool, cfg.flow.base_mixture_components) == (0, 1, 0)
    assert cfg.threshold._target_.endswith("NFATreeThreshold")
    # the tree NFA as published: none of the corrections
    threshold = cfg.threshold
    assert not (threshold.clip_lower_tail or threshold.tests_by_size or threshold.calibrate_on_normal)
    assert threshold.scales is None and threshold.refine_fraction is None
    assert compose_train([], tmp_path).threshold.refine_fraction == 0.7  # the default refines


def test_the_mvtec_experiment_reads_each_categorys_published_settings(tmp_path):
    bottle = compose_train(["experiment=mvtec"], tmp_path)  # the data set's default category
    assert (bottle.dataset.category, bottle.trainer.max_epochs, bottle.dataset.batch_size) == (
        "bottle",
        200,
        23,
    )
    assert bottle.model.optimizer.lr == pytest.approx(1.1289990475381853e-4)
    screw = compose_train(["experiment=mvtec", "dataset.category=screw"], tmp_path)
    assert (screw.trainer.max_epochs, screw.dataset.batch_size, screw.dataset.category) == (500, 11, "screw")
    assert "total_iters" not in screw.model.scheduler and list(screw.tags) == [
        "mvtec",
        "screw",
    ]  # the run's steps
    assert len(screw.mvtec_paper_settings) == 15


def test_an_mvtec_category_without_published_settings_is_named(tmp_path):
    cfg = compose_train(["experiment=mvtec", "dataset.category=teapot"], tmp_path)
    with pytest.raises(Exception, match="mvtec_paper_settings.teapot"):
        OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("layout", ["stc", "btad"])
def test_scene_and_product_experiments_take_the_category(layout, tmp_path):
    cfg = compose_train([f"experiment={layout}", "dataset.category=03"], tmp_path)
    assert (cfg.dataset.category, cfg.dataset.batch_size, cfg.model.optimizer.lr) == ("03", 8, 1e-4)
    assert list(cfg.tags) == [layout, "03"]


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "submitit_slurm"])
def test_launchers_compose(launcher):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert hydra.utils.get_class(cfg.hydra.launcher._target_)


def test_optuna_search_composes():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    assert "model.optimizer.lr" in cfg.hydra.sweeper.params
    assert hydra.utils.get_class(cfg.hydra.sweeper._target_)


def test_unknown_option_fails_at_composition(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="no_such_backbone"):
        compose_train(["backbone=no_such_backbone"], tmp_path)


def test_the_trainer_keys_users_tune_override_without_plus(tmp_path):
    overrides = [
        "trainer.limit_train_batches=2",
        "trainer.val_check_interval=0.5",
        "trainer.gradient_clip_val=1",
    ]
    cfg = compose_train(overrides, tmp_path)
    assert (cfg.trainer.limit_train_batches, cfg.trainer.val_check_interval) == (2, 0.5)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert (trainer.limit_train_batches, trainer.gradient_clip_val) == (2, 1)


def test_data_workers_never_outnumber_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert compose_train(["dataset=mvtec", "dataset.root=/data"], tmp_path).dataset.num_workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert compose_train(["dataset=lgg_mri"], tmp_path).dataset.num_workers == 4


@pytest.mark.parametrize("variable", ["RANK", "LOCAL_RANK"])
def test_the_config_is_printed_and_saved_by_the_first_process_only(variable, tmp_path, monkeypatch, capsys):
    from uflow_exp.utils import print_config

    cfg = compose_train([], tmp_path)
    monkeypatch.setenv(variable, "1")  # another DDP rank, started by Lightning's launcher
    print_config(cfg, tmp_path / "other.yaml")
    assert capsys.readouterr().out == "" and not (tmp_path / "other.yaml").exists()
    monkeypatch.setenv(variable, "0")
    print_config(cfg, tmp_path / "first.yaml")
    assert "backbone" in capsys.readouterr().out and (tmp_path / "first.yaml").is_file()


def test_help_names_the_command_and_lists_only_real_options():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "uflow_exp", "--help"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.startswith("uflow_exp (train) is powered by Hydra") and "__main__" not in out
    (datasets,) = [line for line in out.splitlines() if line.startswith("dataset: ")]
    assert datasets == "dataset: btad, folder, lgg_mri, mvtec, stc, textures"


def test_the_configs_resolve_in_a_fresh_process_that_only_imports_the_config_dir():
    """tests/test_data.py once failed alone: the resolvers were registered by another module's import."""
    import subprocess
    import sys

    code = (
        "from hydra import compose, initialize_config_dir\n"
        "from omegaconf import OmegaConf\n"
        "from uflow_exp.utils import CONFIG_DIR\n"
        "with initialize_config_dir(config_dir=CONFIG_DIR, version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['dataset=folder', 'dataset.root=x'])\n"
        "print(OmegaConf.to_container(cfg.dataset, resolve=True)['num_workers'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) >= 0


def test_a_single_run_that_neither_trains_nor_tests_logs_no_error(tmp_path):
    """The ERROR about the optimised metric is for sweepers; a single run returns nothing to one."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "uflow_exp", "train=false", "test=false", "logger=csv",
         "backbone.pretrained=false", f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}",
         f"dataset.cache_dir={tmp_path / 'data'}", "dataset.n_train=4", "dataset.n_test_good=1",
         "dataset.n_test_defect=1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERROR" not in done.stdout + done.stderr


def test_bfloat16_training_only_where_the_hardware_runs_it_natively(tmp_path, monkeypatch):
    import torch

    from uflow_exp.utils import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags, native in [
        ("fpu avx512f avx512_bf16", True),
        ("fpu amx_bf16 amx_tile", True),
        ("fpu avx2", False),
    ]:
        (tmp_path / "cpuinfo").write_text(f"processor : 0\nflags\t\t: {flags}\n")
        assert config._native_bfloat16("auto", str(tmp_path / "cpuinfo")) is native
    assert not config._native_bfloat16("auto", str(tmp_path / "missing"))
    # a CUDA device decides unless the run asks for the CPU
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu avx2\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert config._native_bfloat16("auto", str(tmp_path / "cpuinfo"))
    assert not config._native_bfloat16("cpu", str(tmp_path / "cpuinfo"))
    monkeypatch.setattr(config, "_native_bfloat16", lambda accelerator: accelerator == "gpu")
    assert config._train_precision("cpu") == "32-true"
    assert config._train_precision("gpu") == "bf16-mixed"


def test_default_precision_follows_the_hardware_and_the_paper_stays_float32(tmp_path, monkeypatch):
    from uflow_exp.utils import config

    monkeypatch.setattr(config, "_native_bfloat16", lambda accelerator: accelerator == "auto")
    assert compose_train([], tmp_path).trainer.precision == "bf16-mixed"
    assert compose_train(["trainer=cpu"], tmp_path).trainer.precision == "32-true"
    assert compose_train(["experiment=paper"], tmp_path).trainer.precision == "32-true"


def test_the_wandb_logger_no_longer_passes_the_anonymous_setting(tmp_path):
    import hydra

    cfg = compose_train(["logger=wandb"], tmp_path)
    logger = hydra.utils.instantiate(cfg.logger.wandb)
    assert "anonymous" not in logger._wandb_init  # wandb warned about it on every run
    assert logger._wandb_init["project"] == "uflow_exp" and logger._offline
