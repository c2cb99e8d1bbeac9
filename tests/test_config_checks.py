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


def test_feature_levels_the_backbone_lacks_are_named_with_the_ones_it_has():
    from uflow_exp.models.uflow.feature_extraction import check_backbone

    check_backbone("resnet18", [1, 2, 3], pretrained=False, weights=None)
    with pytest.raises(ConfigValueError, match=r"backbone.layers=\[1, 2, 3, 5\]: resnet18 has feature levels "
                       r"0 \(stride 2\), 1 \(stride 4\), .*4 \(stride 32\)$"):  # fmt: skip
        check_backbone("resnet18", [1, 2, 3, 5], pretrained=False, weights=None)
    with pytest.raises(ConfigValueError, match="unknown backbone 'resnet1'"):
        check_backbone("resnet1", None, pretrained=False, weights=None)


def test_hub_weights_that_cannot_be_had_fail_in_seconds(monkeypatch, tmp_path):
    import huggingface_hub

    from uflow_exp.models.uflow import feature_extraction as fe

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fe, "hub_unreachable", lambda: "the hub does not answer")
    message = "weights of resnet18, which are not cached here, and the hub does not answer. Give local files"
    with pytest.raises(fe.BackboneWeightsError, match=message):
        fe.check_backbone("resnet18", None, pretrained=True, weights=None)
    with pytest.raises(fe.BackboneWeightsError, match="weights of cait_m48_448, cait_s24_224, which"):
        fe.check_backbone("mcait", None, pretrained=True, weights=None)
    # no check needed: random weights, a local file, the offline Lite0 package
    fe.check_backbone("resnet18", None, pretrained=False, weights=None)
    fe.check_backbone("resnet18", None, pretrained=True, weights="w.pth")
    fe.check_backbone("efficientnet_lite0", [1, 2, 3, 4], pretrained=True, weights=None)
    # weights in torch.hub's cache load without the hub
    url = fe.timm.models.get_pretrained_cfg("resnet18").url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    fe.check_backbone("resnet18", None, pretrained=True, weights=None)
    # and a reachable hub lets the download happen later
    monkeypatch.setattr(fe, "hub_unreachable", lambda: None)
    fe.check_backbone("wide_resnet50_2", None, pretrained=True, weights=None)


@pytest.mark.parametrize("devices", [1, 2])
def test_a_gpu_run_without_enough_gpus_fails_before_anything_loads(devices, tmp_path, monkeypatch):
    import torch

    from uflow_exp.utils.checks import check_accelerator

    cfg = compose_train(["trainer=gpu", f"trainer.devices={devices}"], tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    if devices == 1:
        check_accelerator(cfg)
    else:
        with pytest.raises(ConfigValueError, match="trainer.devices=2: 1 CUDA device"):
            check_accelerator(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigValueError, match="trainer.accelerator=gpu .*: 0 CUDA device.*use trainer=cpu"):
        check_accelerator(cfg)
    check_accelerator(compose_train(["trainer=cpu"], tmp_path))
