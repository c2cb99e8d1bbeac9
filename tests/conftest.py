import os
from pathlib import Path

import pytest
import torch

# CI places shared/ beside the checkout; tests read the reference fixtures and sample data from it.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


# CI sets this: there a missing fixture or data folder is a failure, never a silent skip.
REQUIRE_SHARED = os.environ.get("UFLOW_REQUIRE_SHARED") == "1"


def shared_path(*parts: str) -> Path:
    """A path under ../shared; absent, the test is skipped (or fails under UFLOW_REQUIRE_SHARED=1)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} not found (the shared/ folder beside the checkout)"
        if REQUIRE_SHARED:
            pytest.fail(f"{message}; UFLOW_REQUIRE_SHARED=1 requires it")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def reference_resnet18() -> dict:
    """The authors' implementation run on a resnet18 U-Flow (see shared/fixtures/README.md)."""
    return torch.load(shared_path("fixtures", "uflow_reference_resnet18.pt"), weights_only=False)["resnet18"]


@pytest.fixture
def bench_peers(monkeypatch):
    """benchmarks/bench_peers.py as a module (the benchmarks are scripts, not a package)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_peers

    return bench_peers
