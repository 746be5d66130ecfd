"""Plot functions: one scatter per series, one line per fit, one band per bootstrapped fit,
labelled axes, and PNG + PDF files when an output stem is given."""

import numpy as np
import pytest
from matplotlib.collections import FillBetweenPolyCollection, LineCollection, PathCollection

from sparsejax import laws, plotting

D = np.geomspace(0.5, 200, 30)


def _artists(fig):
    (ax,) = fig.axes
    kinds = {
        "scatter": sum(isinstance(c, PathCollection) for c in ax.collections),
        "bands": sum(isinstance(c, FillBetweenPolyCollection) for c in ax.collections),
        "errorbars": sum(isinstance(c, LineCollection) for c in ax.collections),
        # error-bar caps are marker-only lines; count drawn curves
        "lines": sum(line.get_linestyle() != "None" for line in ax.lines),
    }
    return ax, kinds


def _assert_saved(stem):
    for ext in ("png", "pdf"):
        path = stem.parent / f"{stem.name}.{ext}"
        assert path.is_file() and path.stat().st_size > 1000, path
    assert not list(stem.parent.glob("*.tmp")), "a temporary file was left behind"


def test_save_figure_is_atomic(tmp_path):
    """A failed write leaves the previous figure intact and no temporary file behind."""
    fig = plotting.plot_limit_vs_params({"relu": ([0.1, 0.4], [0.06, 0.07])})
    stem = plotting.save_figure(fig, tmp_path / "limits")
    _assert_saved(stem)
    before = (tmp_path / "limits.png").read_bytes()

    def broken_savefig(fh, **kwargs):
        fh.write(b"half a figure")
        raise RuntimeError("disk full")

    fig.savefig = broken_savefig
    with pytest.raises(RuntimeError, match="disk full"):
        plotting.save_figure(fig, stem)
    assert (tmp_path / "limits.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["limits.pdf", "limits.png"]


def test_ratio_vs_tokens_draws_series_fits_and_bands(tmp_path):
    series = {size: (D, laws.published_curve("relu", size, D)) for size in ("0.1B", "0.4B", "1.2B")}
    noisy = series["0.4B"][1] + 1e-4 * np.random.default_rng(0).standard_normal(len(D))
    fits = {
        "0.1B": laws.fit("relu_ratio", *series["0.1B"]),
        "0.4B": laws.bootstrap("relu_ratio", D, noisy, n_boot=20),
    }
    stem = tmp_path / "figs" / "relu_0.1B"  # the ".1B" must survive as part of the stem
    fig = plotting.plot_ratio_vs_tokens(series, fits, tokens_range=(0.5, 1000), out_path=stem)
    ax, kinds = _artists(fig)
    assert kinds == {"scatter": 3, "bands": 1, "errorbars": 0, "lines": 2}
    assert ax.get_xlabel() == "training tokens (B)" and ax.get_ylabel() == "activation ratio (%)"
    assert ax.get_xscale() == "log" and ax.get_title() and ax.get_legend() is not None
    assert ax.lines[0].get_xdata().max() == pytest.approx(1000)
    # ratios are drawn in percent
    assert ax.lines[0].get_ydata().max() == pytest.approx(100 * laws.published_curve("relu", "0.1B", 0.5))
    _assert_saved(stem)


def test_ratio_vs_tokens_needs_a_range_without_series():
    fit = laws.fit("silu_ratio", D[10:], laws.published_curve("silu", "0.1B", D[10:]))
    with pytest.raises(ValueError, match="tokens_range"):
        plotting.plot_ratio_vs_tokens({}, {"0.1B": fit})
    _, kinds = _artists(plotting.plot_ratio_vs_tokens({}, {"0.1B": fit}, tokens_range=(2, 200)))
    assert kinds["lines"] == 1 and kinds["scatter"] == 0


def test_limit_vs_width_depth(tmp_path):
    width_depth = np.array([4, 8, 16, 32, 64, 114, 200, 400, 800, 1000], float)
    limits = laws.power_offset(width_depth, -0.5, -0.6, 0.085)
    noisy = limits + 5e-4 * np.random.default_rng(1).standard_normal(len(limits))
    fit = laws.bootstrap("power_offset", width_depth, noisy, n_boot=20)
    fig = plotting.plot_limit_vs_width_depth(width_depth, noisy, fit, out_path=tmp_path / "width_depth")
    ax, kinds = _artists(fig)
    assert kinds == {"scatter": 1, "bands": 1, "errorbars": 0, "lines": 1}
    assert "width / depth" in ax.get_xlabel() and "(%)" in ax.get_ylabel()
    _assert_saved(tmp_path / "width_depth")


def test_limit_vs_params_with_and_without_error_bars(tmp_path):
    sizes = np.array([0.1, 0.2, 0.4, 0.8, 1.2])
    series = {
        act: (sizes, [laws.PUBLISHED[(act, f"{s}B")]["A0"] for s in sizes]) for act in ("relu", "silu")
    }
    relu_limits = np.array(series["relu"][1])
    ci = {"relu": (relu_limits - 0.002, relu_limits + 0.003)}
    fig = plotting.plot_limit_vs_params(series, ci, out_path=tmp_path / "limits")
    ax, kinds = _artists(fig)
    assert kinds["lines"] == 2 and kinds["errorbars"] == 1
    assert ax.get_xlabel() == "parameters (B)" and ax.get_ylabel() == "limit activation ratio (%)"
    _assert_saved(tmp_path / "limits")


def test_loss_vs_tokens_with_chinchilla_at_fixed_n(tmp_path):
    N_grid, D_grid = np.meshgrid([0.1, 0.4, 1.2], np.geomspace(1, 100, 10))
    ND = np.stack([N_grid.ravel(), D_grid.ravel()], axis=1)  # N in B params, D in B tokens
    true = np.array([1.8, 0.5, 0.35, 1.2, 0.3])
    chinchilla_fit = laws.fit("chinchilla", ND, laws.chinchilla(ND, *true))
    tokens = D_grid[:, 0]
    series = {f"{n}B": (tokens, laws.chinchilla(ND[ND[:, 0] == n], *true)) for n in (0.1, 1.2)}
    one_d_fit = laws.fit("power_offset", tokens, series["0.1B"][1])
    fits = {"0.1B": (chinchilla_fit, 0.1), "1.2B": (chinchilla_fit, 1.2), "power law": one_d_fit}
    fig = plotting.plot_loss_vs_tokens(series, fits, log_y=True, out_path=tmp_path / "loss")
    ax, kinds = _artists(fig)
    assert kinds == {"scatter": 2, "bands": 0, "errorbars": 0, "lines": 3}
    assert ax.get_yscale() == "log" and ax.get_ylabel().startswith("loss")
    np.testing.assert_allclose(ax.lines[1].get_ydata()[-1], laws.chinchilla(np.array([[1.2, 100.0]]), *true))
    _assert_saved(tmp_path / "loss")
    with pytest.raises(ValueError, match="takes"):
        plotting.plot_loss_vs_tokens(series, {"bad": chinchilla_fit})


def _minor_labels(fig) -> list[str]:
    ax = fig.axes[0]
    fig.canvas.draw()
    return [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text() and t.get_visible()
            and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]


def test_log_axis_over_a_decade_labels_only_twos_and_fives():
    """Over 1.4 decades matplotlib's default labels every minor tick (3×10⁻⁵, 4×10⁻⁵, ... overlap);
    only the 2s and 5s are labelled. Over many decades the default (no minor labels) stays."""
    params = np.array([2.4e-5, 8e-5, 1.9e-4, 6.4e-4])
    fig = plotting.plot_limit_vs_params({"relu": (params, np.array([0.33, 0.28, 0.18, 0.06]))})
    labels = _minor_labels(fig)
    assert labels and all(("2\\times" in t) or ("5\\times" in t) for t in labels), labels
    assert len(labels) <= 4
    wide = plotting.plot_limit_vs_params({"relu": (np.array([1e-6, 1e-3, 1.0]), np.array([0.3, 0.2, 0.1]))})
    assert not [t for t in _minor_labels(wide) if "times" in t and not t.startswith("$\\mathdefault{10")]
    assert plotting._minor_log_label(5e-4) == "$5\\times10^{-4}$"
    assert plotting._minor_log_label(3e-4) == "" and plotting._minor_log_label(0.0) == ""


def test_mark_synthetic_stamps_the_figure_and_changes_its_pixels(tmp_path):
    """The SYNTHETIC stamp is a figure text and visibly changes the saved image."""
    import matplotlib.image

    plain = plotting.plot_limit_vs_params({"relu": ([0.1, 0.4], [0.06, 0.07])})
    marked = plotting.mark_synthetic(plotting.plot_limit_vs_params({"relu": ([0.1, 0.4], [0.06, 0.07])}))
    assert [t.get_text() for t in marked.texts] == ["SYNTHETIC"] and not plain.texts
    a = matplotlib.image.imread(plotting.save_figure(plain, tmp_path / "plain").with_suffix(".png"))
    b = matplotlib.image.imread(plotting.save_figure(marked, tmp_path / "marked").with_suffix(".png"))
    assert a.shape == b.shape
    # the stamp is red: many more pixels where red clearly exceeds green than in the plain figure
    reddish = lambda img: int(np.sum(img[..., 0] - img[..., 1] > 0.1))
    assert reddish(b) > reddish(a) + 1000
