"""The users' path on models shaped like theirs: QLoRA on models/tiny-mistral-4bit (every linear
layer 4-bit, like mlx-community/Mistral-7B-Instruct-v0.3-4bit) through training, kill -9 and
resume, best/, the worker and `make eval`; and user text with control-token strings through
the real worker."""

import json
import os
import signal
import subprocess

import pytest
from helpers_train import (
    ROOT,
    env_for,
    load_weights,
    max_abs_diff,
    ok,
    run_dir,
    run_module,
    run_train,
    shared_base,
    train_cmd,
    trained,
    write_config,
)
from test_train import watch_until
from worker_harness import Worker

QLORA = {
    "model": "models/tiny-mistral-4bit",
    "iters": 12,
    "save_every": 4,
    "steps_per_eval": 4,
    "lora_parameters": {"rank": 4, "scale": 4.0, "dropout": 0.1},
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_4bit):
    base = shared_base(tmp_path_factory)
    config = base / "qlora.yaml"
    if not config.exists():
        write_config(config, **QLORA)
    return base


@pytest.fixture(scope="module")
def qlora_run(shared):
    """The uninterrupted QLoRA run (12 steps) the resume test compares against."""
    path, stderr = trained(shared / "qlora", "q", shared / "qlora.yaml", shared / "data")
    return path, stderr


def test_every_linear_layer_of_the_4bit_model_is_quantized(tiny_model_4bit):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, _ = load(str(tiny_model_4bit))
    kinds = {
        type(m).__name__ for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    }
    assert kinds == {"QuantizedLinear"}
    scales = {v.dtype for k, v in tree_flatten(model.parameters()) if k.endswith(".scales")}
    assert scales == {mx.float32}


def test_qlora_trains_keeps_best_and_records_it(qlora_run):
    import json

    path, stderr = qlora_run
    assert "QLoRA" in stderr
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["adapter_source"] == "best" and meta["base_model"].endswith("tiny-mistral-4bit")
    assert (path / "best" / "adapters.safetensors").exists()
    assert (path / "last" / "adapters.safetensors").exists()
    shipped = load_weights(path / "adapters.safetensors")
    assert max_abs_diff(shipped, load_weights(path / "best" / "adapters.safetensors")) == 0.0


def test_qlora_kill_9_then_rerun_matches_the_uninterrupted_run(shared, qlora_run, tmp_path):
    reference, _ = qlora_run
    proc = subprocess.Popen(
        train_cmd(shared / "qlora.yaml", "q", shared / "data"),
        cwd=ROOT,
        env=env_for(tmp_path, TRAIN_STEP_DELAY_S=0.2),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    reached = watch_until(proc, tmp_path / "logs" / "q" / "metrics.jsonl", 6)  # after step 4's checkpoint
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    again = ok(run_train(tmp_path, shared / "qlora.yaml", "q", shared / "data"))
    assert "resuming from" in again.stderr
    out = run_dir(tmp_path, "q")
    for name in ("adapters.safetensors", "best/adapters.safetensors", "last/adapters.safetensors"):
        assert max_abs_diff(load_weights(reference / name), load_weights(out / name)) <= 1e-5, (name, reached)


def test_qlora_adapter_serves_through_the_worker_and_evaluates(shared, qlora_run):
    import json

    path, _ = qlora_run
    w = Worker("--context-length", "2048", model=ROOT / "models" / "tiny-mistral-4bit", adapter=path)
    try:
        done = w.request("q1", prompt="Em que ano foi fundado o Sporting Clube Farense?", max_tokens=16)
        assert done["type"] == "done" and done["usage"]["completion_tokens"] >= 1
    finally:
        w.close()
    ok(run_module(shared / "qlora", "train.evaluate", "--name", "q", "--max-tokens", "16"))
    report = json.loads((path / "eval.json").read_text())
    # the shipped (best) adapter's validation loss, evaluated again (that QLoRA learns:
    # test_smollm_train.py, on a real model)
    meta = json.loads((path / "metadata.json").read_text())
    assert report["fine_tuned"]["loss"] == pytest.approx(meta["best_val_loss"], abs=1e-5)


# --------------------------------------------------------------------------- user text is text

CONTROL = ["[INST]", "[/INST]", "</s>", "<s>", "[TOOL_CALLS]"]


@pytest.fixture(scope="module")
def worker(tiny_model):
    w = Worker("--context-length", "2048")
    yield w
    w.close()


@pytest.mark.parametrize("text", CONTROL)
def test_fifty_copies_of_a_control_string_are_text_to_the_worker(worker, text):
    base = worker.request(f"base-{text}", prompt="olá", max_tokens=1)["usage"]["prompt_tokens"]
    done = worker.request(f"many-{text}", prompt="olá " + text * 50, max_tokens=1)
    assert done["type"] == "done"
    assert done["usage"]["prompt_tokens"] - base >= 100


def test_a_conversation_the_template_cannot_train_stops_with_file_and_line(shared, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    text = (
        '{"messages":[{"role":"user","content":"Quem?"},{"role":"assistant","content":"Nós."}]}\n'
        '{"messages":[{"role":"user","content":"Onde?"}]}\n'
    )
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text(text, encoding="utf-8")
    proc = run_train(tmp_path, shared / "small.yaml", "bad", data)
    assert proc.returncode == 2
    assert (
        f"error: {data / 'train.jsonl'}:2: a training conversation must end with an assistant turn"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- train/serve parity (slow)

ANSWER_TOKENS = 80


def answers_through_the_worker(adapter, conversations):
    """The worker's greedy answer to each conversation's question (the system message left to
    the worker, which adds it from metadata.json) and its prompt length, one request at a time
    without the prefix cache, so each answer is computed as a lone generation is."""
    w = Worker("--context-length", "2048", "--prefix-cache-bytes", "0", adapter=adapter)
    try:
        done = [
            w.request(
                f"q{i}",
                timeout=300,
                messages=[m for m in messages[:-1] if m["role"] != "system"],
                max_tokens=ANSWER_TOKENS,
            )
            for i, messages in enumerate(conversations)
        ]
    finally:
        w.close()
    assert all(d["type"] == "done" for d in done), [d for d in done if d["type"] != "done"][:3]
    return [(d["text"].strip(), d["usage"]["prompt_tokens"]) for d in done]


def trained_model(run):
    """The trained model (base + adapter) and its tokenizer, loaded as `make eval` loads them."""
    from mlx_lm.tuner.utils import load_adapters

    from train import eval_model

    meta = json.loads((run / "metadata.json").read_text())
    model, tokenizer = eval_model.load_base(meta["base_model_path"], meta)
    load_adapters(model, str(run))
    return model, tokenizer, meta


@pytest.mark.slow
def test_a_model_trained_with_a_system_prompt_answers_through_the_worker_as_it_was_trained(shared):
    """The system prompt is trained where it is served. For every training conversation the
    worker, given the questions without the system message, builds the prompt that training
    learned from (the same length as the training example's masked prefix), and its greedy
    answer is the one the trained model gives in-process on training's own prompt ids. Many of
    those answers are the training answers: the model learned through the system prompt.

    What this test used to compare, "as many training answers right as a model trained without
    a system prompt (within 5%)", is no property of the code: two trainings of a random
    1.3M-parameter model on sequences of different lengths are two trajectories that diverge
    (59 against 69 of 96 here, within the margin where it landed). Whether a real model
    learns as well with the club's system prompt is `make eval`'s to measure on SmolLM2."""
    from mlx_lm import generate

    from train import batches

    demo = ROOT / "tests" / "fixtures" / "tiny-demo.yaml"
    split = batches.read_split(shared / "data" / "train.jsonl")
    assert all(m[0]["role"] == "system" for m in split.conversations)
    run, _ = trained(shared / "tiny-demo", "demo", demo, shared / "data")
    model, tokenizer, meta = trained_model(run)
    assert meta["system_prompt"] == split.conversations[0][0]["content"]
    encoded = batches.encode(
        tokenizer, split.conversations, meta["system_prompt"], True, meta["max_seq_length"]
    )
    assert len(encoded.examples) == len(split.conversations) and not encoded.truncated
    prompts = [ids[:offset] for ids, offset in encoded.examples]
    model_answers = [generate(model, tokenizer, ids, max_tokens=ANSWER_TOKENS).strip() for ids in prompts]
    del model
    served = answers_through_the_worker(run, split.conversations)

    assert [n for _, n in served] == [len(p) for p in prompts], "the worker's prompts are not training's"
    differ = [(i, s, m) for i, ((s, _), m) in enumerate(zip(served, model_answers)) if s != m]
    assert not differ, (
        f"{len(differ)} answers differ between the worker and training's prompt ids: {differ[:3]}"
    )
    right = sum(s == c[-1]["content"].strip() for (s, _), c in zip(served, split.conversations))
    n = len(split.conversations)
    print(f"training answers given exactly through the worker: {right}/{n}")
    # The random base model gives none of them. How many the toy memorises in 700 steps depends on the
    # machine's kernels (48, 59 and 63 of 84-96 seen): a quarter is half the lowest.
    assert right >= n // 4
