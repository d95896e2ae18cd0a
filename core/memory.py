"""Memory: a model of what training and serving need, the budget, and the batch-size probe.

The model (pure functions of a model's config.json and the settings; formulas in
docs/MEMORY.md) predicts

- weight bytes (quantized layers: bits/8 per weight + a scale and a bias per group),
- LoRA + optimizer state: the trainable parameters, their gradients and AdamW's two moments,
- activation bytes per token in training, with and without gradient checkpointing,
- KV-cache bytes per token in serving,

and from those the peak of one training step (checked against mlx's measured peak in
tests/test_memory.py) and the worker's limits (max batch, prefix-cache and buffer-cache
bytes). The budget is the smaller of a fraction of the device's recommended working set and
the memory available now (other processes count).

batch_size: auto - the largest batch that fits, found by trying. Each probe runs one forward
and backward pass (no optimizer update, so the weights do not change) on the longest
examples, padded as training pads them, and reads mlx's peak memory. The optimizer's state,
which does not exist yet, is added as an estimate. A batch whose predicted peak is over the
budget is never tried (a Metal out-of-memory is an abort no code can catch); when batch 1 does
not fit, gradient checkpointing is turned on and the probe tried again; when even that does
not fit, training stops before allocating anything, naming settings that fit.
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
KV_STEP = 256  # mlx-lm's KV caches grow in steps of 256 tokens
WORKER_MAX_BATCH = 32  # the worker's batch when memory is no limit
PREFILL_BATCH = 8  # mlx-lm BatchGenerator's prefill batch (worker/engine.py)
# Prefill chunk sizes tried, longest first. Without fused attention (the CPU) a chunk computes
# chunk x prefix softmax scores with mlx's scalar exp, the largest cost of a long prompt, so
# short chunks are faster: 256 took 0.82x the time of 1024 on a 1,000-token prompt
# (docs/PERFORMANCE.md, Prefill against the compute roofline).
PREFILL_STEPS = (2048, 1024, 512, 256)
PREFILL_STEPS_UNFUSED = (256,)


class DoesNotFit(Exception):
    """Training would not fit the memory budget; the message names settings that do."""


# --------------------------------------------------------------------------- the model's shape


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
    logits and their gradients (float32 copies of vocab per token)."""
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


def kv_bytes_per_token(s):
    """Serving: keys and values of every layer (fp16 for a float16/4-bit model)."""
    return 2 * s.layers * s.kv_dim * s.dtype_bytes


# --------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    num_layers: int = 16
    rank: int = 8
    fine_tune_type: str = "lora"
    optimizer: str = "adamw"

    @classmethod
    def from_cfg(cls, cfg):
        lora = cfg.get("lora_parameters") or {}
        return cls(
            num_layers=int(cfg.get("num_layers", 16)),
            rank=int(lora.get("rank", 8)),
            fine_tune_type=str(cfg.get("fine_tune_type", "lora")),
            optimizer=str(cfg.get("optimizer", "adamw")).lower(),
        )


def training_peak(s, settings, batch_size, seq_len, grad_checkpoint=False):
    """{weights, parameters, gradients, optimizer, activations, total} of one training step."""
    out = {"weights": weight_bytes(s)}
    out.update(
        training_state_bytes(
            s, settings.num_layers, settings.rank, settings.fine_tune_type, settings.optimizer
        )
    )
    out["activations"] = (
        batch_size * seq_len * activation_bytes_per_token(s, seq_len, settings.num_layers, grad_checkpoint)
    )
    out["total"] = sum(out.values())
    return out


def largest_batch(s, settings, seq_len, budget, grad_checkpoint=False, cap=1 << 16):
    """The largest batch whose predicted peak is within budget (0: not even 1)."""
    fixed = training_peak(s, settings, 0, seq_len, grad_checkpoint)["total"]
    per_seq = seq_len * activation_bytes_per_token(s, seq_len, settings.num_layers, grad_checkpoint)
    return int(max(0, min(cap, (budget - fixed) // max(per_seq, 1))))


def settings_that_fit(s, settings, budget, seq_lens=(4096, 2048, 1024, 512, 256, 128)):
    """[(max_seq_length, batch_size, grad_checkpoint)] that the model predicts fit."""
    out = []
    for L in seq_lens:
        for gc in (False, True):
            b = largest_batch(s, settings, L, budget, gc)
            if b >= 1:
                out.append((L, b, gc))
                break
    return out


def does_not_fit_message(s, settings, budget, seq_len, why):
    fits = settings_that_fit(s, settings, budget)
    need = training_peak(s, settings, 1, seq_len, True)["total"]
    lines = [
        f"error: training does not fit the memory budget: {why}; batch 1 of "
        f"{seq_len} tokens needs about {need / GB:.2f} GB even with gradient checkpointing"
    ]
    if fits:
        opts = "; ".join(
            f"make train MAX_SEQ_LENGTH={L} BATCH_SIZE={b}" + (" GRAD_CHECKPOINT=1" if gc else "")
            for L, b, gc in fits[:3]
        )
        lines.append(
            f"settings that fit: {opts} (or max_seq_length, batch_size and "
            "grad_checkpoint in the config; longer examples are cut)"
        )
    else:
        lines.append(
            "nothing fits: the weights alone "
            f"({weight_bytes(s) / GB:.2f} GB) leave too little; free memory (another "
            "process, e.g. a worker?) or use a smaller or quantized model"
        )
    return ". ".join(lines)


# --------------------------------------------------------------------------- budget and device


def device_memory():
    """(bytes, where the number comes from): Metal/CUDA report theirs; CPU uses system RAM."""
    import mlx.core as mx

    try:
        info = mx.device_info()
    except Exception:
        info = {}
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key]), f"mx.device_info()['{key}']"
    import psutil

    return int(psutil.virtual_memory().total), "psutil total memory (CPU)"


def available_memory():
    import psutil

    return int(psutil.virtual_memory().available)


def budget(fraction, held=0, total=None, available=None):
    """(bytes, explanation): min(fraction x the device's memory, available now + held), where
    held is what this process already holds (its loaded weights are not 'available')."""
    if total is None:
        total, source = device_memory()
    else:
        source = "given"
    if available is None:
        available = available_memory()
    by_device, by_now = total * fraction, available + held
    if by_now < by_device:
        why = (
            f"{by_now / GB:.1f} GB available now (less than {fraction:g} x "
            f"{total / GB:.1f} GB, {source}: other processes hold the rest)"
        )
    else:
        why = f"{fraction:g} x {total / GB:.1f} GB ({source}) = {by_device / GB:.1f} GB"
    return int(min(by_device, by_now)), why


def set_wired_limit(log=None):
    """As mlx-lm's trainer does: wire the recommended working set (Metal only; a no-op on
    CPU and CUDA, which report no recommended size). Returns the limit set, or None."""
    import mlx.core as mx

    try:
        size = mx.device_info().get("max_recommended_working_set_size")
    except Exception:
        size = None
    if not size or not mx.metal.is_available():
        return None
    previous = mx.set_wired_limit(int(size))
    if log and previous != int(size):
        log(f"mlx wired limit: {int(size) / GB:.1f} GB (the recommended working set)")
    return int(size)


def optimizer_state_bytes(model, optimizer_name):
    """What the optimizer will hold per trainable parameter (Adam: two moments)."""
    from mlx.utils import tree_flatten

    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    return trainable * ADAM_MOMENTS.get(optimizer_name, 2)


# --------------------------------------------------------------------------- the probe


def _candidates(limit):
    sizes, b = [], 1
    while b <= limit:
        sizes.append(b)
        b *= 2
    if sizes and sizes[-1] != limit:
        sizes.append(limit)
    return sizes


def _measure(model, loss_and_grad, examples, collate, indices):
    import mlx.core as mx

    batch, lengths, _ = collate(examples, indices)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    (loss, _), grads = loss_and_grad(model, batch, lengths)
    mx.eval(loss, grads)
    peak = mx.get_peak_memory()
    del loss, grads
    return peak


def _probe_sizes(
    model, loss_and_grad, examples, collate, longest, limit, budget_bytes, predict, extra_bytes, log
):
    """[(batch, measured peak)] and the largest batch within budget (None: not even 1)."""
    probes, chosen = [], None
    for b in _candidates(limit):
        predicted = predict(b)
        if predicted is not None and predicted > budget_bytes:
            log(
                f"batch_size auto: not trying {b} (the memory model predicts "
                f"{predicted / GB:.2f} GB > budget {budget_bytes / GB:.2f} GB)"
            )
            break
        if len(probes) >= 2:
            (b1, m1), (b2, m2) = probes[-2], probes[-1]
            extrapolated = m2 + max((m2 - m1) / (b2 - b1), 0) * (b - b2)
            if extrapolated > budget_bytes:
                log(
                    f"batch_size auto: stop probing before {b} (predicted "
                    f"{extrapolated / GB:.2f} GB > budget)"
                )
                break
        peak = _measure(model, loss_and_grad, examples, collate, longest[:b]) + extra_bytes
        probes.append((b, peak))
        if peak > budget_bytes:
            break
        chosen = b
    return probes, chosen


def choose_batch_size(
    model,
    loss_and_grad,
    examples,
    collate,
    *,
    max_batch_size,
    memory_fraction,
    extra_bytes=0,
    log=print,
    shape=None,
    settings=None,
    grad_checkpoint=False,
    enable_grad_checkpoint=None,
    budget_bytes=None,
):
    """Pick the batch size; returns (batch_size, explanation, grad_checkpoint).

    shape/settings (the memory model): batches predicted over budget are not tried. When
    batch 1 does not fit and grad_checkpoint is off, enable_grad_checkpoint() is called and
    the probe runs again. Raises DoesNotFit when nothing fits. budget_bytes overrides the
    budget (tests)."""
    import mlx.core as mx

    if budget_bytes is None:
        budget_bytes, source = budget(memory_fraction, held=int(mx.get_active_memory()))
    else:
        source = "given"
    limit = max(1, min(int(max_batch_size), len(examples)))
    longest = sorted(range(len(examples)), key=lambda i: len(examples[i][0]), reverse=True)
    seq_len = max(len(examples[i][0]) for i in longest[:1]) if examples else 1
    model.train()

    def probe(gc):
        predict = (
            (lambda b: None)
            if shape is None
            else (lambda b: training_peak(shape, settings, b, seq_len, gc)["total"])
        )
        return _probe_sizes(
            model, loss_and_grad, examples, collate, longest, limit, budget_bytes, predict, extra_bytes, log
        )

    probes, chosen = probe(grad_checkpoint)
    note = ""
    if chosen is None and not grad_checkpoint and enable_grad_checkpoint is not None:
        log(
            f"batch_size auto: batch 1 of {seq_len} tokens does not fit {budget_bytes / GB:.2f} GB "
            "without gradient checkpointing; turning it on"
        )
        enable_grad_checkpoint()
        grad_checkpoint, note = True, "; gradient checkpointing turned on (batch 1 did not fit without)"
        probes, chosen = probe(True)
    mx.clear_cache()
    mx.reset_peak_memory()
    table = ", ".join(f"{b}: {m / GB:.3f} GB" for b, m in probes) or "none tried"
    why = (
        f"budget {budget_bytes / GB:.2f} GB = {source}; peak per batch size (longest "
        f"examples, {seq_len} tokens, incl. optimizer state) {table}{note}"
    )
    if chosen is None:
        if shape is None:
            raise DoesNotFit(
                f"error: even batch size 1 exceeds the memory budget ({why}); "
                "try grad_checkpoint: true or a smaller max_seq_length"
            )
        raise DoesNotFit(does_not_fit_message(shape, settings, budget_bytes, seq_len, why))
    if chosen == limit:
        cap = (
            f"max_batch_size {max_batch_size}"
            if limit == max_batch_size
            else f"the {len(examples)} training examples"
        )
        why += f"; capped by {cap} (auto_batch.max_batch_size)"
    return chosen, why, grad_checkpoint


def check_resume(shape, settings, batch_size, seq_len, grad_checkpoint, memory_fraction, held=0, log=print):
    """A resumed run keeps its batch size (exact resume); does it still fit the budget now?
    Raises DoesNotFit saying so and how to continue."""
    budget_bytes, source = budget(memory_fraction, held=held)
    need = training_peak(shape, settings, batch_size, seq_len, grad_checkpoint)["total"]
    if need <= budget_bytes:
        log(
            f"memory: batch_size {batch_size} still fits ({need / GB:.2f} GB predicted, "
            f"budget {budget_bytes / GB:.2f} GB = {source})"
        )
        return
    fix = []
    if (
        not grad_checkpoint
        and training_peak(shape, settings, batch_size, seq_len, True)["total"] <= budget_bytes
    ):
        fix.append("resume with grad_checkpoint: true (same results, ~30% slower)")
    fix.append("free memory (stop other processes, e.g. a worker) and resume")
    b = largest_batch(shape, settings, seq_len, budget_bytes, True)
    if b >= 1:
        fix.append(
            f"or start over with FRESH=1 BATCH_SIZE={b} (a new batch size changes the "
            "trajectory, so it cannot continue this run)"
        )
    raise DoesNotFit(
        f"error: this run was started with batch_size {batch_size}, which no longer "
        f"fits: about {need / GB:.2f} GB predicted for {seq_len}-token batches, "
        f"budget {budget_bytes / GB:.2f} GB = {source}. To continue: " + "; ".join(fix)
    )


# --------------------------------------------------------------------------- serving


def prefill_bytes_per_token(s, context_length, fused_attention=True):
    """Serving: what one prompt token of a prefill chunk needs in flight: one block's
    intermediates and the logits, plus its attention scores where attention is not fused
    (mlx's CPU backend materializes them; Metal and CUDA do not)."""
    a = s.dtype_bytes
    scores = 0 if fused_attention else s.heads * context_length * a
    return int(_block_activations(s) * a + scores + s.vocab * a)


def _kv_with_growth(s, ctx):
    """KV bytes of one sequence of ctx tokens as mlx-lm allocates it (256-token steps), plus
    its share of the bounded buffer cache (two growth steps)."""
    return kv_bytes_per_token(s) * (-(-ctx // KV_STEP) * KV_STEP + 2 * KV_STEP)


def worker_limits(
    s,
    budget_bytes,
    context_length,
    *,
    max_batch=None,
    prefix_cache_bytes=None,
    prefill_step_size=None,
    fused_attention=True,
    cap=WORKER_MAX_BATCH,
):
    """The worker's limits from the memory model. Every sequence of a batch may reach the
    context length, so max_batch x context x KV bytes fits next to the weights, one prefill
    chunk (PREFILL_BATCH prompts), mlx's buffer cache and the prefix cache (a quarter of what
    is left, at most 1 GiB). The prefill chunk is the longest of 2048 .. 128 tokens per prompt
    (256 at most without fused attention: PREFILL_STEPS_UNFUSED) whose transient stays within an
    eighth of the budget. The buffer cache is bounded at two
    256-token KV growth steps of every sequence (at most 1 GiB). When not even one
    full-context sequence fits, the context is capped to what does (longer prompts get
    `too_long` instead of exhausting memory). Values given (not None) are kept."""
    original = max(1, int(context_length or 2048))
    step_given, prefix_given = prefill_step_size, prefix_cache_bytes
    for ctx in [original] + list(range(original // KV_STEP * KV_STEP, 0, -KV_STEP)):
        per_token = min(PREFILL_BATCH, cap) * prefill_bytes_per_token(s, ctx, fused_attention)
        prefill_step_size = step_given or next(
            (
                n
                for n in (PREFILL_STEPS if fused_attention else PREFILL_STEPS_UNFUSED)
                if n * per_token <= budget_bytes / 8
            ),
            128,
        )
        transient = min(prefill_step_size, ctx) * per_token
        free = budget_bytes - weight_bytes(s) - transient
        prefix_cache_bytes = (
            prefix_given if prefix_given is not None else int(min(max(free // 4, 0), 1 << 30))
        )
        fits = max(0, int((free - prefix_cache_bytes) // _kv_with_growth(s, ctx)))
        if fits < 1 and prefix_given is None:  # capping: the prefix cache goes first
            prefix_cache_bytes = 0
            fits = max(0, int(free // _kv_with_growth(s, ctx)))
        if fits >= 1:
            break
    chosen = int(max(1, min(cap, fits))) if max_batch is None else int(max_batch)
    cache_limit = int(min(2 * chosen * KV_STEP * kv_bytes_per_token(s), 1 << 30))
    return {
        "budget_bytes": int(budget_bytes),
        "weights_bytes": int(weight_bytes(s)),
        "kv_bytes_per_token": int(kv_bytes_per_token(s)),
        "context_length": ctx,
        "context_capped_from": original if ctx < original else None,
        "max_batch": chosen,
        "prefill_step_size": int(prefill_step_size),
        "prefix_cache_bytes": int(prefix_cache_bytes),
        "cache_limit_bytes": cache_limit,
        "predicted_peak_bytes": int(
            weight_bytes(s) + transient + prefix_cache_bytes + chosen * _kv_with_growth(s, ctx)
        ),
        "full_context_fits": bool(fits >= 1),
    }


# --------------------------------------------------------------------------- train.py's entry points


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


def enable_grad_checkpoint(model, cfg):
    """mlx-lm's gradient checkpointing on every block (as grad_checkpoint: true does)."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    grad_checkpoint(model.layers[0])
    cfg["grad_checkpoint"] = True


def auto_batch_size(
    model, loss_and_grad, examples, collate, cfg, *, max_batch_size, memory_fraction, extra_bytes=0, log=print
):
    """batch_size: auto with the memory model: (batch_size, explanation); may turn on
    cfg['grad_checkpoint']; raises DoesNotFit (before allocating) when nothing fits."""
    set_wired_limit(log)
    try:
        shape = shape_from_model(model)
    except Exception as e:  # not a Mistral/Llama-shaped model: measuring alone
        log(f"memory: no memory model for this architecture ({type(e).__name__}: {e}); probing only")
        shape = None
    b, why, _ = choose_batch_size(
        model,
        loss_and_grad,
        examples,
        collate,
        max_batch_size=max_batch_size,
        memory_fraction=memory_fraction,
        extra_bytes=extra_bytes,
        log=log,
        shape=shape,
        settings=TrainSettings.from_cfg(cfg),
        grad_checkpoint=bool(cfg.get("grad_checkpoint")),
        enable_grad_checkpoint=None
        if cfg.get("grad_checkpoint")
        else lambda: enable_grad_checkpoint(model, cfg),
    )
    return b, why


def _run_plan(model, cfg, examples):
    """(shape, settings, longest sequence, grad_checkpoint) of a training run, or None when the
    model's shape cannot be read (then the memory model stays out of the way)."""
    try:
        shape = shape_from_model(model)
    except Exception:
        return None
    seq_len = max((len(ids) for ids, _ in examples), default=1)
    return shape, TrainSettings.from_cfg(cfg), seq_len, bool(cfg.get("grad_checkpoint"))


def check_resumed_batch_size(model, cfg, batch_size, examples, memory_fraction, log=print):
    """A resumed run's recorded batch size against the budget now: turns on gradient
    checkpointing when that is enough (same results), else raises DoesNotFit with what to do."""
    import mlx.core as mx

    set_wired_limit(log)
    plan = _run_plan(model, cfg, examples)
    if plan is None:
        return
    shape, settings, seq_len, gc = plan
    held = int(mx.get_active_memory())
    if not gc:
        budget_bytes, _ = budget(memory_fraction, held=held)
        if (
            training_peak(shape, settings, batch_size, seq_len, False)["total"]
            > budget_bytes
            >= training_peak(shape, settings, batch_size, seq_len, True)["total"]
        ):
            log(
                f"memory: batch_size {batch_size} no longer fits without gradient checkpointing; "
                "turning it on (same results, slower)"
            )
            enable_grad_checkpoint(model, cfg)
            gc = True
    check_resume(shape, settings, batch_size, seq_len, gc, memory_fraction, held=held, log=log)


def check_fixed_batch_size(model, cfg, batch_size, examples, memory_fraction, log=print):
    """A batch size given in the config is kept; warn (naming what fits) when the model
    predicts it over the budget: on Metal an out-of-memory aborts the process."""
    import mlx.core as mx

    plan = _run_plan(model, cfg, examples)
    if plan is None:
        return
    shape, settings, seq_len, gc = plan
    budget_bytes, why = budget(memory_fraction, held=int(mx.get_active_memory()))
    need = training_peak(shape, settings, batch_size, seq_len, gc)["total"]
    if need > budget_bytes:
        b = largest_batch(shape, settings, seq_len, budget_bytes, gc)
        log(
            f"warning: batch_size {batch_size} of {seq_len}-token batches needs about {need / GB:.2f} GB "
            f"(memory model), over the budget {budget_bytes / GB:.2f} GB ({why}); "
            + (
                f"BATCH_SIZE={b} fits"
                if b >= 1
                else "even 1 does not: GRAD_CHECKPOINT=1 or a smaller MAX_SEQ_LENGTH"
            )
            + " (or batch_size: auto)"
        )
