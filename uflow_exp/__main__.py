"""`python -m uflow_exp [overrides]`: train and test (see conf/train.yaml)."""

import logging
import math

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from uflow_exp.utils import CONFIG_DIR, quiet_expected_warnings, run_task
from uflow_exp.utils.runs import route_lightning_logs

log = logging.getLogger("uflow_exp")
quiet_expected_warnings()


def checked_train(cfg: DictConfig) -> dict[str, float]:
    """Check the config's values and list the data set's files first, with light imports, so that a
    wrong value, root or layout fails in about a second; then the accelerator, the backbone's feature
    levels and whether its weights can be had (torch and timm, seconds); only then load Lightning and
    train."""
    from uflow_exp.data.layouts import preflight
    from uflow_exp.utils.checks import check_accelerator, check_run_config

    check_run_config(cfg)
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    for key in OmegaConf.missing_keys(cfg.dataset):  # `root: ???` not given: the layout says so
        dataset[key.removeprefix("dataset.")] = None
    preflight(dataset)
    check_accelerator(cfg)
    from uflow_exp.models.uflow.feature_extraction import check_backbone

    backbone = cfg.backbone
    check_backbone(
        backbone.name, backbone.get("layers"), backbone.get("pretrained", True), backbone.get("weights")
    )
    from uflow_exp.tasks.train import train

    route_lightning_logs()  # Lightning is loaded only now: its own console handlers go now
    return train(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    metrics = run_task(checked_train, cfg, multirun=multirun)
    name = cfg.get("optimized_metric")
    if not name or not multirun:  # only a sweeper reads the returned value
        return None
    value = metrics.get(name)
    if value is None or not math.isfinite(value):
        # A value that is not a float makes the Optuna sweeper record a failed trial and go on; NaN
        # would not (optuna 2.10 fails the trial inside `tell`, and the sweeper's second `tell` raises).
        log.error("%s is %s for this job: the sweeper records it as failed", name, value)
        return None
    return value


if __name__ == "__main__":
    main()
