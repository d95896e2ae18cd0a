"""The rows of `make bench` section **training** (bench/training.py runs it): our trainer against
mlx_lm lora on the toy model and on SmolLM2 (tokens/s and peak memory, side by side), the demo's
replay against the same runs without it, and the optimised BLAS against FAST_BLAS=0."""

from bench import report
from core.config import REPLAY_WINDOW

SECTION = "training"


def rows(res):
    tr = res.get(SECTION)
    if not tr:
        return []
    samples = lambda k: [r.get("tokens_per_s") for r in (tr.get(k) or [])]
    return [
        report.row(
            "training tokens/s (LoRA)",
            report.median_of(tr, "ours_summary"),
            report.median_of(tr, "mlx_lm_lora_summary"),
            "tok/s",
            ours_label="train.train",
            anchor_label="mlx_lm lora",
            target_key="training",
            paired=report.paired_ratio(samples("ours"), samples("mlx_lm_lora")),
            note=f"{tr['model']}, batch {tr['batch_size']}, rank {tr['lora_rank']}, "
            f"{tr['lora_layers']} layers, {tr['iters']} iters",
        )
    ]


def real_rows(res):
    """SmolLM2: tokens/s (target >= 1x mlx_lm lora's) and peak memory (target <= its own), with
    the section's settings and with the demo's adapters and masking; one row saying why when it
    was skipped."""
    real = (res.get(SECTION) or {}).get("smollm2")
    if not real:
        return []
    if real.get("skipped"):
        return [report.row("training on SmolLM2", None, None, "", note=f"skipped: {real['skipped']}")]
    tr = res[SECTION]
    runs = f"{len(real['ours'])} reps x {real['iters']} iters, first {real['steps_per_report']}-step window left out"
    rows = _pair_rows(
        real,
        ("SmolLM2", ""),
        f"{real['model']}, batch {tr['batch_size']}, rank {tr['lora_rank']}, {tr['lora_layers']} layers, {runs}",
    )
    demo = real.get("demo")
    if demo:  # results written before the demo's pairing existed have none
        a = demo["adapters"]
        note = f"{real['model']}, train/demo.yaml's top {a['layers']} blocks, rank {a['rank']}, prompts masked, batch {tr['batch_size']}, {runs}"
        rows += _pair_rows(demo, ("SmolLM2, the demo's adapters", " (answer tokens/s)"), note)
        if demo.get("replay"):
            rows += _replay_rows(demo, note)
    return rows


def _replay_rows(demo, note):
    """Ours with the demo's replay against ours without it (the demo pairing's runs): its cost."""
    replay, r = demo["replay"], demo["replay"]["config"]
    labels = dict(
        ours_label="with replay",
        anchor_label="without",
        note=f"{note}; replay: {r['per_step']} window(s) of {REPLAY_WINDOW} tokens a step, KL weight {r['weight']}"
        + (
            f", measured after {replay['warm_steps']} steps (every window once)"
            if replay.get("warm_steps")
            else ""
        ),
    )
    samples = lambda k, v: [x.get(v) for x in (replay if k == "with" else demo)["ours"]]
    paired = lambda v: report.paired_ratio(samples("with", v), samples("without", v))
    return [
        report.row(
            "training tokens/s, SmolLM2 demo with its replay vs without (answer tokens/s)",
            report.median_of(replay, "summary"),
            report.median_of(demo, "ours_summary"),
            "tok/s",
            paired=paired("tokens_per_s"),
            **labels,
        ),
        report.row(
            "training peak memory, SmolLM2 demo with its replay vs without",
            report.median_of(replay, "peak_summary"),
            report.median_of(demo, "ours_peak_summary"),
            "GB",
            paired=paired("peak_mem_gb"),
            **labels,
        ),
    ]


def _pair_rows(pair, names, note):
    """The tokens/s and peak-memory rows of one pairing; names: (what ran, what the rate counts)."""
    what, counted = names
    labels = dict(ours_label="train.train", anchor_label="mlx_lm lora", note=note)
    samples = lambda k, v: [r.get(v) for r in (pair.get(k) or [])]
    paired = lambda v: report.paired_ratio(samples("ours", v), samples("mlx_lm_lora", v))
    return [
        report.row(
            f"training tokens/s (LoRA), {what}{counted}",
            report.median_of(pair, "ours_summary"),
            report.median_of(pair, "mlx_lm_lora_summary"),
            "tok/s",
            target_key="training",
            paired=paired("tokens_per_s"),
            **labels,
        ),
        report.row(
            f"training peak memory (LoRA), {what}",
            report.median_of(pair, "ours_peak_summary"),
            report.median_of(pair, "mlx_lm_lora_peak_summary"),
            "GB",
            target_key="training_peak_memory",
            paired=paired("peak_mem_gb"),
            **labels,
        ),
    ]


def blas_rows(res):
    """Our trainer with the optimised BLAS vs FAST_BLAS=0."""
    tr = res.get(SECTION)
    if not (tr and tr.get("ours_noblas")):
        return []
    return [
        report.row(
            "optimised BLAS, training",
            report.median_of(tr, "ours_summary"),
            report.median_of(tr, "ours_noblas_summary"),
            "tok/s",
            ours_label="BLAS on",
            anchor_label="FAST_BLAS=0",
        )
    ]
