"""The worker's memory limits (worker/limits.py, core/memory.py) through the real worker:
chosen from the memory model unless given, reported in `ready` and `stats` (schema-checked
by the harness), and a batch the budget cannot hold makes requests wait or get
`overloaded`, never takes the process down."""

import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker_harness import TINY, Worker  # noqa: E402

from core import memory  # noqa: E402

LONG = {"WORKER_TEST_IGNORE_EOS": "1"}
PROMPT = "Qual é o estádio do Farense?"


def test_ready_and_stats_report_the_limits_the_memory_model_chose():
    with Worker() as w:
        lim = w.ready["limits"]
        shape = memory.shape_from_config(memory.read_config(TINY))
        assert lim["source"].startswith("memory model")
        assert lim["weights_bytes"] == memory.weight_bytes(shape)
        assert lim["kv_bytes_per_token"] == memory.kv_bytes_per_token(shape)
        assert lim["context_length"] == w.ready["context_length"]
        again = memory.worker_limits(shape, lim["budget_bytes"], lim["context_length"], fused_attention=False)
        assert {k: v for k, v in lim.items() if k != "source"} == again
        assert 1 <= lim["max_batch"] <= 32 and lim["predicted_peak_bytes"] <= lim["budget_bytes"]
        assert lim["budget_bytes"] <= 0.8 * psutil.virtual_memory().total + 1
        s = w.stats()
        assert s["limits"] == lim
        assert s["prefix_cache"]["budget_bytes"] == lim["prefix_cache_bytes"]


def test_given_limits_are_kept():
    with Worker("--max-batch", "3", "--prefix-cache-bytes", "0") as w:
        lim = w.ready["limits"]
        assert (lim["max_batch"], lim["prefix_cache_bytes"]) == (3, 0)
        assert w.request("a", prompt=PROMPT, max_tokens=2)["type"] == "done"


def test_a_budget_for_one_sequence_queues_the_rest_and_overloads_past_the_queue():
    fraction = 40e6 / psutil.virtual_memory().total  # a few tens of MB: one sequence at most
    with Worker("--memory-fraction", f"{fraction:.3g}", "--max-queue", "2", env=LONG) as w:
        assert w.ready["limits"]["max_batch"] == 1
        lim = w.ready["limits"]
        # 64 MiB of KV at the model's 32768 tokens does not fit: the context is capped
        assert lim["context_capped_from"] == 32768 and lim["full_context_fits"]
        assert w.ready["context_length"] == lim["context_length"] < 32768
        w.wait_for_stderr("the context is capped at")
        too_long = w.request("long", prompt="Farense " * lim["context_length"], max_tokens=1)
        assert too_long["type"] == "error" and too_long["code"] == "too_long", too_long
        w.send(
            *[{"id": f"r{i}", "prompt": f"{PROMPT} {i}", "max_tokens": 40} for i in range(4)], {"op": "stats"}
        )
        assert w.terminal("r3")["code"] == "overloaded"
        s = w.wait_for(lambda m: m["type"] == "stats")
        assert s["in_flight"] == 1 and s["queued"] == 2
        for i in range(3):  # the queued ones are served in turn
            d = w.terminal(f"r{i}", timeout=120)
            assert d["type"] == "done" and d["usage"]["completion_tokens"] == 40
        assert w.ping()["type"] == "pong"
