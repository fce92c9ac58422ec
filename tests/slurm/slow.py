"""A test-only Hydra callback that slows every training step of a sweep job, so that a test
can act on a run while it trains. A sleep changes no number: the records stay identical to an
uninterrupted run's. Added with ``+hydra.callbacks.slow._target_=tests.slurm.slow.SlowSteps``
(a ``hydra.*`` override: not part of a job's identity, so a re-run may leave it out)."""

from __future__ import annotations

import time
from typing import Any

from hydra.experimental.callback import Callback


class SlowSteps(Callback):
    """Sleep ``seconds`` before each training step of the jobs (in the job's process, before
    its supervised child is forked)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        from benchmarks.harness import train

        seconds, original = self.seconds, train.FaultHooks.build.__func__

        class Slow:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def before_step(self, step: int, loss: Any) -> Any:
                time.sleep(seconds)
                return self.inner.before_step(step, loss) if self.inner is not None else loss

        def build(cls: Any, faults: Any, start_step: int, attempt: int) -> Slow:
            return Slow(original(cls, faults, start_step, attempt))

        train.FaultHooks.build = classmethod(build)
