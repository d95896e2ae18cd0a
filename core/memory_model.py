"""The memory model: what a model needs, from its config.json and the settings (formulas in
docs/MEMORY.md). Pure arithmetic; mlx only to read a loaded model's shape.

- weight bytes (quantized layers: bits/8 per weight + a scale and a bias per group),
- LoRA + optimizer state: the trainable parameters, their gradients and AdamW's two moments,
- activation bytes per token in training, with and without gradient checkpointing,
- KV-cache bytes per token in serving, and what one prompt token of a prefill chunk needs.

Training's peak and the batch that fits are core/training_budget.py's; the worker's limits
core/worker_budget.py's; the budget itself core/memory.py's.
"""

import json
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
ADAM_MOMENTS = {"adam": 2, "adamw": 2, "sgd": 1, "muon": 1, "adafactor": 1}
LORA_KEYS = 7  # mlx-lm adapts every linear layer of a block: q k v o gate up down
ACT_FACTOR = 0.82  # share of a block's intermediates alive at the backward pass (measured)
LOGIT_COPIES = 5  # logits, log-softmax and their gradients, float32 (measured) ...
LOGIT_COPIES_CHECKPOINTED = 2  # ... and at the peak of a checkpointed step
SCORES_CHECKPOINTED = 4  # attention score matrices in flight while a block is recomputed
# A replay step (train/loss.py ReplayLoss) holds, beside an ordinary step's logits, the base
# model's logits and log-probabilities and the KL's terms at every position: 2.1-2.2 more
# float32 copies of the vocabulary per token, measured on SmolLM2-135M and gemma-3-270m
# (batch 1-8 of 128-token windows); counted as 3, an upper bound as LOGIT_COPIES is.
REPLAY_LOGIT_COPIES = 3
# The process itself, beside mlx's buffers: Python, mlx, mlx-lm, transformers, the BLAS and the
# tokenizer. Measured with SmolLM2-135M on Linux (docs/MEMORY.md): 137 MB of RSS before the
# weights load; at the peak, 167 MB of RSS beside mlx's peak in training and 155 MB in the
# worker beside its arrays and buffer cache. Added to a process's predicted resident peak.
RUNTIME_BYTES = 150 * 10**6


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype_bytes: int  # unquantized weights and activations
    bits: int | None = None  # quantized: bits per weight
    group_size: int | None = None
    scale_bytes: int | None = None  # the dtype of the scales and biases

    @property
    def q_dim(self):
        return self.heads * self.head_dim

    @property
    def kv_dim(self):
        return self.kv_heads * self.head_dim


def read_config(model_path):
    """config.json of a local model folder (a dict)."""
    return json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))


def shape_from_config(config, dtype=None, scales_dtype=None):
    """The numbers the memory model needs, from a (Mistral/Llama-shaped) config.json.

    dtype: of unquantized weights and activations (default: the config's torch_dtype, else
    float16); scales_dtype: of quantization scales and biases (default: the same)."""
    text = config.get("text_config") or {}
    get = lambda k, d=None: config.get(k, text.get(k, d))  # noqa: E731
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    dtype = dtype or get("torch_dtype") or get("dtype") or "float16"
    quant = get("quantization") or get("quantization_config") or None
    bits = group = scale_bytes = None
    if isinstance(quant, dict) and quant.get("bits"):
        bits, group = int(quant["bits"]), int(quant.get("group_size", 64))
        scale_bytes = DTYPE_BYTES[scales_dtype or quant.get("scales_dtype") or dtype]
    return Shape(
        hidden=hidden,
        layers=int(get("num_hidden_layers")),
        heads=heads,
        kv_heads=int(get("num_key_value_heads") or heads),
        head_dim=int(get("head_dim") or hidden // heads),
        intermediate=int(get("intermediate_size")),
        vocab=int(get("vocab_size")),
        tied=bool(get("tie_word_embeddings", False)),
        dtype_bytes=DTYPE_BYTES[dtype],
        bits=bits,
        group_size=group,
        scale_bytes=scale_bytes,
    )


def shape_from_model(model):
    """The Shape of a loaded mlx-lm model (its args, and quantization read off its layers)."""
    import mlx.core as mx
    import mlx.nn as nn

    args = vars(model.args) if hasattr(model, "args") else {}
    config = {k: v for k, v in args.items() if isinstance(v, (int, float, bool, str)) or v is None}
    dtypes = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
    norm = model.layers[0].input_layernorm.weight
    config["torch_dtype"] = dtypes.get(norm.dtype, "float16")
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear) and getattr(m, "bits", None):
            config["quantization"] = {"bits": m.bits, "group_size": m.group_size}
            return shape_from_config(config, scales_dtype=dtypes.get(m.scales.dtype, "float16"))
    return shape_from_config(config)


def _matrix_bytes(s, rows, cols):
    """A weight matrix as stored: quantized when the model is and cols divide into groups."""
    if s.bits and cols % s.group_size == 0:
        return rows * cols * s.bits // 8 + 2 * rows * (cols // s.group_size) * s.scale_bytes
    return rows * cols * s.dtype_bytes


def block_linears(s):
    """(out, in) of each linear layer of one block."""
    h, q, kv, i = s.hidden, s.q_dim, s.kv_dim, s.intermediate
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def weight_bytes(s):
    """The base model's weights as loaded."""
    block = sum(_matrix_bytes(s, o, i) for o, i in block_linears(s)) + 2 * s.hidden * s.dtype_bytes
    embed = _matrix_bytes(s, s.vocab, s.hidden)
    head = 0 if s.tied else _matrix_bytes(s, s.vocab, s.hidden)
    return s.layers * block + embed + head + s.hidden * s.dtype_bytes


def adapted_layers(s, num_layers):
    return s.layers if num_layers < 0 else min(num_layers, s.layers)


def trainable_parameters(s, num_layers=16, rank=8, fine_tune_type="lora"):
    """LoRA: rank x (in + out) per linear layer of the adapted blocks (DoRA adds a magnitude
    per output); full: the adapted blocks' own weights."""
    n = adapted_layers(s, num_layers)
    if fine_tune_type == "full":
        per_block = sum(o * i for o, i in block_linears(s)) + 2 * s.hidden
    else:
        per_block = sum(rank * (o + i) for o, i in block_linears(s))
        if fine_tune_type == "dora":
            per_block += sum(o for o, _ in block_linears(s))
    return n * per_block


def training_state_bytes(s, num_layers=16, rank=8, fine_tune_type="lora", optimizer="adamw"):
    """{parameters, gradients, optimizer}: LoRA weights are float32; full fine-tuning keeps
    the model's dtype."""
    per = 4 if fine_tune_type != "full" else s.dtype_bytes
    params = trainable_parameters(s, num_layers, rank, fine_tune_type) * per
    moments = ADAM_MOMENTS.get(str(optimizer).lower(), 2)
    return {"parameters": params, "gradients": params, "optimizer": moments * params}


def _block_activations(s):
    """Elements one block keeps per token for its backward pass (before ACT_FACTOR): the input,
    norms, q/k/v before and after RoPE, attention output, residuals, the MLP's gate, up,
    SiLU and product."""
    return 8 * s.hidden + 5 * s.intermediate + 3 * s.q_dim + 3 * s.kv_dim


def activation_bytes_per_token(s, seq_len, num_layers=16, grad_checkpoint=False):
    """Training activations per token of a batch padded to seq_len.

    Without checkpointing each adapted block keeps its intermediates and its attention
    probabilities (heads x seq_len per token; blocks below the adapted ones keep nothing);
    with it every block keeps only its input (twice: input and residual), and one block at a
    time recomputes the rest (with SCORES_CHECKPOINTED score matrices in flight). Plus the
    logits and their gradients (float32 copies of vocab per token), counted for every token:
    train/loss.py computes them at the loss targets only, so with the prompts masked this is
    an upper bound."""
    a = s.dtype_bytes
    block = ACT_FACTOR * _block_activations(s) * a
    scores = s.heads * seq_len * a
    if grad_checkpoint:
        return int(
            2 * s.layers * s.hidden * a
            + block
            + SCORES_CHECKPOINTED * scores
            + LOGIT_COPIES_CHECKPOINTED * s.vocab * 4
        )
    n = adapted_layers(s, num_layers)
    return int(n * (block + scores) + scores + LOGIT_COPIES * s.vocab * 4)


def replay_bytes_per_token(s, window, num_layers=16, grad_checkpoint=False):
    """Training activations per token of a replay batch (raw-text windows of `window` tokens):
    an ordinary step's, plus the base model's logits and the KL's (REPLAY_LOGIT_COPIES)."""
    return activation_bytes_per_token(s, window, num_layers, grad_checkpoint) + (
        REPLAY_LOGIT_COPIES * s.vocab * 4
    )


def kv_bytes_per_token(s):
    """Serving: keys and values of every layer (fp16 for a float16/4-bit model)."""
    return 2 * s.layers * s.kv_dim * s.dtype_bytes


def prefill_bytes_per_token(s, context_length, fused_attention=True):
    """Serving: what one prompt token of a prefill chunk needs in flight: one block's
    intermediates, plus its attention scores where attention is not fused (mlx's CPU backend
    materializes them; Metal and CUDA do not).

    No logits: mlx-lm's BatchGenerator evaluates only the KV cache after a prefill chunk
    (`mx.eval([c.state for c in cache])` in PromptProcessingBatch.prompt), so the lazy graph of
    the chunk's logits is dropped, never computed; only a prompt's last token goes through the
    decode step, which computes logits for one token per sequence. Measured with SmolLM2-135M
    (vocabulary 49,152, float32) on the CPU: counting the chunk's logits planned 1,504 MB for 4
    requests filling a 512-token context where the worker's RSS peaked at 954 MB; without them
    the plan is within 20% (docs/MEMORY.md, "SmolLM2-135M on this machine")."""
    a = s.dtype_bytes
    scores = 0 if fused_attention else s.heads * context_length * a
    return int(_block_activations(s) * a + scores)
