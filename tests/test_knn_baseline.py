"""The nearest-neighbour baseline that bench_accuracy measures the recipe against: its greedy coreset
is the textbook one, and it finds planted defects."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import knn_baseline  # noqa: E402


def textbook_greedy(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-center, every distance recomputed at every step."""
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    nearest = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(1))
    return torch.tensor(chosen)


@pytest.mark.parametrize("clustered", [False, True])
def test_the_pruned_coreset_is_the_textbook_greedy_coreset(clustered):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g) * torch.rand(4000, 1, generator=g)
    if clustered:  # patches of real images: tight groups, where the pruning skips most rows
        x = x * 0.05 + 3 * torch.randn(40, 16, generator=g)[torch.randint(40, (4000,), generator=g)]
    for k in (1, 50, 400):
        ours = knn_baseline.greedy_coreset(x, k, torch.Generator().manual_seed(3))
        assert torch.equal(ours, textbook_greedy(x, k, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="coreset of 0"):
        knn_baseline.greedy_coreset(x, 0, g)


def test_the_baseline_finds_planted_defects(tmp_path):
    from tests import fake_layouts

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=64)
    overrides = ["dataset=mvtec", f"dataset.root={root}", "backbone.input_size=64",
                 "model.eval_size=64", "dataset.num_workers=0"]  # fmt: skip
    for ratio, patches in ((1.0, 6 * 8 * 8), (0.1, round(0.1 * 6 * 8 * 8))):  # of 6 images' 8 x 8 patches
        metrics = knn_baseline.run(overrides, seed=0, coreset_ratio=ratio)
        assert metrics["test/pixel_auroc"] > 0.9 and metrics["test/image_auroc"] > 0.9
        assert metrics["memory_bank_patches"] == patches


def test_nearest_distances_are_the_distances_to_the_nearest_bank_row(monkeypatch):
    monkeypatch.setattr(knn_baseline, "DISTANCES_PER_CHUNK", 7 * 11)  # chunks of 7 queries
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(30, 5, generator=g), torch.randn(11, 5, generator=g)
    expected = torch.stack([min((q - b).norm() for b in bank) for q in queries])
    assert torch.allclose(knn_baseline.nearest_distances(queries, bank), expected, atol=1e-5)
    assert torch.allclose(knn_baseline.nearest_distances(bank, bank), torch.zeros(11), atol=1e-3)


def test_the_tiled_baseline_banks_every_tile_and_blends_the_test_maps(tmp_path):
    from tests import fake_layouts

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=(64, 96))
    overrides = ["dataset=mvtec", f"dataset.root={root}", "backbone.input_size=64", "model.eval_size=64",
                 "dataset.num_workers=0", "dataset.tiling={scale:native,overlap:0.25}"]  # fmt: skip
    metrics = knn_baseline.run(overrides, seed=0)
    assert metrics["memory_bank_patches"] == 6 * 2 * 8 * 8  # two 64 px tiles (columns 0 and 32) per image
    assert metrics["test/pixel_auroc"] > 0.9 and metrics["test/image_auroc"] > 0.9
