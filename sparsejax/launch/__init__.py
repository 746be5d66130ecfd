"""Launch training on several processes: this machine, TPU VM slices, GKE.

Engines, each a thin front to an existing tool (no orchestrator of our own):

* ``local``: N CPU processes on this machine joined by ``jax.distributed`` (:mod:`.local`);
  the laptop rehearsal of a multi-host run.
* ``tpu-vm``: the documented ``gcloud compute tpus tpu-vm create`` / ``ssh --worker=all`` flow
  (:mod:`.cloud`): every worker installs the pinned requirements and ``jax[tpu]`` and runs
  ``train.py`` with the same arguments; JAX reads the slice topology from the TPU metadata.
* ``xpk``: ``xpk workload create`` on a GKE cluster of TPU slices; ``jobset``: the equivalent
  JobSet manifest for ``kubectl apply`` (:mod:`.cloud`).

The cloud engines print what they would run (``--dry-run``, the default) or run it. The engines,
their options, defaults and builders are one table, :data:`.targets.TARGETS`, which
``python -m sparsejax.sweep --launch`` reads too.
"""

from sparsejax.launch.cli import main  # noqa: F401
