"""`make fuse`'s GGUF in real llama.cpp (llama-cpp-python, installed by `make llamacpp`): its
greedy tokens and logits against mlx's base + adapter, its vocabulary against the model's
tokenizer, its chat template rendered by llama.cpp's bindings against core/prompt.py, and the
quantized copies `make gguf-quantize` writes, with their perplexity."""

import json
import shutil

import numpy as np
import pytest
from helpers_train import TINY, ok, reference_run, run_module, shared_base

from core import llamacpp, prompt

if not llamacpp.installed():
    pytest.skip(llamacpp.INSTALL_HINT, allow_module_level=True)

GGUF = "ggml-model-f16.gguf"
TEMPLATES = TINY.parent.parent / "tests" / "fixtures" / "chat_templates"
MAX_TOKENS = 24
# llama.cpp runs the F16 file, mlx the float32 weights: logits may differ by F16 rounding. Stated
# bound: 1% of the largest |logit| (measured on the tiny model: ~0.1%).
LOGIT_TOL = 0.01


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """The session's reference run (30 LoRA steps on the tiny model), fused once: (run, meta)."""
    src = reference_run(shared_base(tmp_path_factory)).parent.parent
    base = tmp_path_factory.mktemp("llamacpp_fused")
    shutil.copytree(src / "models", base / "models")
    shutil.copytree(src / "logs", base / "logs")
    ok(run_module(base, "train.fuse", "--name", "run"))
    run = base / "models" / "run"
    assert (run / "fused" / GGUF).is_file()
    return base, run, json.loads((run / "metadata.json").read_text())


@pytest.fixture(scope="module")
def mlx_models(fused):
    from mlx_lm import load

    _, run, meta = fused
    adapted, tokenizer = load(str(TINY), adapter_path=str(run))
    plain, _ = load(str(TINY))
    tokenizer._tokenizer.chat_template = meta["chat_template"]
    return adapted, plain, tokenizer


@pytest.fixture(scope="module")
def gguf_model(fused):
    _, run, _ = fused
    return llamacpp.load(run / "fused" / GGUF, n_ctx=512, threads=2)


def questions(run):
    lines = (run.parent.parent.parent / "shared_train" / "data" / "valid.jsonl").read_text().splitlines()
    return [json.loads(x)["messages"][-2]["content"] for x in lines if x.strip()][:6]


def mlx_logits(model, ids):
    import mlx.core as mx

    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def test_greedy_tokens_of_the_fused_gguf_in_llamacpp_equal_mlx_base_plus_adapter(
    fused, mlx_models, gguf_model
):
    """Six validation questions, rendered by core/prompt.py with the run's system prompt and passed
    as ids: llama.cpp's greedy continuation on the fused F16 GGUF is mlx's on base + adapter,
    token for token (teacher-forced on llama.cpp's path, so each step's logits are compared too);
    the adapter's own effect is far larger than the difference."""
    _, run, meta = fused
    adapted, plain, tokenizer = mlx_models
    eos = {tokenizer.eos_token_id}
    agree, worst, effect = 0, 0.0, 0.0
    prompts = [
        prompt.encode_prompt(tokenizer, [{"role": "user", "content": q}], meta["system_prompt"])
        for q in questions(run)
    ]
    assert len(prompts) == 6
    for ids in prompts:
        tokens, steps = llamacpp.greedy(gguf_model, ids, MAX_TOKENS, eos)
        path = ids + tokens
        want = mlx_logits(adapted, path)[len(ids) - 1 : len(path) - 1]
        base = mlx_logits(plain, path)[len(ids) - 1 : len(path) - 1]
        got = np.stack(steps)
        assert [int(t) for t in want.argmax(axis=1)] == tokens, (tokenizer.decode(ids), tokens)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        effect = max(effect, float(np.abs(want - base).max() / np.abs(want).max()))
        agree += 1
    assert agree == 6
    assert worst < LOGIT_TOL, f"llama.cpp's logits differ from mlx's by {worst:.2%} of their range"
    assert effect > 20 * worst, f"the adapter's effect ({effect:.2%}) is not far above the difference"


def test_the_gguf_vocabulary_gives_the_model_tokenizers_ids(fused, mlx_models, gguf_model):
    """llama.cpp's own tokenizer on the GGUF (sentencepiece, byte fallback, its dummy-prefix rule)
    gives the ids the model's tokenizer gives: texts after a control token, as a chat template
    writes them, and whole rendered prompts with their markup parsed as control tokens (content
    holding no control strings: the engine passes ids, so such content never reaches this)."""
    _, run, meta = fused
    _, _, tokenizer = mlx_models
    hf = tokenizer._tokenizer
    texts = questions(run) + [meta["system_prompt"], "Olá, Faro! 1910 – «São Luís» ñ 日本 🙂", "a  b\tc\n\nd"]
    for text in texts:
        chat = f"[INST] {text}[/INST]"
        got = gguf_model.tokenize(chat.encode(), add_bos=False, special=True)
        assert got == hf.encode(chat, add_special_tokens=False), text
    for messages in corpus():
        if any(prompt.control_strings(m["content"]) for m in messages):
            continue
        ids = prompt.encode_conversation(tokenizer, messages, add_generation_prompt=True)
        text = prompt.render(tokenizer, messages, add_generation_prompt=True)
        assert gguf_model.tokenize(text.encode(), add_bos=False, special=True) == ids, text
    assert (
        gguf_model.metadata["tokenizer.ggml.add_space_prefix"] == "false"
    )  # see fuse_gguf.prefix_after_special


def corpus():
    """Conversations every fixture template accepts (alternating turns after a system message)."""
    s, u1, a1, u2 = "És o assistente do Farense.", "Quem fundou o clube?", " Em 1910. ", "E o estádio?"
    return [
        [{"role": "user", "content": u1}],
        [{"role": "system", "content": s}, {"role": "user", "content": u1}],
        [
            {"role": "user", "content": u1},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": u2},
        ],
        [
            {"role": "system", "content": s},
            {"role": "user", "content": u1},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": u2},
        ],
        [
            {"role": "system", "content": "linha 1\nlinha 2"},
            {"role": "user", "content": "[INST] </s> <s> «ñ» 🙂"},
        ],
    ]


def test_llamacpp_renders_the_gguf_template_as_core_prompt_does(fused, mlx_models, gguf_model):
    """The template stored in the GGUF, rendered by llama.cpp's bindings (Jinja2ChatFormatter, with
    the GGUF's BOS/EOS pieces), writes what core/prompt.py writes for the corpus: the system prompt
    folded into the first user turn (Mistral v0.3 would put it before the last one)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, _, tokenizer = mlx_models
    meta = gguf_model.metadata
    vocab = [
        gguf_model.detokenize([i], special=True).decode()
        for i in (gguf_model.token_bos(), gguf_model.token_eos())
    ]
    formatter = Jinja2ChatFormatter(meta["tokenizer.chat_template"], bos_token=vocab[0], eos_token=vocab[1])
    for messages in corpus():
        got = formatter(messages=messages).prompt
        assert got == prompt.render(tokenizer, messages, add_generation_prompt=True), messages
    folded = formatter(messages=corpus()[3]).prompt
    assert (
        folded.startswith("<s>[INST] És o assistente do Farense.\n\nQuem fundou")
        and folded.count("Farense.") == 1
    )


@pytest.mark.parametrize("name", sorted(p.stem for p in TEMPLATES.glob("*.jinja")))
def test_standalone_templates_render_as_core_prompt_for_every_fixture_template(name, tiny_model):
    """core.prompt.standalone_template (what the GGUF stores) for every fixture template: kept
    where the template keeps a leading system message (ChatML, Llama 3), folded elsewhere."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    hf = tokenizer._tokenizer
    hf.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    formatter = Jinja2ChatFormatter(prompt.standalone_template(tokenizer), hf.eos_token, hf.bos_token)
    for messages in corpus():
        assert formatter(messages=messages).prompt == prompt.render(tokenizer, messages, True), (
            name,
            messages,
        )


def test_gguf_quantize_writes_q8_0_and_q4_0_with_their_perplexity(fused):
    """`make gguf-quantize`: llama.cpp's quantizer writes each type next to the F16 file; each is
    loaded in llama.cpp and measured on the validation answers. The F16 file's perplexity is mlx's
    fused model's (the same forward pass in another engine); Q8_0 moves it by under 1%; Q4_0 is
    the smallest file."""
    base, run, _ = fused
    proc = ok(run_module(base, "train.gguf_quantize", "--name", "run", "--types", "Q8_0,Q4_0"))
    report = json.loads((run / "fused" / "gguf_quantize.json").read_text())
    rows = {r["type"]: r for r in report["files"]}
    assert list(rows) == ["F16", "Q8_0", "Q4_0"], report
    for row in rows.values():
        assert (run / "fused" / row["file"]).stat().st_size == row["bytes"]
        assert row["answer_tokens"] == rows["F16"]["answer_tokens"] > 100
    assert rows["F16"]["perplexity"] == pytest.approx(report["mlx_fused_perplexity"], rel=0.01)
    assert abs(rows["Q8_0"]["perplexity_change"]) < 0.01, rows["Q8_0"]
    assert rows["Q4_0"]["bytes"] < rows["Q8_0"]["bytes"] < rows["F16"]["bytes"]
    assert 4 < rows["Q4_0"]["bits_per_weight"] < rows["Q8_0"]["bits_per_weight"] < 9
    assert "Q8_0" in proc.stdout and "vs F16" in proc.stdout


def test_the_adapter_as_gguf_lora_on_the_base_gguf_equals_the_fused_gguf(fused, mlx_models):
    """train.gguf_lora: the run's adapter in llama.cpp's GGUF-LoRA format, applied by llama.cpp to
    the base exported as GGUF, gives the fused GGUF's logits (one base, several adapters); the
    base alone does not."""
    from worker.llamacpp_seqs import Sequences, Work

    base, run, meta = fused
    _, _, tokenizer = mlx_models
    proc = ok(run_module(base, "train.gguf_lora", "--name", "run", "--base"))
    assert "28 adapted weights" in proc.stderr, proc.stderr
    files = {"fused": (run / "fused" / GGUF, None), "base": (run / "base-gguf" / GGUF, None)}
    files["lora"] = (files["base"][0], run / "ggml-lora.gguf")
    prompts = [
        prompt.encode_prompt(tokenizer, [{"role": "user", "content": q}], meta["system_prompt"])
        for q in questions(run)[:3]
    ]
    out = {}
    for name, (path, lora) in files.items():
        seqs = Sequences(path, n_ctx=512, slots=3, threads=2, lora=lora)
        try:
            out[name] = seqs.decode([Work(i, ids, 0) for i, ids in enumerate(prompts)])
        finally:
            seqs.close()
    for i in range(3):
        want, scale = out["fused"][i], np.abs(out["fused"][i]).max()
        assert np.abs(out["lora"][i] - want).max() < LOGIT_TOL * scale, i
        assert np.abs(out["base"][i] - want).max() > 20 * np.abs(out["lora"][i] - want).max(), i


def test_a_byte_level_bpe_model_with_tied_embeddings_exports_and_runs_in_llamacpp(tmp_path, smollm_model):
    """SmolLM2-135M-Instruct (byte-level BPE, tied embeddings, ChatML) through make fuse's exporter:
    gpt2 vocabulary with its merges and pre-tokenizer, no output.weight; llama.cpp tokenizes chat
    text into the model's ids and its greedy answers are mlx's, token for token."""
    import mlx.core as mx
    from mlx_lm import load

    from train import fuse_gguf

    model, tokenizer, config = load(str(smollm_model), return_config=True)
    assert config["tie_word_embeddings"] and not (smollm_model / "tokenizer.model").exists()
    texts = ["Em que ano foi fundado o Farense?", "Olá! 1910 – «São Luís» ñ 日本 🙂 12345", "a  b\tc\n\nd"]
    result = fuse_gguf.export(
        tmp_path, smollm_model, model, config, tokenizer, tokenizer._tokenizer.chat_template, texts
    )
    assert result["file"] == GGUF, result["note"]
    assert "byte-level BPE" in result["note"] and "by llama.cpp itself" in result["note"], result["note"]
    gguf_model = llamacpp.load(tmp_path / GGUF, n_ctx=512, threads=2)
    assert gguf_model.metadata["tokenizer.ggml.model"] == "gpt2"
    for question in ("What is the capital of Portugal?", texts[0]):
        ids = prompt.encode_prompt(tokenizer, [{"role": "user", "content": question}], "You are helpful.")
        text = prompt.render(
            tokenizer,
            [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": question}],
            True,
        )
        assert gguf_model.tokenize(text.encode(), add_bos=False, special=True) == ids
        tokens, steps = llamacpp.greedy(gguf_model, ids, 16, {tokenizer.eos_token_id})
        path = ids + tokens
        want = np.array(model(mx.array([path]))[0].astype(mx.float32))[len(ids) - 1 : len(path) - 1]
        assert [int(t) for t in want.argmax(axis=1)] == tokens, question
        assert np.abs(np.stack(steps) - want).max() < LOGIT_TOL * np.abs(want).max()


def test_without_llamacpp_the_error_says_how_to_install_it(tmp_path):
    """llama_cpp hidden from the import system: require() and gguf-quantize say `make llamacpp`."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['llama_cpp'] = None\n"
        "from train import gguf_quantize\n"
        "sys.exit(gguf_quantize.main(['--name', 'nothing', '--models-dir', sys.argv[1]]))"
    )
    (tmp_path / "nothing").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=TINY.parent.parent, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "make llamacpp" in proc.stderr, proc.stderr
