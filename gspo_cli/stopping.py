"""Why and how a run stops early: a signal (finish the step, checkpoint, exit 128 + signal; a second one stops at
once) or too many non-finite steps in a row (exit 3). The loop raises `Stop`; the console script prints its one line."""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path


class Stop(Exception):
    """The run stopped early on purpose (a signal, or too many non-finite steps), after saving a checkpoint."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def caught_signals():
    """SIGTERM (SLURM pre-emption) and SIGINT: the first one finishes the step, checkpoints and stops; a second one
    stops at once (the last checkpoint stays intact). The previous handlers are back when the run ends."""
    caught = {}

    def handler(signum, _frame):
        if "signal" in caught:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        caught["signal"] = signum
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def reason(caught: dict | None, step: int, bad_steps: int, max_nonfinite: int, run_dir: Path) -> Stop:
    if caught is not None:  # another rank may have caught it: this one reports SIGTERM, what SLURM and torchrun send
        sig = signal.Signals(caught.get("signal", signal.SIGTERM))
        return Stop(f"stopped by {sig.name} after step {step}; checkpoint saved; continue with resume={run_dir}",
                    128 + sig)
    return Stop(f"trainer.max_nonfinite={max_nonfinite} exceeded: {bad_steps} steps in a row had a "
                f"non-finite loss or gradient (last at step {step}); the last good weights are checkpointed in "
                f"{run_dir}; lower optim.lr or check the rewards", 3)
