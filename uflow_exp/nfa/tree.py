"""Tree (max-tree) a-contrario NFA of U-Flow, computed with array operations.

The reference prunes and merges a networkx graph node by node. The same result follows from a
closed form over the max-tree, evaluated in O(n log n) vectorised numpy over all images and scales:

* A *segment* is a maximal chain of single-child nodes together with the leaf or bifurcation at its
  bottom. Pruning keeps, in each segment that has become a leaf branch, the node of minimal value
  (the deepest one on ties, as ``np.argmin`` over a leaf-first branch does). Which node that is does
  not depend on when the segment is pruned.
* A bifurcation whose child segments have all collapsed merges iff its value is <= the smallest of
  the children's kept values. A failed test never succeeds later (the values involved are fixed), so
  a segment collapses iff no bifurcation in its subtree fails the test, whatever the pass order.
* The painted regions are the kept nodes of the collapsed segments whose parent bifurcation did not
  collapse (or of the root segment, if everything collapsed).

Subtree sums and minima become range queries over a depth-first preorder, in which every subtree is
a contiguous range.
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.sparse import csr_array
from scipy.sparse.csgraph import depth_first_order
from scipy.special import logsumexp
from skimage.morphology import max_tree
from torch.nn import functional as F

from uflow_exp.utils.shapes import as_shape

# Polyomino-count fit used by the reference: number of 4-connected shapes of r pixels ~ ALPHA * BETA^r / r.
_POLYOMINO_ALPHA = 0.316915
_POLYOMINO_BETA = 4.062570
_FOREST_PIXELS = 1 << 18


def log_number_of_tests(sizes: list[int]) -> float:
    """log10 of sum_s N_s * sum_{r=1..N_s} ALPHA * BETA^r / r, the number of tested regions.

    Summed in log space because BETA^r overflows float64 for r > ~500. The result is rounded to float32
    because the reference does so before adding it to the map, and the segmentation threshold sits
    exactly where the two terms cancel.
    """
    per_scale = []
    for n in sizes:
        r = np.arange(1, n + 1, dtype=np.float64)
        per_scale.append(np.log(n) + logsumexp(r * np.log(_POLYOMINO_BETA) - np.log(r)))
    ln_tests = np.log(_POLYOMINO_ALPHA) + logsumexp(per_scale)
    return float(np.float32(ln_tests / np.log(10)))


def log_number_of_size_classes(sizes: list[int]) -> float:
    """log10 of the number of (scale, region size) classes, sum_s N_s: the Bonferroni factor of
    ``tests_by_size``."""
    return float(np.float32(np.log10(sum(sizes))))


def tree_nfa(
    z: list[torch.Tensor],
    eval_size: int | tuple[int, int],
    *,
    clip_lower_tail: bool = False,
    tests_by_size: bool = False,
) -> torch.Tensor:
    """-log10 NFA of the tree method, shape (B, 1, H, W) at ``eval_size`` (a side or (H, W));
    positive = significant.

    ``z`` holds one latent per scale, each (B, C_s, H_s, W_s), finite. The automatic segmentation is
    ``tree_nfa(z, size) > 0`` (NFA < 1). The result is on the device of ``z[0]``.

    Both options default to the reference (exact, bit for bit):

    * ``clip_lower_tail``: the Chernoff bound ``P(chi2_C >= C t) <= exp(-C/2 (t - 1 - ln t))`` holds
      for ``t >= 1`` only; below, it is not a bound (it falls towards 0 as t does, while the true
      tail rises to 1). The reference applies it anyway, so latents smaller than the null model's
      (a flow trained with feature noise sees clean, under-dispersed features) count as evidence and
      whole images come out significant. Clipped, ``log P = 0`` for ``t < 1``.
    * ``tests_by_size``: the reference charges every region the number of tests of all regions of
      every size (10^2490 for a 64 x 64 latent), so a defect must cover about a tenth of the image.
      Stratified by size, a region of r pixels at scale s is charged the number of regions of its own
      size there, ``N_s * ALPHA * BETA^r / r``, times the number of (scale, size) classes, ``sum_s N_s``:
      a Bonferroni split of the same budget of one expected false alarm per image.
    """
    if min(min(zs.shape[-2:]) for zs in z) < 3:
        raise ValueError("tree_nfa needs latents of at least 3 x 3 pixels (skimage's max_tree fails below)")
    with torch.no_grad():
        z_cpu = [zs.detach().cpu() for zs in z]
        batch = z_cpu[0].shape[0]
        out = np.empty((batch, 1, *as_shape(eval_size)), dtype=np.float32)
        # Images are processed in forests of at most ~2^18 pixels: large enough to amortise the fixed
        # cost of the array operations, small enough to bound their memory.
        chunk = max(1, _FOREST_PIXELS // sum(zs[0, 0].numel() for zs in z_cpu))
        for lo in range(0, batch, chunk):
            log_prob = out[lo : lo + chunk]
            chunk_z = [zs[lo : lo + chunk] for zs in z_cpu]
            for s, maps in enumerate(region_log_prob_maps(chunk_z, clip_lower_tail, tests_by_size)):
                # nan_to_num as the reference: unpainted pixels -> 0, -inf -> the most negative float32.
                maps = torch.from_numpy(np.nan_to_num(maps, nan=0.0)).unsqueeze(1)
                up = F.interpolate(maps, size=as_shape(eval_size), mode="bilinear", align_corners=False)
                # Exact elementwise steps run in numpy: single-threaded, they avoid torch's thread
                # barriers, which stall for milliseconds per op on an oversubscribed machine.
                if s == 0:
                    log_prob[...] = up.numpy()
                else:
                    np.minimum(log_prob, up.numpy(), out=log_prob)
        sizes = [int(zs.shape[-2] * zs.shape[-1]) for zs in z_cpu]
        log_n_tests = log_number_of_size_classes(sizes) if tests_by_size else log_number_of_tests(sizes)
        np.negative(np.add(out, np.float32(log_n_tests), out=out), out=out)
        return torch.from_numpy(out).to(z[0].device)


def _chernoff_log10_tail(
    s_min: np.ndarray, channels: np.ndarray, clip_lower_tail: bool = False
) -> np.ndarray:
    """log10 P(chi2_C >= s) bounded by Chernoff, with the reference's float32 -> float64 steps;
    ``clip_lower_tail`` sets it to 0 where ``s < C``, outside the bound's domain (see ``tree_nfa``).

    The reference evaluates this on numpy float32 scalars (NEP 50: Python numbers stay float32) and
    only the final division by the float64 ln(10) widens; the casts below reproduce those roundings.
    """
    t = s_min / channels.astype(np.float32)
    gap = (t - np.float32(1)) - np.log(t)
    log10_tail = ((-(channels / 2)).astype(np.float32) * gap).astype(np.float64) / np.log(10)
    return np.where(t < 1, 0.0, log10_tail) if clip_lower_tail else log10_tail


def _log10_regions_of_size(area: np.ndarray, scale_pixels: np.ndarray) -> np.ndarray:
    """log10 of the number of 4-connected regions of ``area`` pixels in a latent of ``scale_pixels``."""
    return (
        np.log10(scale_pixels)
        + np.log10(_POLYOMINO_ALPHA)
        + area * np.log10(_POLYOMINO_BETA)
        - np.log10(area)
    )


def _pointer_jump(pointer: np.ndarray) -> np.ndarray:
    """Follow ``pointer`` to its fixed points (every chain must end in one) in O(log length) steps."""
    while True:
        jumped = pointer[pointer]
        if np.array_equal(jumped, pointer):
            return pointer
        pointer = jumped


def _preorder(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth-first preorder position and subtree end (exclusive) of every node of a forest.

    ``parent`` is -1 at the roots. scipy's compiled DFS, started from a virtual node above the roots,
    gives the preorder; a subtree ends after its last descendant, reached by pointer jumping along
    "child with the largest preorder position".
    """
    n = parent.size
    up = np.where(parent < 0, n, parent)  # the virtual node n adopts the roots
    by_parent = np.argsort(up, kind="stable")
    indptr = np.zeros(n + 2, dtype=np.int64)
    np.cumsum(np.bincount(up, minlength=n + 1), out=indptr[1:])
    graph = csr_array((np.ones(n, dtype=np.int8), by_parent, indptr), shape=(n + 1, n + 1))
    order = depth_first_order(graph, n, directed=True, return_predecessors=False)[1:]
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)

    kids = np.flatnonzero(parent >= 0)
    last_pos = np.full(n, -1, dtype=np.int64)
    np.maximum.at(last_pos, parent[kids], pos[kids])
    last = _pointer_jump(np.where(last_pos >= 0, order[last_pos], np.arange(n)))
    return pos, pos[last] + 1


def _range_min(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """min(values[lo[i]:hi[i]]) for non-empty ranges, with a sparse table (O(n log n) build)."""
    n = values.size
    length = hi - lo
    levels = int(length.max()).bit_length()
    table = np.full((levels, n), np.inf, dtype=values.dtype)
    table[0] = values
    for j in range(1, levels):
        half = 1 << (j - 1)
        width = n - 2 * half + 1
        table[j, :width] = np.minimum(table[j - 1, :width], table[j - 1, half : half + width])
    j = np.frexp(length.astype(np.float64))[1] - 1
    return np.minimum(table[j, lo], table[j, hi - (1 << j)])


def _max_forest(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """skimage max-trees of several 2D images, indexed over their concatenated raveled pixels.

    Returns ``(parent, traverser)``: each image's parent array as ``max_tree`` gives it (its root
    points to itself), and one traverser in which each image's pixels appear in the order of that
    image's own traverser, parents first.

    The images are laid out as one mosaic, separated by -inf pixels, for a single ``max_tree`` call:
    skimage's max_tree spends tens of microseconds on each pixel of the array border (it checks their
    neighbours in Python), so a near-square mosaic costs far less than separate calls. Above -inf
    every upper-level component lies inside one image, and the stable sort keeps each image's raster
    order, so every image gets exactly the tree (canonical pixels included) a separate call gives.
    """
    # Shelf packing, tallest first, in rows about as wide as the square root of the total area.
    shapes = [image.shape for image in images]
    width = max(max(w for _, w in shapes), math.isqrt(sum((h + 1) * (w + 1) for h, w in shapes)))
    corners = [(0, 0)] * len(images)
    x = y = shelf = 0
    for i in sorted(range(len(images)), key=lambda i: -shapes[i][0]):
        h, w = shapes[i]
        if x > 0 and x + w > width:
            x, y, shelf = 0, y + shelf + 1, 0
        corners[i] = (y, x)
        x, shelf = x + w + 1, max(shelf, h)
    mosaic_w = max(cx + w for (_, cx), (_, w) in zip(corners, shapes, strict=True))
    mosaic = np.full((y + shelf, mosaic_w), -np.inf, dtype=images[0].dtype)
    cells = []
    for (cy, cx), image in zip(corners, images, strict=True):
        h, w = image.shape
        mosaic[cy : cy + h, cx : cx + w] = image
        cells.append((np.arange(cy, cy + h)[:, None] * mosaic_w + np.arange(cx, cx + w)).ravel())
    in_mosaic = np.concatenate(cells)
    from_mosaic = np.full(mosaic.size, -1, dtype=np.int64)
    from_mosaic[in_mosaic] = np.arange(in_mosaic.size)

    mosaic_parent, mosaic_traverser = max_tree(mosaic, connectivity=1)
    parent = from_mosaic[mosaic_parent.ravel()[in_mosaic]]
    separated = parent < 0  # image roots hang below the separators' component
    parent[separated] = np.flatnonzero(separated)
    traverser = from_mosaic[mosaic_traverser]
    return parent, traverser[traverser >= 0]


class _Forest(NamedTuple):
    """The max-tree nodes of every image and scale, as arrays indexed by node (parents first)."""

    nodes: np.ndarray  # the canonical pixel of each node
    pixel_node: np.ndarray  # the node each pixel belongs to
    parent: np.ndarray  # -1 at roots
    tree_of: np.ndarray  # the image (and scale) of each node
    pos: np.ndarray  # preorder position; a node's subtree is positions pos .. end - 1
    end: np.ndarray
    order: np.ndarray  # nodes in preorder


def _scale_statistics(z: list[torch.Tensor]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Per scale and image, the score map (mean of z^2 over channels); per pixel of all of them, the
    sum S of z^2, the channel count and the pixel count of its scale."""
    scores, sums, channels, scale_pixels = [], [], [], []
    for zs in z:
        batch, c = zs.shape[:2]
        # The reference squares and reduces each image separately (torch mean for the score, numpy
        # sum for S); squaring is exactly rounded in both libraries and these batched reductions give
        # bit-identical values (tested), which matters because ties in the score shape the tree.
        squared = zs**2
        scores.extend(torch.mean(squared, dim=1).numpy())
        sums.append(np.sum(squared.numpy().reshape(batch, c, -1), axis=1).ravel())
        channels.append(np.full(zs[:, 0].numel(), c))
        scale_pixels.append(np.full(zs[:, 0].numel(), zs[0, 0].numel()))
    return scores, np.concatenate(sums), np.concatenate(channels), np.concatenate(scale_pixels)


def _forest(scores: list[np.ndarray]) -> _Forest:
    pix_parent, traverser = _max_forest(scores)
    flat = np.concatenate([score.ravel() for score in scores])
    image_of_pixel = np.repeat(np.arange(len(scores)), [score.size for score in scores])
    n_pix = flat.size
    # Canonical pixels are the max-tree nodes: a plateau pixel shares its parent's level, and it only
    # adds area to the node it points at (the reference folds it the same way).
    canonical = flat[pix_parent] != flat
    root_pixels = pix_parent == np.arange(n_pix)
    canonical |= root_pixels
    nodes = traverser[canonical[traverser]]  # parents precede children
    node_of = np.empty(n_pix, dtype=np.int64)
    node_of[nodes] = np.arange(nodes.size)
    pixel_node = node_of[np.where(canonical, np.arange(n_pix), pix_parent)]
    parent = np.where(root_pixels[nodes], -1, node_of[pix_parent[nodes]])
    pos, end = _preorder(parent)
    order = np.empty(nodes.size, dtype=np.int64)
    order[pos] = np.arange(nodes.size)
    return _Forest(nodes, pixel_node, parent, image_of_pixel[nodes], pos, end, order)


def _node_values(
    f: _Forest, s: np.ndarray, channels: np.ndarray, scale_pixels: np.ndarray, clip: bool, by_size: bool
) -> np.ndarray:
    """log10 probability bound of each node's region (+ log10 regions of its size with ``by_size``)."""
    n = f.nodes.size
    own_area = np.bincount(f.pixel_node, minlength=n)
    own_min = np.full(n, np.inf, dtype=s.dtype)
    np.minimum.at(own_min, f.pixel_node, s)
    cum_area = np.concatenate(([0], np.cumsum(own_area[f.order])))
    area = cum_area[f.end] - cum_area[f.pos]
    s_min = _range_min(own_min[f.order], f.pos, f.end)
    with np.errstate(divide="ignore"):  # S = 0 gives log10 P = -inf, as in the reference
        value = area * _chernoff_log10_tail(s_min, channels[f.nodes], clip)
    if by_size:
        value = value + _log10_regions_of_size(area, scale_pixels[f.nodes])
    return value


def _selected_regions(f: _Forest, value: np.ndarray) -> np.ndarray:
    """The nodes the prune / merge procedure keeps, one per distinct value within an image."""
    n = f.nodes.size
    roots, kids = np.flatnonzero(f.parent < 0), np.flatnonzero(f.parent >= 0)
    n_kids = np.bincount(f.parent[kids], minlength=n)
    # Bottom of each node's segment: follow only-children down to a leaf or bifurcation.
    unary_parent = kids[n_kids[f.parent[kids]] == 1]
    bottom = np.arange(n)
    bottom[f.parent[unary_parent]] = unary_parent
    bottom = _pointer_jump(bottom)
    seg_min = np.full(n, np.inf)
    np.minimum.at(seg_min, bottom, value)
    is_min = value == seg_min[bottom]
    kept = np.full(n, -1, dtype=np.int64)
    np.maximum.at(kept, bottom[is_min], np.flatnonzero(is_min))  # deepest minimum = largest index

    child_best = np.full(n, np.inf)
    np.minimum.at(child_best, f.parent[kids], seg_min[bottom[kids]])
    bifurcation = n_kids >= 2
    fails = bifurcation & ~(value <= child_best)
    cum_fails = np.concatenate(([0], np.cumsum(fails[f.order])))
    blocked = cum_fails[f.end] > cum_fails[f.pos]

    tops = np.concatenate((kids[bifurcation[f.parent[kids]] & blocked[f.parent[kids]]], roots))
    collapsed = bottom[tops][~blocked[bottom[tops]]]
    leaves = kept[collapsed]
    leaf_value = value[leaves]
    # The reference keys each image's final regions by value in a dict: of regions with equal values
    # only the last one (in traverser order) is painted. Reproduced for exactness.
    by_value = np.lexsort((leaves, leaf_value, f.tree_of[leaves]))
    same_next = (leaf_value[by_value][1:] == leaf_value[by_value][:-1]) & (
        f.tree_of[leaves][by_value][1:] == f.tree_of[leaves][by_value][:-1]
    )
    return leaves[by_value[np.append(~same_next, True)]]


def _paint(f: _Forest, value: np.ndarray, regions: np.ndarray, n_pix: int) -> np.ndarray:
    """Each pixel gets the value of the selected region holding it (NaN outside every one)."""
    start = f.pos[regions]
    by_start = np.argsort(start)
    start, stop = start[by_start], f.end[regions][by_start]
    painted = value[regions][by_start].astype(np.float32)
    pixel_pos = f.pos[f.pixel_node]
    slot = np.searchsorted(start, pixel_pos, side="right") - 1
    inside = (slot >= 0) & (pixel_pos < stop[np.maximum(slot, 0)])
    out = np.full(n_pix, np.nan, dtype=np.float32)
    out[inside] = painted[slot[inside]]
    return out


def region_log_prob_maps(
    z: list[torch.Tensor], clip_lower_tail: bool = False, tests_by_size: bool = False
) -> list[np.ndarray]:
    """Per-pixel log10 probability of the selected upper-level regions, per scale (B, H_s, W_s);
    with ``tests_by_size``, plus the log10 number of regions of that size at that scale.

    ``z`` holds CPU latents (B, C_s, H_s, W_s). Pixels outside every selected region are NaN, as in
    the reference. All images and scales are processed as one forest so that the fixed cost of the
    array operations is paid once per call. The options are ``tree_nfa``'s.
    """
    scores, s, channels, scale_pixels = _scale_statistics(z)
    forest = _forest(scores)
    value = _node_values(forest, s, channels, scale_pixels, clip_lower_tail, tests_by_size)
    out = _paint(forest, value, _selected_regions(forest, value), s.size)
    bounds = np.cumsum([zs[:, 0].numel() for zs in z])[:-1]
    return [m.reshape(zs[:, 0].shape) for m, zs in zip(np.split(out, bounds), z, strict=True)]
