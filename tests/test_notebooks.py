"""The notebooks run end to end (small settings) and are committed without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SPARSING_LAW_FIGURES = ("relu_ratio_vs_tokens", "silu_ratio_vs_tokens", "limit_vs_params")


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear outputs"


def test_sparsing_law_fits_notebook_executes_and_saves_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEJAX_SMALL", "1")
    monkeypatch.setenv("SPARSEJAX_OUT", str(tmp_path))
    notebook = nbformat.read(NOTEBOOKS / "sparsing_law_fits.ipynb", as_version=4)
    # Run from notebooks/ as Jupyter would; the kernel inherits the environment set above.
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    for stem in SPARSING_LAW_FIGURES:
        for ext in ("png", "pdf"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 1000, f"{stem}.{ext}"
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == len(SPARSING_LAW_FIGURES)


CPU_PROXY_FIGURES = ("proxy_relu_ratio_vs_tokens", "proxy_silu_ratio_vs_tokens", "proxy_loss_vs_tokens")


def test_cpu_proxy_sweep_notebook_trains_a_miniature_sweep_and_saves_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEJAX_SMALL", "1")
    monkeypatch.setenv("SPARSEJAX_OUT", str(tmp_path))
    monkeypatch.delenv("SPARSEJAX_SWEEP_DIR", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the miniature runs train on one CPU device
    notebook = nbformat.read(NOTEBOOKS / "cpu_proxy_sweep.ipynb", as_version=4)
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    for stem in CPU_PROXY_FIGURES:
        for ext in ("png", "pdf"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 1000, f"{stem}.{ext}"
    assert (tmp_path / "mini_sweep" / "results.csv").exists()
    text = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "Sparsing Law trend (ReLU falls, SiLU rises)" in text
    assert "ReLU: ratio falls with data in" in text and "SiLU: ratio rises with data in" in text
