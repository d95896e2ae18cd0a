"""Pure helpers of the benchmark: statistics, target rows, tables, the result files, the plot.

Nothing here measures anything; tests/test_bench_smoke.py runs all of it.
"""

import json
import math
import os
import statistics
import tempfile
from pathlib import Path

# Each target: how the ratio is compared. ">=" means bigger is better.
TARGETS = {
    "training": (">=", 1.0),
    "training_peak_memory": ("<=", 1.0),  # ours / mlx_lm lora's, on the same run settings
    "decode": (">=", 0.95),
    "settings_default": (">=", 0.95),  # the CPU settings in use vs the best alternative measured
    "concurrency_scaling": (">=", 3.0),
    "concurrency_vs_server": (">=", 1.0),
    "ttft_cached": ("<=", 0.3),
    "bandwidth_fraction": (">=", 0.8),
    "prefill_roofline": (">=", 0.5),
    "workload_tokens_8": (">=", 1.2),
    "workload_ttft_p99": ("<=", 1.0),
}


def clean(values):
    """The finite numbers among values (None, nan and inf dropped)."""
    return [
        float(v)
        for v in values
        if v is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]


def median(values):
    vals = clean(values)
    return statistics.median(vals) if vals else None


def median_of(results, key):
    """The median of a summary (summarize's dict) stored under key, None where there is none."""
    return (results.get(key) or {}).get("median")


def summarize(values):
    """{"n", "median", "min", "max", "samples"} of a list of samples."""
    vals = clean(values)
    return {
        "n": len(vals),
        "median": statistics.median(vals) if vals else None,
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
        "samples": list(values),
    }


def ratio(a, b):
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


def meets(value, target):
    """True/False against ("<=" | ">=", bound); None when there is no value."""
    if value is None:
        return None
    op, bound = target
    return value <= bound if op == "<=" else value >= bound


def paired_ratio(ours, anchor):
    """Median over repetitions of ours[i] / anchor[i] (samples taken back to back): steadier
    than the ratio of medians when the machine's load drifts during a run."""
    return median([ratio(a, b) for a, b in zip(ours, anchor)])


def row(
    name,
    ours,
    anchor,
    unit,
    *,
    ours_label="",
    anchor_label="",
    target_key=None,
    value=None,
    note="",
    paired=None,
):
    """One line of the results table. `value` is the number compared with the target
    (default ours/anchor, the ratio of the medians); `paired` the median of per-repetition
    ratios, shown beside it."""
    r = ratio(ours, anchor)
    v = r if value is None else value
    target = TARGETS.get(target_key) if target_key else None
    return {
        "name": name,
        "ours": ours,
        "anchor": anchor,
        "unit": unit,
        "ratio": r,
        "paired_ratio": paired,
        "ours_label": ours_label,
        "anchor_label": anchor_label,
        "target_key": target_key,
        "value": v,
        "target": f"{target[0]} {target[1]:g}" if target else "",
        "met": meets(v, target) if target else None,
        "note": note,
    }


def window_rate(windows, skip_first=True):
    """Tokens/s over report windows [(tokens, tokens_per_s)]: sum(tokens) / sum(seconds),
    leaving out the first window (warm-up, compilation) when there is more than one."""
    ws = [(t, r) for t, r in windows if t and r and r > 0]
    if skip_first and len(ws) > 1:
        ws = ws[1:]
    if not ws:
        return None
    return sum(t for t, _ in ws) / sum(t / r for t, r in ws)


def train_windows_ours(metrics_records, counter="tokens_seen", after_step=0):
    """[(tokens, tokens_per_s)] of train.train's metrics.jsonl records (report windows), the
    tokens by `counter`: tokens_seen (every token of the batches) or trained_tokens (the loss
    targets, per second of the window's elapsed time); only the windows that end after
    `after_step`."""
    out, prev, start = [], 0, 0.0
    for rec in metrics_records:
        if rec.get("tokens_per_s") is None:
            continue
        seen, now = rec.get(counter) or 0, rec.get("elapsed_s") or 0.0
        rate = rec["tokens_per_s"] if counter == "tokens_seen" else (seen - prev) / max(now - start, 1e-9)
        if rec.get("step", 0) > after_step:
            out.append((seen - prev, rate))
        prev, start = seen, now
    return out


def train_windows_lora(reports):
    """[(tokens, tokens_per_s)] of mlx_lm.lora's train reports (dicts with trained_tokens)."""
    out, prev = [], 0
    for rec in reports:
        seen = rec.get("trained_tokens") or 0
        out.append((seen - prev, rec["tokens_per_second"]))
        prev = seen
    return out


def fmt(v, digits=3):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}g}"


def markdown_table(rows):
    head = (
        "| measurement | ours | anchor | ratio | paired ratio | target | met |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        ours = f"{fmt(r['ours'])} {r['unit']}".strip() if r["ours"] is not None else "n/a"
        anchor = f"{fmt(r['anchor'])} {r['unit']}".strip() if r["anchor"] is not None else "—"
        if r["ours_label"]:
            ours += f" ({r['ours_label']})"
        if r["anchor_label"] and r["anchor"] is not None:
            anchor += f" ({r['anchor_label']})"
        value = r["value"]
        shown = f"{fmt(value)}x" if value is not None else "n/a"
        met = "" if r["met"] is None else ("**yes**" if r["met"] else "**NO**")
        paired = f"{fmt(r['paired_ratio'])}x" if r.get("paired_ratio") is not None else ""
        lines.append(f"| {r['name']} | {ours} | {anchor} | {shown} | {paired} | {r['target']} | {met} |")
    return head + "\n".join(lines) + "\n"


def text_table(rows):
    """The final table for a terminal (fixed-width columns)."""
    cols = ["measurement", "ours", "anchor", "ratio", "paired", "target", "met"]
    data = []
    for r in rows:
        data.append(
            [
                r["name"],
                f"{fmt(r['ours'])} {r['unit']}".strip() if r["ours"] is not None else "n/a",
                f"{fmt(r['anchor'])} {r['unit']}".strip() if r["anchor"] is not None else "-",
                f"{fmt(r['value'])}x" if r["value"] is not None else "n/a",
                f"{fmt(r['paired_ratio'])}x" if r.get("paired_ratio") is not None else "",
                r["target"],
                "" if r["met"] is None else ("yes" if r["met"] else "NO"),
            ]
        )
    widths = [max(len(c), *(len(d[i]) for d in data)) if data else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(d) for d in data]) + "\n"


def write_json(path, obj):
    """Atomically write obj as indented JSON (a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


PERFORMANCE_HEADER = """# Performance

`make bench` measures this project side by side with its anchor, mlx-lm, in one run
(bench/run.py): each measurement and its anchor run alternately, several times, and the
tables below give medians and ratios. `make bench QUICK=1` is the short version. Each run
appends a section here and writes every raw sample to `bench/results/<date>-<HHMM>-<host>[-quick].json` (runs before 2026-12-01 13:00: `<date>-<host>[-quick]`, each replaced by the next run of that day).

What is compared:

- **training tokens/s**: `python -m train.train` vs `mlx_lm lora` (through `bench/anchors.py`,
  which only loads the same BLAS first), same model, data (system prompt folded into the first
  user turn for mlx-lm, exactly as our trainer does for this template), batch size, LoRA rank
  and layers, iterations, `mask_prompt: false` on both (then both count every sequence token);
  the first report window (warm-up, compilation) is left out.
- **decode tokens/s, one stream**: the worker over its stdio protocol (`stream: true`, timed on
  the client from the first `token` message to `done`) vs `mlx_lm.stream_generate` in the bench
  process (from its first response with text to the last), same prompt tokens, greedy.
- **aggregate tokens/s at 1-16 concurrent requests**: the worker vs `mlx_lm server` over HTTP
  (threads + urllib, non-streaming, temperature 0, same max_tokens).
- **time to first token** with a >= 500-token system prompt: uncached (a nonce first) vs cached
  (same system prompt, another question), through the worker, `max_tokens: 1`.
- **FAST_BLAS=0** (mlx's reference BLAS) vs the optimised BLAS, in the subprocess environment.
- **the limit**: memory read bandwidth (the fastest of several passes of `bench.machine.memory_read_bandwidth`, measured in the same run) / bytes of weights read per token (float32 bench model).
- **prefill vs the compute roofline**: an uncached ~1,000-token prompt through the worker
  (prompt tokens / client first-token time) over the roofline = the sgemm FLOP/s this machine
  reaches on the model's own prefill products (mlx + the loaded BLAS, best pass) / the
  model's prefill FLOPs per token (2 x the linear weights + causal attention); each rep paired
  with a roofline pass (`bench/prefill.py`).
- **chatbot workload**: `bench/workload.jsonl` (the club's system prompt, 16 Portuguese
  conversations of 1-4 turns) replayed by 1-16 simulated users at once, each user sending the
  system prompt + its history + the next question, through the worker (stdio, streaming) and
  `mlx_lm server` (/v1/chat/completions, SSE, one HTTP/1.0 connection per request), greedy,
  the same max_tokens; aggregate tokens/s, first-token p50/p99, end-to-end p99, and the
  first-token time of follow-up turns, whose history is already cached (`bench/workload.py`).

The machine is often shared (other test runs): the load average at the start and end of each
run is recorded; compare ratios from one run rather than absolute numbers across runs.
"""


def append_markdown(doc_path, section, header=PERFORMANCE_HEADER):
    """Append a section to docs/PERFORMANCE.md (creating it with its header)."""
    doc_path = Path(doc_path)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    if not doc_path.exists() or not doc_path.read_text().strip():
        doc_path.write_text(header)
    text = doc_path.read_text()
    sep = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    with open(doc_path, "a") as f:
        f.write(sep + section.rstrip("\n") + "\n")
    return doc_path


def plot_concurrency(
    path,
    levels,
    ours,
    anchor,
    title,
    ours_label="worker (stdio)",
    anchor_label="mlx_lm server (HTTP)",
    single=None,
):
    """Aggregate tokens/s against concurrency, ours vs the anchor (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(levels, ours, "o-", label=ours_label)
    if anchor and any(v is not None for v in anchor):
        ax.plot(levels, [v if v is not None else float("nan") for v in anchor], "s--", label=anchor_label)
    if single:
        ax.plot(levels, [single * n for n in levels], ":", color="gray", label="linear from 1 stream")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels)
    ax.set_xticklabels([str(n) for n in levels])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(title, fontsize=9)
    top = max([v for v in list(ours) + list(anchor or []) if v is not None] or [1])
    ax.set_ylim(0, top * 1.25)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_workload(
    path, levels, ours, anchor, title, ours_label="worker (stdio)", anchor_label="mlx_lm server (HTTP)"
):
    """Two panels against simulated users: aggregate tokens/s, and first-token p50/p99 (ms).
    ours/anchor: {"tokens_per_s": [...], "ttft_p50_ms": [...], "ttft_p99_ms": [...]} per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nan = lambda vs: [v if v is not None else float("nan") for v in vs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.6, 4.0), dpi=110)
    a.plot(levels, nan(ours["tokens_per_s"]), "o-", label=ours_label)
    a.plot(levels, nan(anchor["tokens_per_s"]), "s--", label=anchor_label)
    a.set_ylabel("aggregate tokens/s")
    b.plot(levels, nan(ours["ttft_p50_ms"]), "o-", color="C0", label=f"{ours_label} p50")
    b.plot(levels, nan(ours["ttft_p99_ms"]), "o:", color="C0", label=f"{ours_label} p99")
    b.plot(levels, nan(anchor["ttft_p50_ms"]), "s--", color="C1", label=f"{anchor_label} p50")
    b.plot(levels, nan(anchor["ttft_p99_ms"]), "s:", color="C1", label=f"{anchor_label} p99")
    b.set_ylabel("time to first token (ms)")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels)
        ax.set_xticklabels([str(n) for n in levels])
        ax.set_xlabel("simulated users")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
