"""The quick-start notebook: committed without outputs, and it runs end to end (fast mode)."""

import re
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [], f"outputs left in cell:\n{cell.source[:200]}"
        assert cell.execution_count is None, f"execution count left in cell:\n{cell.source[:200]}"
    assert sum("metrics" in cell.metadata.get("tags", []) for cell in code) == 1


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_notebook_executes_in_fast_mode(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    copy = tmp_path / "quickstart.ipynb"
    shutil.copy(NOTEBOOK, copy)
    nb = nbformat.read(copy, as_version=4)
    # The kernel inherits the environment: fast mode, and the run folder under tmp_path.
    monkeypatch.setenv("UFLOW_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("UFLOW_NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    client = nbclient.NotebookClient(
        nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    nbformat.write(nb, copy)

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    for cell in code:
        assert cell.execution_count is not None
        assert not [out for out in cell.outputs if out.output_type == "error"], cell.source[:200]

    (metrics_cell,) = [cell for cell in code if "metrics" in cell.metadata.get("tags", [])]
    printed = "".join(out.get("text", "") for out in metrics_cell.outputs if out.output_type == "stream")
    match = re.search(r"pixel AUROC = (\S+)", printed)
    assert match, printed
    assert 0.0 < float(match.group(1)) <= 1.0

    figures = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert figures, "the maps cell drew no figure"
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.json").is_file()
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
