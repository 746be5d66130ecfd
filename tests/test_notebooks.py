"""The notebooks run end to end (small settings) and are committed without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # executes notebooks

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SPARSING_LAW_FIGURES = ("relu_ratio_vs_tokens", "silu_ratio_vs_tokens", "limit_vs_params")


def _execute(name, tmp_path, figures):
    """Execute notebooks/<name> from notebooks/ as Jupyter would (the kernel inherits the
    environment the test set), check each figure was saved as PNG and PDF, return the notebook."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    for stem in figures:
        for ext in ("png", "pdf"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 1000, f"{stem}.{ext}"
    return notebook


def _text(notebook) -> str:
    return "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))


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
    notebook = _execute("sparsing_law_fits.ipynb", tmp_path, SPARSING_LAW_FIGURES)
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == len(SPARSING_LAW_FIGURES)


CPU_PROXY_FIGURES = ("proxy_relu_ratio_vs_tokens", "proxy_silu_ratio_vs_tokens", "proxy_loss_vs_tokens")


def test_cpu_proxy_sweep_notebook_trains_a_miniature_sweep_and_saves_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEJAX_SMALL", "1")
    monkeypatch.setenv("SPARSEJAX_OUT", str(tmp_path))
    monkeypatch.delenv("SPARSEJAX_SWEEP_DIR", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the miniature runs train on one CPU device
    text = _text(_execute("cpu_proxy_sweep.ipynb", tmp_path, CPU_PROXY_FIGURES))
    assert (tmp_path / "mini_sweep" / "results.csv").exists()
    assert "Sparsing Law trend (ReLU falls, SiLU rises)" in text
    assert "ReLU: ratio falls with data in" in text and "SiLU: ratio rises with data in" in text


FINDINGS_FIGURES = ("findings_ratio_vs_width_depth", "findings_limit_vs_params",
                    "findings_convergence_vs_params", "findings_ratio_vs_loss")


def test_sparsing_law_findings_notebook_recovers_the_planted_findings(tmp_path, monkeypatch):
    """SPARSEJAX_SMALL=1 runs the analysis on synthetic tables for the three CPU finding sweeps'
    real run lists, with known truth: ratio = 0.10 + 0.001·width/depth (+0.05 for CETT-PPL), limits
    independent of size, settling slower for larger models, ReLU/ReLU² at 20%/10% vs SiLU/GELU 55%."""
    import re

    monkeypatch.setenv("SPARSEJAX_SMALL", "1")
    monkeypatch.setenv("SPARSEJAX_OUT", str(tmp_path))
    for var in ("SPARSEJAX_WIDTH_DEPTH_DIR", "SPARSEJAX_SCALE_DIR", "SPARSEJAX_ACTIVATIONS_DIR"):
        monkeypatch.delenv(var, raising=False)
    text = _text(_execute("sparsing_law_findings.ipynb", tmp_path, FINDINGS_FIGURES))
    # Finding 1: the planted slope (0.1 pp per unit width/depth) is recovered, with an interval above 0.
    m = re.search(r"Finding 1 \(width/depth\): ratio vs width/depth below 114: slope ([+-][\d.]+) pp/unit "
                  r"\[([+-][\d.]+), ([+-][\d.]+)\] -> holds", text)
    assert m, text[-3000:]
    slope, lo, hi = map(float, m.groups())
    assert 0 < lo <= slope <= hi and abs(slope - 0.1) < 0.01
    # Finding 2: limits planted equal across sizes (8% ReLU, 45% SiLU); ReLU settles later when larger.
    assert "Finding 2a (A0 weakly dependent on scale): holds" in text
    limits = [float(x) for x in re.findall(r"relu: A0 ([\d.]+)%–([\d.]+)%", text)[0]]
    assert all(abs(v - 8.0) < 0.5 for v in limits)
    assert re.search(r"Finding 2b \(smaller models converge faster\): relu: holds; silu: "
                     r"(holds|in direction only)", text)
    # Finding 3: planted ratios recovered per variant, verdict computed.
    for variant, planted in (("ReLU", 20.0), ("ReLU²", 10.0), ("SiLU", 55.0), ("GELU", 55.0), ("dReLU", 12.0)):
        got = re.search(rf"\n{re.escape(variant)} +2 +([\d.]+) ± [\d.]+%", text)
        assert got and abs(float(got.group(1)) - planted) < 1.0, variant
    assert "Finding 3 (ReLU/ReLU² much sparser than SiLU/GELU at about the same loss): holds" in text
    assert "SYNTHETIC DATA (SPARSEJAX_SMALL=1): not results" in text
    assert text.count("| holds |") >= 2
