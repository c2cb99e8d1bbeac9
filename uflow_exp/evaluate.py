"""`python -m uflow_exp.evaluate ckpt_path=PATH [dataset=...]`: a checkpoint's test metrics."""

import hydra
from omegaconf import DictConfig

from uflow_exp.utils import CONFIG_DIR, quiet_expected_warnings, run_task

quiet_expected_warnings()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from uflow_exp.tasks.evaluate import evaluate

    run_task(evaluate, cfg, multirun=False)


if __name__ == "__main__":
    main()
