"""Tests of the a-contrario segmentation: exactness against the reference fixtures and a naive
simulation of the prune/merge procedure, and detection behaviour on synthetic latents."""

import functools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from skimage.morphology import max_tree
from torch.nn import functional as F

import uflow_exp.nfa.tree as nfa_tree
from tests.conftest import shared_path
from uflow_exp.nfa import block_nfa, log_number_of_tests, tree_nfa


@functools.cache
def _fixture(name: str) -> dict:
    data = torch.load(shared_path("fixtures", name), weights_only=False)
    return data["resnet18"] if "resnet18" in data else data


def _assert_matches_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    # bit for bit, infinities included: the same float operations in the same order as the authors'
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.equal(out, ref)
    assert not torch.isnan(out).any()


FIXTURE_CASES = [
    pytest.param("uflow_reference_resnet18.pt", id="resnet18"),
    pytest.param("nfa_reference_mcait.pt", id="mcait"),
]


def _target(ref: dict) -> int:
    return int(ref.get("target_size", ref["neg_log_nfa_tree"].shape[-1]))


@pytest.mark.parametrize("name", FIXTURE_CASES)
def test_tree_nfa_matches_reference(name):
    ref = _fixture(name)
    out = tree_nfa(list(ref["z"]), _target(ref))
    _assert_matches_reference(out, ref["neg_log_nfa_tree"])
    # The fixtures include a normal image (no detection) and planted anomalies (detections).
    detected = (out > 0).flatten(1).any(dim=1)
    assert not detected[0] and detected.any()


@pytest.mark.parametrize("name", FIXTURE_CASES)
def test_block_nfa_matches_reference(name):
    ref = _fixture(name)
    args = ref.get("block_args", {"win_size": 5, "binomial_probability_thr": 0.9})
    out = block_nfa(
        list(ref["z"]), _target(ref), win_size=args["win_size"], probability=args["binomial_probability_thr"]
    )
    assert out.dtype == torch.float64
    _assert_matches_reference(out, ref["nfa_block"])


@pytest.mark.parametrize("name", FIXTURE_CASES)
def test_log_number_of_tests_matches_reference(name):
    ref = _fixture(name)
    sizes = [int(zs.shape[-2] * zs.shape[-1]) for zs in ref["z"]]
    assert log_number_of_tests(sizes) == pytest.approx(ref["log_n_tests"], abs=1e-3)


def test_log_number_of_tests_small_sizes_direct_sum():
    sizes = [3, 7]
    direct = sum(n * sum(0.316915 * 4.062570**r / r for r in range(1, n + 1)) for n in sizes)
    assert log_number_of_tests(sizes) == pytest.approx(math.log10(direct), abs=1e-4)
    assert log_number_of_tests([784, 196]) == pytest.approx(476.9237, abs=1e-3)


def _naive_region_log_prob_map(zi: torch.Tensor, clip: bool = False, by_size: bool = False) -> np.ndarray:
    """Direct node-by-node simulation of the procedure in the method doc, for cross-checking.
    ``clip`` and ``by_size`` are the options of ``tree_nfa`` (log P = 0 for t < 1; plus the log10
    number of polyominoes of the region's size in this latent).

    Nodes are the canonical pixels of skimage's max-tree, visited in traverser order; prune and merge
    passes edit explicit parent/children dicts exactly as the procedure is stated.
    """
    channels = zi.shape[0]
    score = torch.mean(zi**2, dim=0).numpy()
    s = np.sum(zi.reshape(channels, -1).numpy() ** 2, axis=0)
    pix_parent, traverser = max_tree(score, connectivity=1)
    pix_parent, flat = pix_parent.ravel(), score.ravel()
    root = int(traverser[0])
    nodes = [int(p) for p in traverser if p == root or flat[pix_parent[p]] != flat[p]]
    own = {v: [] for v in nodes}
    for p in range(flat.size):
        own[p if p in own else int(pix_parent[p])].append(p)
    parent = {v: int(pix_parent[v]) for v in nodes[1:]}
    children = {v: [] for v in nodes}
    for v in nodes[1:]:
        children[parent[v]].append(v)
    region = {}
    for v in reversed(nodes):
        region[v] = own[v] + [q for k in children[v] for q in region[k]]
    value = {}
    with np.errstate(divide="ignore"):
        for v in nodes:
            t = s[region[v]].min() / channels
            log_p = 0.0 if clip and t < 1 else -(channels / 2) * (t - 1 - np.log(t)) / np.log(10)
            value[v] = len(region[v]) * log_p
            if by_size:
                r = len(region[v])
                value[v] += math.log10(flat.size * 0.316915 * 4.062570**r / r) if r < 300 else np.nan

    def remove(v):
        up = parent.pop(v, None)
        below = children.pop(v)
        if up is not None:
            children[up].remove(v)
            children[up].extend(below)
        for k in below:
            if up is None:
                del parent[k]
            else:
                parent[k] = up

    def branch(leaf):
        nodes_up = [leaf]
        while nodes_up[-1] in parent and len(children[parent[nodes_up[-1]]]) == 1:
            nodes_up.append(parent[nodes_up[-1]])
        return nodes_up

    def chosen(leaf):
        nodes_up = branch(leaf)
        return nodes_up, nodes_up[int(np.argmin([value[x] for x in nodes_up]))]

    def prune():
        for leaf in [v for v in children if not children[v]]:
            nodes_up, keep = chosen(leaf)
            for x in nodes_up:
                if x != keep:
                    remove(x)

    def merge():
        merged = False
        for b in [v for v in children if len(children[v]) > 1]:
            if any(children[k] for k in children[b]):
                continue
            if value[b] <= min(value[k] for k in children[b]):
                merged = True
                for k in list(children[b]):
                    remove(k)
        return merged

    prune()
    while merge():
        prune()
    prune()
    final = {}
    for leaf in [v for v in children if not children[v]]:
        keep = chosen(leaf)[1]
        final[value[keep]] = region[keep]
    out = np.full(flat.size, np.nan, dtype=np.float32)
    for v, pixels in final.items():
        out[pixels] = v
    return out.reshape(score.shape)


def _naive_block_nfa(z, eval_size, win_size=5, probability=0.9):
    """The block method written out window by window, as stated in the method doc."""
    tau = stats.chi2.ppf(probability, 1)
    maps = []
    for scale, zs in enumerate(z):
        half = max(int((win_size / 2**scale) // 2), 1)
        z2 = np.pad((zs**2).numpy(), ((0, 0), (0, 0), (half, half), (half, half)), mode="reflect")
        batch, channels, height, width = zs.shape
        log_prob = np.empty((batch, 1, height, width))
        for b in range(batch):
            for i in range(height):
                for j in range(width):
                    k = np.sum(z2[b, :, i : i + 2 * half + 1, j : j + 2 * half + 1] >= tau)
                    n = (2 * half + 1) ** 2
                    log_prob[b, 0, i, j] = stats.binom.logsf(k / channels, n, 1 - probability) / np.log(10)
        maps.append(
            F.interpolate(
                torch.from_numpy(log_prob),
                size=(eval_size, eval_size),
                mode="bicubic",
                align_corners=True,
            )
        )
    total = torch.cat(maps, dim=1).sum(dim=1, keepdim=True)
    return -(torch.log10(torch.tensor(sum(zs.shape[-2] * zs.shape[-1] for zs in z))) + total)


@pytest.mark.parametrize("probability", [0.9, 0.8])
def test_block_nfa_equals_window_by_window_computation(probability):
    g = torch.Generator().manual_seed(11)
    z = [torch.randn(2, 6, 10, 10, generator=g) * 1.5, torch.randn(2, 4, 5, 5, generator=g) * 1.5]
    # Entries whose float32 square sits just below the float64 threshold must not count.
    just_below = np.float32(1.6448536)
    z[0][0, :, 2:5, 2:5] = float(just_below)
    z[0][1, :, 3:8, 3:8] = 3.0  # saturated windows: log P = -inf, kept as in the reference
    out = block_nfa(z, 23, probability=probability)
    np.testing.assert_array_equal(out.numpy(), _naive_block_nfa(z, 23, probability=probability).numpy())
    if probability == 0.9:
        assert (z[0][0, 0, 2, 2] ** 2).item() < 2.705543454095404
        assert torch.isinf(out).any() and (out > 0).any()


def _planted_latents(generator, n_images, channels, size, box, gain):
    z = torch.randn(n_images, channels, size, size, generator=generator)
    r0, r1, c0, c1 = box
    z[:, :, r0:r1, c0:c1] *= gain
    return z


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("clip, by_size", [(True, False), (False, True), (True, True)])
def test_tree_options_equal_naive_simulation(seed, clip, by_size):
    g = torch.Generator().manual_seed(seed)
    # under-dispersed background (t < 1 everywhere but the planted box), as a noise-trained flow gives
    z = _planted_latents(g, 1, 6 + seed, 14, (3, 7, 5, 10), 3.0 + 0.3 * seed)[0] * 0.8
    fast = nfa_tree.region_log_prob_maps([z[None]], clip, by_size)[0][0]
    np.testing.assert_allclose(fast, _naive_region_log_prob_map(z, clip, by_size), rtol=1e-6)
    assert np.isfinite(fast).any()


def test_clip_lower_tail_ignores_under_dispersed_latents():
    g = torch.Generator().manual_seed(5)
    z = [0.7 * torch.randn(8, 31, 32, 32, generator=g), 0.7 * torch.randn(8, 76, 16, 16, generator=g)]
    flagged = lambda **kw: (tree_nfa(z, 64, **kw) > 0).flatten(1).any(dim=1)  # noqa: E731
    # The unclipped bound counts latents smaller than the null's as evidence: every image is flagged.
    assert flagged().all() and flagged(tests_by_size=True).all()
    assert not flagged(clip_lower_tail=True).any()
    assert not flagged(clip_lower_tail=True, tests_by_size=True).any()


def test_tests_by_size_detects_a_small_region_the_total_count_misses():
    g = torch.Generator().manual_seed(5)
    z = [torch.randn(8, 31, 32, 32, generator=g), torch.randn(8, 76, 16, 16, generator=g)]
    z[0][:, :, 10:14, 20:24] *= 2.5  # 16 of 1024 latent pixels
    box = torch.zeros(64, 64, dtype=torch.bool)
    box[20:28, 40:48] = True
    reference = tree_nfa(z, 64)[:, 0] > 0
    assert not reference.any()
    mask = tree_nfa(z, 64, clip_lower_tail=True, tests_by_size=True)[:, 0] > 0
    iou = (mask & box).flatten(1).sum(1) / (mask | box).flatten(1).sum(1)
    assert (iou > 0.5).all()
    assert not (mask & ~F.max_pool2d(box[None].float(), 9, 1, 4)[0].bool()).any()  # nothing far off


def test_tree_options_keep_noise_false_alarms_rare():
    g = torch.Generator().manual_seed(31)
    z = [torch.randn(100, 31, 32, 32, generator=g), torch.randn(100, 76, 16, 16, generator=g)]
    out = tree_nfa(z, 32, clip_lower_tail=True, tests_by_size=True)
    assert (out > 0).flatten(1).any(dim=1).double().mean().item() <= 0.05


@pytest.mark.parametrize("seed", range(6))
def test_fast_tree_equals_naive_simulation_continuous(seed):
    g = torch.Generator().manual_seed(seed)
    z = _planted_latents(g, 1, 6 + seed, 14, (3, 7, 5, 10), 1.0 + 0.3 * seed)[0]
    np.testing.assert_array_equal(
        nfa_tree.region_log_prob_maps([z[None]])[0][0], _naive_region_log_prob_map(z)
    )


@pytest.mark.parametrize("seed", range(12))
def test_fast_tree_equals_naive_simulation_with_plateaus_and_ties(seed):
    # Small integer latents: large plateaus of the score, equal values of disjoint regions (equal
    # dict keys in the reference) and pixels with S = 0 (value -inf).
    g = torch.Generator().manual_seed(100 + seed)
    z = torch.randint(-2, 3, (1 + seed % 3, 12, 11), generator=g).float()
    with np.errstate(divide="ignore"):
        fast = nfa_tree.region_log_prob_maps([z[None]])[0][0]
    np.testing.assert_array_equal(fast, _naive_region_log_prob_map(z))


def test_batched_forest_equals_per_latent_naive_simulation():
    # One call over scales of different shapes and channel counts; two images hold equal integer
    # content so that equal region values occur in different trees (deduplicated per tree only).
    g = torch.Generator().manual_seed(5)
    ties = torch.randint(-2, 3, (2, 9, 10), generator=g).float()
    z = [
        torch.randn(1, 7, 13, 9, generator=g),
        torch.stack([ties, torch.randint(-2, 3, (2, 9, 10), generator=g).float(), ties]),
        torch.randn(2, 3, 5, 6, generator=g) * 2,
        torch.randint(-1, 2, (1, 1, 8, 8), generator=g).float(),
    ]
    with np.errstate(divide="ignore"):
        fast = nfa_tree.region_log_prob_maps(z)
        for zs, maps in zip(z, fast, strict=True):
            assert maps.shape == (zs.shape[0], *zs.shape[2:])
            for zi, got in zip(zs, maps, strict=True):
                np.testing.assert_array_equal(got, _naive_region_log_prob_map(zi))


def test_batched_reductions_equal_per_image_reductions():
    # region_log_prob_maps squares once in torch and reduces whole batches; the reference squares in
    # torch and numpy and reduces image by image. Exactness relies on bit-identical score and S.
    g = torch.Generator().manual_seed(9)
    shapes = [(3, 84, 112, 112), (4, 816, 28, 28), (4, 192, 14, 14), (3, 7, 13, 5), (2, 2048, 7, 7)]
    for shape in shapes:
        z = torch.randn(*shape, generator=g) * 2
        squared = z**2
        np.testing.assert_array_equal(squared.numpy(), z.numpy() ** 2)
        score = torch.mean(squared, dim=1)
        s = np.sum(squared.numpy().reshape(*shape[:2], -1), axis=1)
        for b in range(shape[0]):
            assert torch.equal(score[b], torch.mean(z[b] ** 2, dim=0))
            np.testing.assert_array_equal(s[b], np.sum(z[b].reshape(shape[1], -1).numpy() ** 2, axis=0))


def test_mosaic_max_forest_equals_separate_max_trees():
    rng = np.random.default_rng(8)
    shapes = [(28, 28), (14, 14), (5, 9), (28, 28), (3, 3), (17, 4), (9, 30)]
    images = [rng.random(shape).astype(np.float32) for shape in shapes]
    images += [rng.integers(0, 3, shape).astype(np.float32) for shape in shapes]  # plateaus
    parent, traverser = nfa_tree._max_forest(images)
    offsets = np.cumsum([0] + [image.size for image in images])
    for k, image in enumerate(images):
        lo, hi = offsets[k], offsets[k + 1]
        want_parent, want_traverser = max_tree(image, connectivity=1)
        np.testing.assert_array_equal(parent[lo:hi] - lo, want_parent.ravel())
        mine = traverser[(traverser >= lo) & (traverser < hi)] - lo
        np.testing.assert_array_equal(mine, want_traverser)


def test_hand_computed_maps():
    # C = 1, S = 1 on a plateau around a centre with S = 4: the chain {all} -> {centre} has values
    # 9 * 0 and f(4), so only the centre is kept, with value -(1/2) * (4 - 1 - ln 4) / ln 10.
    z = torch.ones(1, 3, 3)
    z[0, 1, 1] = -2.0
    expected = np.float32(-0.5 * (3 - np.log(np.float32(4))) / np.log(10))
    want = np.full((3, 3), np.nan, np.float32)
    want[1, 1] = expected
    np.testing.assert_array_equal(nfa_tree.region_log_prob_maps([z[None]])[0][0], want)
    assert expected == pytest.approx(-0.35041, abs=1e-5)
    flat = torch.ones(4, 5, 6)  # one plateau: t = 1, value 0 over the whole image
    np.testing.assert_array_equal(
        nfa_tree.region_log_prob_maps([flat[None]])[0][0], np.zeros((5, 6), np.float32)
    )


def test_tree_nfa_shapes_and_non_square_latents():
    g = torch.Generator().manual_seed(3)
    z = [torch.randn(2, 8, 12, 10, generator=g), torch.randn(2, 5, 6, 5, generator=g)]
    out = tree_nfa(z, 40)
    assert out.shape == (2, 1, 40, 40) and out.dtype == torch.float32
    # Region values are <= 0, and unpainted pixels are 0: the output never drops below -log10 N_tests.
    assert torch.all(out >= -log_number_of_tests([120, 30])) and out.std() > 0
    with pytest.raises(ValueError, match="3 x 3"):
        tree_nfa([torch.randn(1, 4, 2, 8)], 16)


def test_tree_nfa_chunking_does_not_change_the_result(monkeypatch):
    g = torch.Generator().manual_seed(4)
    z = [_planted_latents(g, 5, 16, 16, (4, 9, 4, 9), 2.5), torch.randn(5, 24, 8, 8, generator=g)]
    whole = tree_nfa(z, 48)
    monkeypatch.setattr(nfa_tree, "_FOREST_PIXELS", 700)  # two images per forest
    torch.testing.assert_close(tree_nfa(z, 48), whole, rtol=0, atol=0)
    assert (whole > 0).any()  # the comparison covers detections too


def test_noise_latents_have_few_false_alarms():
    g = torch.Generator().manual_seed(2024)
    n_images = 200
    z = [torch.randn(n_images, 64, 16, 16, generator=g), torch.randn(n_images, 64, 8, 8, generator=g)]
    tree_rate = (tree_nfa(z, 32) > 0).flatten(1).any(dim=1).double().mean().item()
    block_rate = (block_nfa(z, 32) > 0).flatten(1).any(dim=1).double().mean().item()
    print(f"false-alarm rate over {n_images} noise images: tree {tree_rate:.3f}, block {block_rate:.3f}")
    assert tree_rate <= 0.05
    assert block_rate <= 0.05


@pytest.mark.slow
@pytest.mark.parametrize(
    "shapes",
    [
        pytest.param([(816, 28, 28), (192, 14, 14)], id="mcait448"),
        pytest.param([(84, 64, 64), (80, 32, 32), (128, 16, 16)], id="resnet18-256"),
    ],
)
def test_noise_latents_false_alarm_rate_at_model_sizes(shapes):
    g = torch.Generator().manual_seed(31)
    n_images, per_batch = 200, 20
    tree_hits = block_hits = 0
    for _ in range(n_images // per_batch):
        z = [torch.randn(per_batch, *shape, generator=g) for shape in shapes]
        tree_hits += (tree_nfa(z, 64) > 0).flatten(1).any(dim=1).sum().item()
        block_hits += (block_nfa(z, 64) > 0).flatten(1).any(dim=1).sum().item()
    print(f"false-alarm rate over {n_images} noise images: tree {tree_hits / n_images:.3f}, ", end="")
    print(f"block {block_hits / n_images:.3f}")
    assert tree_hits <= 0.05 * n_images
    assert block_hits <= 0.05 * n_images


def _iou(mask: torch.Tensor, box_mask: torch.Tensor) -> float:
    return ((mask & box_mask).sum() / (mask | box_mask).sum()).item()


def test_planted_region_is_detected_and_localised():
    g = torch.Generator().manual_seed(7)
    n_images, size, target = 4, 24, 96
    z_fine = _planted_latents(g, n_images, 64, size, (6, 14, 10, 18), 2.5)
    z_coarse = torch.randn(n_images, 64, size // 2, size // 2, generator=g)
    box = torch.zeros(target, target, dtype=torch.bool)
    box[24:56, 40:72] = True  # the planted 8 x 8 latent square at 4x upsampling
    near = torch.zeros(target, target, dtype=torch.bool)
    near[12:68, 28:84] = True  # the square widened by the block window and the upsampling kernels
    for method in (tree_nfa, block_nfa):
        mask = method([z_fine, z_coarse], target)[:, 0] > 0
        for b in range(n_images):
            assert _iou(mask[b], box) > 0.75, method.__name__
            assert not (mask[b] & ~near).any(), method.__name__


def test_tests_by_size_charges_the_number_of_size_classes_of_every_scale():
    """The Bonferroni factor is the sum over scales of their pixel counts, not the largest of them."""
    from uflow_exp.nfa.tree import log_number_of_size_classes

    assert log_number_of_size_classes([4096, 1024, 256]) == pytest.approx(math.log10(5376), abs=1e-6)
    z = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 8, 4, 4)]
    z[0][0, :, 2:4, 2:4] = 6.0  # a strong 2 x 2 region at the finer scale
    stratified = tree_nfa(z, 16, tests_by_size=True, clip_lower_tail=True)
    from uflow_exp.nfa.tree import region_log_prob_maps

    (finer, _) = region_log_prob_maps(z, clip_lower_tail=True, tests_by_size=True)
    # the most significant pixel: its region's log10 probability (its size's count in) + log10(64 + 16)
    assert float(stratified.max()) == pytest.approx(-(float(np.nanmin(finer)) + math.log10(80)), abs=1e-3)
