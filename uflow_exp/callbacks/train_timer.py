"""Images per second of the training loop alone, as ``time/train_images_per_s``.

Timed from the start of each training epoch to the end of its last batch, so data loading and the
training steps count and validation does not; summed over the epochs of the run. Imports Lightning
only, so that ``benchmarks/peer_anomalib.py`` can time another tool's training the same way.
"""

from __future__ import annotations

import time

import lightning as L


def batch_images(batch) -> int:
    """Images in a batch: this project's dict of tensors, or an object with an ``image`` tensor."""
    if isinstance(batch, dict):
        return len(batch["label"])
    return int(batch.image.shape[0])


class TrainLoopTimer(L.Callback):
    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._epoch_start = 0.0
        self._last_batch_end = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_batch_end = time.perf_counter()
        self.images += batch_images(batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds += self._last_batch_end - self._epoch_start
        if self.seconds > 0:
            pl_module.log("time/train_images_per_s", self.images / self.seconds, sync_dist=False)
