"""Code shape the project holds itself to: small functions."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*REPO.glob("uflow_exp/**/*.py"), *REPO.glob("benchmarks/*.py")])
MAX_LINES = 60


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_is_longer_than_sixty_lines(path):
    tree = ast.parse(path.read_text())
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, f"{path.relative_to(REPO)}: split {', '.join(long)}"


def test_the_onnx_runner_and_the_run_bookkeeping_import_no_module_that_imports_them():
    """Two former import circles: onnx_runner <-> tasks.export, utils.checks <-> utils.runs."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import uflow_exp.onnx_runner\n"
        "assert 'uflow_exp.tasks.export' not in sys.modules, 'onnx_runner imports the export task'\n"
        "from uflow_exp.utils.runs import _is_usage_error\n"
        "_is_usage_error(ValueError())\n"
        "assert 'uflow_exp.utils.checks' not in sys.modules, 'utils.runs imports utils.checks'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
