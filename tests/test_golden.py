"""Golden evaluation results: the evaluator on frozen parameters, compared in a way that holds on
any CPU.

The fixture (``golden_run``) is a run directory rebuilt from parameters stored once, so no
training trajectory amplifies rounding. What still differs between machines is the evaluation's
own float32 arithmetic (matmul kernels, threads, reduction order: ~1e-6 relative), and the
comparison is written for it:

* continuous values (losses, ratios, chunk sparsities, thresholds) to ``RTOL`` relative;
* discrete results by the property they must satisfy, not by value:
  - the CETT-PPL bisection: both searches take the same steps until one decision differs, and a
    decision may differ only where the compared perplexity ratio was within ``RTOL`` of the
    target (a near-tie); the searched value must then still bracket the target within the
    search tolerance, and the values computed at it are not compared;
  - dead-neuron shares: a neuron flips only when its activity rate sits on the cut-off, so a
    share may move by at most ``DEAD_NEURONS`` neurons of a layer;
  - histogram counts: a value on a bin edge moves to the next bin, so per layer the counts keep
    their total and move by at most ``HIST_MOVES`` values in all.

The checks are run under other arithmetic by ``.ci/run`` (XLA limited to SSE4.2, one core) and
were tried with AVX2, SSE4.2 / AVX-512 kernels, one vs both cores and 1 vs 8 fake devices.
"""

from __future__ import annotations

import copy
import json
import math

import pytest

import golden_run

from sparsejax import results as results_lib

RTOL = 2e-4
DEAD_NEURONS = 2
HIST_MOVES_PER_MILLION = 200


class Mismatch(AssertionError):
    pass


def _side(ratio: float, target: float) -> bool:
    return ratio >= target  # bisect_cett: at or above the target, the upper bracket moves down


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-7)


def compare_search(new: dict, old: dict) -> bool:
    """The CETT-PPL search of ``new`` against ``old``; True if it reached the same value."""
    target, tol = old["target_ppl_ratio"], None
    assert new["target_ppl_ratio"] == target and new["mode"] == old["mode"]
    assert new["joint_steps"] == old["joint_steps"] and new["iterations"] == old["iterations"]
    for i, ((c_new, r_new), (c_old, r_old)) in enumerate(zip(new["evaluations"], old["evaluations"])):
        if c_new != c_old:
            raise Mismatch(f"search step {i} evaluated CETT {c_new} instead of {c_old} although "
                           "every earlier decision agreed")
        if _side(r_new, target) != _side(r_old, target):
            if not (_close(r_new, target) and _close(r_old, target)):
                raise Mismatch(f"search step {i} at CETT {c_new}: ppl ratio {r_new} vs {r_old} "
                               f"fall on different sides of {target} and neither is a near-tie")
            tol = True
            break
        if not _close(r_new, r_old):
            raise Mismatch(f"search step {i} at CETT {c_new}: ppl ratio {r_new} vs {r_old}")
    # Whatever the path, the result must bracket the target within the search's tolerance.
    lo = max((c for c, r in new["evaluations"] if r < target), default=0.0)
    hi = min((c for c, r in new["evaluations"] if r >= target), default=1.0)
    assert lo <= new["cett"] <= hi and hi - lo <= 2 ** -new["iterations"] + 1e-12, (lo, new["cett"], hi)
    if tol is None and new["cett"] != old["cett"]:
        raise Mismatch(f"CETT-PPL {new['cett']} vs {old['cett']} after identical decisions")
    return tol is None


def compare(new, old, path: str = "", *, d_ff: int, skip: tuple[str, ...] = ()) -> None:
    """Recursive comparison by the rules in the module docstring; raises Mismatch."""
    if any(path.endswith(s) or f"{s}/" in path + "/" for s in skip):
        return
    if isinstance(old, dict):
        if set(new) != set(old):
            raise Mismatch(f"{path}: keys differ by {sorted(set(new) ^ set(old))}")
        for k in sorted(old):
            compare(new[k], old[k], f"{path}/{k}", d_ff=d_ff, skip=skip)
        return
    key = path.rsplit("/", 1)[-1].split("[")[0]
    if key.startswith("counts_layers") or key == "counts":
        for layer, (a, b) in enumerate(zip(new, old)):
            total = sum(b)
            moved = sum(abs(x - y) for x, y in zip(a, b)) / 2
            if sum(a) != total or len(a) != len(b) or moved > 1 + total * HIST_MOVES_PER_MILLION / 1e6:
                raise Mismatch(f"{path}[{layer}]: {moved} of {total} values changed bins")
        return
    if key.startswith("dead_share"):
        pairs = zip(new, old) if isinstance(old, list) else [(new, old)]
        for a, b in pairs:
            if abs(a - b) > DEAD_NEURONS / d_ff + 1e-9:
                raise Mismatch(f"{path}: dead share {a} vs {b} (> {DEAD_NEURONS} of {d_ff} neurons)")
        return
    if isinstance(old, list):
        if len(new) != len(old):
            raise Mismatch(f"{path}: length {len(new)} vs {len(old)}")
        for i, (a, b) in enumerate(zip(new, old)):
            compare(a, b, f"{path}[{i}]", d_ff=d_ff, skip=skip)
        return
    if isinstance(old, float) and not isinstance(old, bool):
        if not _close(new, old):
            raise Mismatch(f"{path}: {new} vs {old} (rtol {RTOL})")
        return
    if new != old:
        raise Mismatch(f"{path}: {new!r} vs {old!r}")


def compare_results(new: dict, old: dict) -> None:
    same_cett = compare_search(new["cett_ppl"], old["cett_ppl"])
    skip = ("/cett_ppl/evaluations",)
    if not same_cett:  # values at a different CETT are not comparable; the property held
        skip += ("/results/cett_ppl", "/cett_ppl/cett")
    compare(new, old, d_ff=old["d_ff"], skip=skip)


@pytest.fixture(scope="module")
def golden_results(tmp_path_factory):
    return golden_run.evaluate(golden_run.build_run(tmp_path_factory.mktemp("golden") / "run"))


def test_results_match_the_golden_file(golden_results):
    compare_results(golden_results, json.loads(golden_run.RESULTS.read_text()))


def _layout(x):
    """``x`` without its numbers: every key in its order, list lengths, strings and None, and the
    type where a number is (the numbers are compare_results' business)."""
    if isinstance(x, dict):
        return [(k, _layout(v)) for k, v in x.items()]
    if isinstance(x, list):
        return [_layout(v) for v in x]
    if isinstance(x, (bool, str)) or x is None:
        return x
    return type(x).__name__


def _row_keys(csv_text: str) -> list[str]:
    """Each CSV row without its value: step, tokens_seen, metric, layer, quantity."""
    return [line.rsplit(",", 1)[0] for line in csv_text.splitlines()]


def test_results_have_the_golden_files_layout(golden_results, tmp_path):
    """results.json as eval.py writes it: the committed file's keys in their order (metrics in the
    registry's order, each metric's parameters, the searched metric's top-level entry), and a CSV
    with the committed file's rows in their order; the numbers are compared above."""
    golden = json.loads(golden_run.RESULTS.read_text())
    assert _layout(golden_results) == _layout(golden)
    _, csv_path = results_lib.write_results(golden_results, tmp_path / "results.json")
    assert _row_keys(csv_path.read_text()) == _row_keys(golden_run.RESULTS_CSV.read_text())


def test_the_writer_reproduces_the_golden_files_byte_for_byte(tmp_path):
    """The committed results.json and results.csv were written by eval.py's writer; writing the
    same results again gives the same bytes (key order, number formatting, the CSV flattener)."""
    golden = json.loads(golden_run.RESULTS.read_text())
    json_path, csv_path = results_lib.write_results(golden, tmp_path / "results.json")
    assert json_path.read_bytes() == golden_run.RESULTS.read_bytes()
    assert csv_path.read_bytes() == golden_run.RESULTS_CSV.read_bytes()


def test_the_layout_check_can_fail(golden):
    moved = dict(reversed(list(golden.items())))
    assert _layout(moved) != _layout(golden)
    reordered = copy.deepcopy(golden)
    reordered["checkpoints"][0]["results"]["fat"] = reordered["checkpoints"][0]["results"].pop("fat")
    assert _layout(reordered) != _layout(golden)  # same keys, fat now last


def test_fixture_is_the_stored_parameters(tmp_path):
    """The rebuilt run reads back exactly the stored arrays (the restore is not part of the
    rounding that may differ)."""
    from sparsejax import trained_run, evaluation
    import numpy as np
    workdir = golden_run.build_run(tmp_path / "run")
    run = trained_run.load(workdir)
    stored = golden_run.stored_params()
    assert run.steps == sorted(stored) == [40, 80, 120, 160]
    mesh = evaluation.Evaluator(run.cfg, evaluation.EvalOptions()).mesh
    params, meta = run.params(160, mesh)
    flat = golden_run.flatten(params)
    want = golden_run.flatten(stored[160])
    assert set(flat) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(flat[k]), want[k])
    assert meta["tokens_seen"] == 160 * 8 * 64


# ---- the comparison can fail: each rule rejects what it must ------------------------------------

@pytest.fixture(scope="module")
def golden():
    return json.loads(golden_run.RESULTS.read_text())


def test_a_changed_continuous_value_fails(golden):
    bad = copy.deepcopy(golden)
    bad["checkpoints"][1]["results"]["zero"]["loss"] *= 1 + 10 * RTOL
    with pytest.raises(Mismatch, match="zero/loss"):
        compare_results(bad, golden)
    ok = copy.deepcopy(golden)
    ok["checkpoints"][1]["results"]["zero"]["loss"] *= 1 + RTOL / 10
    compare_results(ok, golden)


def test_a_search_that_turns_away_from_the_target_without_a_tie_fails(golden):
    bad = copy.deepcopy(golden)
    c, r = bad["cett_ppl"]["evaluations"][2]
    target = golden["cett_ppl"]["target_ppl_ratio"]
    # The same point on the other side of the target, far from it.
    bad["cett_ppl"]["evaluations"][2] = [c, target + 0.01 if r < target else target - 0.01]
    with pytest.raises(Mismatch, match="search step 2"):
        compare_results(bad, golden)


def _with_last_ratio(results: dict, ratio: float) -> dict:
    """``results`` whose search saw ``ratio`` at its last point, with the CETT that follows."""
    from sparsejax import evaluation
    out = copy.deepcopy(results)
    evals = [list(e) for e in out["cett_ppl"]["evaluations"]]
    evals[-1][1] = ratio
    seen = {c: r for c, r in evals}
    search = evaluation.bisect_cett(seen.__getitem__, out["cett_ppl"]["target_ppl_ratio"], 1e-3)
    out["cett_ppl"]["evaluations"] = [list(e) for e in search.evaluations]
    out["cett_ppl"]["cett"] = search.cett
    return out


def test_a_near_tie_may_turn_the_search(golden):
    """The last decision flipped by a 1e-6 change of a ratio that sits on the target: accepted,
    and the values at the other CETT are not compared; the same flip far from the target is not."""
    target = golden["cett_ppl"]["target_ppl_ratio"]
    old = _with_last_ratio(golden, target + 5e-7)
    new = _with_last_ratio(golden, target - 5e-7)
    assert new["cett_ppl"]["cett"] > old["cett_ppl"]["cett"]
    for ck in new["checkpoints"]:
        ck["results"]["cett_ppl"]["ratio"] *= 1.5  # a different CETT gives different values
    compare_results(new, old)
    far_old = _with_last_ratio(golden, target + 0.01)
    far_new = _with_last_ratio(golden, target - 0.01)
    with pytest.raises(Mismatch, match="neither is a near-tie"):
        compare_results(far_new, far_old)


def test_dead_share_and_histogram_rules(golden):
    d_ff = golden["d_ff"]
    bad = copy.deepcopy(golden)
    bad["checkpoints"][0]["results"]["zero"]["dead_share_layers"][0] += (DEAD_NEURONS + 1) / d_ff
    with pytest.raises(Mismatch, match="dead share"):
        compare_results(bad, golden)
    ok = copy.deepcopy(golden)
    ok["checkpoints"][0]["results"]["zero"]["dead_share_layers"][0] += 1 / d_ff
    compare_results(ok, golden)
    counts = golden["checkpoints"][0]["histograms"]["counts_layers"][0]
    i = max(range(len(counts)), key=counts.__getitem__)
    moved = copy.deepcopy(golden)
    moved["checkpoints"][0]["histograms"]["counts_layers"][0][i] -= 1
    moved["checkpoints"][0]["histograms"]["counts_layers"][0][i + 1] += 1
    compare_results(moved, golden)
    lost = copy.deepcopy(golden)
    lost["checkpoints"][0]["histograms"]["counts_layers"][0][i] -= 1
    with pytest.raises(Mismatch, match="changed bins"):
        compare_results(lost, golden)
    many = copy.deepcopy(golden)
    many["checkpoints"][0]["histograms"]["counts_layers"][0][i] -= counts[i] // 2
    many["checkpoints"][0]["histograms"]["counts_layers"][0][i + 1] += counts[i] // 2
    with pytest.raises(Mismatch, match="changed bins"):
        compare_results(many, golden)
