"""`make check-backend`: does this machine's mlx backend (Metal, CUDA or the CPU) run the whole
job? In a few minutes, on the tiny test models: train a few LoRA steps, kill -9 the run and
resume it, train QLoRA steps on the 4-bit tiny model, serve a round trip through the worker and
through the Node client, and measure the decode speed and the peak memory. It prints one table,
a PASS/FAIL/SKIP line per check plus the versions: what to paste into a bug report.

    python -m bench.check_backend [--keep] [--json PATH] [--no-build]

Everything it writes goes to a temporary folder (MODELS_DIR/LOGS_DIR point there; removed at the
end unless --keep): your runs in models/ are never touched. The tiny models are built in
models/ when missing (`make tiny-model`; --no-build: never). Exit status 0 when no line
failed, 1 otherwise.
"""

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from core import paths

ROOT = paths.ROOT
TINY = paths.TINY_MODEL
TINY_4BIT = ROOT / "models" / "tiny-mistral-4bit"
PY = sys.executable
NODE_CLIENT = ROOT / "clients" / "node" / "index.js"
PROMPT = "Quem fundou o Sporting Clube Farense?"
DECODE_TOKENS = 128
WORKER_RSS_LIMIT = 4 << 30  # the tiny model's worker uses a few hundred MB
TRAIN_CONFIG = {
    "seed": 0,
    "fine_tune_type": "lora",
    "num_layers": -1,
    "lora_parameters": {"rank": 4, "scale": 4.0, "dropout": 0.0},
    "batch_size": 4,
    "iters": 8,
    "learning_rate": 1e-3,
    "lr_schedule": {"name": "cosine", "warmup": 2, "min_lr": 1e-4},
    "max_seq_length": 256,
    "steps_per_report": 1,
    "steps_per_eval": 4,
    "save_every": 2,
    "keep_last": 2,
    "patience": 0,
}


class Skip(Exception):
    """The check does not apply here (the reason is the line's detail)."""


@dataclass
class Line:
    check: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float


@dataclass
class Report:
    versions: dict
    lines: list = field(default_factory=list)
    measured: dict = field(default_factory=dict)

    def run(self, name, fn, *args):
        """One table line: fn returns its detail (PASS), raises Skip (SKIP) or anything else (FAIL)."""
        t0 = time.monotonic()
        try:
            status, detail = "PASS", fn(*args)
        except Skip as e:
            status, detail = "SKIP", str(e)
        except Exception as e:
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
        self.lines.append(Line(name, status, detail, round(time.monotonic() - t0, 1)))
        print(
            f"check-backend: {status} {name}: {detail.splitlines()[0] if detail else ''}",
            file=sys.stderr,
            flush=True,
        )
        return status == "PASS"

    @property
    def failed(self):
        return [line for line in self.lines if line.status == "FAIL"]


# --------------------------------------------------------------------------- versions


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _os_name():
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]} ({platform.machine()})"
    try:
        distro = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        distro = ""
    libc = " ".join(platform.libc_ver()).strip() or "libc ?"
    return f"{platform.system()} {platform.release()} ({platform.machine()}, {libc}){', ' + distro if distro else ''}"


def _node_version():
    node = shutil.which("node")
    if not node:
        return None
    try:
        return subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def versions():
    import mlx.core as mx

    from core import blas

    info = {}
    try:
        info = dict(mx.device_info())
    except Exception:
        pass
    metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    cuda = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
    device = mx.default_device()
    return {
        "python": f"{platform.python_version()} ({platform.python_implementation()}) {sys.executable}",
        "os": _os_name(),
        "mlx": mx.__version__,
        "mlx-lm": _version("mlx-lm"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "device": f"{'gpu' if device == mx.gpu else 'cpu'}: {info.get('device_name') or platform.processor() or '?'}"
        f" ({info.get('architecture') or platform.machine()})",
        "backend": "metal" if metal else "cuda" if cuda else "cpu",
        "memory": _memory_info(info),
        "blas": blas.loaded_path or blas.status or "-",
        "small products": blas.SMALL_GEMM_PATH if blas.small_gemm else "BLAS only (small_gemm not loaded)",
        "node": _node_version() or "not found",
    }


def _memory_info(info):
    import psutil

    total = psutil.virtual_memory().total
    text = f"{total / 2**30:.1f} GiB RAM"
    ws = info.get("max_recommended_working_set_size")
    if ws:
        text += f", recommended working set {ws / 2**30:.1f} GiB"
    return text


# --------------------------------------------------------------------------- the checks


def run(cmd, env, timeout, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def must(proc, what):
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-6:])
        raise RuntimeError(f"{what} exited {proc.returncode}: {tail}")
    return proc


def check_tiny_model(build):
    if (TINY / "config.json").exists():
        return f"{TINY.relative_to(ROOT)} present"
    if not build:
        raise RuntimeError(f"{TINY.relative_to(ROOT)} is missing (make tiny-model builds it)")
    _build_tiny_models()
    if not (TINY / "config.json").exists():
        raise RuntimeError(f"make tiny-model did not build {TINY}")
    return f"built {TINY.relative_to(ROOT)}"


def check_tiny_4bit(build):
    rel = TINY_4BIT.relative_to(ROOT)
    if (TINY_4BIT / "config.json").exists():
        return f"{rel} present"
    if build and _make_builds_4bit():
        _build_tiny_models()
        if (TINY_4BIT / "config.json").exists():
            return f"built {rel}"
    raise Skip(f"{rel} not built (make tiny-model builds it, in versions that have it): no QLoRA line")


def _make_builds_4bit():
    if not shutil.which("make"):
        return False
    dry = subprocess.run(["make", "-n", "tiny-model"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return "tiny-mistral-4bit" in dry.stdout


def _build_tiny_models():
    if shutil.which("make"):
        cmd = ["make", "--no-print-directory", "tiny-model"]
    else:
        cmd = [PY, "-m", "train.tiny_model", "--out", str(TINY)]
    print(f"check-backend: building the tiny model(s): {' '.join(cmd)}", file=sys.stderr, flush=True)
    must(subprocess.run(cmd, cwd=ROOT, timeout=1800, capture_output=True, text=True), " ".join(cmd))


class Job:
    """The temporary folder of one check: data, configs, MODELS_DIR and LOGS_DIR."""

    def __init__(self, work):
        self.work = Path(work)
        self.data = self.work / "data"
        self.env = dict(
            os.environ,
            MODELS_DIR=str(self.work / "models"),
            LOGS_DIR=str(self.work / "logs"),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            FAST_BLAS_QUIET="1",
            PYTHONUNBUFFERED="1",
        )
        for hook in ("TRAIN_INJECT_NAN", "TRAIN_STEP_DELAY_S", "WORKER_TEST_IGNORE_EOS", "WORKER_TEST_FAULT"):
            self.env.pop(hook, None)

    def run_dir(self, name):
        return self.work / "models" / name

    def metrics(self, name):
        path = self.work / "logs" / name / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def config(self, name, model):
        path = self.work / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(dict(TRAIN_CONFIG, model=str(model), data=str(self.data))), encoding="utf-8"
        )
        return path

    def train_cmd(self, name, model):
        return [PY, "-m", "train.train", "--config", str(self.config(name, model)), "--name", name]


def check_data(job):
    must(
        run(
            [PY, "-m", "train.prepare_data", "--out", str(job.data), "--raw", str(paths.SAMPLE)], job.env, 300
        ),
        "train.prepare_data",
    )
    n = {
        split: sum(1 for _ in open(job.data / f"{split}.jsonl", encoding="utf-8"))
        for split in ("train", "valid")
    }
    return f"data/sample -> {n['train']} training, {n['valid']} validation examples"


def _summary(job, name, report, key):
    recs = [r for r in job.metrics(name) if r.get("train_loss") is not None]
    if not recs:
        raise RuntimeError(f"{name}: no training metrics in {job.work / 'logs' / name}")
    first, last = recs[0]["train_loss"], recs[-1]["train_loss"]
    if not all(math.isfinite(r["train_loss"]) for r in recs):
        raise RuntimeError(f"{name}: a non-finite training loss")
    peak = max(r.get("peak_mem_gb") or 0 for r in job.metrics(name))
    tps = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
    report.measured[key] = {
        "peak_mem_gb": peak,
        "tokens_per_s": tps[-1] if tps else None,
        "first_loss": first,
        "last_loss": last,
    }
    speed = f", {tps[-1]:,.0f} tok/s" if tps else ""
    return f"loss {first:.3f} -> {last:.3f}, peak {peak * 1000:.0f} MB (mlx){speed}"


def check_lora_killed(job, report):
    """The LoRA run, killed with SIGKILL once a checkpoint exists (a step pause makes it land)."""
    name = "check-lora"
    env = dict(job.env, TRAIN_STEP_DELAY_S="0.3")
    proc = subprocess.Popen(
        job.train_cmd(name, TINY),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpts = job.run_dir(name) / "checkpoints"
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            steps = [r.get("step", 0) for r in job.metrics(name)]
            if max(steps, default=0) >= 3 and any(ckpts.glob("step_*")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        stderr = proc.communicate(timeout=120)[1]
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(
            f"the run ended with {proc.returncode} before the kill: "
            f"{' | '.join(stderr.strip().splitlines()[-4:])}"
        )
    reached = max((r.get("step", 0) for r in job.metrics(name)), default=0)
    saved = sorted(p.name for p in ckpts.glob("step_*"))
    report.measured["killed_at_step"] = reached
    return f"{TRAIN_CONFIG['iters']} steps planned; kill -9 at step {reached}, checkpoints {', '.join(saved)}"


def check_lora_resume(job, report):
    name = "check-lora"
    proc = must(run(job.train_cmd(name, TINY), job.env, 900), "the resumed run")
    line = next((entry for entry in proc.stderr.splitlines() if "resuming from" in entry), None)
    if line is None:
        raise RuntimeError("the second run did not resume (no 'resuming from' in its log)")
    meta = json.loads((job.run_dir(name) / "metadata.json").read_text())
    step = Path(line.split("resuming from ", 1)[1].split(" ")[0]).name
    report.measured["resumed_from"] = step
    best = meta.get("best_val_loss")
    return f"resumed from {step}, finished; {_summary(job, name, report, 'train_lora')}" + (
        f"; best val loss {best:.3f}" if isinstance(best, (int, float)) else ""
    )


def check_qlora(job, report):
    if not (TINY_4BIT / "config.json").exists():
        raise Skip(f"{TINY_4BIT.relative_to(ROOT)} not built")
    name = "check-qlora"
    must(
        run(job.train_cmd(name, TINY_4BIT) + ["--iters", "4", "--save-every", "2"], job.env, 900),
        "QLoRA training",
    )
    if not (job.run_dir(name) / "adapters.safetensors").exists():
        raise RuntimeError(f"no adapters.safetensors in {job.run_dir(name)}")
    return f"4 steps on {TINY_4BIT.name}; {_summary(job, name, report, 'train_qlora')}"


class WorkerSession:
    """`python -m worker --adapter RUN` over pipes, one request at a time (stderr to a file)."""

    def __init__(self, job, adapter, env=None):
        self.log = open(job.work / "worker.err", "wb")
        self.proc = subprocess.Popen(
            [PY, "-m", "worker", "--adapter", str(adapter)],
            cwd=ROOT,
            env=env or job.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.ready = self.read()
        if self.ready.get("type") != "ready":
            raise RuntimeError(f"the worker's first message is not ready: {self.ready}")

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(60)
            err = (Path(self.log.name).read_text(errors="replace").strip().splitlines() or [""])[-3:]
            raise RuntimeError(f"the worker exited {self.proc.returncode}: {' | '.join(err)}")
        return json.loads(line)

    def send(self, obj):
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def until(self, rid, kind):
        msgs = []
        while True:
            msg = self.read()
            msgs.append(msg)
            if msg.get("type") == kind and msg.get("id") == rid or msg.get("type") == "error":
                return msgs

    def close(self):
        self.proc.stdin.close()
        rc = self.proc.wait(60)
        self.log.close()
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _done(msgs, rid):
    last = msgs[-1]
    if last.get("type") != "done" or last.get("id") != rid:
        raise RuntimeError(f"request {rid}: {last}")
    return last


def check_worker(job, report):
    adapter = job.run_dir("check-lora")
    if not (adapter / "adapters.safetensors").exists():
        raise Skip("no trained adapter (the LoRA lines failed)")
    # Generation ends only at max_tokens (a test hook of the worker), so the decode rate is
    # measured over DECODE_TOKENS tokens whatever the tiny model says.
    w = WorkerSession(job, adapter, env=dict(job.env, WORKER_TEST_IGNORE_EOS="1"))
    try:
        w.send({"id": "rt-1", "prompt": PROMPT, "max_tokens": 16})
        one = _done(w.until("rt-1", "done"), "rt-1")
        w.send(
            {
                "id": "rt-2",
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 16,
                "stream": True,
            }
        )
        msgs = w.until("rt-2", "done")
        two = _done(msgs, "rt-2")
        streamed = "".join(m["text"] for m in msgs if m.get("type") == "token")
        if streamed != two["text"] or not one["text"]:
            raise RuntimeError(f"streamed text {streamed!r} != done text {two['text']!r}")
        w.send({"id": "decode", "prompt": PROMPT, "max_tokens": DECODE_TOKENS, "temperature": 0})
        dec = _done(w.until("decode", "done"), "decode")
        w.send({"op": "stats"})
        stats = next(m for m in w.until(None, "stats") if m.get("type") == "stats")
        rc = w.close()
    except BaseException:
        w.kill()
        raise
    if rc != 0:
        raise RuntimeError(f"the worker exited {rc} after stdin EOF")
    report.measured["decode"] = {"tokens": dec["usage"]["completion_tokens"], **dec["timing"]}
    report.measured["worker_memory"] = stats.get("memory", {})
    report.measured["worker_backend"] = w.ready.get("backend")
    accelerator = report.versions["backend"]
    if accelerator != "cpu" and w.ready.get("backend") != "gpu":
        raise RuntimeError(
            f"the worker runs on {w.ready.get('backend')!r} although {accelerator} is available"
        )
    return f"ready ({w.ready.get('backend')}), a reply and a stream of {len(msgs) - 1} tokens, exit 0 on EOF"


def check_decode(report):
    dec = report.measured.get("decode")
    if not dec:
        raise Skip("no worker measurement (the worker line did not pass)")
    if dec["tokens"] != DECODE_TOKENS or not dec["tokens_per_s"] > 0:
        raise RuntimeError(f"{dec['tokens']} tokens at {dec['tokens_per_s']} tok/s")
    return (
        f"{dec['tokens_per_s']:,.1f} tok/s on {report.measured.get('worker_backend')} "
        f"(batch 1, {dec['tokens']} tokens, first token {dec['ttft_ms']:.0f} ms)"
    )


def check_memory(report):
    mem = report.measured.get("worker_memory")
    if not mem:
        raise Skip("no worker measurement (the worker line did not pass)")
    parts = [f"worker: peak {mem['peak_bytes'] / 1e6:,.0f} MB (mlx), RSS {mem['rss_bytes'] / 1e6:,.0f} MB"]
    for key, label in (("train_lora", "LoRA"), ("train_qlora", "QLoRA")):
        if key in report.measured:
            parts.append(f"{label} training peak {report.measured[key]['peak_mem_gb'] * 1000:,.0f} MB")
    if mem["rss_bytes"] > WORKER_RSS_LIMIT:
        raise RuntimeError(
            f"the tiny model's worker uses {mem['rss_bytes'] / 1e9:.1f} GB "
            f"(> {WORKER_RSS_LIMIT / 1e9:.1f} GB): " + "; ".join(parts)
        )
    return "; ".join(parts)


NODE_SCRIPT = r"""
const [clientPath, python, adapter, prompt] = process.argv.slice(1);
const { startWorker } = await import(clientPath);
const worker = await startWorker({ python, adapter, readyTimeoutMs: 600_000 });
try {
  const done = await worker.complete({ prompt, max_tokens: 16 }, { timeoutMs: 120_000 });
  const s = worker.stream({ messages: [{ role: 'user', content: prompt }], max_tokens: 16 }, { timeoutMs: 120_000 });
  let streamed = '';
  for await (const text of s) streamed += text;
  const final = await s.done;
  console.log(JSON.stringify({ ready: worker.info, done, streamed, final }));
} finally {
  await worker.close();
}
"""


def check_node(job):
    node = shutil.which("node")
    if not node:
        raise Skip("node not found on PATH (the Node client needs Node >= 20)")
    adapter = job.run_dir("check-lora")
    if not (adapter / "adapters.safetensors").exists():
        raise Skip("no trained adapter (the LoRA lines failed)")
    proc = must(
        run(
            [node, "--input-type=module", "-e", NODE_SCRIPT, NODE_CLIENT.as_uri(), PY, str(adapter), PROMPT],
            job.env,
            900,
        ),
        "node (clients/node)",
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["done"]["type"] != "done" or not out["done"]["text"]:
        raise RuntimeError(f"complete(): {out['done']}")
    if out["streamed"] != out["final"]["text"]:
        raise RuntimeError(f"stream(): {out['streamed']!r} != {out['final']['text']!r}")
    return f"{_node_version()}: startWorker, complete() and stream() answered, close()"


# --------------------------------------------------------------------------- the table


def table(report):
    v = report.versions
    out = ["farense-lm check-backend (paste all of this into a bug report)", ""]
    out += [f"  {k:<13}{v[k]}" for k in v]
    out.append("")
    width = max(len(line.check) for line in report.lines)
    out.append(f"  {'check':<{width}}  result  time    detail")
    for line in report.lines:
        detail = line.detail.replace("\n", " | ")
        out.append(f"  {line.check:<{width}}  {line.status:<6}  {line.seconds:>5.1f}s  {detail}")
    counts = {s: sum(1 for line in report.lines if line.status == s) for s in ("PASS", "FAIL", "SKIP")}
    out += ["", f"  {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"]
    return "\n".join(out)


def check_all(work, build=True):
    report = Report(versions=versions())
    job = Job(work)
    report.run("tiny model", check_tiny_model, build)
    report.run("tiny model, 4-bit", check_tiny_4bit, build)
    data_ok = report.run("prepare data", check_data, job)
    if data_ok and report.run("train LoRA, kill -9", check_lora_killed, job, report):
        report.run("resume after kill -9", check_lora_resume, job, report)
    else:
        report.lines.append(Line("resume after kill -9", "SKIP", "no killed run to resume", 0.0))
    if data_ok:
        report.run("train QLoRA (4-bit base)", check_qlora, job, report)
    report.run("worker round trip", check_worker, job, report)
    report.run("decode speed", check_decode, report)
    report.run("peak memory", check_memory, report)
    report.run("Node client round trip", check_node, job)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.check_backend", description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--no-build", action="store_true", help="never build the tiny models (a missing one fails or skips)"
    )
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="check-backend-")
    try:
        report = check_all(work, build=not args.no_build)
    finally:
        if args.keep:
            print(f"check-backend: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(table(report), flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "versions": report.versions,
                    "measured": report.measured,
                    "lines": [asdict(line) for line in report.lines],
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
