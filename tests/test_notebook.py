"""notebooks/tour.ipynb: stored without outputs, and runs end to end in its quick mode (about 30-60 s on a CPU)."""

import os

import nbformat
import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "tour.ipynb"


def test_tour_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"stored with outputs: {cell.source[:80]!r}"


def test_tour_runs_in_quick_mode(mnist_dir, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="nbclient and ipykernel come with the dev extras")
    pytest.importorskip("ipykernel", reason="nbclient and ipykernel come with the dev extras")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this process's environment.
    monkeypatch.setenv("DIFFUSION_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("DIFFUSION_DATA_DIR", str(mnist_dir))
    # One thread unless told otherwise: on a few shared, busy cores torch's default (one thread per core) made the
    # tiny U-Net's small batches 5-10 times slower, spinning in OpenMP barriers.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 5, f"expected the notebook's image grids, got {len(images)} images"
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    for expected in ("first tenth", "ddpm", "dpmpp2m", "slerp midpoint"):
        assert expected in text, f"{expected!r} missing from the notebook's printed output"
    # Running it must not have touched the stored file.
    stored = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in stored.cells if cell.cell_type == "code")
