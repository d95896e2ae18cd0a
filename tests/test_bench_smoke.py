"""The benchmark's pure helpers, and one very short real measurement (never timings)."""

import json
import math
import subprocess
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parents[1]


def test_statistics_helpers():
    assert report.median([3, 1, 2]) == 2
    assert report.median([1, None, float("nan"), 3]) == 2
    assert report.median([]) is None
    s = report.summarize([4.0, None, 2.0])
    assert s["n"] == 2 and s["median"] == 3.0 and s["min"] == 2.0 and s["max"] == 4.0
    assert s["samples"] == [4.0, None, 2.0]  # raw samples kept as they were
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(1.0, 0) is None and report.ratio(None, 1.0) is None
    assert report.ratio(float("inf"), 1.0) is None
    assert report.meets(0.25, ("<=", 0.3)) is True
    assert report.meets(0.95, (">=", 0.95)) is True
    assert report.meets(0.5, (">=", 0.6)) is False
    assert report.meets(None, (">=", 1)) is None


def test_training_windows():
    ours = [
        {"step": 0, "tokens_per_s": None, "tokens_seen": 0},
        {"step": 10, "tokens_per_s": 100.0, "tokens_seen": 1000},
        {"step": 20, "tokens_per_s": 200.0, "tokens_seen": 3000},
        {"step": 30, "tokens_per_s": 400.0, "tokens_seen": 4000},
    ]
    w = report.train_windows_ours(ours)
    assert w == [(1000, 100.0), (2000, 200.0), (1000, 400.0)]
    # first window left out: (2000 + 1000) tokens / (10 s + 2.5 s)
    assert math.isclose(report.window_rate(w), 3000 / 12.5)
    assert math.isclose(report.window_rate(w, skip_first=False), 4000 / 22.5)
    assert report.window_rate([(500, 50.0)]) == 50.0  # one window: kept
    assert report.window_rate([]) is None
    lora = [
        {"trained_tokens": 600, "tokens_per_second": 60.0},
        {"trained_tokens": 1200, "tokens_per_second": 120.0},
    ]
    assert report.train_windows_lora(lora) == [(600, 60.0), (600, 120.0)]
    # prompts masked: the loss targets per second of each window's elapsed time
    masked = [
        {"step": 0, "tokens_per_s": None, "tokens_seen": 0, "trained_tokens": 0, "elapsed_s": 0.0},
        {"step": 10, "tokens_per_s": 100.0, "tokens_seen": 1000, "trained_tokens": 300, "elapsed_s": 10.0},
        {"step": 20, "tokens_per_s": 200.0, "tokens_seen": 3000, "trained_tokens": 500, "elapsed_s": 20.0},
    ]
    assert report.train_windows_ours(masked, "trained_tokens") == [(300, 30.0), (200, 20.0)]
    # warm-up steps left out (the replay run's first pass over its windows): windows ending after
    assert report.train_windows_ours(masked, "trained_tokens", after_step=10) == [(200, 20.0)]
    assert report.train_windows_ours(ours, after_step=15) == [(2000, 200.0), (1000, 400.0)]


def test_rows_tables_and_files(tmp_path):
    rows = [
        report.row("training", 120.0, 100.0, "tok/s", target_key="training"),
        report.row(
            "ttft", 50.0, 1000.0, "ms", ours_label="cached", anchor_label="uncached", target_key="ttft_cached"
        ),
        report.row("bandwidth", 9.0, 20.0, "tok/s", target_key="bandwidth_fraction"),
        report.row("info only", 1.0, None, "x"),
    ]
    assert rows[0]["met"] is True and math.isclose(rows[0]["ratio"], 1.2)
    assert rows[1]["met"] is True and rows[1]["target"] == "<= 0.3"
    assert rows[2]["met"] is False
    assert rows[3]["met"] is None and rows[3]["ratio"] is None
    md = report.markdown_table(rows)
    assert md.count("\n") == len(rows) + 2 and "**NO**" in md and "1.2x" in md
    assert report.paired_ratio([2.0, 4.0, 9.0], [1.0, 4.0, 3.0]) == 2.0
    txt = report.text_table(rows)
    assert "measurement" in txt.splitlines()[0] and "NO" in txt

    path = report.write_json(tmp_path / "sub" / "r.json", {"rows": rows, "p": tmp_path})
    assert json.loads(path.read_text())["rows"][0]["name"] == "training"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left

    doc = tmp_path / "PERFORMANCE.md"
    report.append_markdown(doc, "## run 1\n\n" + md)
    report.append_markdown(doc, "## run 2\n")
    text = doc.read_text()
    assert text.startswith("# Performance") and text.index("## run 1") < text.index("## run 2")

    png = report.plot_concurrency(
        tmp_path / "c.png", [1, 2, 4], [10.0, 18.0, 30.0], [9.0, None, 25.0], "test", single=10.0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def pairing(ours, anchor):
    """One pairing as bench/training.py records it, from each side's runs of (tokens/s, peak GB)."""
    runs = lambda pairs: [{"tokens_per_s": t, "peak_mem_gb": m} for t, m in pairs]
    median_of = lambda pairs, i: report.summarize([p[i] for p in pairs])
    return {
        "ours": runs(ours),
        "mlx_lm_lora": runs(anchor),
        "ours_summary": median_of(ours, 0),
        "mlx_lm_lora_summary": median_of(anchor, 0),
        "ours_peak_summary": median_of(ours, 1),
        "mlx_lm_lora_peak_summary": median_of(anchor, 1),
    }


def test_training_on_smollm2_rows_side_by_side_or_skipped():
    from bench import training

    s = lambda *v: report.summarize(list(v))
    tr = {"model": "models/tiny-mistral", "batch_size": 4, "lora_rank": 8, "lora_layers": 4, "iters": 15}
    tr["smollm2"] = {
        "model": "models/smollm2-135m-instruct",
        "iters": 10,
        "steps_per_report": 5,
        **pairing([(110.0, 1.0), (90.0, 1.2)], [(100.0, 1.1), (100.0, 1.1)]),
    }
    speed, memory = training.real_rows({"training": tr})
    assert speed["name"] == "training tokens/s (LoRA), SmolLM2" and speed["ratio"] == pytest.approx(1.0)
    assert speed["paired_ratio"] == pytest.approx(1.0) and speed["met"] is True
    assert memory["ours"] == pytest.approx(1.1) and memory["target"] == "<= 1" and memory["met"] is True
    assert "models/smollm2-135m-instruct, batch 4, rank 8, 4 layers, 2 reps x 10 iters" in memory["note"]
    tr["smollm2"]["ours_peak_summary"] = s(1.3, 1.3)
    assert training.real_rows({"training": tr})[1]["met"] is False
    tr["smollm2"]["demo"] = {
        "adapters": {"layers": 16, "rank": 16, "mask": True},
        **pairing([(60.0, 0.9), (66.0, 0.9)], [(50.0, 1.0), (60.0, 1.0)]),
    }
    _, _, demo_speed, demo_memory = training.real_rows({"training": tr})
    assert demo_speed["name"] == "training tokens/s (LoRA), SmolLM2, the demo's adapters (answer tokens/s)"
    assert demo_speed["ratio"] == pytest.approx(63 / 55) and demo_speed["paired_ratio"] == pytest.approx(1.15)
    assert demo_memory["name"] == "training peak memory (LoRA), SmolLM2, the demo's adapters"
    assert demo_memory["met"] is True and "top 16 blocks, rank 16, prompts masked" in demo_memory["note"]
    # ours once more with the demo's replay, against the pairing's own runs without it
    with_replay = pairing([(54.0, 1.2), (55.0, 1.2)], [])
    tr["smollm2"]["demo"]["replay"] = {
        "config": {"data": "/x/data/replay", "per_step": 1, "weight": 1.0, "repeat": 1},
        "ours": with_replay["ours"],
        "summary": with_replay["ours_summary"],
        "peak_summary": with_replay["ours_peak_summary"],
    }
    *_, replay_speed, replay_memory = training.real_rows({"training": tr})
    assert (
        replay_speed["name"] == "training tokens/s, SmolLM2 demo with its replay vs without (answer tokens/s)"
    )
    assert replay_speed["ratio"] == pytest.approx(54.5 / 63) and replay_speed[
        "paired_ratio"
    ] == pytest.approx(((54 / 60) + (55 / 66)) / 2)
    assert replay_memory["ratio"] == pytest.approx(1.2 / 0.9) and replay_memory["met"] is None
    assert "replay: 1 window(s) of 128 tokens a step, KL weight 1.0" in replay_memory["note"]
    tr["smollm2"]["demo"]["replay"]["warm_steps"] = 13
    assert (
        "KL weight 1.0, measured after 13 steps (every window once)"
        in training.real_rows({"training": tr})[-1]["note"]
    )
    tr["smollm2"] = {
        "model": "models/smollm2-135m-instruct",
        "skipped": "models/smollm2-135m-instruct is missing",
    }
    (row,) = training.real_rows({"training": tr})
    assert row["ours"] is None and row["met"] is None and row["note"].startswith("skipped: models/smollm2")
    assert training.real_rows({"training": {"model": "m"}}) == []  # runs recorded before SmolLM2


def test_build_rows_and_section():
    from bench import run

    s = lambda *v: report.summarize(list(v))
    res = {
        "training": {
            "model": "models/tiny-mistral",
            "batch_size": 4,
            "lora_rank": 8,
            "lora_layers": 4,
            "iters": 15,
            "ours_summary": s(110.0),
            "mlx_lm_lora_summary": s(100.0),
            "ours_noblas": [{}],
            "ours_noblas_summary": s(50.0),
        },
        "decode": {
            "model": "m",
            "max_tokens": 8,
            "worker": [{}],
            "worker_noblas": [],
            "worker_summary": s(10.0),
            "worker_own_summary": s(10.5),
            "stream_generate_summary": s(10.0),
            "stream_generate_own_summary": s(10.2),
            "worker_noblas_summary": s(),
        },
        "concurrency": {
            "levels": [1, 8],
            "worker_summary": {"1": s(10.0), "8": s(40.0)},
            "server_summary": {"1": s(10.0), "8": s(35.0)},
        },
        "ttft": {
            "system_prompt_tokens": 520,
            "cached_summary": s(100.0),
            "uncached_summary": s(1000.0),
            "cached_worker_summary": s(95.0),
            "uncached_worker_summary": s(990.0),
        },
        "bandwidth": {"limit_tokens_per_s": 20.0, "bytes_per_s": 8e9, "weights_bytes": 4e8},
    }
    rows = run.build_rows(res)
    met = {r["target_key"]: r["met"] for r in rows if r["target_key"]}
    assert met == {
        "training": True,
        "decode": True,
        "concurrency_vs_server": True,
        "concurrency_scaling": True,
        "ttft_cached": True,
        "bandwidth_fraction": False,
    }
    res.update(
        mode="quick",
        started="2026-01-01 00:00",
        command="x",
        make_command="make bench QUICK=1",
        elapsed_s=1.0,
        load_start=[0.1, 0, 0],
        load_end=[2.0, 0, 0],
        models_note="tiny",
        results_file="bench/results/x.json",
        errors={},
        warnings=["server reset 2 connections"],
        machine={"host": "h", "cpu": "c", "cores": 2, "backend": "cpu", "blas": "b"},
    )
    from bench import writeup

    md = writeup.markdown_section(
        res, rows, ["![aggregate tokens/s against concurrency](../bench/results/x.png)\n"]
    )
    assert "## 2026-01-01 00:00 — quick — h" in md and "noisy" in md and "x.png" in md
    assert "Missed targets: decode vs bandwidth limit" in md
    assert "Note: server reset 2 connections" in md


def test_one_real_decode_measurement(tiny_model, tmp_path):
    """The decode path end to end on the tiny model: the worker over stdio and
    mlx_lm.stream_generate, 1 repetition of 4 tokens. Checks the plumbing, not the speed."""
    from bench import decode, run
    from bench.common import Context, Workers

    plan = dict(
        run.PLANS["quick"], decode_model=tiny_model, decode_reps=1, decode_max_tokens=4, decode_noblas_reps=0
    )
    res = {}
    ctx = Context(plan=plan, tmp=tmp_path, res=res, workers=Workers(tmp_path))
    try:
        decode.section(ctx)
        assert ctx.workers.get("main").ready["protocol"] == 2
    finally:
        ctx.workers.stop_all()
    assert ctx.tokenizers[tiny_model] is not None  # loaded once, for the sections after it
    dec = res["decode"]
    (w,), (a,) = dec["worker"], dec["stream_generate"]
    assert w["prompt_tokens"] == dec["prompt_tokens"]  # same prompt tokens on both sides
    assert w["completion_tokens"] <= 4 and a["completion_tokens"] <= 4
    assert w["finish_reason"] in ("length", "stop")
    assert dec["worker_summary"]["n"] + dec["stream_generate_summary"]["n"] >= 0
    assert "-m worker --model" in dec["worker_command"]


def test_openblas_coretype_from_flags():
    from core.blas import openblas_coretype

    avx512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
    assert openblas_coretype(avx512 | {"avx512_bf16"}) == "Cooperlake"
    assert openblas_coretype(avx512) == "SkylakeX"
    assert openblas_coretype({"avx2", "fma", "sse3"}) == "Haswell"
    assert openblas_coretype({"sse3"}) is None


@pytest.mark.skipif(
    not __import__("sys").platform.startswith("linux"), reason="core/blas.py acts on Linux only"
)
def test_blas_threads_do_not_spin_unless_told(tmp_path):
    """A process that imports core gets KMP_BLOCKTIME=0 (and the OpenBLAS equivalent) before
    the BLAS loads; a value in the environment wins. With MKL loaded, Intel OpenMP itself
    reports the block time it uses."""
    import os
    import subprocess
    import sys

    probe = (
        "import ctypes, json, os, core\n"
        "from core import blas\n"
        "bt = None\n"
        "if blas.loaded_path and 'mkl' in blas.loaded_path:\n"
        "    import mlx.core as mx; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))\n"
        "    bt = ctypes.CDLL('libiomp5.so').kmp_get_blocktime()\n"
        "print(json.dumps({k: os.environ.get(k) for k in blas.SHARED_MACHINE_THREADS} | {'omp': bt}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("KMP_BLOCKTIME", "OPENBLAS_THREAD_TIMEOUT")}
    env["FAST_BLAS_QUIET"] = "1"
    run = lambda e: json.loads(
        subprocess.run(
            [sys.executable, "-c", probe],
            env=e,
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path.parent,
        ).stdout
    )
    env["PYTHONPATH"] = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
    default = run(env)
    assert default["KMP_BLOCKTIME"] == "0" and default["OPENBLAS_THREAD_TIMEOUT"] == "4"
    assert default["omp"] in (None, 0)
    told = run(dict(env, KMP_BLOCKTIME="200"))
    assert told["KMP_BLOCKTIME"] == "200" and told["omp"] in (None, 200)


def test_workload_file_and_helpers():
    from bench import chat_replay

    system, convs = chat_replay.load()
    assert "Farense" in system and len(convs) >= 16
    assert len({c["id"] for c in convs}) == len(convs)
    assert all(1 <= len(c["turns"]) <= 4 for c in convs)
    assert {len(c["turns"]) for c in convs} == {1, 2, 3, 4}
    assert chat_replay.percentile([1, 2, 3, 4, 5], 50) == 3
    assert math.isclose(chat_replay.percentile([0, 10], 99), 9.9)
    assert chat_replay.percentile([], 50) is None
    plan = chat_replay.assign(convs, 3, at_least=4)  # 4 conversations over 3 users
    assert [len(p) for p in plan] == [2, 1, 1] and plan[0][0] is convs[0] and plan[0][1] is convs[3]
    assert [len(p) for p in chat_replay.assign(convs, 20)] == [1] * 20  # reused past the set's end
    turns = [
        {"turn": 0, "ttft_s": 0.1, "e2e_s": 1.0, "completion_tokens": 4},
        {"turn": 1, "ttft_s": 0.3, "e2e_s": 2.0, "completion_tokens": 6},
    ]
    lvl = chat_replay.summarize_level(turns, users=2, wall=2.0)
    assert lvl["tokens_per_s"] == 5.0 and lvl["follow_up_ttft_p50_ms"] == 300.0
    assert math.isclose(lvl["first_turn_ttft_p50_ms"], 100.0)


def test_bad_workload_line_is_named(tmp_path):
    from bench import chat_replay

    bad = tmp_path / "w.jsonl"
    bad.write_text('{"system": "s"}\n{"id": "x", "turns": []}\n')
    with pytest.raises(ValueError, match=r"w.jsonl:2"):
        chat_replay.load(bad)


def test_prefill_flops_count_the_weights():
    from bench import bench_model, prefill

    cfg = dict(bench_model.BENCH_CONFIG, vocab_size=1024)
    shapes = prefill.linear_shapes(cfg)
    assert len(shapes) == 7 * cfg["num_hidden_layers"] + 1
    linear = sum(o * i for o, i in shapes[:-1])
    f = prefill.flops_per_token(cfg, 1000)
    # 2 FLOPs per weight, plus the causal attention over 500 positions on average
    assert math.isclose(f, 2 * linear + 4 * 16 * 12 * 64 * 500)


def test_prefill_and_workload_rows_and_plot(tmp_path):
    from bench import run

    s = lambda *v: report.summarize(list(v))
    lvl = lambda tps, p99: {
        "tokens_per_s": tps,
        "ttft_p50_ms": p99 / 2,
        "ttft_p99_ms": p99,
        "e2e_p99_ms": 3 * p99,
        "follow_up_ttft_p50_ms": p99 / 4,
        "first_turn_ttft_p50_ms": p99 / 2,
    }
    res = {
        "prefill": {
            "prompt_tokens": 1000,
            "prefill_step_size": 256,
            "flops_per_token": 2.3e8,
            "reps": [{"tokens_per_s": 60.0}],
            "rooflines": [{"limit_tokens_per_s": 100.0}],
            "tokens_per_s_summary": s(60.0),
            "limit_summary": s(100.0),
            "sgemm_summary": s(2.3e10),
        },
        "workload": {
            "levels": [1, 8],
            "model": "m",
            "max_tokens": 16,
            "worker": {"1": [lvl(10.0, 500.0)], "8": [lvl(36.0, 900.0)]},
            "server": {"1": [lvl(10.0, 400.0)], "8": [lvl(30.0, 1000.0)]},
        },
    }
    from bench import chat_replay, workload, writeup

    res["workload"]["worker_medians"] = chat_replay.medians(res["workload"]["worker"])
    res["workload"]["server_medians"] = chat_replay.medians(res["workload"]["server"])
    rows = run.build_rows(res)
    by = {r["name"]: r for r in rows}
    assert by["prefill vs compute roofline, uncached 1000-token prompt"]["met"] is True  # 0.6 >= 0.5
    assert by["chatbot tokens/s, 8 users"]["met"] is True  # 1.2x
    assert by["chatbot first token p99, 1 users"]["met"] is False  # 500 > 400 ms
    assert by["chatbot first token p99, 8 users"]["met"] is True
    assert writeup.targets_met(rows) == {
        "prefill_roofline": True,
        "workload_tokens_8": True,
        "workload_ttft_p99": False,
    }
    res.update(machine={"cpu": "c"}, load_start=[1.0])
    line = workload.plot(res, tmp_path / "r", tmp_path / "doc.md")
    assert res["workload_png_rel"] == "r-workload.png" and line.endswith("(r-workload.png)\n")
    assert (tmp_path / "r-workload.png").read_bytes()[:4] == b"\x89PNG"


def test_workload_replay_through_worker_and_server(tiny_model, tmp_path):
    """Two users, one short conversation each, through a real worker and a real mlx_lm server
    on the tiny model: histories grow, both sides answer, usage is read from both."""
    from mlx_lm.utils import load_tokenizer

    from bench import chat_replay
    from bench.anchors import ServerProcess
    from bench.common import sub_env
    from bench.worker_client import WorkerProcess
    from core.prompt import accepts_system_role

    convs = [{"id": "a", "turns": ["Olá", "Quem és tu?"]}, {"id": "b", "turns": ["Bom dia"]}]
    fold = not accepts_system_role(load_tokenizer(Path(tiny_model)))
    with (
        WorkerProcess(["--model", str(tiny_model)], env=sub_env(FAST_BLAS_QUIET=1)) as w,
        ServerProcess(tiny_model, env=sub_env(FAST_BLAS_QUIET=1), stderr_path=tmp_path / "server.log") as srv,
    ):
        senders = {
            "worker": chat_replay.worker_sender(w),
            "server": chat_replay.server_sender(srv.port, fold),
        }
        out = chat_replay.run_levels(
            senders, "És o assistente do Farense.", convs, [2], 1, 3, log=lambda m: None, at_least=2
        )
    for side in ("worker", "server"):
        (lvl,) = out[side]["2"]
        assert "error" not in lvl, lvl.get("error")
        assert lvl["requests"] == 3 and lvl["completion_tokens"] >= 3
        second = [t for t in lvl["turns"] if t["conv"] == "a" and t["turn"] == 1][0]
        first = [t for t in lvl["turns"] if t["conv"] == "a" and t["turn"] == 0][0]
        assert second["prompt_tokens"] > first["prompt_tokens"]  # the history was sent
        assert lvl["ttft_p99_ms"] >= lvl["ttft_p50_ms"] > 0


def test_cpu_prefill_chunk_is_short():
    """Without fused attention (the CPU) the worker prefills in 256-token chunks (fewer scalar
    softmax exps: docs/PERFORMANCE.md); with it, the longest chunk that fits, as before."""
    from bench import bench_model
    from core import memory

    s = memory.shape_from_config(dict(bench_model.BENCH_CONFIG, vocab_size=1024))
    cpu = memory.worker_limits(s, 20 * 2**30, 4096, fused_attention=False)
    gpu = memory.worker_limits(s, 20 * 2**30, 4096, fused_attention=True)
    assert cpu["prefill_step_size"] == 256 and gpu["prefill_step_size"] > 256
    assert (
        memory.worker_limits(s, 20 * 2**30, 4096, fused_attention=False, prefill_step_size=1024)[
            "prefill_step_size"
        ]
        == 1024
    )  # a value given is kept


def test_small_gemm_measure_and_rows(tiny_model):
    from bench import small_gemm
    from core import blas

    res = small_gemm.measure(tiny_model, ms=[1, 3], reps=1)
    if blas.small_gemm is None:
        assert "not loaded" in res["skipped"] and small_gemm.rows({"small_gemm": res}) == []
        pytest.skip(res["skipped"])
    assert res["weights_bytes"] > 0 and sorted(res["m"]) == [1, 3]
    for r in res["m"].values():
        assert r["blas_s"] > 0 and r["small_s"] > 0 and r["paired"] > 0
    rows = small_gemm.rows({"small_gemm": res})
    assert [r["name"] for r in rows] == [
        "decode products x @ W^T, M=1 (read rate)",
        "decode products x @ W^T, M=3 (read rate)",
    ]
    m1 = res["m"][1]
    assert rows[0]["ours"] == pytest.approx(res["weights_bytes"] / 1e9 / m1["small_s"])
    assert rows[0]["anchor"] == pytest.approx(res["weights_bytes"] / 1e9 / m1["blas_s"])
    assert rows[0]["paired_ratio"] == m1["paired"] and rows[0]["unit"] == "GB/s"


def test_anchor_server_runs_without_our_kernel_unless_asked(monkeypatch):
    from bench.anchors import ServerProcess

    monkeypatch.delenv("SMALL_GEMM", raising=False)
    assert ServerProcess("m").env["SMALL_GEMM"] == "0"  # the BLAS only: the kernel is ours
    assert ServerProcess("m", env={"PATH": "/bin"}).env == {"SMALL_GEMM": "0", "PATH": "/bin"}
    assert ServerProcess("m", env={"SMALL_GEMM": "1"}).env["SMALL_GEMM"] == "1"


def test_decode_env_runs_each_variant_in_its_own_process(tiny_model, capsys):
    from bench import decode_env

    with pytest.raises(ValueError, match="'SPIN' is not NAME=VALUE"):
        decode_env.parse_variant("A=1 SPIN")
    assert decode_env.parse_variant("SMALL_GEMM_SPIN_US=0  X=a=b") == {"SMALL_GEMM_SPIN_US": "0", "X": "a=b"}
    args = [str(tiny_model), "--rounds", "1", "--tokens", "6"]
    assert decode_env.main(["SMALL_GEMM=0", "SMALL_GEMM=1", "--model", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("round 1/1: ") and len(lines) == 3
    first, second = lines[1].split(), lines[2].split()
    assert first[0] == "SMALL_GEMM=0" and first[6] == "1.00x" and float(first[2]) > 0
    assert second[0] == "SMALL_GEMM=1" and float(second[2]) > 0
    with pytest.raises(RuntimeError, match="exit 1"):  # a child that fails is named, not averaged
        decode_env.run_once({}, str(tiny_model / "absent"), 6)
    # a child that did not load what its variant says stops the run (here: no kernel at that path)
    absent = {"SMALL_GEMM": "1", "SMALL_GEMM_LIB": str(tiny_model / "absent.so")}
    with pytest.raises(RuntimeError, match="did not load what they say: small_gemm off with SMALL_GEMM=1"):
        decode_env.run_once(absent, str(tiny_model), 6)


def test_a_partial_run_keeps_the_whole_runs_results():
    import datetime

    from bench import run, writeup

    now = datetime.datetime(2026, 12, 1, 12, 0)
    full, quick = run.planned(False), run.planned(True)
    assert quick == [s for s in full if s != "concurrency"]
    stem = lambda is_quick, sections: writeup.results_stem(
        now, "vm", is_quick, sections, run.planned(is_quick)
    )
    assert stem(False, full) == "2026-12-01-1200-vm"
    assert stem(True, quick) == "2026-12-01-1200-vm-quick"
    assert stem(False, ["bandwidth", "decode"]) == "2026-12-01-1200-vm-bandwidth-decode"
    assert stem(True, ["decode"]) == "2026-12-01-1200-vm-quick-decode"


# A full and a quick run recorded before bench/ was split into one module per measurement
# (issue 25): the code of today must rebuild their rows, targets, plan and doc section exactly.
COMMITTED_RUNS = ["2026-12-01-1250-vm.json", "2026-12-01-1233-vm-quick.json"]
NEWER_SECTIONS = (
    "settings_",
    "llamacpp_",
    "lw_",
    "train_real",
)  # plan keys of the measurements added after those runs


@pytest.mark.parametrize("name", COMMITTED_RUNS)
def test_a_committed_run_is_rebuilt_as_it_was_recorded(name):
    import os

    from bench import run, writeup
    from bench.common import DOC, RESULTS, rel

    res = json.loads((RESULTS / name).read_text())
    rows = json.loads(json.dumps(run.build_rows(res)))
    assert [r["name"] for r in rows] == [r["name"] for r in res["rows"]]
    assert rows == res["rows"]
    assert writeup.targets_met(rows) == res["targets_met"]
    plan = run.PLANS[res["mode"]]
    now = json.loads(json.dumps({k: rel(v) if isinstance(v, Path) else v for k, v in plan.items()}))
    assert {k: now.get(k) for k in res["plan"]} == res["plan"]
    assert all(k.startswith(NEWER_SECTIONS) for k in set(now) - set(res["plan"]))  # only sections added since
    sections = [s for s in run.SECTIONS if s in res]
    assert run.models_note(plan, sections) == res["models_note"]
    images = []
    if res.get("plot"):
        images.append(f"![aggregate tokens/s against concurrency]({os.path.relpath(res['plot'], 'docs')})\n")
    if res.get("workload_png_rel"):
        images.append(
            "![chatbot workload: tokens/s and first-token time against users, worker vs mlx_lm server]"
            f"({res['workload_png_rel']})\n"
        )
    section = writeup.markdown_section(res, rows, images)
    assert section.splitlines()[0] in DOC.read_text(), f"{name}'s section is no longer in {DOC.name}"
    assert section in DOC.read_text()


def test_plans_are_assembled_from_the_measurements(monkeypatch):
    from bench import run

    for mode in ("quick", "full"):
        keys = [k for m in run.MEASUREMENTS for k in m.PLAN[mode]]
        assert sorted(run.PLANS[mode]) == sorted(keys + ["skip_sections"])
    assert run.PLANS["quick"]["skip_sections"] == ("concurrency",)
    clash = type("clash", (), {"SECTION": "clash", "PLAN": {"quick": {"decode_reps": 1}, "full": {}}})
    monkeypatch.setattr(run, "MEASUREMENTS", run.MEASUREMENTS + (clash,))
    with pytest.raises(ValueError, match=r"bench/clash.py: plan keys \['decode_reps'\]"):
        run.plan_for("quick")


def test_a_new_measurement_is_one_line_in_the_runner(monkeypatch):
    """A module with SECTION, PLAN, section and rows, added to MEASUREMENTS only: it runs after
    the others, in its turn, and its rows come after theirs."""
    from bench import run
    from bench.common import Context

    def section(ctx):
        ctx.res["extra"] = {"x": ctx.plan["extra_x"], "decode_ran_first": "decode" in ctx.res}

    extra = type(
        "extra",
        (),
        {
            "SECTION": "extra",
            "PLAN": {"quick": {"extra_x": 2.0}, "full": {"extra_x": 3.0}},
            "section": staticmethod(section),
            "rows": staticmethod(lambda res: [report.row("extra", res["extra"]["x"], 1.0, "x")]),
        },
    )
    decode = type(
        "decode",
        (),
        {
            "SECTION": "decode",
            "PLAN": {"quick": {}},
            "section": staticmethod(lambda ctx: ctx.res.update(decode={})),
        },
    )
    monkeypatch.setattr(run, "MEASUREMENTS", (decode, extra))
    assert run.plan_for("quick")["extra_x"] == 2.0
    res = {"errors": {}}
    run.measure(Context(plan={"extra_x": 2.0}, tmp=Path("."), res=res, workers=None), ["decode", "extra"])
    assert res["extra"] == {"x": 2.0, "decode_ran_first": True} and res["errors"] == {}
    res["training"] = {"model": "m", "batch_size": 4, "lora_rank": 8, "lora_layers": 4, "iters": 1}
    assert [r["name"] for r in run.build_rows(res)] == ["training tokens/s (LoRA)", "extra"]


def test_a_failing_measurement_is_an_error_of_the_run_not_its_end(monkeypatch):
    from bench import run
    from bench.common import Context

    def boom(ctx):
        raise RuntimeError("no server")

    a = type("a", (), {"SECTION": "a", "section": staticmethod(boom)})
    b = type("b", (), {"SECTION": "b", "section": staticmethod(lambda ctx: ctx.res.update(b=1))})
    monkeypatch.setattr(run, "MEASUREMENTS", (a, b))
    res = {"errors": {}}
    run.measure(Context(plan={}, tmp=Path("."), res=res, workers=None), ["a", "b"])
    assert res["b"] == 1 and res["errors"]["a"].startswith("RuntimeError: no server\n")


def test_same_shape_compares_keys_and_rows_not_values(tmp_path, capsys):
    from bench import same_shape
    from bench.common import RESULTS

    res = json.loads((RESULTS / COMMITTED_RUNS[1]).read_text())
    other = json.loads(json.dumps(res))
    other["decode"]["worker"] = other["decode"]["worker"][:1]  # fewer repetitions: same shape
    other["decode"]["worker_summary"]["median"] = 1.0
    assert same_shape.differences(res, other) == []
    del other["decode"]["worker"][0]["timing"]
    other["rows"] = other["rows"][1:]
    other["new_section"] = {"a": 1}
    diff = same_shape.differences(res, other)
    assert diff[0].startswith("top-level keys:")
    assert "gone: decode.worker[].timing" in diff and "new: new_section.a" in diff
    assert diff[-1].startswith("rows: ['training tokens/s (LoRA)', ")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(res))
    b.write_text(json.dumps(other))
    assert same_shape.main([str(a), str(a)]) == 0 and "same shape" in capsys.readouterr().out
    assert (
        same_shape.main([str(a), str(b)]) == 1 and "gone: decode.worker[].timing" in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "sections, llama, smollm2",
    [
        ("training", False, True),
        ("decode,ttft", False, False),
        ("llamacpp_workload", True, False),
        ("", True, True),
    ],
)
def test_make_bench_builds_llama_cpp_and_smollm2_only_for_the_sections_that_use_them(
    tmp_path, sections, llama, smollm2
):
    """`make bench SECTIONS=...` (dry run, llama.cpp not yet built): the ~15-minute llama.cpp build
    only when a llamacpp section runs (or all do), SmolLM2 only when the training section does."""
    proc = subprocess.run(
        ["make", "-n", "bench", f"SECTIONS={sections}", f"LLAMA_STAMP={tmp_path / 'not-built'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert ("install-llamacpp.sh" in proc.stdout) == llama and (
        "build-llama-server.sh" in proc.stdout
    ) == llama
    assert ("models/smollm2-135m-instruct/config.json" in proc.stdout) == smollm2, proc.stdout
    assert "-m bench.run" in proc.stdout
