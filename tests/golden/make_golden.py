"""Writes the golden evaluation fixture: run once, by hand, when the evaluator's results change
on purpose (python tests/golden/make_golden.py), never by the tests.

Why frozen parameters: a golden file of numbers computed after a training trajectory holds only
on the CPU that wrote it — 160 steps amplify float32 rounding differences (other matmul kernels,
thread counts, reduction orders) into different thresholds and dead-neuron counts. So the
trajectory is run once here and its checkpoints' parameters are stored
(``tiny_relu_params.npz``); the golden test rebuilds a run directory from them and evaluates it,
so only the evaluation's own rounding (~1e-6 relative) separates two machines.

Writes ``tiny_relu_params.npz`` (the parameters of every kept checkpoint, float32) and
``eval_results_tiny_relu.json`` / ``.csv`` (the evaluator's results on the run rebuilt from them,
written as eval.py writes them: its key order and its CSV rows are part of what the tests pin).
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import golden_run  # noqa: E402
from sparsejax import evaluation, results as results_lib, trained_run, trainer  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp) / "trained"
        trainer.train(golden_run.config(), workdir, progress=False)
        run = trained_run.load(workdir)
        mesh = evaluation.Evaluator(run.cfg, evaluation.EvalOptions()).mesh
        arrays = {}
        for step in run.steps:
            params, _ = run.params(step, mesh)
            flat = golden_run.flatten(jax.device_get(params))
            arrays.update({f"{step}/{k}": v for k, v in flat.items()})
        run.reader.close()
        np.savez_compressed(golden_run.PARAMS, **arrays)
        rebuilt = golden_run.build_run(pathlib.Path(tmp) / "rebuilt")
        results = golden_run.evaluate(rebuilt)
    results_lib.write_results(results, golden_run.RESULTS)
    print(f"wrote {golden_run.PARAMS} ({golden_run.PARAMS.stat().st_size / 1e6:.2f} MB), "
          f"{golden_run.RESULTS} and {golden_run.RESULTS_CSV}")


if __name__ == "__main__":
    main()
