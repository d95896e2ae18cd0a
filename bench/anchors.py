"""The anchors: mlx-lm's own training, server and generation, run with the same BLAS as ours
(not with our small-product kernel, core/native/small_gemm.c, unless SMALL_GEMM=1).

    python -m bench.anchors lora   ARGS...   # = python -m mlx_lm lora ARGS...
    python -m bench.anchors server ARGS...   # = python -m mlx_lm server ARGS...

`import bench` (hence `import core`) runs first, so mlx-lm gets the optimised BLAS exactly as
our entry points do (and the reference BLAS under FAST_BLAS=0): the comparison is then
between the two programs, not between two BLAS libraries. Everything else is mlx-lm's own
code, unchanged.

For `lora`, every training report mlx-lm makes (its "Tokens/sec" column) is also appended
as one JSON line to $BENCH_LORA_METRICS (full precision; the console table rounds), through
mlx-lm's own TrainingCallback hook.
"""

import json
import os
import sys
import time

import bench  # noqa: F401  (fast BLAS before mlx)

# The anchor server gets the BLAS but not core/native/small_gemm.c, unless SMALL_GEMM=1 is in
# its environment: that kernel is this project's own, and what it adds is part of what the
# comparison measures. (In-process anchors, stream_generate, share the bench's process and so
# its kernel: those rows measure the worker's own overhead.)
ANCHOR_DEFAULTS = {"SMALL_GEMM": "0"}
# Tries per request to mlx_lm server: its listen backlog is 5, so a burst of connections can be
# reset; clients retry as a real one would, and the time lost counts against the server.
SERVER_ATTEMPTS = 4


class _JsonlCallback:
    def __init__(self, path, wrapped=None):
        self.path = path
        self.wrapped = wrapped

    def _write(self, kind, info):
        rec = {"kind": kind, "time": time.time()}
        for k, v in info.items():
            rec[k] = v.item() if hasattr(v, "item") else v
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def on_train_loss_report(self, info):
        self._write("train", info)
        if self.wrapped is not None:
            self.wrapped.on_train_loss_report(info)

    def on_val_loss_report(self, info):
        self._write("val", info)
        if self.wrapped is not None:
            self.wrapped.on_val_loss_report(info)


def run_lora(argv):
    from mlx_lm import lora

    path = os.environ.get("BENCH_LORA_METRICS")
    if path:
        original = lora.get_reporting_callbacks

        def callbacks(*args, **kwargs):
            return _JsonlCallback(path, original(*args, **kwargs))

        lora.get_reporting_callbacks = callbacks
    sys.argv = ["mlx_lm.lora", *argv]
    lora.main()


def run_server(argv):
    from mlx_lm import server

    sys.argv = ["mlx_lm.server", *argv]
    server.main()


class ServerProcess:
    """`python -m bench.anchors server --model M --host 127.0.0.1 --port P` as a child, with a
    urllib client for its OpenAI-style /v1/chat/completions (non-streaming)."""

    def __init__(self, model, python=None, env=None, stderr_path=None, extra_args=(), ready_timeout=300):
        import socket

        with socket.socket() as s:  # a free port on 127.0.0.1
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.model = model
        self.command = [
            python or sys.executable,
            "-m",
            "bench.anchors",
            "server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "WARNING",
            *extra_args,
        ]
        self.env = {**ANCHOR_DEFAULTS, **(os.environ if env is None else env)}
        self.stderr_path = stderr_path
        self.ready_timeout = ready_timeout
        self.proc = None
        self._err = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        import subprocess
        import urllib.request
        from pathlib import Path

        root = Path(__file__).resolve().parent.parent
        self._err = open(self.stderr_path, "ab") if self.stderr_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.command, cwd=root, env=self.env, stdin=subprocess.DEVNULL, stdout=self._err, stderr=self._err
        )
        deadline = time.perf_counter() + self.ready_timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlx_lm server exited ({self.proc.returncode}); see {self.stderr_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError(f"mlx_lm server not up in {self.ready_timeout}s")

    def chat(self, messages, max_tokens, temperature=0.0, timeout=600):
        """One non-streaming request: (usage, seconds)."""
        import urllib.request

        body = json.dumps(
            {
                "model": "default_model",
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "stream": False,
            }
        ).encode()
        req = urllib.request.Request(
            self.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        tic = time.perf_counter()
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
        return out.get("usage", {}), time.perf_counter() - tic

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        if self._err not in (None,) and hasattr(self._err, "close"):
            self._err.close()
        return None if self.proc is None else self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def stream_generate_once(model, tokenizer, prompt_ids, max_tokens):
    """mlx_lm.stream_generate, greedy, timed like the worker's client side: from the first
    response with text to the last response. Returns a dict of measurements."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(0.0)
    t_first = t_last = None
    n = 0
    n_at_first = 0
    last = None
    tic = time.perf_counter()
    for resp in stream_generate(model, tokenizer, prompt_ids, max_tokens=max_tokens, sampler=sampler):
        now = time.perf_counter()
        n += 1
        if t_first is None and resp.text:
            t_first, n_at_first = now, n
        t_last = now
        last = resp
    client = None
    if t_first is not None and t_last > t_first and n > 1:
        client = (n - 1) / (t_last - t_first)
    return {
        "completion_tokens": n,
        "tokens_per_s": client,
        "own_generation_tps": float(last.generation_tps) if last else None,
        "own_prompt_tps": float(last.prompt_tps) if last else None,
        "ttft_s": (t_first - tic) if t_first else None,
        "first_text_at_token": n_at_first,
        "finish_reason": last.finish_reason if last else None,
    }


def parse_lora_metrics(path):
    """[(iteration, tokens_per_second)] from a $BENCH_LORA_METRICS file."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("kind") == "train":
                    out.append((int(rec["iteration"]), float(rec["tokens_per_second"])))
    except FileNotFoundError:
        pass
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("lora", "server"):
        sys.exit("usage: python -m bench.anchors lora|server ARGS...")
    cmd, rest = argv[0], argv[1:]
    if cmd == "lora":
        run_lora(rest)
    else:
        run_server(rest)


if __name__ == "__main__":
    main()
