"""Decoding image and mask files into arrays, with errors that name the file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from uflow_exp.data.records import BadFileError, MaskSource, NpyFrame

# Pillow reduces 16-bit multi-channel TIFFs to 8 bits; tifffile keeps every TIFF variant exact.
_TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
# Modes whose pixel values are not plain intensities per channel; Pillow converts them exactly.
_CONVERT_TO_RGB = frozenset({"1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as error:
        raise BadFileError(path, "file not found") from error
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, tifffile.TiffFileError) as error:
        # Truncated and corrupt files surface as any of these, depending on the decoder.
        raise BadFileError(
            path, f"unreadable or truncated image ({type(error).__name__}: {error})"
        ) from error


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in _TIFF_SUFFIXES


def _decode(path: Path) -> np.ndarray:
    with _reading(path):
        if _is_tiff(path):
            return tifffile.imread(path, key=0)
        with Image.open(path) as image:
            image.load()
            if image.mode in _CONVERT_TO_RGB:
                image = image.convert("RGB")
            return np.asarray(image)


def image_shape(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels."""
    with _reading(path):
        if _is_tiff(path):
            with tifffile.TiffFile(path) as tiff:
                return tiff.pages[0].imagelength, tiff.pages[0].imagewidth
        with Image.open(path) as image:
            return image.height, image.width


def _unit_range(array: np.ndarray, path: Path) -> np.ndarray:
    """Scale integer pixels by their bit depth (8-bit by 255, wider by 65535) and floats as they are."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        scale = 255.0 if array.dtype.itemsize == 1 else 65535.0
        return np.clip(array.astype(np.float32) / scale, 0.0, 1.0)
    if np.issubdtype(array.dtype, np.floating):
        return np.clip(array.astype(np.float32), 0.0, 1.0)
    raise BadFileError(path, f"unsupported pixel type {array.dtype}")


def read_image(path: Path) -> np.ndarray:
    """Any image file as float32 (H, W, 3) in [0, 1]: grey is repeated, alpha is dropped."""
    array = _decode(path)
    if array.ndim == 3 and array.shape[2] in (1, 2):  # grey, or grey + alpha
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise BadFileError(path, f"expected a grey, RGB or RGBA image, got an array of shape {array.shape}")
    return _unit_range(array[..., :3], path)


@lru_cache(maxsize=64)
def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise BadFileError(path, f"unreadable .npy file ({error})") from error


def _npy_frames(source: NpyFrame) -> np.ndarray:
    frames = load_npy(source.path)
    if frames.ndim != 3 or not 0 <= source.index < frames.shape[0]:
        raise BadFileError(source.path, f"no frame {source.index} in an array of shape {frames.shape}")
    return frames


def read_mask(source: MaskSource) -> np.ndarray:
    """A mask as a bool (H, W) array: any non-zero value (in any colour channel) is anomalous."""
    if isinstance(source, NpyFrame):
        return np.asarray(_npy_frames(source)[source.index]) != 0
    array = _decode(source)
    if array.ndim == 3:
        colour = array[..., : 3 if array.shape[2] >= 3 else 1]  # an alpha channel is not a label
        return (colour != 0).any(axis=2)
    return array != 0


def mask_shape(source: MaskSource) -> tuple[int, int]:
    if isinstance(source, NpyFrame):
        return tuple(_npy_frames(source).shape[1:3])
    return image_shape(source)
