"""ShanghaiTech Campus: training videos (normal only) and labelled test frames, one scene at a time.

Training frames are decoded from `ROOT/training/videos/SS_VVV.avi` every `frame_stride` frames into
the cache folder as JPEG files (the test frames are JPEG too), or read from pre-extracted folders
`ROOT/training/frames/SS_VVV/`; either way they go through the same reading path as every image.
"""

from __future__ import annotations

from pathlib import Path

import cv2

from uflow_exp.data.io import load_npy
from uflow_exp.data.records import (
    BadFileError,
    DatasetError,
    FileProblems,
    LayoutContext,
    NpyFrame,
    Record,
    Splits,
    build_once,
    list_images,
    natural_key,
    normal_records,
    require_dir,
    root_dir,
    two_digits,
)

SCENES = tuple(f"{scene:02d}" for scene in range(1, 14))
EXPECTED = (
    "ROOT/training/videos/SS_VVV.avi (or ROOT/training/frames/SS_VVV/*.jpg), "
    "ROOT/testing/frames/SS_VVVV/*.jpg, "
    "ROOT/testing/test_frame_mask/SS_VVVV.npy (per-frame 0/1) and ROOT/testing/test_pixel_mask/SS_VVVV.npy "
    "(frames x H x W), with SS the scene 01..13"
)
TRAIN_SOURCES = ("auto", "videos", "frames")
JPEG_QUALITY = 95


def _scene_folders(parent: Path, scene: str) -> list[Path]:
    return sorted((p for p in parent.glob(f"{scene}_*") if p.is_dir()), key=natural_key)


def _decode(video: Path, folder: Path, stride: int) -> None:
    capture = cv2.VideoCapture(str(video))
    index = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        if index % stride == 0:
            cv2.imwrite(str(folder / f"{index:06d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        index += 1
    capture.release()
    if index == 0:
        raise BadFileError(video, "no frame could be decoded (damaged video or missing codec)")


def decode_video(video: Path, target: Path, stride: int, problems: FileProblems) -> list[Path]:
    """Every `stride`-th frame of `video` as `target/<frame index>.jpg`, decoded once."""
    try:
        build_once(target, lambda folder: _decode(video, folder, stride))
    except BadFileError as error:
        problems.report(error.path, error.reason)
        return []
    return list_images(target)


def _train_records(
    root: Path, scene: str, cache_dir: Path, stride: int, source: str, problems: FileProblems
) -> list[Record]:
    frames_dir, videos_dir = root / "training" / "frames", root / "training" / "videos"
    if source == "auto":
        source = "frames" if _scene_folders(frames_dir, scene) else "videos"
    if source == "frames":
        folders = _scene_folders(require_dir(frames_dir, "stc", EXPECTED), scene)
        return [r for f in folders for r in normal_records(list_images(f)[::stride], group=f.name)]
    videos = sorted(require_dir(videos_dir, "stc", EXPECTED).glob(f"{scene}_*.avi"), key=natural_key)
    target = cache_dir / f"stride{stride}"
    return [
        r
        for video in videos
        for r in normal_records(decode_video(video, target / video.stem, stride, problems), group=video.stem)
    ]


def _test_records(root: Path, scene: str, problems: FileProblems) -> list[Record]:
    testing = root / "testing"
    records: list[Record] = []
    for folder in _scene_folders(require_dir(testing / "frames", "stc", EXPECTED), scene):
        frames = list_images(folder)
        labels_file = testing / "test_frame_mask" / f"{folder.name}.npy"
        masks_file = testing / "test_pixel_mask" / f"{folder.name}.npy"
        missing = [str(p) for p in (labels_file, masks_file) if not p.is_file()]
        if missing:
            problems.report(folder, f"test frames without their labels (missing {' and '.join(missing)})")
            continue
        try:
            labels, masks = load_npy(labels_file), load_npy(masks_file)
        except BadFileError as error:
            problems.report(error.path, error.reason)
            continue
        if labels.shape != (len(frames),) or masks.shape[:1] != (len(frames),):
            problems.report(
                folder,
                f"{len(frames)} frames, but {labels_file.name} has shape {labels.shape} and "
                f"{masks_file.name} has shape {masks.shape}",
            )
            continue
        records += [
            Record(frame, NpyFrame(masks_file, i), int(label != 0))
            for i, (frame, label) in enumerate(zip(frames, labels, strict=True))
        ]
    return records


def find_records(
    ctx: LayoutContext, cache_dir: str = ".cache/stc", frame_stride: int = 5, train_source: str = "auto"
) -> Splits:
    if train_source not in TRAIN_SOURCES:
        raise DatasetError(f"stc: train_source must be one of {TRAIN_SOURCES}, got {train_source!r}")
    if frame_stride < 1:
        raise DatasetError(f"stc: frame_stride must be >= 1, got {frame_stride}")
    root = root_dir(ctx, "stc", EXPECTED)
    scene = two_digits(ctx.category)
    if scene not in SCENES:
        raise DatasetError(f"stc: category must be a scene {SCENES[0]}..{SCENES[-1]}, got {ctx.category!r}")
    train = _train_records(root, scene, Path(cache_dir), frame_stride, train_source, ctx.problems)
    return Splits(train, _test_records(root, scene, ctx.problems))
