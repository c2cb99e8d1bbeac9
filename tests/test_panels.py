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


def test_the_panels_of_a_run_share_one_colour_range_spanning_their_maps(tmp_path, monkeypatch):
    """The relative map lives near 0.5: a fixed [0, 1] colour range drew every panel flat; one range
    per panel would make a clean image as hot as a defect. All panels take the kept maps' min and max."""
    from types import SimpleNamespace

    import pytest
    import torch

    from uflow_exp.callbacks import test_images
    from uflow_exp.callbacks.test_images import TestImageLogger, panel_figure

    ranges = []
    monkeypatch.setattr(test_images, "render_panel", lambda *args: ranges.append(args[-1]))
    callback = TestImageLogger(max_images=4, output_dir=str(tmp_path))
    maps = torch.stack([torch.full((1, 8, 8), 0.45), torch.full((1, 8, 8), 0.5)])
    maps[0, 0, 0, 0], maps[1, 0, 3, 3] = 0.4, 0.9
    batch = {"image": torch.rand(2, 3, 8, 8), "label": torch.tensor([0, 1]), "has_mask": torch.ones(2) > 0,
             "path": ["a.png", "b.png"]}  # fmt: skip
    outputs = {"anomaly_map": maps, "mask": torch.zeros(2, 1, 8, 8, dtype=torch.bool),
               "segmentation": torch.zeros(2, 1, 8, 8, dtype=torch.bool)}  # fmt: skip
    callback.on_test_batch_end(None, None, outputs, batch, 0)
    callback.on_test_end(SimpleNamespace(is_global_zero=True, loggers=[]), SimpleNamespace())
    assert ranges == [pytest.approx((0.4, 0.9))] * 2

    figure = panel_figure(torch.zeros(3, 8, 8), None, maps[0, 0], maps[0, 0], "x", (0.4, 0.9))
    assert figure.axes[2].images[0].get_clim() == (0.4, 0.9)
    assert test_images.shared_map_range([torch.full((2, 2), 0.3)]) == pytest.approx((-0.2, 0.8))  # constant
