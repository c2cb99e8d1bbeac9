"""`python -m uflow_exp.export ckpt_path=PATH [format=onnx] [output=FILE]`: a deployable anomaly-map graph."""

import hydra
from omegaconf import DictConfig

from uflow_exp.utils import CONFIG_DIR, quiet_expected_warnings, run_task

quiet_expected_warnings()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    from uflow_exp.tasks.export import export

    run_task(export, cfg, multirun=False)


if __name__ == "__main__":
    main()
