"""The serving lines of `make check-backend`: a round trip through the worker (a reply, a
stream, exit 0 on EOF), its decode speed and peak memory, and a round trip through the Node
client, on the adapter the training lines left."""

import json
import shutil
import subprocess
from pathlib import Path

from bench.backend.job import PY, ROOT, Skip, must, run
from bench.backend.versions import node_version

NODE_CLIENT = ROOT / "clients" / "node" / "index.js"
PROMPT = "Quem fundou o Sporting Clube Farense?"
DECODE_TOKENS = 128
WORKER_RSS_LIMIT = 4 << 30  # the tiny model's worker uses a few hundred MB


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
    return f"{node_version()}: startWorker, complete() and stream() answered, close()"
