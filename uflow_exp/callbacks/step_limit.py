"""Validate the end of a run that ``trainer.max_steps`` stops in the middle of an epoch."""

from __future__ import annotations

import lightning as L


class ValidateAtStepLimit(L.Callback):
    """Lightning ends a run at ``max_steps`` without validating the steps taken since the last epoch
    ended, so neither the checkpoint callback nor the test would see them (and a run shorter than one
    epoch would have no checkpoint at all). On the last step this asks the loop to stop, which makes
    Lightning validate first, as it does for early stopping; on an epoch's last batch that is the
    epoch's own validation, run once."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
