"""Peak memory and time of `python -m uflow_exp.predict` on large images under `dataset.tiling`.

Run: .venv/bin/python benchmarks/bench_predict_memory.py [--sizes 1024x768 2592x1944] [--batches 4 16 64]
(`make bench-predict-memory`). For each image size (width x height; 2592 x 1944 is 5 MP) it writes
one textured image, builds a model tiled at that native size (the default backbone and flow, tiles of
its 256 px input, overlap 0.25; untrained: memory and time do not depend on the weights) and runs
the real predict command on the image in a fresh process per row, with `batch` tiles through the
model at once. The table gives the tile count, the process's peak resident memory (ru_maxrss of the
child) and its seconds (start-up and model loading included). Memory stays bounded when it grows
with `batch`, not with the image: no whole-image feature tensor exists, only the image, its maps and
one batch of tiles' features and latents.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_checkpoint(folder: Path, width: int, height: int, batch: int) -> tuple[Path, int]:
    """A checkpoint of the default model tiled at ``height`` x ``width`` (its NFA level 0, which needs
    no calibration) and its tile count."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from uflow_exp.utils import CONFIG_DIR

    overrides = [
        f"dataset.tiling={{scale:native,overlap:0.25,batch:{batch},shape:[{height},{width}]}}",
        "threshold.calibrate_on_normal=false",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    module = instantiate(cfg.model)
    path = folder / f"tiled_{width}x{height}_b{batch}.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path, len(module.tiler)


def run_predict(ckpt: Path, image: Path, out: Path) -> tuple[float, float]:
    """(peak RSS MB, seconds) of one predict process, measured by a process of this script whose only
    child it is (ru_maxrss of children is the largest child's so far)."""
    command = [
        sys.executable, "-m", "uflow_exp.predict", f"ckpt_path={ckpt}", f"input={image}", f"output={out}",
        "device=cpu", "num_workers=0", "batch_size=1", f"hydra.run.dir={out / 'run'}",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--measure", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"predict failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return float(done.stdout.split()[-1]) / 1024, seconds


def measure(command: list[str]) -> None:
    """Run ``command`` and print its peak resident memory (kB)."""
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        return measure(sys.argv[2:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["1024x768", "2592x1944"], help="width x height")
    parser.add_argument("--batches", nargs="+", type=int, default=[4, 16, 64], help="tiles at once")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for size in args.sizes:
            width, height = (int(v) for v in size.split("x"))
            image = folder / f"image_{size}.png"
            rng = np.random.default_rng(0)
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)
            for batch in args.batches:
                ckpt, tiles = make_checkpoint(folder, width, height, batch)
                peak, seconds = run_predict(ckpt, image, folder / f"out_{size}_{batch}")
                rows.append((size, width * height / 1e6, tiles, batch, peak, seconds))
                print(f"{size}: {tiles} tiles, batch {batch}: {peak:.0f} MB, {seconds:.1f} s", flush=True)
    print("\n| image (width x height) | megapixels | tiles | tiles per batch | peak RSS MB | seconds |")
    print("|---|---|---|---|---|---|")
    for size, mp, tiles, batch, peak, seconds in rows:
        print(f"| {size} | {mp:.1f} | {tiles} | {batch} | {peak:.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
