"""One LightningDataModule for every data set; `layout` picks the layout module that lists the files."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler

from uflow_exp.data.dataset import AnomalyDataset, FeatureLookup, validate_records
from uflow_exp.data.io import image_shape as _header_shape
from uflow_exp.data.layouts import LAYOUTS, check_options, list_records
from uflow_exp.data.records import DatasetError, FileProblems, Record, Splits, split_off
from uflow_exp.tiling import Tiler, tiler_of, whole_shape
from uflow_exp.utils.shapes import Shape, as_shape, keep_aspect, shape_text

log = logging.getLogger(__name__)

VAL_SPLITS = ("train", "test")
RESIZE_MODES = ("auto", "square", "keep_aspect")
# dataset.resize=keep_aspect (and auto): the largest relative difference of an image's aspect ratio
# from the training images' median that one rectangle still serves (e.g. KolektorSDD's 250 x 620..640)
ASPECT_TOLERANCE = 0.1
# dataset.resize=auto keeps the aspect of images whose longer side is at least this many times their
# shorter one. Squashing kolektor_dev's 2.5:1 frames to a square lost most of their thin cracks
# (AUPRO 0.44 against 0.89 at their aspect); tire_dev's 4:3 frames lost nothing at the pixel level
# and ranked images better squashed (image AUROC 0.69 against 0.61) (docs/real-data.md)
AUTO_MIN_ASPECT = 1.5


class EpochSeededSampler(Sampler[int]):
    """A new permutation every epoch, drawn from (seed, epoch) alone.

    torch's RandomSampler draws from the global generator, whose state a checkpoint does not hold,
    so a run resumed from ``last.ckpt`` would see other batches than the uninterrupted run. Lightning
    calls ``set_epoch`` at the start of each epoch (under DDP it wraps this sampler per rank).
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def _evaluation_sampler(dataset: AnomalyDataset) -> Sampler[int] | None:
    """Under DDP, each rank evaluates every world_size-th image and no image twice.

    Lightning would otherwise give evaluation loaders a DistributedSampler, which pads the shards by
    repeating images, so that an image counts twice in the metrics whenever the set's size is not a
    multiple of the number of processes. Off-by-one shard sizes are safe in evaluation (no gradient
    sync), as Lightning's own prediction loop relies on.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    return UnrepeatedDistributedSampler(dataset, shuffle=False)


class AnomalyDataModule(L.LightningDataModule):
    """Train on normal images, test on normal + anomalous ones, validate on either.

    Args:
        layout: how the files lie on disk, one of `LAYOUTS`.
        root: data set root (unused by `textures`, which generates into `cache_dir`).
        category: MVTec category, BTAD product, texture name or ShanghaiTech scene.
        image_size: the images the loaders yield (the backbone's input): a side or [height, width].
        eval_size: the masks they yield (the maps that metrics and thresholds see): a side or
            [height, width]; None: ``image_size``.
        resize: "square" resizes every image to ``image_size`` whatever its shape; "keep_aspect"
            (with a single ``image_size``) to the rectangle of the data's aspect ratio whose shorter
            side is ``image_size`` and whose longer side is a multiple of ``size_multiple`` (the masks
            likewise, shorter side ``eval_size``): see `image_shape`. "auto": "keep_aspect" when every
            image, training and test, has one aspect ratio of at least `AUTO_MIN_ASPECT`, else
            "square"; `image_shape` replaces it with the mode it chose.
        size_multiple: the longer side of a "keep_aspect" rectangle is rounded to a multiple of this
            (the backbone's largest stride).
        tiling: None, or ``{scale, overlap, shape, batch}`` (``uflow_exp.tiling``): each image, at its
            own aspect and ``scale`` ("native" or its longer side in pixels; ``shape`` once known), is
            cut into tiles of ``image_size`` overlapping by at least ``overlap``; training samples are
            tiles, evaluation samples whole images (masks: ``eval_size`` per tile). ``resize`` is
            then unused.
        val_split: "train" validates on a seeded `val_fraction` of the normal training images
            (unsupervised); "test" validates on the test set, as the paper does (label leakage).
        val_whole_groups: with val_split "train", hold out whole groups where the layout knows them
            (LGG patients, ShanghaiTech videos: `split_off`); false splits the images themselves.
        seed: seeds every split (validation, LGG patients, folder tests) and the textures; kept apart
            from the training seed so that sweeping training seeds keeps the data fixed.
        on_bad_file: "error" stops at the first bad file; "warn" skips bad files and logs a count.
        verify_images: decode every file at setup (catches truncated files); else read headers only.
        **options: layout-specific keyword arguments of that layout's `find_records`.
    """

    def __init__(
        self,
        layout: str,
        root: str | None = None,
        category: str | None = None,
        image_size: int | list[int] = 256,
        eval_size: int | list[int] | None = None,
        resize: str = "auto",
        size_multiple: int = 32,
        tiling: dict | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_split: str = "train",
        val_fraction: float = 0.2,
        val_whole_groups: bool = True,
        seed: int = 0,
        on_bad_file: str = "error",
        verify_images: bool = True,
        **options,
    ) -> None:
        super().__init__()
        if val_split not in VAL_SPLITS:
            raise DatasetError(f"val_split must be one of {VAL_SPLITS}, got {val_split!r}")
        if val_split == "train" and not 0 < val_fraction < 1:
            raise DatasetError(f"val_fraction must be in (0, 1) with val_split=train, got {val_fraction}")
        if resize not in RESIZE_MODES:
            raise DatasetError(f"dataset.resize must be one of {RESIZE_MODES}, got {resize!r}")
        FileProblems(on_bad_file)  # rejects an unknown mode now rather than at setup
        check_options(layout, options)
        # not logged: Lightning would flatten them to the top of the run's logged config, where the
        # data split's `seed` replaced the run's seed (the task logs the whole config, nested)
        self.save_hyperparameters(logger=False)
        self.layout = layout
        self.root = None if root is None else Path(root)
        self.category = category
        # (height, width); "keep_aspect" (or "auto") may replace both with a rectangle (`image_shape`)
        self.image_size = as_shape(image_size, "dataset.image_size")
        self.eval_size = as_shape(eval_size or image_size, "dataset.eval_size")
        # an explicit rectangle is taken as it is; a single side keeps the data's aspect on request
        self.resize = resize if not isinstance(image_size, list | tuple) else "square"
        self.size_multiple = int(size_multiple)
        # {scale, overlap, shape, batch} (uflow_exp.tiling); its shape is set from the data if not given
        self.tiling = None if not tiling else dict(tiling)
        self.tiler: Tiler | None = None
        self._shaped = self.resize == "square" and self.tiling is None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_split, self.val_fraction, self.val_whole_groups = val_split, val_fraction, val_whole_groups
        self.seed = seed
        self.on_bad_file = on_bad_file
        self.verify_images = verify_images
        self.options = options
        self.train_dataset: AnomalyDataset | None = None
        self.val_dataset: AnomalyDataset | None = None
        self.test_dataset: AnomalyDataset | None = None
        self._found: tuple[Splits, FileProblems] | None = None
        self._valid: tuple[list[Record], list[Record]] | None = None
        self._aspect_found: tuple[Shape, tuple[Path, int, int] | None] | None = None

    def _find(self) -> tuple[Splits, FileProblems]:
        """The layout's records, listed once per process (what it skipped under ``warn`` with them)."""
        if self._found is None:
            self._found = list_records(
                self.layout, self.root, self.category, self.seed, self.on_bad_file, self.options
            )
        return self._found

    def _validated(self) -> tuple[list[Record], list[Record]]:
        """The training and test records whose files open, checked once per process (bad files go to
        the layout's `FileProblems`: the first one raises, or under ``warn`` each is skipped)."""
        if self._valid is None:
            found, problems = self._find()
            self._valid = (
                validate_records(found.train, problems, self.verify_images),
                validate_records(found.test, problems, self.verify_images),
            )
            problems.summarise(self.layout)
        return self._valid

    def prepare_data(self) -> None:
        # Builds the caches (generated textures, decoded video frames) once, on one process.
        self._find()

    def image_shape(self) -> tuple[Shape, Shape]:
        """The (height, width) of the images and of the masks the evaluation loaders yield (under
        tiling, whole images, which the model cuts into tiles of the configured ``image_size``; the
        training loader yields those tiles). Under "keep_aspect" or tiling they follow the training
        images (`data_shape`); a ``tiling.shape`` already known (a trained model's) is taken as it is."""
        if self._shaped:
            return self.image_size, self.eval_size
        if self.tiling is not None:
            tile, tile_map = self.image_size, self.eval_size
            if self.tiling.get("shape") is None:
                height, width = self.data_shape()
                self.tiling["shape"] = list(
                    whole_shape(height, width, self.tiling.get("scale", "native"), tile)
                )
            self.tiler = tiler_of(self.tiling, tile)
            self.image_size, self.eval_size = self.tiler.shape, self.tiler.blended_shape(tile_map)
            how = f"{len(self.tiler)} tiles of {shape_text(tile)} (overlap >= {self.tiler.overlap:g})"
            log.info("dataset.tiling: images %s, %s, maps %s (height x width)",
                     shape_text(self.image_size), how, shape_text(self.eval_size))  # fmt: skip
        elif self.resize == "auto" and self._auto_is_square():
            self.resize = "square"
        else:
            height, width = self.data_shape()
            self.image_size = keep_aspect(min(self.image_size), height, width, self.size_multiple)
            self.eval_size = keep_aspect(min(self.eval_size), *self.image_size)
            log.info("dataset.resize=%s: images %s, maps %s (height x width)", self.resize,
                     shape_text(self.image_size), shape_text(self.eval_size))  # fmt: skip
            self.resize = "keep_aspect"
        self._shaped = True
        return self.image_size, self.eval_size

    def _auto_is_square(self) -> bool:
        """``resize: auto``: whether the square serves, logging why: the images' aspect ratios differ
        (one rectangle would distort some of them), or they are closer to square than
        `AUTO_MIN_ASPECT`."""
        if not self._validated()[0]:
            return True  # setup names the empty split
        (height, width), outlier = self._aspect()
        if outlier is not None:
            path, h, w = outlier
            log.info("dataset.resize=auto: square, the images' aspect ratios differ (%s is %d x %d, width "
                     "x height, the training images' median %d x %d)", path, w, h, width, height)  # fmt: skip
            return True
        aspect = max(height, width) / min(height, width)
        if aspect < AUTO_MIN_ASPECT:
            log.info("dataset.resize=auto: square, the images (median %d x %d, width x height) are within "
                     "%.3g:1 of square (dataset.resize=keep_aspect keeps their aspect)", width, height,
                     AUTO_MIN_ASPECT)  # fmt: skip
            return True
        return False

    def _aspect(self) -> tuple[Shape, tuple[Path, int, int] | None]:
        """The training images' median (height, width), read from the files' headers, and the first
        image (path, height, width), training or test, whose aspect ratio is more than
        `ASPECT_TOLERANCE` away from theirs (None: every image fits one rectangle). Read once: `auto`
        and `data_shape` both ask."""
        if self._aspect_found is not None:
            return self._aspect_found
        train, test = self._validated()
        shapes = {r.image: _header_shape(r.image) for r in [*train, *test]}
        if not train:
            raise DatasetError(f"{self.layout} (root {self.root}): no training images to take the shape of")
        height, width = (int(np.median([shapes[r.image][axis] for r in train])) for axis in (0, 1))
        ratio = height / width
        outlier = next(
            ((path, h, w) for path, (h, w) in shapes.items() if abs(h / w / ratio - 1) > ASPECT_TOLERANCE),
            None,
        )
        self._aspect_found = (height, width), outlier
        return self._aspect_found

    def data_shape(self) -> Shape:
        """The median height and width of the training images. An image, training or test, whose
        aspect ratio is more than `ASPECT_TOLERANCE` away from theirs is refused, naming it: one
        rectangle would distort it as the square does."""
        (height, width), outlier = self._aspect()
        if outlier is not None:
            path, h, w = outlier
            how = "tiling" if self.tiling is not None else "resize=keep_aspect"
            raise DatasetError(
                f"dataset.{how}: {path} is {w} x {h} pixels (width x height), an aspect ratio "
                f"(height / width) of {h / w:.3f} against the training images' {height / width:.3f}; one "
                "rectangle fits images of one shape: use dataset.resize=square for mixed shapes"
            )
        return height, width

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train, test = self._validated()
        self.image_shape()
        where = f"{self.layout} (root {self.root}, category {self.category})"
        for split, records in (("train", train), ("test", test)):
            if not records:
                raise DatasetError(
                    f"{where}: the {split} split is empty. Expected layout: {LAYOUTS[self.layout].EXPECTED}"
                )
        if self.val_split == "train":
            train, val = split_off(train, self.val_fraction, self.seed, self.val_whole_groups)
        else:
            val = test
        self.train_dataset = AnomalyDataset(train, self.image_size, self.eval_size, tiles=self.tiler)
        self.val_dataset = AnomalyDataset(val, self.image_size, self.eval_size)
        self.test_dataset = AnomalyDataset(test, self.image_size, self.eval_size)
        anomalous = sum(r.label for r in test)
        log.info(
            "%s: %d train, %d val (%s), %d test images (%d anomalous)",
            where,
            len(train),
            len(val),
            self.val_split,
            len(test),
            anomalous,
        )

    def fit_datasets(self) -> list[AnomalyDataset]:
        """The training and validation sets (after ``setup``)."""
        if self.train_dataset is None or self.val_dataset is None:
            raise RuntimeError("call setup() before asking for the training images")
        return [self.train_dataset, self.val_dataset]

    def drawn_training_records(self, epochs: int, limit: int | float) -> list[Record]:
        """The training records that ``epochs`` epochs of at most ``limit`` batches each draw (after
        ``setup``), in the data set's order: Lightning's ``limit_train_batches`` is a count of
        batches or a share of them, and each epoch's batches come from the seeded permutation of
        `EpochSeededSampler`, so the images a limited run will ever see are known before it starts."""
        batches = self.training_batches(limit)
        sampler = self._training_sampler(self.train_dataset)
        drawn: set[int] = set()
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            drawn.update(list(sampler)[: batches * self.batch_size])
        chosen = {id(self.train_dataset.record_of(i)) for i in drawn}  # a tile draws its image
        return [record for record in self.train_dataset.records if id(record) in chosen]

    def training_batches(self, limit: int | float) -> int:
        """The training batches an epoch reads under Lightning's ``limit_train_batches`` (a count of
        batches or a share of them; after ``setup``)."""
        if self.train_dataset is None:
            raise RuntimeError("call setup() before asking for the training images")
        batches = -(-len(self.train_dataset) // self.batch_size)  # samples: images, or their tiles
        return min(batches, limit) if isinstance(limit, int) else int(batches * limit)

    def serve_features(self, features: FeatureLookup) -> None:
        """From now on the training and validation loaders yield each image's stored features
        instead of decoding it (the test loader still decodes)."""
        for dataset in self.fit_datasets():
            dataset.features = features

    def image_loader(self, records: list[Record]) -> DataLoader:
        """Decoded images of every one of ``records`` in order, in evaluation batches (to compute
        features), in whichever process asks: under DDP the caller has already taken its share."""
        return self._loader(
            AnomalyDataset(records, self.image_size), self.eval_batch_size, shuffle=False, shard=False
        )

    def _training_sampler(self, dataset: AnomalyDataset) -> EpochSeededSampler:
        """The training order: the loader's and the one ``drawn_training_records`` predicts."""
        return EpochSeededSampler(len(dataset), self.seed)

    def _loader(
        self, dataset: AnomalyDataset | None, batch_size: int, shuffle: bool, shard: bool = True
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a data loader")
        if shuffle:
            sampler = self._training_sampler(dataset)
        else:
            sampler = _evaluation_sampler(dataset) if shard else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)
