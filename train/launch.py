"""Train in several processes through mlx.launch: `make train NPROC=2` or `HOSTFILE=hosts.json`.

    python -m train.launch --nproc 2 [--backend ring] [--port P] -- <train.train options>
    python -m train.launch --hostfile hosts.json [--port P] -- <train.train options>

Runs `mlx.launch --backend ring -n NPROC -- <this python> -m train.train <options>` (or with
`--hostfile FILE` instead of `-n`), streams the processes' output, and exits with the run's
code: 0 when every process finished, else the code of the first process that failed (one
killed by signal N: 128 + N), after a line naming it. mlx.launch itself exits 0 whatever
happened, so the codes are read from its "Node with rank R exited with code C" lines.
--nproc 1 without a hostfile runs train.train on its own.

train.train does the distributed part (batches.shard, gradients summed with all_sum, rank 0
writes; see its docstring). Stopping:
  - a process crashes or is killed: mlx.launch stops the others, and they stop anyway when a
    collective operation loses its peer (exit 4); the run ends within seconds, non-zero;
  - Ctrl-C: every process on this machine gets it, they agree on the step (the stop flag is
    summed with the loss), rank 0 saves a checkpoint, all exit 130. train.launch and
    mlx.launch ignore it and wait (a third Ctrl-C kills mlx.launch);
  - SIGTERM to train.launch: passed on to the processes on this machine, as a Ctrl-C;
  - kill -9 of train.launch or mlx.launch: the processes see their launcher is gone within a
    second and exit (4).
Re-running the same command resumes from the last checkpoint, as with one process.
"""

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

EXIT_USAGE = 2
# Passed to every process, also on other machines (mlx.launch --env); on this machine they
# inherit the whole environment anyway.
FORWARD_ENV = (
    "MODELS_DIR",
    "LOGS_DIR",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "FAST_BLAS",
    "FAST_BLAS_QUIET",
    "TRAIN_STEP_DELAY_S",
    "TRAIN_INJECT_NAN",
)
# BLAS thread pools: N processes on one machine, each with a pool the size of the machine,
# oversubscribe its cores (on a 2-core Linux box 2 processes ran 3x slower than with this).
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
NODE_EXIT = re.compile(rb"\[WARN\] Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


def log(message):
    print(f"train.launch: {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, train_args = argv[:cut], argv[cut + 1 :]
    else:
        own, train_args = argv, []
    p = argparse.ArgumentParser(
        prog="python -m train.launch",
        description=__doc__.split("\n\n")[0],
        epilog="Everything after -- goes to python -m train.train.",
    )
    p.add_argument("--nproc", type=int, help="processes on this machine")
    p.add_argument("--hostfile", help="mlx.launch hostfile (JSON) for several machines")
    p.add_argument("--backend", default="ring", help="mlx.launch backend (default ring)")
    p.add_argument(
        "--port",
        type=int,
        help="first port of the ring (default: a free one for --nproc, mlx.launch's 32323 with --hostfile)",
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="the python every process runs (default this one; the same path on every machine)",
    )
    p.add_argument("--verbose", action="store_true", help="mlx.launch --verbose")
    args = p.parse_args(own)
    if (args.nproc is None) == (args.hostfile is None):
        p.error("give either --nproc N (processes on this machine) or --hostfile FILE")
    if args.nproc is not None and args.nproc < 1:
        p.error("--nproc must be at least 1")
    if args.hostfile is not None and not Path(args.hostfile).is_file():
        p.error(f"--hostfile {args.hostfile}: no such file")
    return args, train_args


def mlx_launch():
    """The venv's mlx.launch script, else the same entry point through this python."""
    script = Path(sys.executable).parent / "mlx.launch"
    if script.is_file():
        return [str(script)]
    found = shutil.which("mlx.launch")
    if found:
        return [found]
    return [
        sys.executable,
        "-c",
        "import sys; from mlx._distributed_utils.launch import main; "
        "sys.argv[0] = 'mlx.launch'; sys.exit(main())",
    ]


def free_port(count):
    """The first of `count` consecutive free TCP ports on 127.0.0.1 (two runs side by side, or a
    re-run while the old sockets linger, must not collide on mlx.launch's fixed 32323)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports found")


def build_command(args, train_args, env=None):
    """The mlx.launch command line."""
    env = os.environ if env is None else env
    cmd = [*mlx_launch(), "--backend", args.backend]
    if args.hostfile:
        cmd += ["--hostfile", str(args.hostfile)]
    else:
        cmd += ["-n", str(args.nproc)]
    port = args.port if args.port is not None else (None if args.hostfile else free_port(args.nproc))
    if port is not None:
        cmd += ["--starting-port", str(port)]
    if args.verbose:
        cmd.append("--verbose")
    for name in FORWARD_ENV:
        if env.get(name) is not None:
            cmd += ["--env", f"{name}={env[name]}"]
    cmd += ["--env", f"TRAIN_LAUNCH_PID={os.getpid()}", "--env", f"TRAIN_LAUNCH_HOST={socket.gethostname()}"]
    return cmd + ["--", args.python, "-m", "train.train", *train_args]


def describe(code):
    if code is None:
        return "was stopped by mlx.launch"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def exit_code(code):
    if code is None:
        return 128 + signal.SIGTERM
    return 128 - code if code < 0 else code


def local_ranks(launcher_pid):
    """The processes under mlx.launch on this machine, except ssh (remote ranks)."""
    try:
        out = subprocess.run(
            ["ps", "-A", "-o", "pid=,ppid=,comm="], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    children = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            children.setdefault(int(parts[1]), []).append((int(parts[0]), parts[2]))
    found, todo = [], [launcher_pid]
    while todo:
        for pid, comm in children.get(todo.pop(), []):
            if not Path(comm).name.startswith("ssh"):
                found.append(pid)
                todo.append(pid)
    return found


def run(args, train_args):
    """Start the processes through mlx.launch, relay their output, return the run's code."""
    if args.hostfile is None and args.nproc == 1:
        os.execv(sys.executable, [sys.executable, "-m", "train.train", *train_args])
    why = distributed_unavailable()
    if why:
        log(f"error: mlx has no distributed support here ({why})")
        return EXIT_USAGE
    env, threads = process_env(args)
    cmd = build_command(args, train_args, env)
    where = f"the hosts in {args.hostfile}" if args.hostfile else f"{args.nproc} processes on this machine"
    log(f"{where}{threads}, {args.backend} backend: {' '.join(cmd)}")

    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # the processes handle Ctrl-C themselves (mlx.launch would stop
        # relaying their output); the ranks take it back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    handle_signals(proc)
    exits = []  # (rank, code) in the order mlx.launch saw them
    relays = [
        threading.Thread(target=relay, args=(proc.stdout, sys.stdout.buffer, None), daemon=True),
        threading.Thread(target=relay, args=(proc.stderr, sys.stderr.buffer, exits), daemon=True),
    ]
    for t in relays:
        t.start()
    launcher_rc = proc.wait()
    for t in relays:
        t.join(timeout=10)
    return outcome(exits, launcher_rc)


def distributed_unavailable():
    """None when mlx can run distributed here, else why not."""
    try:
        import mlx.core as mx

        available = mx.distributed.is_available()
    except Exception as e:  # noqa: BLE001 - reported as it is
        return f"{type(e).__name__}: {e}"
    return None if available else "mx.distributed.is_available() is False"


def process_env(args):
    """The processes' environment: on one machine, the BLAS threads shared out among them."""
    env = dict(os.environ)
    if args.hostfile is not None:
        return env, ""
    per_process = str(max(1, (os.cpu_count() or 1) // args.nproc))
    for var in THREAD_VARS:
        env.setdefault(var, per_process)
    return env, f", {env['OPENBLAS_NUM_THREADS']} BLAS thread(s) each"


def handle_signals(proc):
    """Ctrl-C: the processes handle it (a third one kills mlx.launch). SIGTERM: passed on to
    the processes on this machine as a request to checkpoint and stop (a second one kills)."""
    signals = {"INT": 0, "TERM": 0}

    def on_int(signum, frame):
        signals["INT"] += 1
        if signals["INT"] >= 3:
            log("third Ctrl-C: killing mlx.launch (the processes exit when they notice)")
            proc.kill()

    def on_term(signum, frame):
        signals["TERM"] += 1
        if signals["TERM"] > 1:
            proc.kill()
            return
        log("SIGTERM: asking the processes on this machine to checkpoint and stop")
        for pid in local_ranks(proc.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass

    signal.signal(signal.SIGINT, on_int)
    signal.signal(signal.SIGTERM, on_term)


def relay(src, dst, exits=None):
    """Copy src to dst line by line, folding repeated lines; with `exits`, mlx.launch's
    "Node with rank R exited with code C" lines become (R, C) there and a clearer line."""
    previous, repeats = None, 0
    for raw in iter(src.readline, b""):
        line = raw
        m = NODE_EXIT.search(raw) if exits is not None else None
        if m:
            rank, code = int(m.group(1)), (int(m.group(2)) if m.group(2) is not None else None)
            exits.append((rank, code))
            line = f"train.launch: rank {rank} {describe(code)}\n".encode()
        elif raw == previous:  # mlx's ring repeats "Socket N was closed by the peer"
            repeats += 1
            continue
        if repeats:
            line = f"(the line above {repeats} more times)\n".encode() + line
        previous, repeats = raw, 0
        _write(dst, line)
    if repeats:
        _write(dst, f"(the line above {repeats} more times)\n".encode())


def _write(dst, data):
    try:
        dst.write(data)
        dst.flush()
    except (BrokenPipeError, ValueError):
        pass


def outcome(exits, launcher_rc):
    """The run's exit code from the processes' codes (the first failure), with a line."""
    failed = [(rank, code) for rank, code in exits if code != 0]
    if failed:
        rank, code = failed[0]
        others = "; ".join(f"rank {r} {describe(c)}" for r, c in failed[1:])
        rc = exit_code(code)
        if rc == 130:
            after = "interrupted: run the same command to continue from the last checkpoint."
        elif rc in (2, 3):
            after = "see its error above."
        else:
            after = (
                "the other processes were stopped. Run the same command to continue from the last checkpoint."
            )
        log(
            f"the run stopped: rank {rank} {describe(code)} first"
            + (f" ({others})" if others else "")
            + f"; {after}"
        )
        return rc
    if launcher_rc != 0:
        log(f"mlx.launch {describe(launcher_rc)}")
        return exit_code(launcher_rc)
    return 0


def main(argv=None):
    args, train_args = parse_args(argv)
    return run(args, train_args)


if __name__ == "__main__":
    sys.exit(main())
