"""Resuming an interrupted run, multirun sweeps, Optuna, DDP on CPU and W&B offline logging."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from tests import fake_layouts
from tests.framework_helpers import TINY, compose_train
from uflow_exp.tasks.train import train

REPO = Path(__file__).resolve().parents[1]


class CrashAtEpoch(L.Callback):
    """Simulates a crash (power cut, OOM kill) at the start of an epoch."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at epoch {self.epoch}")


class RecordEpochs(L.Callback):
    """Appends each epoch the trainer runs to ``EPOCHS_RUN``."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        EPOCHS_RUN.append(trainer.current_epoch)


EPOCHS_RUN: list[int] = []


def assert_same_state(a: dict, b: dict, rel: float = 1e-6) -> None:
    """Equal nested checkpoint states: tensors to ``rel`` of their largest magnitude, the rest exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key], rel)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y, rel)
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = a.abs().max().item() if a.numel() and a.is_floating_point() else 0.0
        assert torch.allclose(a, b, rtol=0, atol=rel * scale) if a.is_floating_point() else torch.equal(a, b)
    else:
        assert a == b


def test_resume_from_last_checkpoint_continues_where_the_run_stopped(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=10, size=64)
    overrides = [*TINY, "dataset=mvtec", f"dataset.root={root}", "trainer.max_epochs=3"]
    recorder = {"_target_": f"{__name__}.RecordEpochs"}
    straight_cfg = compose_train(overrides, tmp_path / "straight")
    assert straight_cfg.trainer.max_steps > 0  # the recipe's step limit, which Lightning resumes its own way
    with open_dict(straight_cfg):
        straight_cfg.callbacks.record = recorder
    straight = train(straight_cfg)

    crashing = compose_train(overrides, tmp_path / "resumed")
    with open_dict(crashing):
        crashing.callbacks.crash = {"_target_": f"{__name__}.CrashAtEpoch", "epoch": 2}
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing)
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1  # the last finished epoch

    EPOCHS_RUN.clear()
    # the resuming command gets a folder of its own (a new timestamp), as on the command line
    resumed_cfg = compose_train([*overrides, f"ckpt_path={last}"], tmp_path / "resuming_command")
    with open_dict(resumed_cfg):
        resumed_cfg.callbacks.record = recorder
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dirpath has changed")
        resumed = train(resumed_cfg)
    assert EPOCHS_RUN == [2]  # only the epoch the crash lost, not a retraining from scratch
    # ...and the run goes on in its own folder: one set of checkpoints, the best one over all epochs
    assert not (tmp_path / "resuming_command" / "checkpoints").exists()
    names = lambda run: sorted(p.name for p in (run / "checkpoints").iterdir())  # noqa: E731
    assert names(tmp_path / "resumed") == names(tmp_path / "straight")
    assert (tmp_path / "resumed" / "metrics.json").is_file()
    # the weights and the optimiser's moments are those of the uninterrupted run
    ends = [
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        for run in (tmp_path / "straight", tmp_path / "resumed")
    ]
    assert_same_state(ends[0]["state_dict"], ends[1]["state_dict"])
    assert_same_state(ends[0]["optimizer_states"], ends[1]["optimizer_states"])
    assert set(resumed) == set(straight)
    for key in straight:
        if key.startswith(("test/", "val/", "train/")):
            assert resumed[key] == pytest.approx(straight[key], rel=1e-5, nan_ok=True), key


def run_cli(
    args: list[str], cwd: Path, timeout: int = 900, returncode: int = 0
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(cwd), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "uflow_exp", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == returncode, result.stderr[-4000:]
    return result


CLI_TINY = [o for o in TINY if not o.startswith("~")] + ["callbacks=none"]


@pytest.mark.slow
def test_multirun_of_two_experiments_keeps_each_result(tmp_path):
    root = tmp_path / "mvtec"
    for category in ("bottle", "cable"):
        fake_layouts.make_mvtec(root, category=category, n_train=6, size=64)
    run_cli(
        ["-m", "experiment=mvtec", "dataset.category=bottle,cable", *CLI_TINY, f"dataset.root={root}"],
        tmp_path,
    )
    jobs = sorted((tmp_path / "logs" / "train" / "multiruns").glob("*/*/metrics.json"))
    assert len(jobs) == 2
    for job in jobs:
        assert "test/pixel_auroc" in json.loads(job.read_text())


@pytest.mark.slow
def test_a_failing_job_does_not_lose_the_others(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "mvtec", n_train=6, size=64)
    roots = f"dataset.root={tmp_path / 'missing'},{root}"  # the failing job first: the next one still runs
    result = run_cli(["-m", roots, *CLI_TINY, "dataset=mvtec"], tmp_path, returncode=1)
    sweep = next((tmp_path / "logs" / "train" / "multiruns").glob("*"))
    assert "missing" in (sweep / "0" / "error.txt").read_text()
    assert (sweep / "1" / "metrics.json").is_file()
    assert "1 job(s) of the multirun" in result.stderr and f"{sweep / '0'}:" in result.stderr


@pytest.mark.slow
def test_optuna_search_runs_two_trials(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "mvtec", n_train=6, size=64)
    run_cli(
        [
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            *CLI_TINY,
            "dataset=mvtec",
            f"dataset.root={root}",
            "dataset.batch_size=4",
        ],
        tmp_path,
    )
    sweep = next((tmp_path / "logs" / "train" / "multiruns").glob("*"))
    assert len(list(sweep.glob("*/metrics.json"))) == 2
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in best and "model.optimizer.lr" in best


@pytest.mark.slow
def test_optuna_search_records_a_failed_trial_and_goes_on(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "mvtec", n_train=6, size=64)
    missing = tmp_path / "missing"
    # the search space gets a data root that does not exist; the sampler's seed 5 draws it for trial 1
    # of 3, so the search must go on after a failure
    search = tmp_path / "conf" / "hparams_search"
    search.mkdir(parents=True)
    (search / "optuna_with_failures.yaml").write_text(
        "# @package _global_\ndefaults:\n  - optuna\n"
        f"hydra:\n  sweeper:\n    params:\n      dataset.root: choice({root}, {missing})\n"
    )
    result = run_cli(
        [
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "hparams_search=optuna_with_failures",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.n_startup_trials=3",
            "seed=5",
            *CLI_TINY,
            "dataset=mvtec",
        ],
        tmp_path,
        returncode=1,
    )
    sweep = next((tmp_path / "logs" / "train" / "multiruns").glob("*"))
    finished = {p.parent.name for p in sweep.glob("*/metrics.json")}
    failed = {p.parent.name for p in sweep.glob("*/error.txt")}
    assert (finished, failed) == ({"0", "2"}, {"1"})  # every trial ran
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_params["dataset.root"] == str(root)
    assert {job.job for job in results.failed_jobs} == failed
    assert all("missing" in job.error for job in results.failed_jobs)
    assert "Values were told" not in result.stderr


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_counts_each_test_image_once(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "mvtec", n_train=8, n_test_good=3, size=64)
    cli = [o for o in CLI_TINY if not o.startswith("trainer=")]
    features = tmp_path / "features"
    result = run_cli(
        [
            *cli,
            "trainer=ddp_cpu",
            "trainer.max_epochs=1",
            "dataset=mvtec",
            f"dataset.root={root}",
            # feature_cache=true: under DDP one disk cache, each process filling every second row
            f"feature_cache_dir={features}",
        ],
        tmp_path,
    )
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    (folder,) = features.iterdir()  # one folder, no leftover temporary one
    assert np.load(folder / "filled.npy").all()
    output = result.stdout + result.stderr
    shares = [f"computed the features of 4 images in .* s \\(process {rank} of 2\\)" for rank in (0, 1)]
    assert all(re.search(share, output) for share in shares), output[-3000:]  # 8 images, 4 each
    # 5 test images on 2 processes: each counted once, so the metrics are those of one process
    # evaluating the same checkpoint
    from uflow_exp.tasks.evaluate import evaluate

    data = ["dataset=mvtec", f"dataset.root={root}", "dataset.num_workers=0"]
    (ckpt,) = run.rglob("*.ckpt")  # callbacks=none: Lightning's own checkpoint of the one epoch
    single = evaluate(
        compose_train([*data, "logger=csv", "trainer=cpu", f"ckpt_path='{ckpt}'"], tmp_path / "eval", "eval")
    )
    tested = [key for key in metrics if key.startswith("test/")]
    assert "test/pixel_auroc" in tested and "test/image_auroc" in tested
    for key in tested:
        assert metrics[key] == pytest.approx(single[key], rel=1e-6, nan_ok=True), key


def read_wandb_records(path: Path):
    """The protobuf records of a W&B run file, decoded with wandb's own ``Record`` schema.

    wandb >= 0.20 moved its Python reader of these files into its Go core, so the framing
    (LevelDB log format: 32 KiB blocks, 7-byte record headers, after a 7-byte ':W&B' file header)
    is undone here by hand.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, header, offset, pending = 32768, 7, 7, b""
    while offset + header <= len(data):
        if block - offset % block < header:  # block tail too short for a header: padding
            offset += block - offset % block
            continue
        length, kind = struct.unpack("<HB", data[offset + 4 : offset + 7])
        chunk = data[offset + header : offset + header + length]
        offset += header + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "mvtec", n_train=6, size=64)
    cli = [o for o in CLI_TINY if not o.startswith("logger=")]
    run_cli([*cli, "logger=wandb", "dataset=mvtec", f"dataset.root={root}"], tmp_path)
    run_dir = next((tmp_path / "logs" / "train" / "runs").glob("*"))
    expected = json.loads((run_dir / "metrics.json").read_text())
    logged: dict[str, float] = {}
    for record in read_wandb_records(next(run_dir.glob("wandb/offline-run-*/run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        items = (
            record.history.item if kind == "history" else record.summary.update if kind == "summary" else []
        )
        for item in items:
            value = json.loads(item.value_json)
            if isinstance(value, int | float):
                logged[item.key or "/".join(item.nested_key)] = float(value)
    for key in ("test/pixel_auroc", "test/image_auroc", "val/loss"):
        assert logged[key] == pytest.approx(expected[key], rel=1e-6), key


@pytest.mark.slow
def test_sweep_jobs_get_wandb_names_and_summary_columns_of_their_overrides(tmp_path):
    from uflow_exp.summarize import collect, summary_rows

    root = fake_layouts.make_mvtec(tmp_path / "mvtec", n_train=6, size=64)
    cli = [o for o in CLI_TINY if not o.startswith("logger=")]
    sweep_args = [
        "-m",
        "model.optimizer.lr=1e-3,2e-3",
        "logger=wandb",
        "dataset=mvtec",
        f"dataset.root={root}",
    ]
    run_cli([*sweep_args, *cli], tmp_path)
    sweep = next((tmp_path / "logs" / "train" / "multiruns").glob("*"))
    names = {}
    for job in ("0", "1"):
        (run_file,) = (sweep / job).glob("wandb/offline-run-*/run-*.wandb")
        runs = [r.run for r in read_wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
        names[job] = runs[0].display_name
    assert names["0"].startswith("train-mvtec-bottle-0 ") and "model.optimizer.lr=0.001" in names["0"]
    assert names["1"].startswith("train-mvtec-bottle-1 ") and "model.optimizer.lr=0.002" in names["1"]
    assert str(root) not in names["0"]  # paths are left out of the name
    rows = summary_rows(collect(sweep))
    assert [r.overrides for r in rows[:2]] == ["model.optimizer.lr=0.001", "model.optimizer.lr=0.002"]
    assert all(r.val_loss is not None for r in rows[:2]) and rows[-1].mean_of == "2 of 2 finished"


@pytest.mark.slow
def test_a_crash_loses_one_epoch_even_after_the_validation_loss_stopped_improving(tmp_path):
    """Lightning's save_last writes last.ckpt only with a new best checkpoint (2.6); the run's last.ckpt
    must still be its last finished epoch when the best is an older one."""
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=10, size=64)
    # "best" = the largest validation loss, which falls from epoch to epoch: epoch 0 stays the best
    overrides = [*TINY, "dataset=mvtec", f"dataset.root={root}", "trainer.max_epochs=3"]
    cfg = compose_train([*overrides, "callbacks.model_checkpoint.mode=max"], tmp_path / "run")
    with open_dict(cfg):
        cfg.callbacks.crash = {"_target_": f"{__name__}.CrashAtEpoch", "epoch": 2}
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 1


def test_sigterm_exits_non_zero_and_says_how_to_resume(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "mvtec", n_train=6, size=64)
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    cli = [o for o in CLI_TINY if not o.startswith(("callbacks=", "trainer.max_epochs"))]
    process = subprocess.Popen(
        [sys.executable, "-m", "uflow_exp", *cli, "~callbacks.progress_bar", "~callbacks.model_summary",
         "~callbacks.early_stopping", "dataset=mvtec", f"dataset.root={root}", "trainer.max_epochs=500"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    runs = tmp_path / "logs" / "train" / "runs"
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.5)  # the first epoch's checkpoint: something to resume from
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 143, out[-3000:]
    (last,) = runs.glob("*/checkpoints/last.ckpt")
    assert f"ckpt_path={last}" in out and "stopped by SIGTERM" in out


def test_ckpt_path_last_stays_within_the_experiment(tmp_path):
    from uflow_exp.utils import find_last_checkpoint

    def run(folder: str, dataset: str, category: str | None, age: int) -> Path:
        ckpt = tmp_path / "train" / folder / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
        os.utime(ckpt, (time.time() - age, time.time() - age))
        config = {"dataset": {"layout": dataset, "category": category}}
        (ckpt.parent.parent / "config_resolved.yaml").write_text(OmegaConf.to_yaml(config))
        return ckpt

    old_brick = run("runs/a", "textures", "brick", age=300)
    new_brick = run("runs/b", "textures", "brick", age=200)
    run("runs/c", "mvtec", "bottle", age=100)  # newer, another data set
    run("multiruns/d/0", "textures", "brick", age=0)  # newest, a sweep's job
    assert find_last_checkpoint(tmp_path, "train", "textures", "brick") == new_brick != old_brick
    with pytest.raises(FileNotFoundError, match="dataset textures, category grass"):
        find_last_checkpoint(tmp_path, "train", "textures", "grass")


@pytest.mark.slow
def test_a_run_prints_each_message_once_and_no_product_tips(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "mvtec", n_train=6, size=64)
    result = run_cli([*CLI_TINY, "dataset=mvtec", f"dataset.root={root}"], tmp_path)
    out = result.stdout + result.stderr
    assert out.count("Seed set to 42") == 1 and out.count("GPU available: False") == 1
    assert "Tip:" not in out and "LeafSpec" not in out
    (log,) = (tmp_path / "logs" / "train" / "runs").glob("*/train.log")
    assert "GPU available: False" in log.read_text()  # Lightning's messages reach the run's log file


@pytest.mark.slow
def test_a_wrong_data_root_is_one_message_without_traceback(tmp_path):
    missing = tmp_path / "nope"
    result = run_cli(["dataset=folder", f"dataset.root={missing}", *CLI_TINY], tmp_path, returncode=1)
    out = result.stdout + result.stderr
    assert f"DatasetNotFoundError: folder: no folder {missing}. Expected layout: ROOT/<normal_dir>" in out
    assert "Traceback" not in out
    # the files are listed before torch and Lightning load: the error comes before any of their lines
    assert "lightning" not in out.lower() and "Seed set" not in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset=folder", "folder: dataset.root is not set. Expected layout: ROOT/<normal_dir>"),
        ("trainer.max_epochs=ten", "ConfigValueError: trainer.max_epochs='ten': expected an integer >= -1"),
        ("backbone.weights=/nope.pth", "ConfigValueError: backbone.weights: /nope.pth is not a file"),
        ("ckpt_path=/nope.ckpt", "CheckpointNotFoundError: ckpt_path=/nope.ckpt: no such checkpoint file"),
    ],
)
def test_a_usage_error_loads_neither_torch_nor_lightning(override, message, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import runpy, sys\n"
        f"sys.argv = ['uflow_exp', '{override}', 'logger=csv', 'hydra.run.dir={tmp_path}']\n"
        "try:\n"
        "    runpy.run_module('uflow_exp', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print('EXIT', exit.code, 'torch' in sys.modules, 'lightning' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert "EXIT 1 False False" in result.stdout, result.stdout + result.stderr[-2000:]
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
