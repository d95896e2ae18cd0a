"""Peak memory of a real model's training and serving, alone and together, beside the memory
model's prediction (issue 23 item 5; docs/MEMORY.md, "SmolLM2-135M on this machine").

    python -m bench.memory_real [--model models/smollm2-135m-instruct] [--users 8] [--rounds 3]
                                [--batch-size 4 --lora-layers 8 --lora-rank 16 --max-seq-length 512]
                                [--phases train,serve,both] [--json PATH]

(a) `python -m train.train` with train/demo.yaml's recipe (options override it) on the sample
    data for one epoch, so that the batch of the longest examples, the step's peak, is trained;
(b) `python -m worker --model M --adapter <that run>` serving --users concurrent users, each
    asking --rounds of the sample's questions under the club's system prompt (bench/soak.py's),
    with --max-batch = users, --context-length (default: the traffic's longest prompt + the
    answer, rounded up to 256) and --prefix-cache-bytes (64 MiB) given, so the worker's plan is
    the plan of this traffic;
(c) both at once (a 16 GB Mac's situation: a worker serving while a new adapter trains).

Measured per process: the RSS high-water mark (the kernel's: VmHWM, read every 50 ms while it
runs; where there is no /proc, wait4's ru_maxrss, which on Linux would keep the forking parent's;
RSS also sampled with psutil), and mlx's peak (training's metrics.jsonl, the worker's `stats`); for
(c) the peak of the two RSS summed, sampled. Predicted: core.memory.training_peak (the longest
batch, as train.py's check does) and the worker's own plan (`ready.limits.predicted_peak_bytes`,
core.memory.worker_limits), each plus core.memory.RUNTIME_BYTES for the process itself. On Metal
and CUDA mlx's buffers are not in the RSS: there the resident figure is RSS + mlx's peak.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

import bench  # noqa: F401  (fast BLAS before mlx)
from bench.common import ROOT, log, rel, sub_env
from bench.soak import SYSTEM
from bench.worker_client import WorkerProcess
from core import memory
from core.config import load_config
from core.paths import ROOT as _ROOT

DEMO_CONFIG = _ROOT / "train" / "demo.yaml"

SMOLLM = ROOT / "models" / "smollm2-135m-instruct"
MB = 1e6


class Sampler(threading.Thread):
    """RSS of some processes every `every` seconds: each one's maximum and the maximum sum; and
    each one's high-water mark as the kernel counts it (VmHWM; none without /proc)."""

    def __init__(self, every=0.05):
        super().__init__(daemon=True)
        self.every, self.procs, self.peak, self.peak_sum, self.hwm = every, {}, {}, 0, {}
        self.halt = threading.Event()

    def watch(self, role, pid):
        self.procs[role] = psutil.Process(pid)

    def run(self):
        while not self.halt.is_set():
            total = 0
            for role, p in list(self.procs.items()):
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                self.peak[role] = max(self.peak.get(role, 0), rss)
                total += rss
                hwm = memory.high_water_mark(p.pid)  # None once it has exited
                if hwm is not None:
                    self.hwm[role] = max(self.hwm.get(role, 0), hwm)
            self.peak_sum = max(self.peak_sum, total)
            self.halt.wait(self.every)

    def stop(self):
        self.halt.set()
        self.join()


def reap(proc, sampler, role):
    """Wait for a child: (exit code, its RSS high-water mark in bytes: the kernel's VmHWM as the
    sampler last read it, or without /proc wait4's ru_maxrss)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if role in sampler.hwm:
        return proc.returncode, sampler.hwm[role]
    return proc.returncode, memory.maxrss_bytes(usage)


def prepare(tmp, args):
    """The sample data (make data's code), the recipe (demo.yaml + options) and the questions."""
    data = tmp / "data"
    subprocess.run(
        [sys.executable, "-m", "train.prepare_data", "--config", str(args.config), "--out", str(data)],
        cwd=ROOT,
        env=sub_env(),
        check=True,
        capture_output=True,
    )
    overrides = {
        "batch_size": args.batch_size,
        "num_layers": args.lora_layers,
        "lora_parameters.rank": args.lora_rank,
        "max_seq_length": args.max_seq_length,
    }
    cfg = load_config(args.config, {k: v for k, v in overrides.items() if v is not None})
    cfg.update(model=str(args.model), data=str(data), config=str(args.config))
    questions = []
    for name in ("valid.jsonl", "train.jsonl"):
        for line in (data / name).read_text(encoding="utf-8").splitlines():
            msgs = json.loads(line)["messages"]
            questions += [m["content"] for m in msgs if m["role"] == "user"][-1:]
    return cfg, questions


def predict_training(cfg):
    """core.memory's training peak for the run's longest batch (train.py's own check), bytes."""
    from mlx_lm.utils import load_tokenizer

    from train import batches

    split = batches.read_split(Path(cfg["data"]) / "train.jsonl")
    system = cfg["system_prompt"] or batches.common_system_prompt(split.conversations)
    tok = load_tokenizer(Path(cfg["model"]))
    enc = batches.encode(tok, split.conversations, system, cfg["mask_prompt"], cfg["max_seq_length"])
    seq_len = max(len(ids) for ids, _ in enc.examples)
    shape = memory.shape_from_config(memory.read_config(cfg["model"]))
    batch = min(int(cfg["batch_size"]), len(enc.examples))
    peak = memory.training_peak(shape, memory.TrainSettings.from_cfg(cfg), batch, seq_len)
    return peak["total"], seq_len, len(enc.examples)


def train_command(cfg, tmp, iters):
    return [
        sys.executable, "-m", "train.train", "--config", str(cfg["config"]), "--name", "memreal",
        "--model", cfg["model"], "--data", cfg["data"], "--fresh", "--iters", str(iters),
        "--models-dir", str(tmp / "models"), "--logs-dir", str(tmp / "logs"),
        "--batch-size", str(cfg["batch_size"]), "--lora-layers", str(cfg["num_layers"]),
        "--lora-rank", str(cfg["lora_parameters"]["rank"]),
        "--set", f"max_seq_length={cfg['max_seq_length']}",
        "--set", f"steps_per_eval={iters}", "--set", f"save_every={iters}",
    ]  # fmt: skip


def start_training(cfg, tmp, iters):
    log(f"training: {iters} steps of {rel(cfg['model'])} (batch {cfg['batch_size']})")
    out = open(tmp / "train.log", "ab")
    return subprocess.Popen(
        train_command(cfg, tmp, iters),
        cwd=ROOT,
        env=sub_env(),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=out,
    )


def finish_training(proc, tmp, sampler):
    code, hwm = reap(proc, sampler, "train")
    if code != 0:
        tail = (tmp / "train.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"training exited {code}:\n{tail}")
    metrics = (tmp / "logs" / "memreal" / "metrics.jsonl").read_text().splitlines()
    mlx_peak = max(json.loads(line)["peak_mem_gb"] for line in metrics) * 1e9
    return {"hwm": hwm, "mlx_peak": int(mlx_peak)}


def context_for(tok, system, questions, max_tokens):
    """The traffic's longest prompt + the answer, rounded up to mlx-lm's 256-token KV steps."""
    from core.prompt import encode_prompt

    longest = max(len(encode_prompt(tok, [{"role": "user", "content": q}], system)) for q in questions)
    return int(math.ceil((longest + max_tokens) / memory.KV_STEP) * memory.KV_STEP)


def start_worker(cfg, tmp, args, context):
    cmd = ["--model", cfg["model"], "--adapter", str(tmp / "models" / "memreal")]
    cmd += ["--max-batch", str(args.users), "--context-length", str(context)]
    cmd += ["--prefix-cache-bytes", str(args.prefix_cache_bytes)]
    log(f"worker: {' '.join(cmd)}")
    return WorkerProcess(cmd, env=sub_env(), stderr_path=tmp / "worker.log").start()


def serve(w, system, questions, args, until=None):
    """--users threads, each asking --rounds questions one after the other (more while the
    thread `until` is alive); `stats` polled meanwhile. Returns (requests answered, the largest
    stats.memory)."""
    done, errors, stop = [], [], threading.Event()

    def user(u):
        k = 0
        while k < args.rounds or (until is not None and until.is_alive() and not stop.is_set()):
            q = questions[(u + k * args.users) % len(questions)]
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": q}]
            try:
                w.generate(
                    {"id": f"u{u}-{k}", "messages": msgs, "max_tokens": args.max_tokens, "temperature": 0}
                )
            except Exception as e:  # noqa: BLE001  (reported after the run)
                errors.append(f"user {u}: {e}")
                return
            done.append(1)
            k += 1

    threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(args.users)]
    for t in threads:
        t.start()
    top = {}
    while any(t.is_alive() for t in threads):
        m = w.control("stats")["memory"]
        top = {k: max(top.get(k, 0), v) for k, v in m.items() if isinstance(v, int)}
        time.sleep(0.5)
    stop.set()
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    return len(done), top


def close_worker(w, sampler):
    """Stop the worker (EOF) and reap it: its RSS high-water mark."""
    w.proc.stdin.close()
    code, hwm = reap(w.proc, sampler, "worker")
    w.close()
    if code != 0:
        raise RuntimeError(f"worker exited {code}")
    return hwm


def resident(measured, gpu):
    """What the process held at most: RSS, plus mlx's peak where mlx's buffers are not in it."""
    return measured["hwm"] + (measured["mlx_peak"] if gpu else 0)


def row(name, measured, predicted):
    ratio = measured / predicted if predicted else float("nan")
    return f"{name:<34} {measured / MB:9.0f} MB {predicted / MB:9.0f} MB {ratio:7.2f}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.memory_real", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=SMOLLM, help="a local model folder (default SmolLM2-135M)")
    p.add_argument(
        "--config", type=Path, default=DEMO_CONFIG, help="the training recipe (default train/demo.yaml)"
    )
    p.add_argument("--batch-size", type=int, help="default: the config's")
    p.add_argument("--lora-layers", type=int, help="default: the config's num_layers")
    p.add_argument("--lora-rank", type=int, help="default: the config's")
    p.add_argument("--max-seq-length", type=int, help="default: the config's")
    p.add_argument("--iters", type=int, help="training steps (default: one epoch)")
    p.add_argument("--users", type=int, default=8, help="concurrent users (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="questions per user at least (default 3)")
    p.add_argument("--max-tokens", type=int, default=128, help="per answer (default 128)")
    p.add_argument("--prefix-cache-bytes", type=int, default=64 << 20, help="the worker's (default 64 MiB)")
    p.add_argument("--phases", default="train,serve,both", help="which of train, serve, both (default all)")
    p.add_argument("--json", type=Path, help="write the figures here too")
    return p.parse_args(argv)


def main(argv=None):
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    args = parse_args(argv)
    phases = set(args.phases.split(","))
    gpu = mx.default_device() == mx.gpu
    with tempfile.TemporaryDirectory(prefix="memory_real-") as t:
        tmp = Path(t)
        cfg, questions = prepare(tmp, args)
        train_pred, seq_len, n_train = predict_training(cfg)
        train_pred += memory.RUNTIME_BYTES
        iters = args.iters or -(-n_train // int(cfg["batch_size"]))
        system = SYSTEM
        context = context_for(load_tokenizer(args.model), system, questions, args.max_tokens)
        res = {"model": rel(args.model), "date": time.strftime("%Y-%m-%d"), "backend": "gpu" if gpu else "cpu",
               "recipe": {k: cfg[k] for k in ("batch_size", "num_layers", "max_seq_length")}
               | {"rank": cfg["lora_parameters"]["rank"], "iters": iters, "longest_example": seq_len},
               "serving": {"users": args.users, "rounds": args.rounds, "max_tokens": args.max_tokens,
                           "context_length": context, "prefix_cache_bytes": args.prefix_cache_bytes},
               "runtime_bytes": memory.RUNTIME_BYTES, "predicted": {"train": train_pred}}  # fmt: skip
        # the adapter the worker serves: training alone, or a short run when that phase is skipped
        proc = start_training(cfg, tmp, iters if "train" in phases else 1)
        sampler = Sampler()
        sampler.watch("train", proc.pid)
        sampler.start()
        trained = finish_training(proc, tmp, sampler)
        sampler.stop()
        if "train" in phases:
            res["train"] = trained
        if "serve" in phases:
            sampler = Sampler()
            w = start_worker(cfg, tmp, args, context)
            sampler.watch("worker", w.proc.pid)
            sampler.start()
            n, stats = serve(w, system, questions, args)
            res["predicted"]["serve"] = w.ready["limits"]["predicted_peak_bytes"] + memory.RUNTIME_BYTES
            res["serve"] = {"hwm": close_worker(w, sampler), "mlx_peak": stats.get("peak_bytes", 0), "requests": n,
                            "stats": stats, "sampled": sampler.peak.get("worker", 0)}  # fmt: skip
            sampler.stop()
        if "both" in phases:
            res["both"] = together(cfg, tmp, args, context, system, questions, iters, res)
    report(res, gpu)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0


def together(cfg, tmp, args, context, system, questions, iters, res):
    """Training and the worker at once: each one's high-water mark, and the sampled peak sum."""
    sampler = Sampler()
    proc = start_training(cfg, tmp, iters)
    sampler.watch("train", proc.pid)
    w = start_worker(cfg, tmp, args, context)
    sampler.watch("worker", w.proc.pid)
    sampler.start()
    # reaped by a thread of its own (wait4 gives its high-water mark; a poll() would reap it first)
    trained = {}
    reaper = threading.Thread(target=lambda: trained.update(finish_training(proc, tmp, sampler)), daemon=True)
    reaper.start()
    n, stats = serve(w, system, questions, args, until=reaper)
    reaper.join()
    if not trained:
        raise RuntimeError("training failed (its traceback above)")
    res["predicted"].setdefault("serve", w.ready["limits"]["predicted_peak_bytes"] + memory.RUNTIME_BYTES)
    out = {"train": trained, "requests": n}
    out["serve"] = {"hwm": close_worker(w, sampler), "mlx_peak": stats.get("peak_bytes", 0)}
    sampler.stop()
    out["peak_sum_sampled"] = sampler.peak_sum
    return out


def report(res, gpu):
    p = res["predicted"]
    lines = [
        f"{res['model']}, {res['backend']}, {res['date']}: recipe {res['recipe']}; serving {res['serving']}",
        f"{'':<34} {'measured':>12} {'predicted':>12} {'ratio':>7}",
    ]
    if "train" in res:
        lines.append(row("training alone (peak RSS)", resident(res["train"], gpu), p["train"]))
        lines.append(f"{'  mlx peak':<34} {res['train']['mlx_peak'] / MB:9.0f} MB")
    if "serve" in res:
        s = res["serve"]
        lines.append(
            row(f"worker alone, {res['serving']['users']} users (peak RSS)", resident(s, gpu), p["serve"])
        )
        lines.append(
            f"{'  mlx peak / stats rss max':<34} {s['mlx_peak'] / MB:9.0f} MB {s['stats'].get('rss_bytes', 0) / MB:9.0f} MB"
        )
    if "both" in res:
        b = res["both"]
        both = resident(b["train"], gpu) + resident(b["serve"], gpu)
        lines.append(row("together: training", resident(b["train"], gpu), p["train"]))
        lines.append(row("together: worker", resident(b["serve"], gpu), p["serve"]))
        lines.append(row("together: sum of the peaks", both, p["train"] + p["serve"]))
        lines.append(
            row("together: peak of the sum (sampled)", b["peak_sum_sampled"], p["train"] + p["serve"])
        )
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
