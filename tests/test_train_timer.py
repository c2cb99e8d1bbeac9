"""TrainLoopTimer counts the training loop's images and seconds, and not what follows the last batch
(validation, checkpointing)."""

from types import SimpleNamespace

import pytest
import torch

from uflow_exp.callbacks import train_timer
from uflow_exp.callbacks.train_timer import TrainLoopTimer, batch_images


class Clock:
    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


class Module:
    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def test_images_per_second_of_the_training_loop_only(monkeypatch):
    # epoch 1: starts at 0, batches end at 1 and 3, validation until 10; epoch 2: 10, batch ends at 12
    monkeypatch.setattr(train_timer.time, "perf_counter", Clock([0.0, 1.0, 3.0, 10.0, 12.0]))
    timer, module = TrainLoopTimer(), Module()
    batch = {"label": torch.zeros(4)}
    timer.on_train_epoch_start(None, module)
    timer.on_train_batch_end(None, module, None, batch, 0)
    timer.on_train_batch_end(None, module, None, batch, 1)
    timer.on_train_epoch_end(None, module)
    assert module.logged["time/train_images_per_s"] == pytest.approx(8 / 3)
    timer.on_train_epoch_start(None, module)
    timer.on_train_batch_end(None, module, None, {"label": torch.zeros(2)}, 0)
    timer.on_train_epoch_end(None, module)
    assert module.logged["time/train_images_per_s"] == pytest.approx(10 / 5)


def test_batch_images_reads_dicts_and_batch_objects():
    assert batch_images({"label": torch.zeros(3), "image": torch.zeros(3, 3, 8, 8)}) == 3
    assert batch_images(SimpleNamespace(image=torch.zeros(5, 3, 8, 8))) == 5


def test_each_epoch_logs_one_line_with_its_losses_seconds_and_rate(monkeypatch, caplog):
    from uflow_exp.callbacks import epoch_log

    monkeypatch.setattr(epoch_log.time, "perf_counter", Clock([0.0, 4.0, 8.0]))
    trainer = SimpleNamespace(
        is_global_zero=True, current_epoch=2, max_epochs=12, global_step=36, max_steps=300,
        callback_metrics={"train/loss": torch.tensor(-31234.56), "val/loss": torch.tensor(-2987.1)},
    )  # fmt: skip
    callback = epoch_log.EpochLog()
    caplog.set_level("INFO", logger="uflow_exp")
    callback.on_train_epoch_start(trainer, None)
    for _ in range(3):
        callback.on_train_batch_end(trainer, None, None, {"label": torch.zeros(4)}, 0)
    callback.on_train_epoch_end(trainer, None)
    line = "Epoch 3/12, step 36/300: train/loss -31234.6, val/loss -2987.1; 4.0 s (validation included), 3.0"
    assert caplog.messages == [f"{line} training images/s"]
    trainer.is_global_zero = False  # other DDP ranks stay quiet
    callback.on_train_epoch_end(trainer, None)
    assert len(caplog.messages) == 1
    trainer.is_global_zero, trainer.max_steps = True, -1  # no step limit: epochs only
    callback.on_train_epoch_end(trainer, None)
    assert caplog.messages[-1].startswith("Epoch 3/12: train/loss")
