"""The training lines of `make check-backend`: the tiny models (built when missing), the sample
data prepared, a LoRA run killed with SIGKILL once a checkpoint exists and then resumed, a few
QLoRA steps on the 4-bit tiny model."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.backend.job import PY, ROOT, TINY, TINY_4BIT, TRAIN_CONFIG, Skip, must, run
from core import paths


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
