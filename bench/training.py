"""`make bench` section **training**: `python -m train.train` vs `python -m bench.anchors lora`
(= `mlx_lm lora` with the same BLAS loaded first) on the same model, data (the system message
folded into the first user turn for mlx-lm, as our trainer does for a template without a system
role), batch size, LoRA rank and layers, iterations, `mask_prompt: false` on both (both then
count every sequence token); tokens/s over the report windows, the first (warm-up) left out;
the two alternate, and our trainer also runs under `FAST_BLAS=0`."""

import json
import shlex
import sys
from pathlib import Path

from bench import report
from bench.common import TINY, log, rel, run_logged, sub_env

SECTION = "training"
PLAN = {
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
    ),
}

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
    cmd = [sys.executable, "-m", "train.train", "--config", str(cfg), "--name", name]
    cmd += ["--model", str(plan["train_model"]), "--data", str(data), "--iters", str(iters)]
    cmd += ["--batch-size", str(plan["train_batch"]), "--lora-rank", str(plan["lora_rank"])]
    cmd += ["--lora-layers", str(plan["lora_layers"]), "--fresh"]
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
    cmd = [sys.executable, "-m", "bench.anchors", "lora", "--model", str(plan["train_model"]), "--train"]
    cmd += ["--data", str(folded), "--iters", str(iters), "--batch-size", str(plan["train_batch"])]
    cmd += ["--num-layers", str(plan["lora_layers"]), "--adapter-path", str(Path(tmp) / name), "-c", str(cfg)]
    # FAST_BLAS_ROLE=train: the BLAS settings `make calibrate` chose for training, as train.train has
    env = sub_env(tmp, BENCH_LORA_METRICS=metrics, NO_COLOR=1, COLUMNS=120, FAST_BLAS_ROLE="train")
    wall = run_logged(cmd, env, Path(tmp) / f"{name}.log")
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


def section(ctx):
    plan, tmp = ctx.plan, ctx.tmp
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
    ctx.res[SECTION] = out
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


def _median(tr, key):
    return (tr.get(key) or {}).get("median")


def rows(res):
    tr = res.get(SECTION)
    if not tr:
        return []
    samples = lambda k: [r.get("tokens_per_s") for r in (tr.get(k) or [])]
    return [
        report.row(
            "training tokens/s (LoRA)",
            _median(tr, "ours_summary"),
            _median(tr, "mlx_lm_lora_summary"),
            "tok/s",
            ours_label="train.train",
            anchor_label="mlx_lm lora",
            target_key="training",
            paired=report.paired_ratio(samples("ours"), samples("mlx_lm_lora")),
            note=f"{tr['model']}, batch {tr['batch_size']}, rank {tr['lora_rank']}, "
            f"{tr['lora_layers']} layers, {tr['iters']} iters",
        )
    ]


def blas_rows(res):
    """Our trainer with the optimised BLAS vs FAST_BLAS=0."""
    tr = res.get(SECTION)
    if not (tr and tr.get("ours_noblas")):
        return []
    return [
        report.row(
            "optimised BLAS, training",
            _median(tr, "ours_summary"),
            _median(tr, "ours_noblas_summary"),
            "tok/s",
            ours_label="BLAS on",
            anchor_label="FAST_BLAS=0",
        )
    ]


def models_note(plan):
    return (
        f"training on {rel(plan['train_model'])} ({plan['train_reps']} reps x {plan['train_iters']} iters, "
        f"first {plan['train_report']}-step window left out)"
    )
