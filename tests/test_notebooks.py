"""Every notebook in notebooks/ runs top to bottom on the organisms, within a time bound, and is
committed without outputs.

Each notebook runs in a fresh kernel (this interpreter's ipykernel, so the venv's packages), in a
temporary working directory (the notebooks write under ``runs/`` relative to it), offline, with
matplotlib on the Agg backend and wandb offline with its folders inside the temporary directory.
"""

import json
import re
import sys
import time
from pathlib import Path

import ipykernel  # noqa: F401  (the kernel the notebooks run in; the dev extra installs all three)
import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = {"01_quickstart", "02_taxonomy", "03_causal_ablations", "04_hybrid"}
# A notebook should run in well under a minute on one thread; the bounds leave room for a busy
# machine (the shared CI box runs other jobs on its two cores) without hiding a runaway cell.
CELL_TIMEOUT_S = 120
NOTEBOOK_WALL_S = 180
# `import _x`, `from m import _x`, `obj._x` (dunders aside)
PRIVATE_NAME = re.compile(r"(?:\bimport\s+|,\s*|\.)_(?!_)\w+")


def test_every_expected_notebook_is_there():
    assert {path.stem for path in NOTEBOOKS} >= EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, f"{path.name} has no code"
    for index, cell in enumerate(code_cells):
        assert cell.outputs == [], f"{path.name}: code cell {index} has outputs; strip them"
        assert cell.execution_count is None, f"{path.name}: code cell {index} has an execution count"
    assert "torch.set_num_threads(1)" in code_cells[0].source, f"{path.name}: the first cell must set one torch thread"
    # public API only: no private names imported or accessed
    for cell in code_cells:
        private = PRIVATE_NAME.search(cell.source)
        assert private is None, f"{path.name} uses a private name: {private.group(0)!r}"


def kernel_environment(tmp_path: Path) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        # the kernel's IPython profile and connection files, not in the home folder
        "IPYTHONDIR": str(tmp_path / "ipython"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter_runtime"),
        "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb"),
        "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
    }


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    for name, value in kernel_environment(tmp_path).items():
        monkeypatch.setenv(name, value)  # the kernel inherits this process's environment
    notebook = nbformat.read(path, as_version=4)
    # Appended check: the kernel really is this venv's interpreter and plots go to Agg.
    notebook.cells.append(nbformat.v4.new_code_cell(
        "import json, sys, matplotlib\n"
        "print(json.dumps({'executable': sys.executable, 'backend': matplotlib.get_backend()}))"))
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    started = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name}: a cell raised\n{str(error)[-3000:]}")
    seconds = time.perf_counter() - started
    print(f"{path.name}: {seconds:.1f} s")
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            errors = [output for output in cell.outputs if output.output_type == "error"]
            assert not errors, f"{path.name}: cell {index} errored: {errors[0].get('ename')}"
    probe = json.loads(notebook.cells[-1].outputs[-1]["text"].strip().splitlines()[-1])
    assert Path(probe["executable"]).resolve() == Path(sys.executable).resolve()
    assert probe["backend"].lower() == "agg"
    assert (tmp_path / "runs" / "notebooks" / path.stem).is_dir(), "the notebook must write under its working dir"
    assert seconds < NOTEBOOK_WALL_S, f"{path.name} took {seconds:.0f} s (bound {NOTEBOOK_WALL_S} s)"
