"""One-shot generation: python -m worker.cli "prompt" [--model M] [--adapter A] [--max-tokens N]

Prints ONE JSON object on stdout (logs go to stderr), with the same engine, prompt
formatting and defaults as the long-lived worker:
  {"text": ..., "finish_reason": "stop"|"length", "usage": {...}, "timing": {...},
   "model": ..., "adapter": ..., "prompt": ...}
or, on failure, {"error": {"code": ..., "message": ...}, ...} with exit status 1
(2 when the model or adapter cannot be loaded).

Without --model and --adapter it uses the adapter models/farense when it exists, else the
base model of train/config.yaml.
"""

import argparse
import os
import queue
import sys
import time

import orjson

import worker  # noqa: F401  (imports train first: fast BLAS before mlx)
from core import paths
from worker import io, loading, protocol


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m worker.cli", description="One-shot generation; prints one JSON result."
    )
    p.add_argument("prompt", help="the user message")
    p.add_argument("--model", help="base model (path or HF id); overrides the adapter's base_model")
    p.add_argument("--adapter", help="adapter folder written by training (models/NAME)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system-prompt", default=None)
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        default=None,
        help="serve the adapter on a base other than the one it was trained on (warns; also WORKER_ALLOW_BASE_MISMATCH=1)",
    )
    p.add_argument("--log-format", choices=("plain", "json"), default=None)
    return p.parse_args(argv)


def default_target(args):
    if args.model or args.adapter:
        return args.model, args.adapter
    farense = paths.run_dir("farense")
    if (farense / "metadata.json").is_file():
        return None, str(farense.relative_to(paths.ROOT)) if farense.is_relative_to(paths.ROOT) else str(
            farense
        )
    from core.config import load_config

    return load_config()["model"], None


def main(argv=None):
    out_fd = io.claim_stdout()
    args = parse_args(argv)
    log = io.Logger(args.log_format)
    model_name, adapter = default_target(args)
    request = {"id": "cli", "prompt": args.prompt}
    for key in ("max_tokens", "temperature", "seed"):
        if getattr(args, key) is not None:
            request[key] = getattr(args, key)
    parsed = protocol.parse_line(orjson.dumps(request), time.perf_counter())
    if isinstance(parsed, protocol.ParseError):
        return _print(out_fd, {"error": {"code": parsed.code, "message": parsed.message}}, 1)
    try:
        settings = loading.settings_for(model_name, adapter, args.system_prompt, args.allow_base_mismatch)
        model, tokenizer, config = loading.load(settings)
    except loading.LoadError as e:
        log.error(str(e))
        return _print(out_fd, {"error": {"code": "load", "message": str(e)}}, 2)

    from worker.engine import Engine

    writer = io.CollectingWriter()
    engine = Engine(
        model,
        tokenizer,
        settings,
        writer=writer,
        log=log,
        context_length=loading.context_length(settings, config),
        prefix_cache_bytes=0,
    )
    events = queue.Queue()
    events.put(protocol.Generate(**{**parsed.__dict__, "received": time.perf_counter()}))
    events.put(io.EOF)
    engine.run(events)
    final = next((m for m in writer.messages if m["type"] in ("done", "error")), None)
    base = {"model": settings.model, "adapter": settings.adapter, "prompt": args.prompt}
    if final is None or final["type"] == "error":
        err = (
            {"code": final["code"], "message": final["message"]}
            if final
            else {"code": "internal", "message": "no result"}
        )
        return _print(out_fd, {"error": err, **base}, 1)
    result = {k: final[k] for k in ("text", "finish_reason", "usage", "timing")}
    return _print(out_fd, {**result, **base}, 0)


def _print(fd, obj, code):
    os.write(fd, orjson.dumps(obj) + b"\n")
    return code


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)
