"""check_run_config: a wrong value is named with what was expected; the shipped configs pass."""

import pytest

from tests.framework_helpers import compose_train
from uflow_exp.utils.checks import ConfigValueError, check_run_config
from uflow_exp.utils.runs import CheckpointNotFoundError


@pytest.mark.parametrize(
    "override",
    [
        [],
        ["experiment=paper"],
        ["experiment=mvtec"],
        ["backbone=mcait"],
        ["trainer.max_epochs=-1"],
        ["ckpt_path=last"],
    ],
)
def test_shipped_configs_pass(override, tmp_path):
    check_run_config(compose_train(override, tmp_path))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=1.5", "trainer.max_epochs=1.5: expected an integer >= -1"),
        ("trainer.max_epochs=-2", "trainer.max_epochs=-2: expected an integer >= -1"),
        ("dataset.batch_size=0", "dataset.batch_size=0: expected an integer >= 1"),
        ("dataset.batch_size=true", "dataset.batch_size=True: expected an integer >= 1"),
        ("dataset.num_workers=-1", "dataset.num_workers=-1: expected an integer >= 0"),
        ("backbone.input_size=abc", "backbone.input_size='abc': expected an integer >= 16"),
        ("flow.flow_steps=0", "flow.flow_steps=0: expected an integer >= 1"),
        ("model.optimizer.lr=0", r"model.optimizer.lr=0: expected a number > 0.0"),
        ("model.optimizer.lr=fast", r"model.optimizer.lr='fast': expected a number > 0.0"),
    ],
)
def test_a_wrong_number_is_named_with_what_was_expected(override, message, tmp_path):
    with pytest.raises(ConfigValueError, match=message.replace("[", r"\[")):
        check_run_config(compose_train([override], tmp_path))


def test_missing_weights_files_and_checkpoints_are_named(tmp_path):
    present = tmp_path / "present.pth"
    present.write_bytes(b"")
    check_run_config(compose_train([f"backbone.weights={present}"], tmp_path))
    missing = tmp_path / "missing.pth"
    with pytest.raises(ConfigValueError, match=f"backbone.weights: {missing} is not a file"):
        check_run_config(
            compose_train(["backbone=mcait", f"backbone.weights=[{present},{missing}]"], tmp_path)
        )
    with pytest.raises(CheckpointNotFoundError, match="ckpt_path=.*nope.ckpt: no such checkpoint file"):
        check_run_config(compose_train([f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path))
