"""`make bench` section **bandwidth**: the machine's memory read bandwidth (the fastest of several
passes: other processes on a shared machine only slow passes down; the median is recorded too)
over the decode model's weight bytes = the decode limit in tokens/s; its rows set decode against
that limit (the decode section's samples, each also paired with the probe taken before it)."""

from bench import machine, report
from bench.common import log, rel, weights_bytes

SECTION = "bandwidth"
PLAN = {
    "quick": dict(bandwidth_gib=0.5, bandwidth_repeats=5),
    "full": dict(bandwidth_gib=1.0, bandwidth_repeats=8),
}


def section(ctx):
    plan = ctx.plan
    passes = machine.memory_read_bandwidth(
        gib=plan["bandwidth_gib"], repeats=plan["bandwidth_repeats"], samples=True
    )
    bw = max(passes)
    wb = weights_bytes(plan["decode_model"])
    ctx.res[SECTION] = {
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


def rows(res):
    bw, dec = res.get(SECTION), res.get("decode")
    if not (bw and dec):
        return []
    lim = bw["limit_tokens_per_s"]
    worker = report.median_of(dec, "worker_summary")
    # judged: the median decode over the run's best bandwidth pass (what the memory can do).
    # paired (shown only): each rep over a bandwidth probe taken right before it; under load
    # the 2-thread probe suffers more than the 1-thread decode, so it flatters the ratio.
    paired = report.paired_ratio(
        [r.get("tokens_per_s") for r in dec.get("worker") or []], dec.get("limit_tokens_per_s") or []
    )
    return [
        report.row(
            "decode vs bandwidth limit",
            worker,
            lim,
            "tok/s",
            ours_label="worker",
            anchor_label=f"{bw['bytes_per_s'] / 1e9:.1f} GB/s / {bw['weights_bytes'] / 1e6:.0f} MB",
            target_key="bandwidth_fraction",
            paired=paired,
        ),
        report.row(
            "stream_generate vs bandwidth limit",
            report.median_of(dec, "stream_generate_summary"),
            lim,
            "tok/s",
            ours_label="stream_generate",
            anchor_label="limit",
        ),
    ]
