"""One log line per training epoch (epoch, losses, seconds, training images/s), so a run whose output
goes to a file (nohup, Slurm, ``train.log``) shows its progress without a terminal's progress bar."""

from __future__ import annotations

import logging
import time

import lightning as L

from uflow_exp.callbacks.train_timer import batch_images

log = logging.getLogger("uflow_exp")


class EpochLog(L.Callback):
    def __init__(self) -> None:
        self._start = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += batch_images(batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning runs this after the epoch's validation: both losses are known
        if not trainer.is_global_zero:
            return
        seconds = time.perf_counter() - self._start
        losses = ", ".join(
            f"{name} {float(trainer.callback_metrics[name]):.6g}"
            for name in ("train/loss", "val/loss")
            if name in trainer.callback_metrics
        )
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        steps = f", step {trainer.global_step}/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        rate = self._images / max(seconds, 1e-9)
        log.info(
            "Epoch %d/%s%s: %s; %.1f s (validation included), %.1f training images/s",
            trainer.current_epoch + 1, total, steps, losses or "no loss logged", seconds, rate,
        )  # fmt: skip
