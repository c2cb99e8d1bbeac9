"""Helpers shared by the tasks: resolvers, instantiation, config printing, run bookkeeping."""

from uflow_exp.utils.config import CONFIG_DIR, print_config, quiet_expected_warnings
from uflow_exp.utils.runs import (
    find_last_checkpoint,
    instantiate_dict,
    require_checkpoint,
    run_task,
    write_metrics,
)

__all__ = [
    "CONFIG_DIR",
    "find_last_checkpoint",
    "instantiate_dict",
    "print_config",
    "quiet_expected_warnings",
    "require_checkpoint",
    "run_task",
    "write_metrics",
]
