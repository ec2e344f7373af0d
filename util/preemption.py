"""SIGTERM / SIGUSR1 -> a flag the training loop reads at the next optimizer step.

SLURM sends one of these before pre-emption or the time limit (with --signal). The loop then
finishes the step, writes checkpoint-last on rank 0 and exits with ExitCode.PREEMPTED (3).
"""
import logging
import signal

logger = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised by the loop once the pre-emption checkpoint is written."""


class PreemptionFlag:
    def __init__(self):
        self.signal_name = None

    def install(self) -> "PreemptionFlag":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        logger.warning("received %s: training stops after the current step, with checkpoint-last written first "
                       "(outside a training step, such as while scoring, the run finishes that work)", self.signal_name)

    @property
    def set(self) -> bool:
        return self.signal_name is not None
