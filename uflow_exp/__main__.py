"""`python -m uflow_exp [overrides]`: train and test (see conf/train.yaml)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from uflow_exp.utils import CONFIG_DIR, quiet_expected_warnings, register_resolvers, run_task

register_resolvers()
quiet_expected_warnings()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from uflow_exp.tasks.train import train

    metrics = run_task(train, cfg, multirun=HydraConfig.get().mode == RunMode.MULTIRUN)
    name = cfg.get("optimized_metric")
    # what a sweeper optimises (NaN for a failed job, which Optuna records as a failed trial)
    return metrics.get(name, float("nan")) if name else None


if __name__ == "__main__":
    main()
