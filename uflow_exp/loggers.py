"""Logger classes the configs name (conf/logger/)."""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger without the ``anonymous=None`` it always hands to ``wandb.init``: wandb
    no longer takes the setting and warned "The anonymous setting has no effect" on every run."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            del self._wandb_init["anonymous"]
