"""anomalib's Uflow on an MVTec-layout category, timed as this project times itself; runs inside the
peers' virtual environment (anomalib installed, this project not). Prints one JSON line.

Called by ``benchmarks/bench_peers.py``; by hand:
.venv-peers/bin/python benchmarks/peer_anomalib.py ROOT CATEGORY --batch 8 --epochs 5 --batches 24

With ``--map-floor CALLS`` it trains nothing and times anomalib's model alone instead: one warm-up
and CALLS timed calls of its eval-mode forward (backbone, flow, anomaly map) on a seeded random
batch, printed as ``{"map_seconds": [...]}``, the peer's side of bench_peers' floor table.

Uses anomalib's public API (``anomalib.data.MVTecAD``, ``anomalib.models.Uflow``,
``anomalib.engine.Engine``; its Uflow resizes every image to 448 px). Its resnet18 loads ImageNet
weights from the hub, unreachable here, so unless ``--pretrained`` is given timm builds it with random
ones: the arithmetic is the same.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path


def train_loop_timer():
    """This project's ``TrainLoopTimer``, loaded by path (the project is not installed here)."""
    path = Path(__file__).resolve().parents[1] / "uflow_exp" / "callbacks" / "train_timer.py"
    spec = importlib.util.spec_from_file_location("train_timer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TrainLoopTimer()


def map_seconds(backbone: str, batch: int, calls: int) -> list[float]:
    """Seconds of each of ``calls`` eval-mode forwards of anomalib's UflowModel, after one warm-up."""
    import torch
    from anomalib.models.image.uflow.torch_model import UflowModel

    model = UflowModel(input_size=(448, 448), backbone=backbone).eval()
    images = torch.rand(batch, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for _ in range(calls + 1):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return times[1:]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("root", type=Path, nargs="?", help="folder holding the category folder (MVTec AD)")
    parser.add_argument("category", nargs="?")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=24, help="training batches per epoch")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pretrained", action="store_true", help="hub weights (needs the internet)")
    parser.add_argument("--out", type=Path, default=Path("results-peer"))
    parser.add_argument("--map-floor", type=int, metavar="CALLS", help="time the model alone (see above)")
    args = parser.parse_args()
    if args.map_floor is None and args.category is None:
        parser.error("ROOT and CATEGORY are needed unless --map-floor is given")
    return args


def main() -> None:
    args = parse_args()
    import timm

    if not args.pretrained:
        create_model = timm.create_model
        timm.create_model = lambda *a, **kw: create_model(*a, **{**kw, "pretrained": False})

    if args.map_floor is not None:
        print(json.dumps({"map_seconds": map_seconds(args.backbone, args.batch, args.map_floor)}))
        return

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Uflow

    data = MVTecAD(
        root=args.root,
        category=args.category,
        train_batch_size=args.batch,
        eval_batch_size=args.batch,
        num_workers=args.workers,
    )
    model = Uflow(backbone=args.backbone, visualizer=False)  # no image files: ours writes 8 panels
    timer = train_loop_timer()
    engine = Engine(
        callbacks=[timer],
        logger=False,
        default_root_dir=args.out,
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        limit_train_batches=args.batches,
        limit_val_batches=0,  # no validation: anomalib's default validates on the test images
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=data)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    results = engine.test(model=model, datamodule=data, verbose=False)
    test_s = time.perf_counter() - start
    n_test = len(data.test_data)
    print(
        json.dumps(
            {
                "fit_s": fit_s,
                "train_images_per_s": timer.images / timer.seconds,
                "test_images_per_s": n_test / test_s,
                "pixel_auroc": results[0].get("pixel_AUROC"),
            }
        )
    )


if __name__ == "__main__":
    main()
