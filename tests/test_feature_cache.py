"""The feature cache: exact features, one extraction per image, a disk store reused and keyed safely."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import hydra
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from tests import fake_layouts
from tests.framework_helpers import TINY, compose_train
from uflow_exp import feature_cache as fc
from uflow_exp.data.dataset import AnomalyDataset
from uflow_exp.data.records import Record
from uflow_exp.feature_cache import (
    CacheSpec,
    FeatureCache,
    FeatureCacheError,
    open_feature_cache,
    parse_mode,
)

SPEC = CacheSpec(dataset="fake", category="cat", backbone="conv", input_size=8, image_size=8)
N_IMAGES = 6


class CountingExtractor(nn.Module):
    """A frozen 1x1 conv at two scales that records every image it is given."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(seed)))
        self.conv.requires_grad_(False)
        self.eval()
        self.seen: list[torch.Tensor] = []

    def backbone_modules(self) -> list[nn.Module]:
        return [self.conv]

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.seen.extend(images)
        # one image at a time: a batched conv's rounding depends on the batch, the cache's rows must not
        x = torch.cat([self.conv(image[None]) for image in images])
        return [x, F.avg_pool2d(x, 2)]


@pytest.fixture
def data(tmp_path) -> tuple[list[str], torch.Tensor]:
    """Image files (the cache stats them, never reads them) and the tensors a loader would yield."""
    paths = []
    for i in range(N_IMAGES):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([i]) * 10)
        paths.append(str(path))
    images = torch.randn(N_IMAGES, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return paths, images


def open_cache(tmp_path, extractor, paths, mode: str = "disk") -> FeatureCache:
    cache = open_feature_cache(extractor, mode, paths, SPEC, tmp_path / "features")
    extractor.seen.clear()  # the blank image that sized the store
    return cache


def epoch(cache: FeatureCache, extractor, paths, images, order, batch: int = 4) -> list[list[torch.Tensor]]:
    """Features of each batch of an epoch in ``order``: the missing ones filled, then all read."""
    out = []
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        missing = set(cache.missing([paths[i] for i in rows]))
        fresh = [i for i in rows if os.path.abspath(paths[i]) in missing]
        if fresh:
            cache.fill([([paths[i] for i in fresh], images[fresh])], extractor.extract)
        per_image = [cache.read(paths[i]) for i in rows]
        out.append([torch.stack(scale) for scale in zip(*per_image, strict=True)])
    return out


def reference(extractor, images, order, batch: int = 4) -> list[list[torch.Tensor]]:
    twin = CountingExtractor()
    twin.load_state_dict(extractor.state_dict())
    return [twin.extract(images[order[start : start + batch]]) for start in range(0, len(order), batch)]


def flags(cache: FeatureCache) -> np.ndarray:
    return np.load(cache.store.folder / "filled.npy", mmap_mode="r+")


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_features_are_exact_and_extracted_once_per_image(mode, data, tmp_path):
    paths, images = data
    extractor = CountingExtractor()
    cache = open_cache(tmp_path, extractor, paths, mode)
    assert isinstance(cache.store, fc.MemoryStore if mode == "memory" else fc.DiskStore)
    for seed in range(3):  # epochs in different orders: the first fills, the others read
        order = torch.randperm(N_IMAGES, generator=torch.Generator().manual_seed(seed)).tolist()
        got = epoch(cache, extractor, paths, images, order)
        for got_batch, want_batch in zip(got, reference(extractor, images, order), strict=True):
            assert all(torch.equal(g, w) for g, w in zip(got_batch, want_batch, strict=True))
    assert len(extractor.seen) == N_IMAGES


def test_disk_cache_is_reused_by_a_second_cache_object(data, tmp_path, caplog):
    paths, images = data
    extractor = CountingExtractor()
    first = open_cache(tmp_path, extractor, paths)
    order = list(range(N_IMAGES))
    filled = epoch(first, extractor, paths, images, order)
    assert first.store.created and len(extractor.seen) == N_IMAGES

    extractor.seen.clear()
    with caplog.at_level(logging.INFO, logger=fc.__name__):
        second = open_cache(tmp_path, extractor, paths)
    assert second.store.folder == first.store.folder and not second.store.created
    assert f"{N_IMAGES} of {N_IMAGES} rows already filled" in caplog.text
    again = epoch(second, extractor, paths, images, order)
    assert extractor.seen == []
    for a, b in zip(filled, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == [first.store.folder.name]


def test_the_folder_name_is_readable_and_changes_with_images_and_weights(data, tmp_path):
    paths, _ = data
    extractor = CountingExtractor()
    folder = open_cache(tmp_path, extractor, paths).store.folder
    assert folder.name.startswith("fake-cat-conv-8-") and len(folder.name.rsplit("-", 1)[1]) == 12

    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched
    touched = open_cache(tmp_path, extractor, paths).store.folder
    with open(paths[1], "ab") as file:  # rewritten with other content
        file.write(b"more")
    rewritten = open_cache(tmp_path, extractor, paths).store.folder
    with torch.no_grad():
        extractor.conv.weight.add_(1e-3)
    reweighted = open_cache(tmp_path, extractor, paths).store.folder
    assert len({folder, touched, rewritten, reweighted}) == 4


def test_a_partially_filled_cache_recomputes_exactly_those_rows(data, tmp_path):
    paths, images = data
    extractor = CountingExtractor()
    cache = open_cache(tmp_path, extractor, paths)
    order = list(range(N_IMAGES))
    epoch(cache, extractor, paths, images, order)
    # A crash between writing rows 1 and 4 and flagging them: flags unset, data half-written.
    rows = sorted(paths).index(paths[1]), sorted(paths).index(paths[4])
    flags(cache)[list(rows)] = 0
    for scale in (0, 1):
        array = np.load(cache.store.folder / f"scale{scale}.npy", mmap_mode="r+")
        array[list(rows)] = np.nan

    extractor.seen.clear()
    resumed = open_cache(tmp_path, extractor, paths)
    got = epoch(resumed, extractor, paths, images, order)
    assert torch.equal(torch.stack(extractor.seen), images[[1, 4]])
    for got_batch, want_batch in zip(got, reference(extractor, images, order), strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got_batch, want_batch, strict=True))
    assert flags(resumed).all()


CORRUPTIONS = {
    "garbage": lambda folder: (folder / "meta.json").write_text("{not json"),
    "version": lambda folder: _edit_meta(folder, version=99),
    "shapes": lambda folder: _edit_meta(folder, shapes=[[4, 8, 8], [4, 2, 2]]),
    "key": lambda folder: _edit_meta(folder, key="0" * 64),
    "index": lambda folder: (folder / "index.json").write_text(json.dumps({"/elsewhere.png": 0})),
    "truncated": lambda folder: (folder / "scale1.npy").write_bytes(b"\x93NUMPY"),
}


def _edit_meta(folder, **fields) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **fields}))


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_mismatched_folder_is_refused_naming_it(corruption, data, tmp_path):
    paths, images = data
    extractor = CountingExtractor()
    cache = open_cache(tmp_path, extractor, paths)
    epoch(cache, extractor, paths, images, list(range(N_IMAGES)))
    folder = cache.store.folder
    CORRUPTIONS[corruption](folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FeatureCacheError, match=f"{folder}.*Delete the folder"):
        open_cache(tmp_path, extractor, paths)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # neither read into nor rebuilt


def test_a_folder_created_meanwhile_by_another_process_is_used(data, tmp_path, monkeypatch):
    paths, images = data
    extractor = CountingExtractor()
    write_layout = fc._write_layout
    others: list[FeatureCache] = []
    raced = []

    def racing(folder, *args):  # another rank creates (and starts filling) the folder first
        if not raced:
            raced.append(folder)
            others.append(open_cache(tmp_path, extractor, paths))
            others[0].fill([(paths[:2], images[:2])], extractor.extract)
        write_layout(folder, *args)

    monkeypatch.setattr(fc, "_write_layout", racing)
    cache = open_cache(tmp_path, extractor, paths)
    assert cache.store.folder == others[0].store.folder and not cache.store.created
    assert os.listdir(tmp_path / "features") == [cache.store.folder.name]  # no temporary folder left
    epoch(cache, extractor, paths, images, list(range(N_IMAGES)))
    assert torch.equal(torch.stack(extractor.seen), images[2:])  # the other's rows are read


@pytest.mark.parametrize("fits", [True, False])
def test_auto_keeps_features_in_memory_when_they_fit_in_a_quarter_of_available_memory(
    fits, data, tmp_path, monkeypatch
):
    paths, _ = data
    nbytes = N_IMAGES * (4 * 8 * 8 + 4 * 4 * 4) * 4  # float32 features of every image
    monkeypatch.setattr(fc, "available_memory", lambda: 4 * nbytes + (0 if fits else -4))
    cache = open_cache(tmp_path, CountingExtractor(), paths, "true")
    assert isinstance(cache.store, fc.MemoryStore if fits else fc.DiskStore)
    assert (tmp_path / "features").exists() != fits


@pytest.mark.parametrize("value", ["yes", "auto", 1, None])
def test_an_invalid_mode_is_refused_naming_the_key(value):
    with pytest.raises(
        ValueError, match=f"feature_cache must be one of true, false, memory, disk; got {value!r}"
    ):
        parse_mode(value)


def test_an_invalid_mode_in_the_config_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    from uflow_exp.tasks.train import train

    cfg = compose_train([*TINY, "feature_cache=sometimes"], tmp_path)
    monkeypatch.setattr(hydra.utils, "instantiate", lambda *a, **k: pytest.fail("built something"))
    with pytest.raises(ValueError, match="feature_cache must be one of .*'sometimes'"):
        train(cfg)


@pytest.mark.parametrize("how", ["requires_grad", "training"])
@pytest.mark.parametrize("mode", ["disk", "fill"])
def test_a_trainable_backbone_is_refused(how, mode, data, tmp_path):
    paths, images = data
    extractor = CountingExtractor()
    cache = FeatureCache(backbone=extractor.backbone_modules())
    if how == "requires_grad":
        extractor.conv.weight.requires_grad_(True)
    else:
        extractor.conv.train()
    with pytest.raises(FeatureCacheError, match="needs a frozen backbone.*feature_cache=false"):
        if mode == "disk":
            open_cache(tmp_path, extractor, paths)
        else:
            cache.fill([(paths[:2], images[:2])], extractor.extract)
    assert extractor.seen == [] and not (tmp_path / "features").exists()


def test_a_key_never_filled_is_refused_naming_the_image(data, tmp_path):
    paths, images = data
    extractor = CountingExtractor()
    cache = open_cache(tmp_path, extractor, paths, "memory")
    cache.fill([(paths[:2], images[:2])], extractor.extract)
    assert [t.shape for t in cache.read(paths[1])] == [(4, 8, 8), (4, 4, 4)]
    with pytest.raises(FeatureCacheError, match=f"image {paths[2]} has no features"):
        cache.read(paths[2])


def test_a_served_data_set_yields_stored_features_and_never_decodes(data, tmp_path, monkeypatch):
    paths, images = data
    extractor = CountingExtractor()
    cache = open_cache(tmp_path, extractor, paths, "memory")
    cache.fill([(paths, images)], extractor.extract)
    monkeypatch.setattr(AnomalyDataset, "load_image", lambda *a: pytest.fail("decoded an image"))
    dataset = AnomalyDataset([Record(p, None, 0) for p in paths], 8, features=cache)
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert "image" not in batch
    for got, want in zip(batch["features"], extractor.extract(images[:3]), strict=True):
        assert torch.equal(got, want)


def test_a_module_trained_without_the_task_extracts_every_step_and_checkpoints_no_cache(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=4, size=64)
    module = hydra.utils.instantiate(compose_train(TINY, tmp_path).model)
    extract, seen = module.model.extract, []
    module.model.extract = lambda images: seen.extend(images) or extract(images)
    records = [Record(p, None, 0) for p in sorted((root / "bottle" / "train" / "good").iterdir())]
    loader = DataLoader(AnomalyDataset(records, 64), batch_size=2)  # validates on the same images
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    # sanity check (2 batches), then per epoch training and validation of every image
    assert len(seen) == 2 * 2 + 2 * 2 * len(records)
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not [key for key in checkpoint["state_dict"] if "cache" in key]
    assert "feature_cache" not in checkpoint["hyper_parameters"]


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_float16_storage_rounds_each_feature_once_and_halves_the_size(mode, data, tmp_path, caplog):
    paths, images = data
    extractor = CountingExtractor()
    spec = dataclasses.replace(SPEC, dtype="float16")
    with caplog.at_level(logging.INFO, logger=fc.__name__):
        cache = open_feature_cache(extractor, mode, paths, spec, tmp_path / "features")
    full = N_IMAGES * (4 * 8 * 8 + 4 * 4 * 4)
    assert f"{full * 2 / 2**20:.1f} MB (float16)" in caplog.text
    cache.fill([(paths, images)], extractor.extract)
    exact = [torch.cat([extractor.extract(image[None])[s] for image in images]) for s in (0, 1)]
    for i, path in enumerate(paths):
        for got, want in zip(cache.read(path), exact, strict=True):
            assert got.dtype == torch.float32
            assert torch.equal(got, want[i].half().float())  # one rounding, nothing else
    if mode == "disk":
        assert cache.store.folder.name.startswith("fake-cat-conv-8-float16-")


def test_float16_storage_refuses_features_beyond_its_range(data, tmp_path):
    paths, images = data
    extractor = CountingExtractor()
    cache = open_feature_cache(extractor, "memory", paths, dataclasses.replace(SPEC, dtype="float16"), None)
    with pytest.raises(FeatureCacheError, match="beyond what feature_cache_dtype=float16 holds.*float32"):
        cache.fill([(paths[:1], images[:1] * 1e6)], extractor.extract)


def test_an_unknown_storage_dtype_is_refused_naming_the_key(data, tmp_path):
    paths, _ = data
    with pytest.raises(ValueError, match="feature_cache_dtype must be one of float32, float16; got 'int8'"):
        open_feature_cache(
            CountingExtractor(), "memory", paths, dataclasses.replace(SPEC, dtype="int8"), None
        )
