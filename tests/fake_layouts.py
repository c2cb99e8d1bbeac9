"""Tiny fake data sets in each real on-disk layout, for tests.

Every normal image is seeded noise; every anomalous image carries one bright square, and its mask is
exactly that square, so tests can check mask alignment. Each builder returns the `dataset.root` to
configure (for LGG MRI the folder that contains `kaggle_3m/`).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

DEFECT = (slice(4, 12), slice(6, 14))  # rows, columns of the bright square in anomalous images


def noise_image(seed: int, height: int, width: int) -> np.ndarray:
    """RGB uint8 noise kept below 200, so the square (255) is the only bright thing."""
    return np.random.default_rng(seed).integers(20, 200, (height, width, 3), dtype=np.uint8)


def defect_pair(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) with the bright square at DEFECT; the mask is 0/255."""
    image = noise_image(seed, height, width)
    image[DEFECT] = 255
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[DEFECT] = 255
    return image, mask


def save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def _normal_folder(
    folder: Path, count: int, size: int | tuple[int, int], seed: int, suffix: str = ".png"
) -> None:
    for i in range(count):
        save(noise_image(seed + i, *_hw(size)), folder / f"{i:03d}{suffix}")


def make_mvtec(
    root: Path,
    category: str = "bottle",
    n_train: int = 4,
    n_test_good: int = 2,
    n_test_defect: int = 2,
    size: int | tuple[int, int] = 32,
) -> Path:
    """``size``: a side, or (height, width)."""
    base = Path(root) / category
    _normal_folder(base / "train" / "good", n_train, size, 0)
    _normal_folder(base / "test" / "good", n_test_good, size, 1000)
    for i in range(n_test_defect):
        image, mask = defect_pair(2000 + i, *_hw(size))
        save(image, base / "test" / "broken" / f"{i:03d}.png")
        save(mask, base / "ground_truth" / "broken" / f"{i:03d}_mask.png")
    return Path(root)


def make_btad(
    root: Path,
    product: str = "01",
    n_train: int = 4,
    n_test_ok: int = 2,
    n_test_ko: int = 2,
    size: int = 32,
    image_suffix: str = ".bmp",
    mask_suffix: str = ".png",
) -> Path:
    """Images and masks use different suffixes, as in the real BTAD products."""
    base = Path(root) / product
    _normal_folder(base / "train" / "ok", n_train, size, 0, image_suffix)
    _normal_folder(base / "test" / "ok", n_test_ok, size, 1000, image_suffix)
    for i in range(n_test_ko):
        image, mask = defect_pair(2000 + i, size, size)
        save(image, base / "test" / "ko" / f"{i:04d}{image_suffix}")
        save(mask, base / "ground_truth" / "ko" / f"{i:04d}{mask_suffix}")
    return Path(root)


def make_lgg(root: Path, n_patients: int = 3, n_slices: int = 5, n_tumour: int = 2, size: int = 32) -> Path:
    """`n_slices` RGB TIFF slices per patient, the last `n_tumour` of them with tumour."""
    for p in range(n_patients):
        patient = f"TCGA_XX_{p:04d}_20000101"
        folder = Path(root) / "kaggle_3m" / patient
        for s in range(1, n_slices + 1):
            seed = 100 * p + s
            if s > n_slices - n_tumour:
                image, mask = defect_pair(seed, size, size)
            else:
                image, mask = noise_image(seed, size, size), np.zeros((size, size), dtype=np.uint8)
            save(image, folder / f"{patient}_{s}.tif")
            save(mask, folder / f"{patient}_{s}_mask.tif")
    return Path(root)


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """An MJPG .avi (OpenCV's built-in encoder, so no codec library is needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    for frame in frames:
        writer.write(frame[..., ::-1].copy())  # OpenCV writes BGR
    writer.release()
    return path


def make_stc(
    root: Path,
    scene: str = "01",
    n_train_videos: int = 2,
    n_train_frames: int = 6,
    n_test_videos: int = 2,
    n_test_frames: int = 4,
    height: int = 32,
    width: int = 48,
    pre_extracted: bool = False,
) -> Path:
    """Training videos (or, with `pre_extracted`, frame folders); test frames whose odd frames are
    anomalous, with per-frame labels and pixel masks in .npy files."""
    root = Path(root)
    for v in range(1, n_train_videos + 1):
        frames = [noise_image(10 * v + f, height, width) for f in range(n_train_frames)]
        if pre_extracted:
            for f, frame in enumerate(frames):
                save(frame, root / "training" / "frames" / f"{scene}_{v:03d}" / f"{f:03d}.jpg")
        else:
            write_video(root / "training" / "videos" / f"{scene}_{v:03d}.avi", frames)
    testing = root / "testing"
    for v in range(1, n_test_videos + 1):
        name = f"{scene}_{v:04d}"
        labels = np.arange(n_test_frames) % 2
        masks = np.zeros((n_test_frames, height, width), dtype=np.uint8)
        for f in range(n_test_frames):
            if labels[f]:
                image, mask = defect_pair(500 + 10 * v + f, height, width)
                masks[f] = mask > 0
            else:
                image = noise_image(500 + 10 * v + f, height, width)
            save(image, testing / "frames" / name / f"{f:03d}.jpg")
        (testing / "test_frame_mask").mkdir(parents=True, exist_ok=True)
        (testing / "test_pixel_mask").mkdir(parents=True, exist_ok=True)
        np.save(testing / "test_frame_mask" / f"{name}.npy", labels)
        np.save(testing / "test_pixel_mask" / f"{name}.npy", masks)
    return root


def make_folder(
    root: Path,
    n_normal: int = 5,
    n_abnormal: int = 2,
    size: int = 32,
    mask_dir: str | None = "masks",
    mask_suffix: str = "_mask",
) -> Path:
    """`normal/`, `abnormal/` and (unless `mask_dir` is None) masks named `<stem><mask_suffix>.png`."""
    root = Path(root)
    _normal_folder(root / "normal", n_normal, size, 0)
    for i in range(n_abnormal):
        image, mask = defect_pair(3000 + i, size, size)
        save(image, root / "abnormal" / f"img{i}.png")
        if mask_dir is not None:
            save(mask, root / mask_dir / f"img{i}{mask_suffix}.png")
    return root
