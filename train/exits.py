"""How a training run ends: Stop (a message and an exit code, raised anywhere in the run), the
exit codes, and ended(), which turns what ended a run (a Stop, a bad config, a lost peer,
Ctrl-C) into its message and the process's exit status, so that a process of a distributed
run leaves with its message said and rank 0's last checkpoint written (stopped, leaving).

0 done; 2 bad configuration or refused resume; 3 non-finite loss; 4 another process of a
distributed run stopped or crashed (or its launcher is gone); 5 a checkpoint could not be
written (disk full, read-only folder); 130 interrupted.
"""

import signal

from core.config import ConfigError
from train.dist import PeerLost

EXIT_CONFIG, EXIT_NAN, EXIT_PEER, EXIT_IO, EXIT_INTERRUPTED = 2, 3, 4, 5, 130


class Stop(Exception):
    """Ends the run with a message and an exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def non_finite(step, what, value, lr, last_checkpoint, best):
    """The Stop of a non-finite loss or gradient norm: what is kept, and what to change."""
    return Stop(
        f"error: {what} is {value} at step {step} (learning rate {lr:.3g}); "
        "training stopped. Nothing from this step was saved: the last checkpoint is "
        f"{last_checkpoint}"
        + (f", best/ holds step {best['step']} (validation loss {best['val_loss']:.4f})" if best else "")
        + ". Lower the learning rate (LEARNING_RATE=...) or lora_parameters.scale, check the "
        "data, and start over with FRESH=1.",
        EXIT_NAN,
    )


def ended(e, dist):
    """The exit status of a run that raised e (a Stop, ConfigError, PeerLost or
    KeyboardInterrupt), its message said."""
    if isinstance(e, Stop):
        return stopped(e, dist)
    leaving(dist)
    if isinstance(e, ConfigError):
        dist.log(f"error: {e}", every_rank=True)
        return EXIT_CONFIG
    if isinstance(e, PeerLost):
        dist.log(
            f"error: lost contact with the other processes of this run ({e}); another one "
            "stopped or crashed (see the messages above). This process stops too; run the same "
            "command to continue from the last checkpoint.",
            every_rank=True,
        )
        return EXIT_PEER
    dist.log("interrupted; run the same command to continue from the last checkpoint")
    return EXIT_INTERRUPTED


def stopped(e, dist):
    """A Stop's message and exit code. NaN and interruptions are decided together (the loss
    and the stop flag are summed over the processes): rank 0 reports them for all."""
    leaving(dist)
    if dist.rank == 0 or e.code not in (EXIT_NAN, EXIT_INTERRUPTED):
        dist.log(str(e), every_rank=True)
    if dist.size > 1 and e.code in (EXIT_NAN, EXIT_INTERRUPTED):
        # Leave together, once rank 0 has saved: mlx.launch stops the others when one
        # exits with an error, and that must not cut rank 0's checkpoint short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            dist.all_sum_floats([0.0])
        except PeerLost:
            pass
    return e.code


def leaving(dist):
    """A distributed process on its way out with its message: when another process exits
    first, mlx.launch sends the rest SIGTERM, which must not cut the message (or rank 0's
    last checkpoint) short."""
    if dist.size > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
