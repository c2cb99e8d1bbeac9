"""Image sides in the configs: one int for a square, or ``[height, width]`` for a rectangle."""

from __future__ import annotations

from collections.abc import Sequence

Shape = tuple[int, int]


def as_shape(size: int | Sequence[int], key: str = "size") -> Shape:
    """``(height, width)`` of a config side: ``256`` -> ``(256, 256)``, ``[256, 640]`` -> ``(256, 640)``."""
    if isinstance(size, int) and not isinstance(size, bool):
        pair = (size, size)
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        pair = tuple(size)
    else:
        raise ValueError(f"{key}={size!r}: expected an int (a square side) or [height, width]")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{key}={size!r}: expected positive integer sides")
    return int(pair[0]), int(pair[1])


def keep_aspect(short_side: int, height: int, width: int, multiple: int = 1) -> Shape:
    """The ``(height, width)`` whose shorter side is ``short_side`` and whose longer side keeps the
    image's ``height / width`` ratio, rounded to the nearest ``multiple`` (the backbone's largest
    stride, so every scale's feature map covers the image exactly)."""
    scale = short_side / min(height, width)
    long = max(multiple, round(max(height, width) * scale / multiple) * multiple)
    return (short_side, long) if height <= width else (long, short_side)


def shape_text(shape: Sequence[int]) -> str:
    """``(256, 640)`` -> ``"256 x 640"`` (height x width), for messages."""
    return " x ".join(str(int(v)) for v in shape)


def size_key(size: int | Sequence[int]) -> str:
    """A side as recorded in an exported graph's metadata: ``"256"`` for a square (as before
    rectangles existed), ``"256x640"`` (height x width) for a rectangle."""
    height, width = as_shape(size)
    return str(height) if height == width else f"{height}x{width}"
