"""The embedded default: crops of scikit-image's CC0 textures with synthetic defects and exact masks.

Normal images are jittered crops of one texture (`brick`, `grass` or `gravel`). Test images carry one
defect each, cycling through four kinds, each covering about 0.5% to 5% of the image:
- `scratch`: a thin curved stroke whose tone sits inside the texture's own range;
- `blob`: a worn, discoloured region (texture smoothed out, hue shifted, luminance kept);
- `patch`: texture cut from elsewhere, shrunk and turned a quarter, so only its structure is wrong;
- `hole`: a dark cavity, shaded from one side.
Most defects keep the texture's intensity statistics, so finding them needs features, not a threshold.

The set is generated once into the cache folder in the MVTec AD layout and read back by that layout.
Each image has its own random stream derived from (seed, texture, split, index), so the output is
byte-identical for a given seed and changing one count does not change the other images.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage.transform import rescale, resize

from uflow_exp.data.mvtec import defect_folder_splits, mask_stem
from uflow_exp.data.records import DatasetError, LayoutContext, Splits, build_once

Tint = tuple[float, float, float]
# Bump when the generator changes, so stale caches are not reused.
GENERATOR_VERSION = 2
TEXTURES: dict[str, Callable[[], np.ndarray]] = {
    "brick": skdata.brick,
    "grass": skdata.grass,
    "gravel": skdata.gravel,
}
# The sources are grey; a fixed tint per texture gives colour defects something to change.
TINTS: dict[str, Tint] = {"brick": (1.0, 0.8, 0.68), "grass": (0.8, 1.0, 0.62), "gravel": (0.96, 0.93, 0.88)}
DEFECTS = ("scratch", "blob", "patch", "hole")
EXPECTED = f"dataset.category one of {', '.join(TEXTURES)}; generated into dataset.cache_dir"
MIN_AREA, MAX_AREA = 0.005, 0.05
# (alpha, target): the defect image is image * (1 - alpha) + target * alpha.
Defect = tuple[np.ndarray, np.ndarray]
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _crop(source: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey crop at a random place, scale (+-12%) and mirror side, with mild gain/offset jitter."""
    side = int(rng.integers(round(size * 0.88), round(size * 1.12) + 1))
    side = min(side, *source.shape)
    y, x = (int(rng.integers(0, n - side + 1)) for n in source.shape)
    crop = resize(source[y : y + side, x : x + side], (size, size), order=1, anti_aliasing=True)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    mean = crop.mean()
    return np.clip((crop - mean) * rng.uniform(0.94, 1.06) + mean + rng.uniform(-0.02, 0.02), 0, 1)


def _luma(tint: Tint) -> float:
    return float(np.asarray(tint, dtype=np.float32) @ _LUMA)


def _tinted(grey: np.ndarray, tint: Tint) -> np.ndarray:
    return grey[..., None] * np.asarray(tint, dtype=np.float32)


def _shape(size: int, area: float, rng: np.random.Generator) -> np.ndarray:
    """Soft alpha (H, W) of an irregular star-shaped region of about `area` pixels; alpha >= 0.5 is
    its exact mask, the 1.5-pixel ramp only keeps edges from aliasing."""
    radius = np.sqrt(area / np.pi)
    cy, cx = rng.uniform(radius * 1.3, size - radius * 1.3, 2)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    angle = np.arctan2(yy - cy, xx - cx)
    boundary = np.full_like(angle, radius)
    for k in range(2, 6):
        boundary += radius * rng.uniform(0, 0.3 / k) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return np.clip((boundary - np.hypot(yy - cy, xx - cx)) / 1.5 + 0.5, 0, 1)


def _stroke(size: int, area: float, rng: np.random.Generator) -> np.ndarray:
    """Soft alpha of a gently curving stroke 2.5-5 px wide whose area is about `area` pixels."""
    width = rng.uniform(2.5, 5.0)
    steps = max(int(area / width / 1.5), 8)  # 1.5 px per step
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.06, steps))
    path = np.cumsum(np.stack([np.sin(heading), np.cos(heading)], 1) * 1.5, axis=0)
    path += rng.uniform(0.15, 0.85, 2) * size - path.mean(0)
    points = np.zeros((size, size), dtype=bool)
    inside = np.all((path >= 0) & (path < size - 1), axis=1)
    points[tuple(np.round(path[inside]).astype(int).T)] = True
    distance = ndimage.distance_transform_edt(~points)
    return np.clip(width / 2 - distance + 0.5, 0, 1)


def _scratch(image: np.ndarray, source: np.ndarray, tint: Tint, rng: np.random.Generator) -> Defect:
    size = image.shape[0]
    alpha = _stroke(size, rng.uniform(MIN_AREA, 3 * MIN_AREA) * size * size, rng)
    luma = image @ _LUMA
    # The stroke's tone is one the texture itself has (its 3rd or 97th percentile), so intensity
    # alone cannot tell it apart; its shape, across the texture's structure, can.
    tone = np.quantile(luma, 0.97 if rng.random() < 0.5 else 0.03)
    grain = 0.92 + 0.16 * rng.random(image.shape[:2], dtype=np.float32)
    return alpha, _tinted(np.full(image.shape[:2], tone / _luma(tint), dtype=np.float32) * grain, tint)


def _blob(image: np.ndarray, source: np.ndarray, tint: Tint, rng: np.random.Generator) -> Defect:
    size = image.shape[0]
    alpha = _shape(size, np.exp(rng.uniform(np.log(MIN_AREA * 2), np.log(MAX_AREA))) * size * size, rng)
    smooth = ndimage.gaussian_filter(image, sigma=(rng.uniform(2.0, 3.5),) * 2 + (0,))
    luma = smooth @ _LUMA
    hue = rng.permutation(np.array([1.1, 0.97, 0.85], dtype=np.float32))
    shifted = smooth * hue
    target = shifted * (luma / np.maximum(shifted @ _LUMA, 1e-3))[..., None]
    return alpha, target


def _patch(image: np.ndarray, source: np.ndarray, tint: Tint, rng: np.random.Generator) -> Defect:
    size = image.shape[0]
    alpha = _shape(size, np.exp(rng.uniform(np.log(MIN_AREA * 3), np.log(MAX_AREA))) * size * size, rng)
    # Turned a quarter and shrunk, the pasted texture runs across the grain at the wrong scale.
    scale = rng.uniform(0.55, 0.8)
    piece = rescale(_crop(source, round(size / scale) + 1, rng), scale, order=1, anti_aliasing=True)
    piece = np.rot90(piece[:size, :size], k=int(rng.choice([1, 3])))
    # Match the host image's grey mean and contrast so only the structure betrays the patch.
    grey = image @ _LUMA / _luma(tint)
    piece = (piece - piece.mean()) / max(piece.std(), 1e-3) * grey.std() + grey.mean()
    return alpha, _tinted(np.clip(piece, 0, 1), tint)


def _hole(image: np.ndarray, source: np.ndarray, tint: Tint, rng: np.random.Generator) -> Defect:
    size = image.shape[0]
    alpha = _shape(size, np.exp(rng.uniform(np.log(MIN_AREA), np.log(MAX_AREA / 2))) * size * size, rng)
    # Darker on the side away from the light, as in a cavity lit at a slant.
    yy, xx = np.mgrid[:size, :size] / size
    light = rng.uniform(0, 2 * np.pi)
    shade = 0.3 + 0.2 * (0.5 + 0.5 * np.sin(6 * (yy * np.cos(light) + xx * np.sin(light))))
    return alpha, image * shade[..., None].astype(np.float32)


_DEFECT_FUNCTIONS = {"scratch": _scratch, "blob": _blob, "patch": _patch, "hole": _hole}


def _to_png(array: np.ndarray, path: Path) -> None:
    # Light compression: encoding dominates the build time, and the files are a local cache.
    Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path, compress_level=1)


def generate(
    folder: Path, texture: str, seed: int, n_train: int, n_test_good: int, n_test_defect: int, size: int
) -> None:
    """Write the data set into `folder` in the MVTec AD layout (category folder `texture`)."""
    source = TEXTURES[texture]().astype(np.float32) / 255.0
    tint = TINTS[texture]
    texture_id = list(TEXTURES).index(texture)
    base = folder / texture

    def normal(split: int, index: int) -> tuple[np.ndarray, np.random.Generator]:
        rng = np.random.default_rng([seed, texture_id, split, index])
        return _tinted(_crop(source, size, rng), tint), rng

    for name, count, split in (("train", n_train, 0), ("test", n_test_good, 1)):
        (base / name / "good").mkdir(parents=True)
        for index in range(count):
            _to_png(normal(split, index)[0], base / name / "good" / f"{index:03d}.png")
    for index in range(n_test_defect):
        kind = DEFECTS[index % len(DEFECTS)]
        image, rng = normal(2, index)
        alpha, target = _DEFECT_FUNCTIONS[kind](image, source, tint, rng)
        image = image * (1 - alpha[..., None]) + target * alpha[..., None]
        for sub in ("test", "ground_truth"):
            (base / sub / kind).mkdir(parents=True, exist_ok=True)
        _to_png(image, base / "test" / kind / f"{index:03d}.png")
        _to_png((alpha >= 0.5).astype(np.float32), base / "ground_truth" / kind / f"{index:03d}_mask.png")


def find_records(
    ctx: LayoutContext,
    cache_dir: str = ".cache/textures",
    n_train: int = 50,
    n_test_good: int = 10,
    n_test_defect: int = 20,
    generated_size: int = 256,
) -> Splits:
    texture = ctx.category
    if texture not in TEXTURES:
        raise DatasetError(f"textures: category must be one of {', '.join(TEXTURES)}, got {texture!r}")
    counts = (n_train, n_test_good, n_test_defect)
    folder = Path(cache_dir) / (
        f"{texture}-seed{ctx.seed}-{'-'.join(map(str, counts))}-{generated_size}px-v{GENERATOR_VERSION}"
    )
    build_once(folder, lambda partial: generate(partial, texture, ctx.seed, *counts, generated_size))
    expected = f"{folder}/{texture}/train/good, test/<kind>, ground_truth/<kind> (delete {folder} to rebuild)"
    return defect_folder_splits(folder / texture, "good", mask_stem, ctx.problems, "textures", expected)
