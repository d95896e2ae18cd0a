"""`make bench` section **llamacpp**: llama.cpp on the bench model exported to GGUF (make fuse's
exporter, then llama.cpp's quantizer: F32 and Q8_0; SmolLM2's Q4_1 and Q8_0 too where `make
base-model` has built it). One stream, greedy, through worker/llamacpp_seqs.py (the batched
low-level path the llama.cpp engine decodes with, driven from Python): decode tokens/s against
the memory-bandwidth limit (the GGUF's weights read once per token), with the time inside
llama_decode apart from Python's share of each step; prefill tokens/s against the compute
roofline (bench.prefill's). Paired, alternating, with llama.cpp's own `llama-server` (built by
`make llama-server` from the same source and flags) on the same file and threads: its own
timings of the same prompt ids (`/completion`, n_predict, no prompt cache). Skipped with a
warning where llama.cpp is not installed (make llamacpp); the server rows where it is not built.
"""

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from bench import machine, report
from bench.common import BENCH, ROOT, log, rel
from bench.prefill import roofline
from core import llamacpp

SECTION = "llamacpp"
SMOLLM2 = "models/smollm2-135m-instruct"  # make base-model; plan values are relative paths (JSON)
BENCH_REL = rel(BENCH)
PLAN = {
    "quick": dict(
        llamacpp_models=(BENCH_REL,), llamacpp_reps=2, llamacpp_max_tokens=24, llamacpp_prefill=256
    ),
    "full": dict(
        llamacpp_models=(BENCH_REL, SMOLLM2), llamacpp_reps=4, llamacpp_max_tokens=64, llamacpp_prefill=512
    ),
}
TYPES = {BENCH_REL: ("F32", "Q8_0"), SMOLLM2: ("Q4_1", "Q8_0")}
OMP_WAIT_POLICY = llamacpp.OMP_WAIT_POLICY  # llama-server's (see Server), as the engine's
PROMPT = [{"role": "user", "content": "Qual é o estádio do Farense e quando foi inaugurado?"}]


def gguf_files(model_dir, types):
    """model_dir exported once into models/<name>-gguf/ (F16), and each type quantized from it."""
    from train import fuse_gguf

    out = model_dir.parent / f"{model_dir.name}-gguf"
    f16 = out / fuse_gguf.GGUF_NAME
    stamp = out / "source.json"
    source = {
        "config": (model_dir / "config.json").read_text(),
        "weights": _weights_stamp(model_dir),
        "recipe": 2,
    }
    source = json.loads(json.dumps(source))  # as the stamp reads back (tuples become lists)
    if not f16.is_file() or not stamp.is_file() or json.loads(stamp.read_text()) != source:
        from mlx_lm import load

        log(f"llamacpp: exporting {rel(model_dir)} to GGUF")
        model, tokenizer, config = load(str(model_dir), return_config=True)
        out.mkdir(parents=True, exist_ok=True)
        template = getattr(tokenizer, "_tokenizer", tokenizer).chat_template  # llama-server's chat endpoint
        result = fuse_gguf.export(out, model_dir, model, config, tokenizer, template)
        if not result["file"]:
            raise RuntimeError(f"{rel(model_dir)}: {result['note']}")
        for old in out.glob("ggml-model-*.gguf"):
            if old != f16:
                old.unlink()
        stamp.write_text(json.dumps(source))
    files = {}
    for name in types:
        files[name] = out / f"ggml-model-{name}.gguf"
        if not files[name].is_file():
            llamacpp.quantize(f16, files[name], name)
    return files


def _weights_stamp(model_dir):
    return sorted(
        (p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(model_dir).glob("*.safetensors")
    )


def weights_read_per_token(path):
    """Bytes of the GGUF's tensors read in one decode step: all but the token embedding's rows
    (one row is read), unless it is also the output matrix (tied: read whole)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    tied = "output.weight" not in tensors
    return sum(n for name, n in tensors.items() if tied or name != "token_embd.weight")


def ours_once(seqs, prompt_ids, long_ids, n):
    """Decode n tokens after prompt_ids (greedy, EOS ignored), then prefill long_ids fresh."""
    import numpy as np

    from worker.llamacpp_seqs import Work

    seqs.drop(0)
    logits = seqs.decode([Work(0, prompt_ids, 0)])[0]
    pos, c0 = len(prompt_ids), seqs.decode_s
    tic = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(logits))
        logits = seqs.decode([Work(0, [token], pos)])[0]
        pos += 1
    wall, inside = time.perf_counter() - tic, seqs.decode_s - c0
    seqs.drop(0)
    tic = time.perf_counter()
    seqs.decode([Work(0, long_ids, 0)])
    prefill = time.perf_counter() - tic
    seqs.drop(0)
    return {
        "tokens_per_s": n / wall,
        "step_ms": 1000 * wall / n,
        "python_ms_per_step": 1000 * (wall - inside) / n,
        "prefill_tokens_per_s": len(long_ids) / prefill,
    }


class Server:
    """llama.cpp's llama-server on one GGUF: `parallel` slots (continuous batching and its prompt
    cache are on by default: llama-server's best settings for a chatbot)."""

    def __init__(self, binary, path, threads, n_ctx, port, parallel=1):
        self.url = f"http://127.0.0.1:{port}"
        cmd = [str(binary), "-m", str(path), "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx)]
        cmd += ["--parallel", str(parallel), "--port", str(port), "--host", "127.0.0.1", "--no-warmup"]
        # OpenMP's threads spin while they wait by default: on a loaded 2-core machine that made
        # llama-server 10-20x slower (measured: 2 vs 30-46 tok/s on the bench model's Q8_0)
        env = {**os.environ, "OMP_WAIT_POLICY": OMP_WAIT_POLICY}
        self.command = [f"OMP_WAIT_POLICY={OMP_WAIT_POLICY}", *cmd]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError("llama-server did not become healthy in 120 s")

    def completion(self, ids, n):
        body = {"prompt": ids, "n_predict": n, "temperature": 0, "cache_prompt": False, "ignore_eos": True}
        req = urllib.request.Request(
            f"{self.url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["timings"]

    def once(self, prompt_ids, long_ids, n):
        decode = self.completion(prompt_ids, n)
        prefill = self.completion(long_ids, 1)
        return {
            "tokens_per_s": decode["predicted_per_second"],
            "prefill_tokens_per_s": prefill["prompt_per_second"],
        }

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def server_binary():
    env = subprocess.run(
        ["sh", "-c", ". .ci/llamacpp-env.sh && echo $LLAMA_KEY"], cwd=ROOT, capture_output=True, text=True
    )
    path = ROOT / ".venv" / "llama.cpp" / env.stdout.strip() / "bin" / "llama-server"
    return path if path.is_file() else None


def section(ctx):
    from core.prompt import encode_prompt

    if not llamacpp.installed():
        ctx.warn(f"llamacpp: skipped: {llamacpp.INSTALL_HINT}")
        return
    plan, threads = ctx.plan, os.cpu_count() or 1
    binary = server_binary()
    if binary is None:
        ctx.warn("llamacpp: no llama-server rows: `make llama-server` builds it")
    out = ctx.res[SECTION] = {"threads": threads, "server": str(binary and rel(binary)), "runs": []}
    for model in plan["llamacpp_models"]:
        model_dir = ROOT / model
        if not (model_dir / "config.json").is_file():
            ctx.warn(f"llamacpp: {rel(model_dir)} skipped: not built")
            continue
        tokenizer = ctx.tokenizer(model_dir)
        prompt_ids = encode_prompt(tokenizer, PROMPT)
        long_ids = (prompt_ids * (plan["llamacpp_prefill"] // len(prompt_ids) + 1))[
            : plan["llamacpp_prefill"]
        ]
        roof = roofline(model_dir, len(long_ids), passes=3)
        for name, path in gguf_files(model_dir, TYPES[model]).items():
            out["runs"].append(measure_file(ctx, model_dir, name, path, prompt_ids, long_ids, binary, roof))


def measure_file(ctx, model_dir, name, path, prompt_ids, long_ids, binary, roof):
    from worker.llamacpp_seqs import Sequences

    plan, threads, n = ctx.plan, os.cpu_count() or 1, ctx.plan["llamacpp_max_tokens"]
    n_ctx = len(long_ids) + len(prompt_ids) + n + 16
    run = {
        "model": rel(model_dir),
        "type": name,
        "file": rel(path),
        "bytes_per_token": weights_read_per_token(path),
    }
    run.update(
        ours=[], server=[], limit_tokens_per_s=[], roofline_tokens_per_s=roof["limit_tokens_per_s"], load=[]
    )
    seqs = Sequences(path, n_ctx=n_ctx, slots=1, threads=threads)
    server = Server(binary, path, threads, n_ctx, 18000 + os.getpid() % 1000) if binary else None
    try:
        ours_once(seqs, prompt_ids, long_ids, 4)  # warm-up, unmeasured
        if server:
            server.once(prompt_ids, long_ids, 4)
            run["server_command"] = " ".join(server.command)
        for rep in range(plan["llamacpp_reps"]):
            bw = max(machine.memory_read_bandwidth(gib=0.25, repeats=3, samples=True))
            run["limit_tokens_per_s"].append(bw / run["bytes_per_token"])
            for side in ("ours", "server") if rep % 2 == 0 else ("server", "ours"):
                if side == "ours":
                    run["ours"].append(ours_once(seqs, prompt_ids, long_ids, n))
                elif server:
                    run["server"].append(server.once(prompt_ids, long_ids, n))
            run["load"].append(os.getloadavg()[0])
            last = run["ours"][-1]
            log(
                f"llamacpp {rel(model_dir)} {name} rep {rep + 1}: ours {report.fmt(last['tokens_per_s'])} tok/s "
                f"({report.fmt(last['python_ms_per_step'])} ms/step in Python), server "
                f"{report.fmt(run['server'][-1]['tokens_per_s'] if run['server'] else None)}; limit "
                f"{report.fmt(run['limit_tokens_per_s'][-1])}; load {run['load'][-1]:.2f}"
            )
    finally:
        seqs.close()
        if server:
            server.close()
    for side in ("ours", "server"):
        for key in ("tokens_per_s", "prefill_tokens_per_s"):
            run[f"{side}_{key}"] = report.summarize([r[key] for r in run[side]])
    run["python_ms_per_step"] = report.summarize([r["python_ms_per_step"] for r in run["ours"]])
    run["limit"] = report.summarize(run["limit_tokens_per_s"])
    return run


def rows(res):
    out = res.get(SECTION)
    if not out:
        return []
    rows = []
    for run in out["runs"]:
        label = f"llama.cpp {run['type']}"
        rows += [
            report.row(
                f"{label} decode vs bandwidth",
                report.median_of(run, "ours_tokens_per_s"),
                report.median_of(run, "limit"),
                "tok/s",
                ours_label="llamacpp_seqs",
                anchor_label="bandwidth limit",
                note=f"{run['model']}; Python {report.fmt(report.median_of(run, 'python_ms_per_step'))} ms/step",
            ),
            report.row(
                f"{label} decode vs llama-server",
                report.median_of(run, "ours_tokens_per_s"),
                report.median_of(run, "server_tokens_per_s"),
                "tok/s",
                ours_label="llamacpp_seqs",
                anchor_label="llama-server",
                paired=paired(run, "tokens_per_s"),
                note=run["model"],
            ),
            report.row(
                f"{label} prefill vs roofline",
                report.median_of(run, "ours_prefill_tokens_per_s"),
                run["roofline_tokens_per_s"],
                "tok/s",
                ours_label="llamacpp_seqs",
                anchor_label="sgemm roofline",
                note=f"llama-server {report.fmt(report.median_of(run, 'server_prefill_tokens_per_s'))} tok/s",
            ),
        ]
    return rows


def paired(run, key):
    if not run["server"]:
        return None
    return report.paired_ratio([r[key] for r in run["ours"]], [r[key] for r in run["server"]])


def models_note(plan):
    models = ", ".join(plan["llamacpp_models"])
    return f"llamacpp on {models} ({plan['llamacpp_reps']} reps x {plan['llamacpp_max_tokens']} tokens)"
