from pathlib import Path

import pytest
import torch

# CI places shared/ beside the checkout; tests read the reference fixtures and sample data from it.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found (the shared/ folder beside the checkout)")
    return path


@pytest.fixture(scope="session")
def reference_resnet18() -> dict:
    """The authors' implementation run on a resnet18 U-Flow (see shared/fixtures/README.md)."""
    return torch.load(shared_path("fixtures", "uflow_reference_resnet18.pt"), weights_only=False)["resnet18"]
