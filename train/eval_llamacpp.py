"""`make eval ENGINE=llamacpp` (python -m train.evaluate --engine llamacpp): the fine-tuned
model's answers through the llama.cpp engine beside mlx's, judged the same way.

The questions train/evaluate.py asked mlx are asked again of `python -m worker --engine
llamacpp --adapter RUN` (the run's fused GGUF by default, written by make fuse; or --gguf, e.g. a
quantized one): the serving path itself - the run's system prompt and chat template rendered by
core/prompt.py, token ids handed to llama.cpp - greedy (temperature 0), the same max_tokens, no
stop strings, nothing truncated (overflow: error). train/eval_model.py judges the answers; here
they are set beside mlx's: per measure (the split's key facts, the paraphrases', the out-of-scope
declines) the two counts may differ by at most one question (RULE).
"""

import json
import subprocess
import sys
from pathlib import Path

from train import eval_report

RULE = (
    "engines: through the llama.cpp engine, each key-fact measure (the split's, the paraphrases', "
    "the out-of-scope declines) equals mlx's within one question"
)


class EngineError(Exception):
    """The llama.cpp worker could not answer (not installed, no GGUF, a request refused)."""


def fused_gguf(run_dir):
    """The GGUF make fuse writes, which the worker's llama.cpp engine serves by default."""
    return run_dir / "fused" / "ggml-model-f16.gguf"


def unavailable(run_dir, gguf=None):
    """Why the llama.cpp engine cannot answer for this run (checked before mlx's evaluation),
    or None."""
    from core import llamacpp

    try:
        llamacpp.require()
    except llamacpp.NotInstalled as e:
        return str(e)
    gguf = gguf or fused_gguf(run_dir)
    if not Path(gguf).is_file():
        return f"{gguf} is missing: make fuse NAME={Path(run_dir).name} writes the run's GGUF (or give --gguf FILE)"
    return None


def answer(run_dir, conversations, max_tokens, *, model=None, gguf=None):
    """Greedy answers (text, stripped as eval_model's) to conversations ending with a user turn,
    from one llama.cpp worker process given them all at once (it batches them)."""
    cmd = [sys.executable, "-m", "worker", "--engine", "llamacpp", "--adapter", str(run_dir)]
    cmd += ["--max-queue", str(len(conversations))]
    for option, value in (("--model", model), ("--gguf", gguf)):
        cmd += [option, str(value)] if value else []
    requests = "".join(
        json.dumps(
            {"id": str(i), "messages": m, "max_tokens": max_tokens, "temperature": 0, "overflow": "error"},
            ensure_ascii=False,
        )
        + "\n"
        for i, m in enumerate(conversations)
    )
    proc = subprocess.run(cmd, input=requests, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EngineError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    texts = {}
    for line in proc.stdout.splitlines():
        msg = json.loads(line)
        if msg["type"] == "error":
            which = f"question {int(msg['id']) + 1}" if msg.get("id") is not None else "a request"
            raise EngineError(f"{which}: {msg['code']}: {msg['message']}")
        if msg["type"] == "done":
            texts[msg["id"]] = msg["text"].strip()
    missing = [i for i in range(len(conversations)) if str(i) not in texts]
    if missing:
        raise EngineError(f"the llama.cpp worker ended without answering request(s) {missing[:5]}")
    return [texts[str(i)] for i in range(len(conversations))]


def compare(split, mlx, llamacpp, gguf):
    """eval.json's "llamacpp" section: each measure's counts for both engines, whether they agree
    within one question, how many answers are the same text, and every question judged apart."""
    measures = {split: ("key_facts", "correct"), "paraphrases": ("sets", "correct")}
    measures["out_of_scope"] = ("sets", "declined")
    rows, differ = {}, []
    for name, (where, key) in measures.items():
        sides = [_measure(r, name, where) for r in (mlx, llamacpp)]
        if sides[0] is None:
            continue
        rows[name] = {"of": sides[0]["of"], "mlx": sides[0][key], "llamacpp": sides[1][key]}
        differ += _judged_apart(name, mlx, llamacpp)
    mine, theirs = _every_answer(mlx), _every_answer(llamacpp)
    same = sum(a == b for a, b in zip(mine, theirs))
    return {
        "gguf": str(gguf),
        "measures": rows,
        "within_one_question": all(abs(r["mlx"] - r["llamacpp"]) <= 1 for r in rows.values()),
        "rule": RULE,
        "identical_answers": same,
        "answers": len(mine),
        "judged_apart": differ,
        "llamacpp_answers": theirs,
    }


def _every_answer(result):
    """The split's answers, then each evaluation set's: the order the questions were asked in."""
    return result["answers"] + [a for s in result["sets"].values() for a in s["answers"]]


def _measure(result, name, where):
    if where == "key_facts":
        return result["key_facts"]
    return result["sets"][name]["summary"] if name in result["sets"] else None


def _judged_apart(name, mlx, llamacpp):
    if name in mlx["sets"]:
        pairs = zip(mlx["sets"][name]["judgements"], llamacpp["sets"][name]["judgements"])
        answers = zip(mlx["sets"][name]["answers"], llamacpp["sets"][name]["answers"])
    else:
        pairs, answers = (
            zip(mlx["judgements"], llamacpp["judgements"]),
            zip(mlx["answers"], llamacpp["answers"]),
        )
    return [
        {"set": name, "index": i, "mlx": a, "llamacpp": b, "mlx_ok": j["ok"], "llamacpp_ok": k["ok"]}
        for i, ((j, k), (a, b)) in enumerate(zip(pairs, answers))
        if j is not None and j["ok"] != k["ok"]
    ]


def _label(name):
    return "declines, out of scope" if name == "out_of_scope" else f"key facts, {name}"


def console(section):
    verdict = (
        "within one question" if section["within_one_question"] else "DIFFERENT (more than one question)"
    )
    lines = [f"llama.cpp engine ({section['gguf']}) vs mlx, fine-tuned: {verdict}"]
    lines += [
        f"  {name:24} {r['mlx']}/{r['of']} -> {r['llamacpp']}/{r['of']}"
        for name, r in section["measures"].items()
    ]
    lines.append(f"  identical answers        {section['identical_answers']}/{section['answers']}")
    return "\n".join(lines)


def markdown(section):
    lines = ["", "## The llama.cpp engine", "", f"`{section['gguf']}`: {section['rule']}.", ""]
    lines += ["| measure | mlx | llama.cpp |", "|---|---|---|"]
    lines += [
        f"| {name} | {r['mlx']}/{r['of']} | {r['llamacpp']}/{r['of']} |"
        for name, r in section["measures"].items()
    ]
    lines += ["", f"Identical answers: {section['identical_answers']}/{section['answers']}."]
    cell = eval_report._cell
    if section["judged_apart"]:
        lines += ["", "| set | # | mlx | llama.cpp |", "|---|---|---|---|"]
        for d in section["judged_apart"]:
            marks = ["✓" if d[k] else "✗" for k in ("mlx_ok", "llamacpp_ok")]
            lines.append(
                f"| {d['set']} | {d['index'] + 1} | {cell(d['mlx'])} {marks[0]} | {cell(d['llamacpp'])} {marks[1]} |"
            )
    return "\n".join(lines) + "\n"
