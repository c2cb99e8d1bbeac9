"""Test panels: what a reader of each panel sees, and how W&B receives them."""


def test_a_panel_without_a_mask_says_so_and_curves_get_their_own_wandb_key(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from uflow_exp.callbacks import test_images
    from uflow_exp.callbacks.test_images import TestImageLogger, panel_figure

    blank = torch.zeros(8, 8)
    titles = [ax.get_title() for ax in panel_figure(torch.zeros(3, 8, 8), None, blank, blank, "x").axes][:4]
    assert titles == ["image", "no mask (labelled anomalous)", "anomaly map", "automatic mask"]

    class FakeWandb:
        def __init__(self):
            self.logged = []

        def log_image(self, key, images, caption):
            self.logged.append((key, len(images)))

    monkeypatch.setattr(test_images, "WandbLogger", FakeWandb)
    callback, wandb = TestImageLogger(max_images=4, output_dir=str(tmp_path)), FakeWandb()
    batch = {"image": torch.rand(2, 3, 8, 8), "label": torch.ones(2), "has_mask": torch.tensor([True, False]),
             "path": ["a.png", "b.png"]}  # fmt: skip
    outputs = {"anomaly_map": torch.rand(2, 1, 8, 8), "mask": torch.zeros(2, 1, 8, 8, dtype=torch.bool),
               "segmentation": torch.zeros(2, 1, 8, 8, dtype=torch.bool)}  # fmt: skip
    callback.on_test_batch_end(None, None, outputs, batch, 0)
    assert [sample["mask"] is None for sample in callback._chosen()] == [False, True]
    curves = {"roc": (torch.linspace(0, 1, 5), torch.linspace(0, 1, 5))}
    callback.on_test_end(
        SimpleNamespace(is_global_zero=True, loggers=[wandb]), SimpleNamespace(test_curves=curves)
    )
    assert wandb.logged == [("test/examples", 2), ("test/curves", 1)]
    assert len(list(tmp_path.glob("*.png"))) == 3
