"""`make bench`: every measurement side by side with its anchor (mlx-lm), in one run.

    python -m bench.run [--quick] [--sections training,decode,concurrency,ttft,bandwidth]
                        [--no-doc] [--keep-tmp]

Progress goes to stderr, the final table to stdout. Results (machine, exact commands, every
raw sample, medians, ratios, targets) go to bench/results/<date>-<HHMM>-<host>[-quick][-<sections>].json, a
section is appended to docs/PERFORMANCE.md, and the throughput-against-concurrency plot is
bench/results/<date>-<HHMM>-<host>[-quick]-concurrency.png.

Full mode (~8-12 min on 2 busy cores): training on models/tiny-mistral (the ~100M bench model
trains at ~50 tokens/s here, too slow for the budget), everything else on models/bench-mistral.
Quick mode (< 3 min): fewer repetitions, fewer iterations, shorter generations, concurrency
levels 1 and 8 only.
"""

import argparse
import datetime
import http.client
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import uuid
from pathlib import Path

import bench  # noqa: F401  (fast BLAS before mlx)
from bench import machine, report
from bench.anchors import ServerProcess, stream_generate_once
from bench.worker_client import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "PERFORMANCE.md"
TINY = ROOT / "models" / "tiny-mistral"
BENCH = ROOT / "models" / "bench-mistral"
SECTIONS = (
    "bandwidth",
    "small_gemm",
    "training",
    "decode",
    "concurrency",
    "ttft",
    "prefill",
    "workload",
    "distributed",
)
SERVER_ATTEMPTS = 4

PLANS = {
    "quick": dict(
        train_model=TINY,
        train_reps=2,
        train_iters=15,
        train_report=5,
        train_batch=4,
        lora_rank=8,
        lora_layers=4,
        train_noblas_reps=1,
        train_noblas_iters=10,
        decode_model=BENCH,
        decode_reps=3,
        decode_max_tokens=24,
        decode_noblas_reps=1,
        conc_model=BENCH,
        conc_levels=[1, 8],
        conc_reps=2,
        conc_max_tokens=16,
        ttft_model=BENCH,
        ttft_reps=2,
        ttft_system_tokens=520,
        bandwidth_gib=0.5,
        bandwidth_repeats=5,
        small_gemm_m=[1, 8],
        small_gemm_reps=3,
        dist_repeats=0,
        prefill_model=BENCH,
        prefill_tokens=1000,
        prefill_reps=1,
        workload_model=BENCH,
        workload_levels=[1, 8],
        workload_reps=1,
        workload_max_tokens=16,
        workload_conversations=2,
        skip_sections=("concurrency",),  # the workload's 1 and 8 users cover it
    ),
    "full": dict(
        train_model=TINY,
        train_reps=3,
        train_iters=30,
        train_report=10,
        train_batch=4,
        lora_rank=8,
        lora_layers=4,
        train_noblas_reps=2,
        train_noblas_iters=20,
        decode_model=BENCH,
        decode_reps=5,
        decode_max_tokens=64,
        decode_noblas_reps=2,
        conc_model=BENCH,
        conc_levels=[1, 2, 4, 8, 16],
        conc_reps=3,
        conc_max_tokens=48,
        ttft_model=BENCH,
        ttft_reps=3,
        ttft_system_tokens=520,
        bandwidth_gib=1.0,
        bandwidth_repeats=8,
        small_gemm_m=[1, 4, 8, 16],
        small_gemm_reps=5,
        dist_repeats=2,
        dist_iters=20,
        prefill_model=BENCH,
        prefill_tokens=1000,
        prefill_reps=3,
        workload_model=BENCH,
        workload_levels=[1, 4, 8, 16],
        workload_reps=3,  # 2 left 8-user ratios of 1.07x and 1.28x in two runs 30 min apart
        workload_max_tokens=16,
        workload_conversations=4,
        skip_sections=(),
    ),
}

DECODE_MESSAGES = [{"role": "user", "content": "Qual é o estádio do Farense e quando foi inaugurado?"}]
FACTS = [
    "O Sporting Clube Farense foi fundado em 1910, em Faro, no Algarve.",
    "O clube joga no Estádio de São Luís, no centro da cidade de Faro.",
    "As cores do Farense são o preto e o branco, e o símbolo tem um leão.",
    "Os adeptos do clube chamam-lhe carinhosamente os Leões de Faro.",
    "O Farense chegou à final da Taça de Portugal em 1990 e jogou na Taça UEFA.",
    "Responde sempre em português de Portugal, de forma breve, correta e educada.",
    "Se não souberes a resposta, diz que não sabes e sugere o sítio oficial do clube.",
]

_T0 = time.perf_counter()


def log(message):
    print(f"bench [{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def rel(path):
    """A path relative to the repository when it is inside it (symlinks not followed)."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(ROOT))
    except ValueError:
        return str(path)


def sub_env(tmp=None, **extra):
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if tmp is not None:
        env["MODELS_DIR"] = str(Path(tmp) / "models")
        env["LOGS_DIR"] = str(Path(tmp) / "logs")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_logged(cmd, env, log_path, timeout=600):
    """Run a subprocess with its output in log_path; raise with the log's tail on failure."""
    tic = time.perf_counter()
    with open(log_path, "ab") as f:
        p = subprocess.run(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=f, timeout=timeout
        )
    wall = time.perf_counter() - tic
    if p.returncode != 0:
        tail = Path(log_path).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}:\n{tail}")
    return wall


def weights_bytes(model_dir):
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


# =========================================================================== training

OURS_TRAIN_YAML = """\
model: {model}
data: {data}
fine_tune_type: lora
num_layers: {layers}
lora_parameters: {{rank: {rank}, scale: 20.0, dropout: 0.0}}
mask_prompt: false
optimizer: adam
batch_size: {batch}
iters: {iters}
learning_rate: 1.0e-4
lr_schedule: null
max_seq_length: 2048
steps_per_report: {report}
steps_per_eval: {iters}
save_every: {iters}
val_batches: 1
seed: 0
"""

LORA_YAML = """\
fine_tune_type: lora
lora_parameters: {{rank: {rank}, scale: 20.0, dropout: 0.0}}
mask_prompt: false
optimizer: adam
learning_rate: 1.0e-4
max_seq_length: 2048
steps_per_report: {report}
steps_per_eval: 100000
val_batches: 1
save_every: 100000
seed: 0
"""


def prepare_data(tmp):
    """data/{train,valid}.jsonl from `python -m train.prepare_data --out`, and the same
    conversations with the system message folded into the first user turn for mlx-lm (the
    tiny template rejects a system role; core/prompt.py folds it identically)."""
    from core.prompt import fold_system

    data, folded = Path(tmp) / "data", Path(tmp) / "data-folded"
    cmd = [sys.executable, "-m", "train.prepare_data", "--out", str(data)]
    run_logged(cmd, sub_env(tmp), Path(tmp) / "prepare_data.log")
    folded.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        with open(data / f"{split}.jsonl") as src, open(folded / f"{split}.jsonl", "w") as dst:
            for line in src:
                if line.strip():
                    msgs = json.loads(line)["messages"]
                    dst.write(json.dumps({"messages": fold_system(msgs)}, ensure_ascii=False) + "\n")
    return data, folded, cmd


def train_ours(plan, tmp, data, rep, iters, blas=True):
    name = f"ours-{'blas' if blas else 'noblas'}-{rep}"
    cfg = Path(tmp) / f"{name}.yaml"
    cfg.write_text(
        OURS_TRAIN_YAML.format(
            model=plan["train_model"],
            data=data,
            layers=plan["lora_layers"],
            rank=plan["lora_rank"],
            batch=plan["train_batch"],
            iters=iters,
            report=plan["train_report"],
        )
    )
    cmd = [
        sys.executable,
        "-m",
        "train.train",
        "--config",
        str(cfg),
        "--name",
        name,
        "--model",
        str(plan["train_model"]),
        "--data",
        str(data),
        "--iters",
        str(iters),
        "--batch-size",
        str(plan["train_batch"]),
        "--lora-rank",
        str(plan["lora_rank"]),
        "--lora-layers",
        str(plan["lora_layers"]),
        "--fresh",
    ]
    extra = {} if blas else {"FAST_BLAS": "0"}
    wall = run_logged(cmd, sub_env(tmp, **extra), Path(tmp) / f"{name}.log")
    metrics = Path(tmp) / "logs" / name / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    windows = report.train_windows_ours(records)
    return {
        "tokens_per_s": report.window_rate(windows),
        "windows": windows,
        "wall_s": wall,
        "command": ("FAST_BLAS=0 " if not blas else "") + shlex.join(cmd),
    }


def train_lora(plan, tmp, folded, rep, iters):
    name = f"lora-{rep}"
    cfg = Path(tmp) / f"{name}.yaml"
    cfg.write_text(LORA_YAML.format(rank=plan["lora_rank"], report=plan["train_report"]))
    metrics = Path(tmp) / f"{name}.metrics.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "bench.anchors",
        "lora",
        "--model",
        str(plan["train_model"]),
        "--train",
        "--data",
        str(folded),
        "--iters",
        str(iters),
        "--batch-size",
        str(plan["train_batch"]),
        "--num-layers",
        str(plan["lora_layers"]),
        "--adapter-path",
        str(Path(tmp) / name),
        "-c",
        str(cfg),
    ]
    wall = run_logged(
        cmd, sub_env(tmp, BENCH_LORA_METRICS=metrics, NO_COLOR=1, COLUMNS=120), Path(tmp) / f"{name}.log"
    )
    reports = [
        json.loads(line)
        for line in metrics.read_text().splitlines()
        if line.strip() and json.loads(line).get("kind") == "train"
    ]
    windows = report.train_windows_lora(reports)
    return {
        "tokens_per_s": report.window_rate(windows),
        "windows": windows,
        "wall_s": wall,
        "command": shlex.join(cmd),
    }


def section_training(plan, tmp, res):
    data, folded, prep_cmd = prepare_data(tmp)
    out = {
        "model": rel(plan["train_model"]),
        "batch_size": plan["train_batch"],
        "lora_rank": plan["lora_rank"],
        "lora_layers": plan["lora_layers"],
        "iters": plan["train_iters"],
        "steps_per_report": plan["train_report"],
        "data_command": shlex.join(prep_cmd),
        "ours": [],
        "mlx_lm_lora": [],
        "ours_noblas": [],
    }
    res["training"] = out
    for rep in range(plan["train_reps"]):
        first, second = ("ours", "lora") if rep % 2 == 0 else ("lora", "ours")
        for which in (first, second):
            if which == "ours":
                r = train_ours(plan, tmp, data, rep, plan["train_iters"])
                out["ours"].append(r)
            else:
                r = train_lora(plan, tmp, folded, rep, plan["train_iters"])
                out["mlx_lm_lora"].append(r)
            log(
                f"training rep {rep + 1}/{plan['train_reps']}: {which} {report.fmt(r['tokens_per_s'])} tokens/s "
                f"({r['wall_s']:.0f}s)"
            )
        if rep < plan["train_noblas_reps"]:
            r = train_ours(plan, tmp, data, rep, plan["train_noblas_iters"], blas=False)
            out["ours_noblas"].append(r)
            log(
                f"training rep {rep + 1}: ours FAST_BLAS=0 {report.fmt(r['tokens_per_s'])} tokens/s ({r['wall_s']:.0f}s)"
            )
    for key in ("ours", "mlx_lm_lora", "ours_noblas"):
        out[key + "_summary"] = report.summarize([r["tokens_per_s"] for r in out[key]])


# =========================================================================== decode


def decode_worker_once(w, max_tokens):
    r = w.generate({"messages": DECODE_MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    return {
        "tokens_per_s": r.client_tokens_per_s(),
        "own_tokens_per_s": r.done["timing"]["tokens_per_s"],
        "completion_tokens": r.completion_tokens,
        "prompt_tokens": r.done["usage"]["prompt_tokens"],
        "token_messages": r.n_token_messages,
        "client_ttft_s": r.client_ttft_s(),
        "timing": r.done["timing"],
        "finish_reason": r.done["finish_reason"],
    }


def section_decode(plan, tmp, res, workers):
    from mlx_lm import load

    from core.prompt import encode_prompt

    model_dir = plan["decode_model"]
    n = plan["decode_max_tokens"]
    log(f"decode: loading {rel(model_dir)} in-process for mlx_lm.stream_generate")
    model, tokenizer = load(str(model_dir))
    ids = encode_prompt(tokenizer, DECODE_MESSAGES)
    w = workers.get("main") or workers.start("main", model_dir)
    wn = (
        workers.start("noblas", model_dir, env_extra={"FAST_BLAS": "0"})
        if plan["decode_noblas_reps"]
        else None
    )
    out = {
        "model": rel(model_dir),
        "max_tokens": n,
        "prompt_tokens": len(ids),
        "worker_command": shlex.join(w.command),
        "anchor": "mlx_lm.stream_generate (in-process, greedy)",
        "worker": [],
        "stream_generate": [],
        "worker_noblas": [],
        "limit_tokens_per_s": [],
        "load": [],
        "worker_noblas_command": ("FAST_BLAS=0 " + shlex.join(wn.command)) if wn else None,
    }
    res["decode"] = out
    # warm-up, unmeasured
    decode_worker_once(w, 4)
    stream_generate_once(model, tokenizer, ids, 4)
    if wn:
        decode_worker_once(wn, 2)
    wb = weights_bytes(model_dir)
    for rep in range(plan["decode_reps"]):
        # the machine's read bandwidth right before this rep: the limit it is paired with
        bw = max(machine.memory_read_bandwidth(gib=0.25, repeats=3, samples=True))
        out["limit_tokens_per_s"].append(bw / wb)
        order = ("worker", "anchor") if rep % 2 == 0 else ("anchor", "worker")
        for which in order:
            if which == "worker":
                r = decode_worker_once(w, n)
                out["worker"].append(r)
            else:
                r = stream_generate_once(model, tokenizer, ids, n)
                out["stream_generate"].append(r)
        out["load"].append(os.getloadavg()[0])
        log(
            f"decode rep {rep + 1}/{plan['decode_reps']}: worker {report.fmt(out['worker'][-1]['tokens_per_s'])} "
            f"(own {report.fmt(out['worker'][-1]['own_tokens_per_s'])}), stream_generate "
            f"{report.fmt(out['stream_generate'][-1]['tokens_per_s'])} tokens/s; limit {bw / wb:.1f} tokens/s "
            f"({bw / 1e9:.1f} GB/s); load {out['load'][-1]:.2f}"
        )
        if wn and rep < plan["decode_noblas_reps"]:
            r = decode_worker_once(wn, n)
            out["worker_noblas"].append(r)
            log(f"decode rep {rep + 1}: worker FAST_BLAS=0 {report.fmt(r['tokens_per_s'])} tokens/s")
    if out["worker"] and out["worker"][0]["prompt_tokens"] != len(ids):
        log(
            f"warning: the worker's prompt has {out['worker'][0]['prompt_tokens']} tokens, the anchor's {len(ids)}"
        )
    out["worker_summary"] = report.summarize([r["tokens_per_s"] for r in out["worker"]])
    out["worker_own_summary"] = report.summarize([r["own_tokens_per_s"] for r in out["worker"]])
    out["stream_generate_summary"] = report.summarize([r["tokens_per_s"] for r in out["stream_generate"]])
    out["stream_generate_own_summary"] = report.summarize(
        [r["own_generation_tps"] for r in out["stream_generate"]]
    )
    out["worker_noblas_summary"] = report.summarize([r["tokens_per_s"] for r in out["worker_noblas"]])
    if wn:
        workers.stop("noblas")
    del model
    import mlx.core as mx

    mx.clear_cache()
    return tokenizer


# =========================================================================== concurrency


def conc_messages(tag, i):
    return [{"role": "user", "content": f"Pergunta {tag}-{i}: o que sabes sobre a história do Farense?"}]


def conc_worker(w, n, max_tokens, tag):
    reqs = [{"messages": conc_messages(tag, i), "max_tokens": max_tokens, "temperature": 0} for i in range(n)]
    results = w.generate_many(reqs)
    t0 = results[0].t_sent
    wall = max(r.t_done for r in results) - t0
    toks = sum(r.completion_tokens for r in results)
    return {
        "n": n,
        "aggregate_tokens_per_s": toks / wall,
        "wall_s": wall,
        "completion_tokens": toks,
        "per_request_tokens": [r.completion_tokens for r in results],
    }


def conc_server(s, n, max_tokens, tag):
    out = [None] * n
    barrier = threading.Barrier(n + 1)

    retries = [0] * n

    def one(i):
        barrier.wait()
        for attempt in range(SERVER_ATTEMPTS):
            try:
                usage, _ = s.chat(conc_messages(tag, i), max_tokens)
                out[i] = (usage.get("completion_tokens", 0), time.perf_counter(), None)
                return
            except (ConnectionError, http.client.RemoteDisconnected, urllib.error.URLError) as e:
                # http.server's listen backlog is 5: a burst of connections can be reset.
                # Retry as a client would; the time lost counts against the server.
                out[i] = (0, time.perf_counter(), f"{type(e).__name__}: {e}")
                retries[i] += 1
                time.sleep(0.05 * (attempt + 1))
            except Exception as e:
                out[i] = (0, time.perf_counter(), f"{type(e).__name__}: {e}")
                return

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    errors = [o[2] for o in out if o[2]]
    if errors:
        raise RuntimeError(f"mlx_lm server errors: {errors[:3]}")
    wall = max(o[1] for o in out) - t0
    toks = sum(o[0] for o in out)
    return {
        "n": n,
        "aggregate_tokens_per_s": toks / wall,
        "wall_s": wall,
        "completion_tokens": toks,
        "per_request_tokens": [o[0] for o in out],
        "connection_retries": sum(retries),
    }


def section_concurrency(plan, tmp, res, workers):
    model_dir = plan["conc_model"]
    m = plan["conc_max_tokens"]
    w = workers.get("main") if workers.model("main") == model_dir else None
    if w is None:
        workers.stop("main")
        w = workers.start("main", model_dir)
    log(f"concurrency: starting mlx_lm server on {rel(model_dir)}")
    server = ServerProcess(model_dir, env=sub_env(), stderr_path=Path(tmp) / "server.log")
    server.start()
    try:
        out = {
            "model": rel(model_dir),
            "max_tokens": m,
            "levels": plan["conc_levels"],
            "worker_command": shlex.join(w.command),
            "server_command": shlex.join(server.command),
            "client": "worker: all requests in one stdin write; server: one thread + urllib per request",
            "worker": {str(n): [] for n in plan["conc_levels"]},
            "server": {str(n): [] for n in plan["conc_levels"]},
        }
        res["concurrency"] = out
        conc_worker(w, 2, 4, "warm")  # warm-up, unmeasured
        conc_server(server, 2, 4, "warm")
        for rep in range(plan["conc_reps"]):
            for n in plan["conc_levels"]:
                order = ("worker", "server") if (rep + n) % 2 == 0 else ("server", "worker")
                for which in order:
                    tag = f"{rep}{which[0]}{n}"
                    try:
                        r = conc_worker(w, n, m, tag) if which == "worker" else conc_server(server, n, m, tag)
                    except Exception as e:  # one failed level must not lose the others
                        r = {"n": n, "aggregate_tokens_per_s": None, "error": f"{type(e).__name__}: {e}"}
                        log(f"concurrency {n} {which} failed: {r['error']}")
                    out[which][str(n)].append(r)
                retried = out["server"][str(n)][-1].get("connection_retries")
                log(
                    f"concurrency {n:>2} rep {rep + 1}/{plan['conc_reps']}: worker "
                    f"{report.fmt(out['worker'][str(n)][-1]['aggregate_tokens_per_s'])}, server "
                    f"{report.fmt(out['server'][str(n)][-1]['aggregate_tokens_per_s'])} tokens/s"
                    + (f" (server: {retried} connection(s) reset and retried)" if retried else "")
                )
        for which in ("worker", "server"):
            out[which + "_summary"] = {
                k: report.summarize([r["aggregate_tokens_per_s"] for r in v]) for k, v in out[which].items()
            }
        for which in ("worker", "server"):
            for k, v in out[which].items():
                failed = [r["error"] for r in v if r.get("error")]
                if failed:
                    res.setdefault("warnings", []).append(
                        f"concurrency {k}, {which}: {len(failed)} of {len(v)} samples failed ({failed[0][:200]})"
                    )
        retried = {k: sum(r.get("connection_retries") or 0 for r in v) for k, v in out["server"].items()}
        if any(retried.values()):
            res.setdefault("warnings", []).append(
                "mlx_lm server reset connections under a burst (http.server's listen backlog is 5); the client "
                "retried and the time counts against the server: "
                + ", ".join(f"{c} at {k} concurrent" for k, c in retried.items() if c)
            )
    finally:
        server.close()


# =========================================================================== time to first token


def long_system_prompt(tokenizer, min_tokens):
    text, k = "", 0
    while len(tokenizer.encode(text, add_special_tokens=False)) < min_tokens:
        text += f"Facto {k + 1}: {FACTS[k % len(FACTS)]} "
        k += 1
    return text.strip()


def ttft_once(w, system, question):
    r = w.generate(
        {
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 1,
            "temperature": 0,
            "stream": True,
        }
    )
    return {
        "client_ttft_ms": r.client_ttft_s() * 1000.0,
        "worker_ttft_ms": r.done["timing"]["ttft_ms"],
        "prompt_tokens": r.done["usage"]["prompt_tokens"],
        "cached_tokens": r.done["usage"]["cached_tokens"],
    }


def section_ttft(plan, tmp, res, workers, tokenizer=None):
    model_dir = plan["ttft_model"]
    w = workers.get("main") if workers.model("main") == model_dir else None
    if w is None:
        workers.stop("main")
        w = workers.start("main", model_dir)
    if tokenizer is None:
        from mlx_lm.utils import load_tokenizer

        tokenizer = load_tokenizer(Path(model_dir))
    system = long_system_prompt(tokenizer, plan["ttft_system_tokens"])
    n_sys = len(tokenizer.encode(system, add_special_tokens=False))
    out = {
        "model": rel(model_dir),
        "system_prompt_tokens": n_sys,
        "max_tokens": 1,
        "worker_command": shlex.join(w.command),
        "uncached": [],
        "cached": [],
    }
    res["ttft"] = out
    ttft_once(w, system, "Olá! Quem és tu?")  # fills the prefix cache (unmeasured)
    for rep in range(plan["ttft_reps"]):
        nonce = uuid.uuid4().hex[:12]
        order = ("uncached", "cached") if rep % 2 == 0 else ("cached", "uncached")
        for which in order:
            q = f"Pergunta {rep + 1} ({which}): em que ano foi fundado o clube?"
            sp = f"Sessão {nonce}. {system}" if which == "uncached" else system
            out[which].append(ttft_once(w, sp, q))
        log(
            f"ttft rep {rep + 1}/{plan['ttft_reps']}: uncached {out['uncached'][-1]['client_ttft_ms']:.0f} ms "
            f"(cached_tokens {out['uncached'][-1]['cached_tokens']}), cached {out['cached'][-1]['client_ttft_ms']:.0f} ms "
            f"(cached_tokens {out['cached'][-1]['cached_tokens']} of {out['cached'][-1]['prompt_tokens']})"
        )
    for which in ("uncached", "cached"):
        out[which + "_summary"] = report.summarize([r["client_ttft_ms"] for r in out[which]])
        out[which + "_worker_summary"] = report.summarize([r["worker_ttft_ms"] for r in out[which]])


# =========================================================================== prefill


def main_worker(workers, model_dir):
    w = workers.get("main") if workers.model("main") == model_dir else None
    if w is None:
        workers.stop("main")
        w = workers.start("main", model_dir)
    return w


def section_prefill(plan, tmp, res, workers, tokenizer=None):
    """The compute roofline (measured sgemm FLOP/s / the model's prefill FLOPs per token) and
    uncached ~1,000-token prompts through the worker, each rep paired with a roofline pass."""
    from mlx_lm.utils import load_tokenizer

    from bench import prefill

    model_dir = plan["prefill_model"]
    w = main_worker(workers, model_dir)
    tokenizer = tokenizer or load_tokenizer(Path(model_dir))
    out = {
        "model": rel(model_dir),
        "prompt_tokens": plan["prefill_tokens"],
        "worker_command": shlex.join(w.command),
        "prefill_step_size": (w.ready.get("limits") or {}).get("prefill_step_size"),
        "reps": [],
        "rooflines": [],
    }
    res["prefill"] = out
    for rep in range(plan["prefill_reps"]):
        roof = prefill.roofline(model_dir, plan["prefill_tokens"], passes=3)
        r = prefill.uncached_prefill(w, tokenizer, plan["prefill_tokens"])
        out["rooflines"].append(roof)
        out["reps"].append(r)
        log(
            f"prefill rep {rep + 1}/{plan['prefill_reps']}: {r['prompt_tokens'] - r['cached_tokens']} uncached tokens "
            f"in {r['client_ttft_ms']:.0f} ms = {r['tokens_per_s']:.0f} tok/s; roofline {roof['limit_tokens_per_s']:.0f} "
            f"tok/s ({roof['sgemm_flops_per_s'] / 1e9:.0f} GFLOP/s sgemm / {roof['flops_per_token'] / 1e6:.0f} "
            f"MFLOP per token); load {r['load']:.2f}"
        )
    out["tokens_per_s_summary"] = report.summarize([r["tokens_per_s"] for r in out["reps"]])
    out["limit_summary"] = report.summarize([r["limit_tokens_per_s"] for r in out["rooflines"]])
    out["sgemm_summary"] = report.summarize([r["sgemm_flops_per_s"] for r in out["rooflines"]])
    out["flops_per_token"] = out["rooflines"][0]["flops_per_token"] if out["rooflines"] else None
    return tokenizer


# =========================================================================== workload


def section_workload(plan, tmp, res, workers, tokenizer=None):
    """bench/workload.jsonl replayed by 1-16 simulated users: the worker vs mlx_lm server."""
    from mlx_lm.utils import load_tokenizer

    from bench import workload
    from core.prompt import accepts_system_role

    model_dir = plan["workload_model"]
    w = main_worker(workers, model_dir)
    tokenizer = tokenizer or load_tokenizer(Path(model_dir))
    fold = not accepts_system_role(tokenizer)
    system, convs = workload.load()
    log(f"workload: starting mlx_lm server on {rel(model_dir)}")
    server = ServerProcess(model_dir, env=sub_env(), stderr_path=Path(tmp) / "server-workload.log")
    server.start()
    try:
        senders = {"worker": workload.worker_sender(w), "server": workload.server_sender(server.port, fold)}
        for send in senders.values():  # the system prompt once (unmeasured): a running chatbot has it
            send([{"role": "system", "content": system}, {"role": "user", "content": "Olá"}], 2)
        out = {
            "model": rel(model_dir),
            "levels": plan["workload_levels"],
            "reps": plan["workload_reps"],
            "max_tokens": plan["workload_max_tokens"],
            "conversations_at_least": plan["workload_conversations"],
            "workload": rel(workload.WORKLOAD),
            "system_prompt_tokens": len(tokenizer.encode(system)),
            "worker_command": shlex.join(w.command),
            "server_command": shlex.join(server.command),
            "system_folded_for_server": fold,
        }
        res["workload"] = out
        runs = workload.run_levels(
            senders,
            system,
            convs,
            plan["workload_levels"],
            plan["workload_reps"],
            plan["workload_max_tokens"],
            log=log,
            at_least=plan["workload_conversations"],
        )
        out["worker"], out["server"] = runs["worker"], runs["server"]
        out["worker_medians"], out["server_medians"] = (
            workload.medians(runs["worker"]),
            workload.medians(runs["server"]),
        )
        for side in ("worker", "server"):
            for k, rs in runs[side].items():
                failed = [r["error"] for r in rs if r.get("error")]
                if failed:
                    res.setdefault("warnings", []).append(f"workload {k} users, {side}: {failed[0][:200]}")
    finally:
        server.close()


# =========================================================================== bandwidth


def section_bandwidth(plan, tmp, res):
    # The limit is what the memory can do: the fastest pass (other processes on a shared
    # machine only slow passes down); the median is recorded too.
    passes = machine.memory_read_bandwidth(
        gib=plan["bandwidth_gib"], repeats=plan["bandwidth_repeats"], samples=True
    )
    bw = max(passes)
    wb = weights_bytes(plan["decode_model"])
    res["bandwidth"] = {
        "bytes_per_s": bw,
        "statistic": "max of passes",
        "median_bytes_per_s": report.median(passes),
        "samples": passes,
        "gib": plan["bandwidth_gib"],
        "repeats": plan["bandwidth_repeats"],
        "weights_model": rel(plan["decode_model"]),
        "weights_bytes": wb,
        "limit_tokens_per_s": bw / wb if wb else None,
    }
    log(
        f"memory read bandwidth {bw / 1e9:.1f} GB/s (fastest of {len(passes)} passes, median "
        f"{report.median(passes) / 1e9:.1f}); {rel(plan['decode_model'])} weights {wb / 1e6:.0f} MB "
        f"-> decode limit {bw / wb:.1f} tokens/s"
    )


# =========================================================================== small_gemm


def section_small_gemm(plan, res):
    """Decoding's products over the decode model's weights: core/native/small_gemm.c vs the BLAS."""
    from bench import small_gemm

    out = small_gemm.measure(plan["decode_model"], plan["small_gemm_m"], plan["small_gemm_reps"])
    res["small_gemm"] = out
    if "skipped" in out:
        log(f"small_gemm: {out['skipped']}")
    for m, r in out.get("m", {}).items():
        log(
            f"small_gemm M={m}: {r['small_s'] * 1e3:.1f} ms vs BLAS {r['blas_s'] * 1e3:.1f} ms ({r['paired']:.2f}x)"
        )


def small_gemm_rows(sg):
    """Read rates (weight bytes / time) of decoding's products at each M, ours vs the BLAS."""
    if not sg or "m" not in sg:
        return []
    gb = sg["weights_bytes"] / 1e9
    return [
        report.row(
            f"decode products x @ W^T, M={m} (read rate)",
            gb / r["small_s"],
            gb / r["blas_s"],
            "GB/s",
            ours_label="small_gemm",
            anchor_label=Path(sg["blas"]).name,
            paired=r["paired"],
        )
        for m, r in sg["m"].items()
    ]


# =========================================================================== distributed


def section_distributed(plan, tmp, res):
    """Training tokens/s with NPROC=1 and NPROC=2 (mlx.launch) at the same global batch."""
    if not plan["dist_repeats"]:
        log("distributed: skipped in the quick run")
        return
    from bench import distributed

    res["distributed"] = distributed.measure(
        nprocs=(1, 2), iters=plan["dist_iters"], repeats=plan["dist_repeats"], log=log
    )


# =========================================================================== workers


class Workers:
    """The long-lived worker children of this run, by role."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = {}
        self.models = {}

    def start(self, role, model_dir, env_extra=None):
        self.stop(role)
        env = sub_env(**(env_extra or {}))
        log(f"starting worker '{role}' on {rel(model_dir)}" + (f" with {env_extra}" if env_extra else ""))
        w = WorkerProcess(
            ["--model", str(model_dir)], env=env, stderr_path=Path(self.tmp) / f"worker-{role}.log"
        )
        tic = time.perf_counter()
        w.start()
        log(f"worker '{role}' ready in {time.perf_counter() - tic:.1f}s (blas {w.ready.get('blas')})")
        self.procs[role], self.models[role] = w, model_dir
        return w

    def get(self, role):
        return self.procs.get(role)

    def model(self, role):
        return self.models.get(role)

    def stop(self, role):
        w = self.procs.pop(role, None)
        self.models.pop(role, None)
        if w is not None:
            w.close()

    def stop_all(self):
        for role in list(self.procs):
            self.stop(role)


# =========================================================================== rows and output


def build_rows(res):
    rows = []
    med = lambda d, k: (d.get(k) or {}).get("median")
    samples = lambda d, k, field="tokens_per_s": [r.get(field) for r in (d.get(k) or [])]
    tr = res.get("training")
    if tr:
        rows.append(
            report.row(
                "training tokens/s (LoRA)",
                med(tr, "ours_summary"),
                med(tr, "mlx_lm_lora_summary"),
                "tok/s",
                ours_label="train.train",
                anchor_label="mlx_lm lora",
                target_key="training",
                paired=report.paired_ratio(samples(tr, "ours"), samples(tr, "mlx_lm_lora")),
                note=f"{tr['model']}, batch {tr['batch_size']}, rank {tr['lora_rank']}, "
                f"{tr['lora_layers']} layers, {tr['iters']} iters",
            )
        )
    dist = res.get("distributed")
    if dist and len(dist.get("rows", [])) == 2:
        one, two = dist["rows"]
        rows.append(
            report.row(
                "training tokens/s, NPROC=2 vs 1",
                two["median_tokens_per_s"],
                one["median_tokens_per_s"],
                "tok/s",
                ours_label="NPROC=2 (mlx.launch)",
                anchor_label="NPROC=1",
                note=f"global batch {dist['global_batch']}, "
                f"{dist['iters']} iters, {dist['model']}; one machine: no speed-up expected",
            )
        )
    dec = res.get("decode")
    if dec:
        rows.append(
            report.row(
                "decode tokens/s, 1 stream",
                med(dec, "worker_summary"),
                med(dec, "stream_generate_summary"),
                "tok/s",
                ours_label="worker, client",
                anchor_label="stream_generate",
                target_key="decode",
                paired=report.paired_ratio(samples(dec, "worker"), samples(dec, "stream_generate")),
                note=f"{dec['model']}, {dec['max_tokens']} tokens",
            )
        )
        rows.append(
            report.row(
                "decode tokens/s, own timing",
                med(dec, "worker_own_summary"),
                med(dec, "stream_generate_own_summary"),
                "tok/s",
                ours_label="done.timing",
                anchor_label="generation_tps",
            )
        )
    if tr and tr.get("ours_noblas"):
        rows.append(
            report.row(
                "optimised BLAS, training",
                med(tr, "ours_summary"),
                med(tr, "ours_noblas_summary"),
                "tok/s",
                ours_label="BLAS on",
                anchor_label="FAST_BLAS=0",
            )
        )
    if dec and dec.get("worker_noblas"):
        rows.append(
            report.row(
                "optimised BLAS, decode",
                med(dec, "worker_summary"),
                med(dec, "worker_noblas_summary"),
                "tok/s",
                ours_label="BLAS on",
                anchor_label="FAST_BLAS=0",
            )
        )
    cc = res.get("concurrency")
    if cc and cc.get("worker_summary"):
        ws, ss = cc["worker_summary"], cc.get("server_summary", {})
        for n in cc["levels"]:
            rows.append(
                report.row(
                    f"aggregate tokens/s, {n} concurrent",
                    (ws.get(str(n)) or {}).get("median"),
                    (ss.get(str(n)) or {}).get("median"),
                    "tok/s",
                    ours_label="worker",
                    anchor_label="mlx_lm server",
                    target_key="concurrency_vs_server" if n == 8 else None,
                    paired=report.paired_ratio(
                        samples(cc.get("worker", {}), str(n), "aggregate_tokens_per_s"),
                        samples(cc.get("server", {}), str(n), "aggregate_tokens_per_s"),
                    ),
                )
            )
        if "1" in ws and "8" in ws:
            rows.append(
                report.row(
                    "8 concurrent vs 1 stream (worker)",
                    ws["8"]["median"],
                    ws["1"]["median"],
                    "tok/s",
                    ours_label="8",
                    anchor_label="1",
                    target_key="concurrency_scaling",
                )
            )
    tt = res.get("ttft")
    if tt:
        rows.append(
            report.row(
                f"first token, {tt['system_prompt_tokens']}-token system prompt",
                med(tt, "cached_summary"),
                med(tt, "uncached_summary"),
                "ms",
                ours_label="cached",
                anchor_label="uncached",
                target_key="ttft_cached",
                paired=report.paired_ratio(
                    samples(tt, "cached", "client_ttft_ms"), samples(tt, "uncached", "client_ttft_ms")
                ),
            )
        )
        rows.append(
            report.row(
                "first token, worker's own ttft_ms",
                med(tt, "cached_worker_summary"),
                med(tt, "uncached_worker_summary"),
                "ms",
                ours_label="cached",
                anchor_label="uncached",
            )
        )
    rows += prefill_rows(res.get("prefill"))
    rows += small_gemm_rows(res.get("small_gemm"))
    rows += workload_rows(res.get("workload"))
    bw = res.get("bandwidth")
    if bw and dec:
        lim = bw["limit_tokens_per_s"]
        # judged: the median decode over the run's best bandwidth pass (what the memory can do).
        # paired (shown only): each rep over a bandwidth probe taken right before it; under load
        # the 2-thread probe suffers more than the 1-thread decode, so it flatters the ratio.
        paired = report.paired_ratio(samples(dec, "worker"), dec.get("limit_tokens_per_s") or [])
        rows.append(
            report.row(
                "decode vs bandwidth limit",
                med(dec, "worker_summary"),
                lim,
                "tok/s",
                ours_label="worker",
                anchor_label=f"{bw['bytes_per_s'] / 1e9:.1f} GB/s / {bw['weights_bytes'] / 1e6:.0f} MB",
                target_key="bandwidth_fraction",
                paired=paired,
            )
        )
        rows.append(
            report.row(
                "stream_generate vs bandwidth limit",
                med(dec, "stream_generate_summary"),
                lim,
                "tok/s",
                ours_label="stream_generate",
                anchor_label="limit",
            )
        )
    return rows


def prefill_rows(pf):
    if not pf or not pf.get("reps"):
        return []
    med = lambda k: (pf.get(k) or {}).get("median")
    paired = report.median(
        [r["tokens_per_s"] / f["limit_tokens_per_s"] for r, f in zip(pf["reps"], pf["rooflines"])]
    )
    return [
        report.row(
            f"prefill vs compute roofline, uncached {pf['prompt_tokens']}-token prompt",
            med("tokens_per_s_summary"),
            med("limit_summary"),
            "tok/s",
            ours_label=f"worker, chunk {pf.get('prefill_step_size')}",
            anchor_label=f"{report.fmt(med('sgemm_summary') / 1e9)} GFLOP/s / "
            f"{report.fmt(pf['flops_per_token'] / 1e6)} MFLOP",
            target_key="prefill_roofline",
            paired=paired,
            value=paired,
        ),
    ]


def workload_rows(wl):
    """Per level: tokens/s, first-token p50/p99, end-to-end p99, follow-up first token."""
    if not wl or not wl.get("worker_medians"):
        return []
    rows = []
    ours, theirs = wl["worker_medians"], wl.get("server_medians", {})
    samples = lambda side, k, m: [r.get(m) for r in wl[side].get(k, [])]
    for n in wl["levels"]:
        k = str(n)
        o, t = ours.get(k, {}), theirs.get(k, {})
        pair = lambda m, k=k: report.paired_ratio(samples("worker", k, m), samples("server", k, m))
        rows.append(
            report.row(
                f"chatbot tokens/s, {n} users",
                o.get("tokens_per_s"),
                t.get("tokens_per_s"),
                "tok/s",
                ours_label="worker",
                anchor_label="mlx_lm server",
                target_key="workload_tokens_8" if n == 8 else None,
                paired=pair("tokens_per_s"),
            )
        )
        rows.append(
            report.row(
                f"chatbot first token p99, {n} users",
                o.get("ttft_p99_ms"),
                t.get("ttft_p99_ms"),
                "ms",
                ours_label="worker",
                anchor_label="mlx_lm server",
                target_key="workload_ttft_p99",
                paired=pair("ttft_p99_ms"),
            )
        )
        rows.append(
            report.row(
                f"chatbot first token p50, {n} users",
                o.get("ttft_p50_ms"),
                t.get("ttft_p50_ms"),
                "ms",
                ours_label="worker",
                anchor_label="mlx_lm server",
                paired=pair("ttft_p50_ms"),
            )
        )
        rows.append(
            report.row(
                f"chatbot follow-up turn first token p50 (cached history), {n} users",
                o.get("follow_up_ttft_p50_ms"),
                t.get("follow_up_ttft_p50_ms"),
                "ms",
                ours_label="worker",
                anchor_label="mlx_lm server",
                paired=pair("follow_up_ttft_p50_ms"),
            )
        )
        rows.append(
            report.row(
                f"chatbot end-to-end p99, {n} users",
                o.get("e2e_p99_ms"),
                t.get("e2e_p99_ms"),
                "ms",
                ours_label="worker",
                anchor_label="mlx_lm server",
                paired=pair("e2e_p99_ms"),
            )
        )
    return rows


def markdown_section(res, rows, png_rel):
    m = res["machine"]
    lines = [
        f"## {res['started']} — {res['mode']} — {m['host']}",
        "",
        f"- machine: {m['cpu']}"
        + (f" (family {m['cpu_family']} model {m['cpu_model_number']})" if m.get("cpu_family") else "")
        + f", {m['cores']} cores, backend {m['backend']}, BLAS `{m['blas']}`"
        + (f" (OpenBLAS core: {m['blas_core']})" if m.get("blas_core") else "")
        + f", mlx {m.get('mlx')}, mlx-lm {m.get('mlx_lm')}",
        f"- command: `{res['command']}` (`{res['make_command']}`), {res['elapsed_s']:.0f} s",
        f"- load average (1 min) at start {res['load_start'][0]:.2f}, at end {res['load_end'][0]:.2f} "
        f"on {m['cores']} cores"
        + (
            " — **shared machine, numbers are noisy; medians quoted**"
            if max(res["load_start"][0], res["load_end"][0]) > 1.0
            else ""
        ),
        f"- models: {res['models_note']}",
        f"- raw samples: `{res['results_file']}`",
        "",
    ]
    lines.append(report.markdown_table(rows))
    if png_rel:
        lines.append(f"![aggregate tokens/s against concurrency]({png_rel})\n")
    if res.get("workload_png_rel"):
        lines.append(
            f"![chatbot workload: tokens/s and first-token time against users, worker vs mlx_lm server]"
            f"({res['workload_png_rel']})\n"
        )
    for warning in res.get("warnings", []):
        lines.append(f"Note: {warning}\n")
    if res.get("errors"):
        lines.append(
            "Errors: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in res["errors"].items()) + "\n"
        )
    missed = [r["name"] for r in rows if r["met"] is False]
    if missed:
        lines.append("Missed targets: " + ", ".join(missed) + " (see *Where the time goes*).\n")
    return "\n".join(lines)


def targets_met(rows):
    """{target key: met by every row judged against it} (None where no row had a value)."""
    out = {}
    for r in rows:
        if r["target_key"] and r["met"] is not None:
            out[r["target_key"]] = out.get(r["target_key"], True) and r["met"]
        elif r["target_key"]:
            out.setdefault(r["target_key"], None)
    return out


def plot_workload(res, png_path, doc):
    wl = res.get("workload")
    if not wl or not wl.get("worker_medians"):
        return None
    levels = wl["levels"]
    get = lambda side, m: [(wl.get(side + "_medians", {}).get(str(n)) or {}).get(m) for n in levels]
    report.plot_workload(
        png_path,
        levels,
        {m: get("worker", m) for m in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")},
        {m: get("server", m) for m in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")},
        f"{wl['model']}, {wl['max_tokens']} tokens/answer, {res['machine']['cpu']}, "
        f"load {res['load_start'][0]:.1f}",
    )
    res["workload_plot"] = rel(png_path)
    return os.path.relpath(png_path, Path(doc).parent)


def models_note(plan, sections):
    parts = []
    if "training" in sections:
        parts.append(
            f"training on {rel(plan['train_model'])} ({plan['train_reps']} reps x {plan['train_iters']} iters, "
            f"first {plan['train_report']}-step window left out)"
        )
    if "decode" in sections:
        parts.append(
            f"decode on {rel(plan['decode_model'])} ({plan['decode_reps']} reps x {plan['decode_max_tokens']} tokens)"
        )
    if "concurrency" in sections:
        parts.append(
            f"concurrency on {rel(plan['conc_model'])} (levels {plan['conc_levels']}, {plan['conc_reps']} reps, "
            f"{plan['conc_max_tokens']} tokens each)"
        )
    if "ttft" in sections:
        parts.append(f"first token on {rel(plan['ttft_model'])} ({plan['ttft_reps']} reps each)")
    if "prefill" in sections:
        parts.append(
            f"prefill on {rel(plan['prefill_model'])} ({plan['prefill_reps']} reps x {plan['prefill_tokens']} "
            "uncached tokens)"
        )
    if "workload" in sections:
        parts.append(
            f"chatbot workload on {rel(plan['workload_model'])} (users {plan['workload_levels']}, "
            f"{plan['workload_reps']} reps, {plan['workload_max_tokens']} tokens/answer, "
            f"max(users, {plan['workload_conversations']}) conversations of bench/workload.jsonl)"
        )
    return "; ".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the short run (< 3 min)")
    p.add_argument(
        "--sections",
        default=None,
        help="comma-separated subset of "
        + ",".join(SECTIONS)
        + " (default: all; --quick leaves out concurrency, which the workload covers)",
    )
    p.add_argument("--no-doc", action="store_true", help="do not append to docs/PERFORMANCE.md")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--doc", default=str(DOC))
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (logs, runs)")
    args = p.parse_args(argv)
    if args.sections is None:
        skip = PLANS["quick" if args.quick else "full"]["skip_sections"]
        args.sections = ",".join(s for s in SECTIONS if s not in skip)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(args.sections) - set(SECTIONS)
    if bad:
        p.error(f"unknown sections: {', '.join(sorted(bad))}")
    return args


def results_stem(now, host, quick, sections):
    """<date>-<HHMM>-<host>[-quick], plus -<sections> when a run measures only some of its
    plan's sections: each run's raw samples and plots stay what its PERFORMANCE.md section
    names (a later run of the same day, or a partial rerun, used to overwrite them)."""
    stem = f"{now:%Y-%m-%d-%H%M}-{host}" + ("-quick" if quick else "")
    skip = PLANS["quick" if quick else "full"]["skip_sections"]
    if list(sections) != [s for s in SECTIONS if s not in skip]:
        stem += "-" + "-".join(sections)
    return stem


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    for m in {
        plan["train_model"],
        plan["decode_model"],
        plan["conc_model"],
        plan["ttft_model"],
        plan["prefill_model"],
        plan["workload_model"],
    }:
        if not (Path(m) / "config.json").exists():
            sys.exit(
                f"bench: {rel(m)} is missing; run `make tiny-model` / `make bench-model` (make bench does)"
            )
    now = datetime.datetime.now()
    host = socket.gethostname().split(".")[0]
    stem = results_stem(now, host, args.quick, args.sections)
    results_path = Path(args.results_dir) / f"{stem}.json"
    png_path = Path(args.results_dir) / f"{stem}-concurrency.png"
    tmp = tempfile.mkdtemp(prefix="bench-")
    log(f"{mode} run, sections {','.join(args.sections)}; temporary files in {tmp}")
    res = {
        "schema": 1,
        "mode": mode,
        "started": now.strftime("%Y-%m-%d %H:%M"),
        "command": shlex.join([rel(sys.executable), "-m", "bench.run", *argv]),
        "make_command": "make bench" + (" QUICK=1" if args.quick else ""),
        "machine": machine.describe(),
        "load_start": list(os.getloadavg()),
        "plan": {k: (rel(v) if isinstance(v, Path) else v) for k, v in plan.items()},
        "targets": {k: f"{op} {b:g}" for k, (op, b) in report.TARGETS.items()},
        "results_file": rel(results_path),
        "errors": {},
    }
    res["models_note"] = models_note(plan, args.sections)
    workers = Workers(tmp)
    tokenizer = None
    try:
        for name in SECTIONS:
            if name not in args.sections:
                continue
            log(f"--- {name}")
            try:
                if name == "bandwidth":
                    section_bandwidth(plan, tmp, res)
                elif name == "small_gemm":
                    section_small_gemm(plan, res)
                elif name == "training":
                    section_training(plan, tmp, res)
                elif name == "decode":
                    tokenizer = section_decode(plan, tmp, res, workers)
                elif name == "concurrency":
                    section_concurrency(plan, tmp, res, workers)
                elif name == "ttft":
                    section_ttft(plan, tmp, res, workers, tokenizer)
                elif name == "prefill":
                    tokenizer = section_prefill(plan, tmp, res, workers, tokenizer)
                elif name == "workload":
                    section_workload(plan, tmp, res, workers, tokenizer)
                elif name == "distributed":
                    section_distributed(plan, tmp, res)
            except Exception as e:  # one failed section must not lose the others
                import traceback

                res["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
                log(f"{name} FAILED: {type(e).__name__}: {e}")
    finally:
        workers.stop_all()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    res["load_end"] = list(os.getloadavg())
    res["elapsed_s"] = time.perf_counter() - _T0
    rows = build_rows(res)
    res["rows"] = rows
    res["targets_met"] = targets_met(rows)

    png_rel = None
    cc = res.get("concurrency")
    if cc and cc.get("worker_summary"):
        try:
            levels = cc["levels"]
            ours = [cc["worker_summary"][str(n)]["median"] for n in levels]
            anchor = [(cc.get("server_summary", {}).get(str(n)) or {}).get("median") for n in levels]
            report.plot_concurrency(
                png_path,
                levels,
                ours,
                anchor,
                f"{cc['model']}, {cc['max_tokens']} tokens/request, {res['machine']['cpu']}",
                single=ours[0] if levels[0] == 1 else None,
            )
            res["plot"] = rel(png_path)
            png_rel = os.path.relpath(png_path, Path(args.doc).parent)
        except Exception as e:
            res["errors"]["plot"] = f"{type(e).__name__}: {e}"
    try:
        res["workload_png_rel"] = plot_workload(
            res, Path(args.results_dir) / f"{stem}-workload.png", args.doc
        )
    except Exception as e:
        res["errors"]["workload plot"] = f"{type(e).__name__}: {e}"
    report.write_json(results_path, res)
    if not args.no_doc:
        report.append_markdown(args.doc, markdown_section(res, rows, png_rel))
    log(
        f"wrote {rel(results_path)}"
        + (f", {res.get('plot')}" if png_rel else "")
        + ("" if args.no_doc else f", appended to {rel(args.doc)}")
        + f" in {res['elapsed_s']:.0f}s"
    )
    sys.stdout.write(f"\n{res['make_command']} ({mode}: {res['models_note']})\n")
    sys.stdout.write(report.text_table(rows))
    missed = [r["name"] for r in rows if r["met"] is False]
    sys.stdout.write(
        f"\ntargets missed: {', '.join(missed) if missed else 'none'}; "
        f"{len(res['errors'])} section error(s); {res['elapsed_s']:.0f}s\n"
    )
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
