"""python -m worker --model M [--adapter models/NAME] ...: the long-lived NDJSON worker.

See docs/PROTOCOL.md. stdin: one JSON request per line; stdout: protocol messages only;
stderr: logs. Exit status 0 after stdin EOF (once everything read is answered), a
`shutdown` request or SIGTERM; 2 when the model or adapter cannot be loaded.
"""

import argparse
import ctypes
import os
import signal
import sys
import threading
import time

import worker  # noqa: F401  (imports train first: fast BLAS before mlx)
from core import blas
from worker import allocator, io, limits, loading, signals

PR_SET_PDEATHSIG = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="base model (path or HF id); overrides the adapter's base_model")
    p.add_argument("--adapter", help="adapter folder written by training (models/NAME)")
    p.add_argument(
        "--system-prompt",
        default=None,
        help="system prompt for conversations without one (default: the adapter's, else none)",
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="cap the context (prompt + answer) below the model's or adapter's (default: theirs)",
    )
    p.add_argument(
        "--engine",
        choices=("mlx", "llamacpp"),
        default="mlx",
        help="mlx (default) or llamacpp: a GGUF in llama.cpp (make llamacpp installs it)",
    )
    p.add_argument("--gguf", help="llamacpp: the GGUF (default: the adapter's fused/ggml-model-f16.gguf)")
    p.add_argument(
        "--lora-gguf", help="llamacpp: an adapter in GGUF-LoRA format on --gguf's base (make gguf-lora)"
    )
    p.add_argument("--max-line-bytes", type=int, default=1 << 20, help="longest request line (default 1 MiB)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests allowed to wait for a batch slot before `overloaded` (default 256)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="sequences decoded together (default: what fits the memory budget, at most 32)",
    )
    p.add_argument(
        "--prefix-cache-bytes",
        type=int,
        default=None,
        help="byte budget of the prefix (KV) cache; 0 disables it (default: from the memory budget)",
    )
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.8,
        help="share of the device's recommended working set the worker plans for (default 0.8)",
    )
    p.add_argument("--prefill-step-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        default=None,
        help="serve the adapter on a base other than the one it was trained on (warns; also WORKER_ALLOW_BASE_MISMATCH=1)",
    )
    p.add_argument(
        "--log-format",
        choices=("plain", "json"),
        default=None,
        help="stderr log format (default: LOG_FORMAT, else plain)",
    )
    args = p.parse_args(argv)
    if not args.model and not args.adapter:
        p.error("give --model (a base model) or --adapter (models/NAME)")
    for name in ("max_line_bytes", "max_batch", "prefill_step_size", "context_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.memory_fraction <= 1:
        p.error("--memory-fraction must be in (0, 1]")
    if args.max_queue < 0 or (args.prefix_cache_bytes or 0) < 0:
        p.error("--max-queue and --prefix-cache-bytes must be >= 0")
    return args


PARENT_POLL_S = 0.2  # how often the watcher looks at getppid()
PARENT_GRACE_S = 0.6  # after its SIGTERM, how long the watcher lets the worker wind down


def die_with_parent(use_prctl=None):
    """The worker never outlives its parent. Linux: PR_SET_PDEATHSIG (SIGTERM when the parent
    dies). Elsewhere (macOS), or with WORKER_PARENT_WATCH=poll (use_prctl=False), a thread
    watches getppid(): when it changes, SIGTERM to itself (the engine's graceful exit), then
    os._exit after PARENT_GRACE_S whatever happens, all within a second of the death.
    Returns "prctl" or "watch"."""
    if use_prctl is None:
        use_prctl = os.environ.get("WORKER_PARENT_WATCH", "") != "poll"
    parent = os.getppid()
    if use_prctl and sys.platform.startswith("linux") and _set_pdeathsig():
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(0)
        return "prctl"
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    return "watch"


def _set_pdeathsig():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except Exception:
        return False


def _watch_parent(parent):
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(PARENT_GRACE_S)
    os._exit(0)


def version(engine="mlx"):
    if engine == "llamacpp":
        from core.llamacpp import LLAMA_CPP_VERSION

        return f"worker/1 llama.cpp (llama-cpp-python/{LLAMA_CPP_VERSION})"
    import mlx.core as mx
    import mlx_lm

    return f"worker/1 mlx/{mx.__version__} mlx-lm/{mlx_lm.__version__}"


def load(args, log):
    """(settings, model, tokenizer, context length, engine or None for mlx's, limits): the
    model folder, adapter and metadata; mlx's weights, or llama.cpp's GGUF (engine_llamacpp)."""
    settings = loading.settings_for(args.model, args.adapter, args.system_prompt, args.allow_base_mismatch)
    log.info(
        f"loading {settings.model_path}"
        + (f" with adapter {settings.adapter_path}" if settings.adapter else "")
    )
    if args.engine == "llamacpp":
        model, (tokenizer, config) = None, loading.load_tokenizer(settings)
    else:
        model, tokenizer, config = loading.load(settings)
    context_length = loading.context_length(settings, config)
    if args.context_length:
        context_length = min(context_length or args.context_length, args.context_length)
    if args.engine == "llamacpp":
        from worker.engine_llamacpp import build

        args.tokenizer = tokenizer
        engine, chosen = build(args, settings, context_length, log, config)
        return settings, model, tokenizer, context_length, engine, chosen
    chosen = limits.choose(
        config,
        context_length,
        memory_fraction=args.memory_fraction,
        max_batch=args.max_batch,
        prefix_cache_bytes=args.prefix_cache_bytes,
        prefill_step_size=args.prefill_step_size,
        log=log,
    )
    if chosen.get("context_capped_from"):  # not even one full-context sequence fits
        context_length = chosen["context_length"]
    return settings, model, tokenizer, context_length, None, chosen


def main(argv=None):
    proto_fd = io.claim_stdout()  # before anything can print
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the (idle) process, until the engine's handler
    die_with_parent()
    args = parse_args(argv)
    log = io.Logger(args.log_format)
    t0 = time.perf_counter()
    allocator.configure(log)  # before the weights: every buffer follows it
    try:
        settings, model, tokenizer, context_length, engine_impl, chosen = load(args, log)
    except loading.LoadError as e:
        log.error(str(e))
        return 2

    from worker.engine import Engine  # mlx after train (fast BLAS)

    writer = io.ProtocolWriter(proto_fd, on_broken_pipe=lambda: _broken_pipe(log))
    engine = Engine(
        model,
        tokenizer,
        settings,
        writer=writer,
        log=log,
        context_length=context_length,
        max_queue=args.max_queue,
        max_batch=chosen["max_batch"],
        prefix_cache_bytes=chosen["prefix_cache_bytes"],
        prefill_step_size=chosen["prefill_step_size"],
        engine=engine_impl,
    )
    engine.limits = chosen
    signals.install(engine)
    try:
        engine.warm_up()
    except Exception as e:  # e.g. the adapter's chat template cannot render: exit 2, clearly
        log.error(
            f"cannot serve {settings.model_path!r}"
            f"{' with adapter ' + repr(settings.adapter_path) if settings.adapter else ''}: "
            f"the warm-up generation failed (a chat template that cannot render a "
            f"conversation?): {type(e).__name__}: {e}"
        )
        return 2
    writer.add(
        dict(
            engine.ready_message(args.max_line_bytes, blas=blas.loaded_path, version=version(args.engine)),
            limits=chosen,
        )
    )
    writer.flush()
    log.info(
        f"ready in {time.perf_counter() - t0:.1f}s",
        model=settings.model,
        adapter=settings.adapter,
        context_length=engine.context_length,
        blas=blas.loaded_path,
    )

    events = io.make_event_queue()
    reader = io.StdinReader(0, events, args.max_line_bytes, log)
    reader.start()
    return engine.run(events)


def _broken_pipe(log):
    log.warning("stdout closed (the parent is gone): exiting")
    os._exit(0)


if __name__ == "__main__":
    code = main()
    try:
        sys.stderr.flush()
    finally:
        os._exit(code or 0)
