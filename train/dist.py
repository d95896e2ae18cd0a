"""The processes of one training run: one on its own, or those mlx.launch started
(mx.distributed). A size-1 Dist sums to its own values, so the training step is the same code
for one process and for several."""

import hashlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np


class PeerLost(Exception):
    """A collective operation failed: another process of the run is gone."""


class Dist:
    """The processes of this run: size 1 on its own, else mlx.launch's group (mx.distributed)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1

    @property
    def main(self):
        """Rank 0: the process that writes (checkpoints, metrics, the bundle) and speaks."""
        return self.rank == 0

    def log(self, message, every_rank=False):
        """Progress on stderr. Rank 0 speaks for the run; the other ranks only report errors
        and warnings (and what every_rank asks for), prefixed with their rank."""
        if self.rank == 0:
            print(f"train: {message}", file=sys.stderr, flush=True)
        elif every_rank or message.startswith(("error", "warning")):
            print(f"train[rank {self.rank}]: {message}", file=sys.stderr, flush=True)

    @classmethod
    def from_environment(cls):
        """Join the run mlx.launch started (it sets MLX_RANK); size 1 otherwise."""
        if os.environ.get("MLX_RANK") is None:
            return cls()
        hostfile = os.environ.get("MLX_HOSTFILE")
        if hostfile and Path(hostfile).is_file() and not Path(hostfile).read_text().strip():
            return cls()  # mlx.launch -n 1: a ring of one
        import mlx.core as mx

        group = mx.distributed.init(strict=True)
        return cls(group) if group.size() > 1 else cls()

    @classmethod
    def join_launched(cls, exit_code):
        """The Dist of a process mlx.launch started (train.launch): Ctrl-C taken back
        (train.launch starts mlx.launch with it ignored, as the ranks handle it, and the ranks
        inherit that), the group joined, the launcher watched (exit_code once it is gone) and
        the process named on stderr."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        dist = cls.from_environment()
        if dist.size > 1:
            dist.watch_launcher(exit_code)
            dist.log(
                f"process {dist.rank} of {dist.size}: pid {os.getpid()} on {socket.gethostname()}",
                every_rank=True,
            )
        return dist

    @staticmethod
    def host_id():
        """48 bits naming this machine (processes on one machine share its memory)."""
        return int(hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12], 16)

    def _eval(self, what, *arrays):
        import mlx.core as mx

        try:
            mx.eval(*arrays)
        except RuntimeError as e:
            raise PeerLost(f"{what}: {e}") from None
        return arrays

    def all_sum_floats(self, values):
        """Sums of a few Python numbers over the processes (float64)."""
        import mlx.core as mx

        if self.size == 1:
            return list(values)
        (out,) = self._eval(
            "all_sum",
            mx.distributed.all_sum(mx.array(values, dtype=mx.float64), group=self.group, stream=mx.cpu),
        )
        return out.tolist()

    def all_gather_ints(self, values):
        """[[rank 0's values], [rank 1's], ...] of a few integers per process."""
        import mlx.core as mx

        if self.size == 1:
            return [list(values)]
        (out,) = self._eval(
            "all_gather",
            mx.distributed.all_gather(
                mx.array(values, dtype=mx.int64).reshape(1, -1), group=self.group, stream=mx.cpu
            ),
        )
        return out.tolist()

    def sum_tree(self, tree, group_bytes=32 << 20):
        """The sum over the processes of a tree of arrays (the gradients), evaluated: arrays of
        one dtype concatenated into a few all_sum calls, as nn.average_gradients does, without
        its division by the number of processes."""
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        chunks, current, nbytes = [], [], 0
        for key, value in flat:
            if current and (nbytes >= group_bytes or current[-1][1].dtype != value.dtype):
                chunks.append(current)
                current, nbytes = [], 0
            current.append((key, value))
            nbytes += value.nbytes
        if current:
            chunks.append(current)
        out = []
        for chunk in chunks:
            big = mx.distributed.all_sum(mx.concatenate([v.reshape(-1) for _, v in chunk]), group=self.group)
            offsets = np.cumsum([v.size for _, v in chunk])[:-1].tolist()
            out.extend((k, part.reshape(v.shape)) for (k, v), part in zip(chunk, mx.split(big, offsets)))
        summed = tree_unflatten(out)
        self._eval("all_sum of the gradients", [v for _, v in out])
        return summed

    def watch_launcher(self, exit_code):
        """Exit when this process is orphaned (its launcher was killed): a rank left alone
        would otherwise keep training, or wait, for nobody."""
        parent = os.getppid()
        launcher = os.environ.get("TRAIN_LAUNCH_PID")
        same_host = os.environ.get("TRAIN_LAUNCH_HOST") == socket.gethostname()
        launcher = int(launcher) if launcher and launcher.isdigit() and same_host else None

        def alive(pid):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            return True

        def loop():
            while True:
                time.sleep(0.5)
                if os.getppid() != parent or (launcher is not None and not alive(launcher)):
                    self.log(
                        "error: the launcher (train.launch / mlx.launch) is gone; stopping. Run "
                        "the same command to continue from the last checkpoint.",
                        every_rank=True,
                    )
                    os._exit(exit_code)

        threading.Thread(target=loop, name="watch-launcher", daemon=True).start()
