"""The foundation: the tiny model, both families' tokenizers (the tiny Mistral v0.3 one and
SmolLM2's byte-level BPE), the shared prompt function, the config loader and the optimised BLAS
in real entry-point processes."""

import hashlib
import os
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT

PORTUGUESE = [
    "Olá! O Sporting Clube Farense foi fundado em 1910, em Faro.",
    "Estádio de São Luís — «Leões de Faro», preto e branco. Açúcar, pão, coração!",
    "  espaços  à esquerda e à direita  ",
    "linha 1\nlinha 2\r\n\ttabulação",
    "emoji 🦁⚽ e CJK 法鲁 e árabe فارو",
]


FAMILIES = {"mistral": "tiny_model", "smollm2": "smollm_model"}
# SmolLM2's vocabulary has no token for these bytes (tests/test_base_model.py lists them): text
# containing them loses them, as with the original tokenizer. 0xF1/0xF2 lead U+40000-U+BFFFF.
SMOLLM_UNTOKENIZABLE = "\x04\x06\x13\x14\x16\x1d"


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(name, the family's model folder)."""
    return request.param, request.getfixturevalue(FAMILIES[request.param])


@pytest.fixture(scope="module")
def tokenizer(family):
    from transformers import AutoTokenizer

    return family[0], AutoTokenizer.from_pretrained(str(family[1]))


def test_tiny_model_shape(tiny_model):
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten

    model, tok = mlx_lm.load(str(tiny_model))
    import json

    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "mistral"
    params = dict(tree_flatten(model.parameters()))
    n = sum(v.size for v in params.values())
    assert 300_000 <= n <= 5_000_000
    assert all(v.dtype == mx.float32 for v in params.values())
    assert "[INST]" in tok.apply_chat_template(
        [{"role": "user", "content": "Olá"}], tokenize=False, add_generation_prompt=True
    )


def test_tiny_model_build_is_deterministic(tiny_model, tiny_model_4bit, tmp_path):
    out = tmp_path / "tiny-mistral"
    subprocess.run(
        [sys.executable, "-m", "train.tiny_model", "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    for built_dir, shipped_dir in ((out, tiny_model), (tmp_path / "tiny-mistral-4bit", tiny_model_4bit)):
        built = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in built_dir.iterdir()}
        shipped = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in shipped_dir.iterdir()}
        assert built == shipped, shipped_dir


def test_tokenizer_loads_offline_with_transformers(family):
    code = (
        "from transformers import AutoTokenizer; "
        f"t = AutoTokenizer.from_pretrained({str(family[1])!r}); "
        "print(t.decode(t.encode('São Luís', add_special_tokens=False)))"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "São Luís"


def _round_trip(name, text):
    """What the tokenizer gives back. Mistral v0.3's: the dummy prefix and a leading space share
    the first piece's "▁", and decoding strips one leading space. SmolLM2's byte-level BPE: the
    text itself (no dummy prefix)."""
    if name == "mistral" and text.startswith(" "):
        return text[1:]
    return text


@pytest.mark.parametrize("text", PORTUGUESE)
def test_tokenizer_round_trips_portuguese(tokenizer, text):
    name, tok = tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == _round_trip(name, text)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=60))
def test_tokenizer_round_trips_any_utf8(tokenizer, text):
    name, tok = tokenizer
    if name == "smollm2":  # the bytes its vocabulary lacks (control characters, U+40000-U+BFFFF)
        text = "".join(c for c in text if c not in SMOLLM_UNTOKENIZABLE and not 0x40000 <= ord(c) < 0xC0000)
    # split_special_tokens: text like "<s>" or "<|im_end|>" stays text (hypothesis finds it).
    ids = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert tok.decode(ids) == _round_trip(name, text)


def test_prompt_folds_system_into_first_user_turn(tiny_model):
    import mlx_lm

    from core import prompt

    _, tok = mlx_lm.load(str(tiny_model))
    assert not prompt.accepts_system_role(tok)  # v0.3 moves it to the last user turn
    messages = [
        {"role": "user", "content": "Quem somos?"},
        {"role": "assistant", "content": "O Farense."},
        {"role": "user", "content": "E o estádio?"},
    ]
    text = prompt.render(tok, prompt.with_system_prompt(messages, "És o assistente."), True)
    assert text == "<s>[INST] És o assistente.\n\nQuem somos?[/INST] O Farense.</s>[INST] E o estádio?[/INST]"


def test_training_example_starts_with_the_served_prompt(family):
    import mlx_lm

    from core import prompt

    _, tok = mlx_lm.load(str(family[1]))
    conv = [
        {"role": "user", "content": "Qual é o estádio?"},
        {"role": "assistant", "content": "Estádio de São Luís."},
        {"role": "user", "content": "E as cores?"},
        {"role": "assistant", "content": "Preto e branco."},
    ]
    ids, n = prompt.encode_example(tok, conv, system_prompt="Sê breve.")
    served = prompt.encode_prompt(tok, conv[:-1], system_prompt="Sê breve.")
    assert ids[:n] == served
    assert (
        tok.decode(ids[n:]) == "Preto e branco." + tok.eos_token
    )  # Mistral: decode strips the leading space
    assert ids[-1] == tok.eos_token_id and tok.eos_token in ("</s>", "<|im_end|>")


def test_config_rejects_unknown_key_naming_file(tmp_path):
    from core.config import ConfigError, load_config

    bad = tmp_path / "c.yaml"
    bad.write_text("iters: 10\nlora_parameters:\n  rnak: 4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: lora_parameters: unknown key 'rnak'"):
        load_config(bad)
    good = tmp_path / "g.yaml"
    good.write_text("learning_rate: 1e-4\ntrain: true\n")  # an mlx-lm key is ignored
    cfg = load_config(good, {"iters": "7", "lora_parameters.rank": "4"})
    assert cfg["learning_rate"] == 1e-4 and cfg["iters"] == 7 and cfg["lora_parameters"]["rank"] == 4


def test_config_passes_an_optimizers_own_settings_through(tmp_path):
    """optimizer_config carries mlx-lm's per-optimizer arguments (eps, betas, weight_decay):
    they reach the optimizer; a typo elsewhere is still refused."""
    from core.config import ConfigError, load_config
    from train.method import make_optimizer

    cfg_file = tmp_path / "o.yaml"
    cfg_file.write_text("optimizer_config:\n  adam:\n    eps: 1.0e-5\n    betas: [0.8, 0.99]\n")
    opt = make_optimizer(load_config(cfg_file))
    assert opt.eps == 1e-5 and list(opt.betas) == [0.8, 0.99]
    cfg_file.write_text("optimizer_config:\n  adam:\n    eps: 1.0e-5\nlora_parameters:\n  sclae: 2\n")
    with pytest.raises(ConfigError, match="lora_parameters: unknown key 'sclae'"):
        load_config(cfg_file)


# --- optimised BLAS in real entry-point processes ---------------------------------------


def _openblas_installed():
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    return "libopenblas.so.0" in out or "libmkl_rt" in out


def _maps_when_mlx_loaded(proc, timeout=60):
    """The process's memory map once libmlx.so is mapped (so BLAS loading is decided)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            maps = open(f"/proc/{proc.pid}/maps").read()
        except FileNotFoundError:
            break
        if "libmlx" in maps:
            return maps
        time.sleep(0.05)
    raise AssertionError("the process never loaded mlx")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS loading is Linux-only")
@pytest.mark.parametrize("disable", [False, True])
def test_trainer_process_maps_optimised_blas(tiny_model, tmp_path, disable):
    if not _openblas_installed():
        pytest.skip("no optimised BLAS installed (apt-get install libopenblas0-pthread)")
    env = dict(os.environ, FAST_BLAS="0" if disable else "1")
    # tiny_model's builder is a real training entry point (it pretrains with mlx).
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.tiny_model", "--out", str(tmp_path / "m"), "--steps", "200"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        maps = _maps_when_mlx_loaded(proc)
    finally:
        proc.kill()
        stderr = proc.communicate()[1]
    loaded = "libopenblas" in maps or "libmkl" in maps
    if disable:
        assert not loaded and "disabled by FAST_BLAS=0" in stderr
    else:
        assert loaded, "an optimised BLAS is installed but was not loaded into the process"
        assert "fast-blas: loaded" in stderr


def test_fast_blas_matmul_is_correct():
    """The optimised BLAS (and the kernels chosen for this CPU) compute what float64 does."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    for m, k, n in [(1, 768, 2048), (7, 128, 1024), (64, 300, 65)]:  # decode, prefill, odd
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        got = np.array(mx.array(a) @ mx.array(b))
        want = a.astype(np.float64) @ b.astype(np.float64)
        assert np.abs(got - want).max() < 1e-3 * np.sqrt(k)
