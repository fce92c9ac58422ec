"""``hydra/launcher=slurm``: :class:`SlurmSweepLauncher` (see :mod:`benchmarks.harness.slurm`)."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


class SlurmSweepLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher that checks the cluster and the request before
    submitting and waits for every job whatever happens to it
    (:func:`benchmarks.harness.slurm.launch`)."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from benchmarks.harness.slurm import launch

        return launch(self, job_overrides, initial_job_idx)
