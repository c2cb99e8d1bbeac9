"""bench_peers' floor bookkeeping, with its measuring processes faked (fast: nothing is timed)."""

import json
from types import SimpleNamespace


def test_floor_rounds_keep_each_tools_map_apart(tmp_path, bench_peers, monkeypatch):
    """The map floors alternate anomalib's process and ours; each tool's calls stay its own."""
    (tmp_path / "ours" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ours" / "checkpoints" / "epoch_000.ckpt").touch()
    commands = []

    def fake_measured(command):
        commands.append(command)
        if str(bench_peers.PEER_PYTHON) == command[0]:  # anomalib's model: 2 s a batch
            return json.dumps({"map_seconds": [2.0, 2.0, 9.0]}), 0.0  # as peer_anomalib prints it
        if command[-1] == "map":  # ours: 1 s with torch, 0.5 s with onnxruntime
            return json.dumps({"map_seconds": [1.0, 1.0, 5.0], "onnx_map_seconds": [0.5, 0.5, 3.0]}), 0.0
        return "{}", 100.0 if command[-1] == "import" else 200.0

    monkeypatch.setattr(bench_peers, "measured", fake_measured)
    floors = bench_peers.run_floors(SimpleNamespace(work=tmp_path, batch=8), peer=True, rounds=2)
    assert floors == {
        "import_peak_rss_mb": 100.0,
        "train_peak_rss_mb": 200.0,
        "peer_map_images_per_s": 4.0,  # median calls, not the mean: a slow call moves nothing
        "map_images_per_s": 8.0,
        "onnx_map_images_per_s": 16.0,
        "batch": 8,
    }
    tools = ["peer" if c[0] == str(bench_peers.PEER_PYTHON) else c[-1] for c in commands]
    assert tools == ["import", "train", "peer", "map", "peer", "map"]  # the rounds alternate
