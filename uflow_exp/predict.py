"""`python -m uflow_exp.predict ckpt_path=PATH input=DIR_or_glob output=DIR`: maps, masks and scores.

Exits with status 1 when any input file could not be read (the others are still predicted).
"""

import sys

import hydra
from omegaconf import DictConfig

from uflow_exp.utils import CONFIG_DIR, quiet_expected_warnings, run_task

quiet_expected_warnings()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    from uflow_exp.tasks.predict import predict

    if run_task(predict, cfg, multirun=False)["failed"]:
        sys.exit(1)  # the failures are already logged by name; scripts need the status


if __name__ == "__main__":
    main()
