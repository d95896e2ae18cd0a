"""The finished run's folder, models/NAME: what the worker and people read.

    adapters.safetensors, adapter_config.json   the adapter shipped (mlx_lm.load(adapter_path=)):
                                                the best one (lowest validation loss), or the
                                                last one with keep: last (KEEP=last)
    best/                                       the adapter with the lowest validation loss
    last/                                       the adapter of the last step
    lora_config.json                            the method and what it adapted
    training_config.json                        the resolved configuration
    metadata.json                               the contract with the worker (written last;
                                                read_metadata checks it for every reader)
    INTEGRATION_GUIDE.md                        how to serve it
    loss.png                                    training and validation loss
"""

import datetime
import hashlib
import io
import json
import math
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

from train import atomic, paths
from train.config import DEFAULTS
from train.checkpoint import ADAPTER_CONFIG, ADAPTERS, dumps

METADATA_FORMAT = 1
GENERATION_KEYS = tuple(DEFAULTS["generation"])


class BundleError(ValueError):
    """A run folder that is missing, incomplete or breaks the metadata contract."""


# --------------------------------------------------------------------------- base model

def resolve_model_path(model):
    """The local folder of a model given as a path or a Hugging Face id (no download)."""
    p = Path(model)
    if p.exists():
        return p.resolve()
    try:
        from mlx_lm.utils import hf_repo_to_path
        return Path(hf_repo_to_path(model))
    except Exception:
        return None


def base_model_hash(model):
    """(hash, method) identifying the base model's weights.

    local folder:  sha256 over the bytes of its *.safetensors files (sorted by name), then
                   config.json - method "sha256:safetensors+config"
    Hugging Face:  the snapshot's commit hash when the model lives in the hub cache -
                   method "hf-revision"; otherwise as for a local folder.
    """
    path = resolve_model_path(model)
    if path is None:
        return None, "unavailable"
    if not Path(model).exists() and path.parent.name == "snapshots":
        return path.name, "hf-revision"
    return folder_hash(path)


def folder_hash(path):
    """(sha256 over the folder's *.safetensors, sorted by name, then config.json, method)."""
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    for f in files:
        if f.is_file():
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
    return h.hexdigest(), "sha256:safetensors+config"


def base_model_identity(model):
    """What metadata.json records about the base: {name, hash, hash_method, revision}; the
    revision is the Hugging Face snapshot (commit) a hub id resolved to, else None."""
    digest, method = base_model_hash(model)
    return {"name": model, "hash": digest, "hash_method": method,
            "revision": digest if method == "hf-revision" else None}


def packages():
    out = {}
    for name in ("mlx", "mlx-lm", "transformers"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def chat_template(tokenizer):
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    template = getattr(hf, "chat_template", None)
    return template if isinstance(template, str) else None


# --------------------------------------------------------------------------- metrics / plot

def read_metrics(path):
    """The metrics.jsonl records (a torn last line, from a kill, is skipped)."""
    path = Path(path)
    out = []
    if not path.is_file():
        return out
    for line in path.read_bytes().split(b"\n"):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def loss_plot_png(records, title, best_step=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="validation", color="tab:orange", marker="o", markersize=3)
    if best_step is not None:
        ax.axvline(best_step, color="tab:green", linestyle="--", linewidth=1, label=f"best (step {best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- documents

def integration_guide(name, run_dir, meta):
    rel = _display(run_dir)
    system = meta.get("system_prompt")
    gen = meta.get("generation", {})
    best, final = meta.get("best_val_loss"), meta.get("final_val_loss")
    best = "n/a" if best is None else f"{best:.4f} at step {meta.get('best_step')}"
    final = "n/a" if final is None else f"{final:.4f}"
    return f"""# Serving `{name}`

Generated by `make train` on {meta['created_at']}.

- base model: `{meta['base_model']}`
- method: {meta['fine_tune_type']}, {meta['steps']} steps ({meta.get('stop_reason')})
- validation loss: best {best}, final {final}

This folder is an adapter on top of the base model: `adapters.safetensors` and
`adapter_config.json` are {_shipped(meta)}; `best/` holds the adapter with the
lowest validation loss and `last/` the one of the last step. `metadata.json` (its
`adapter_source`: {meta.get('adapter_source')}) tells the worker the base model and its revision,
the chat template, the system prompt and the generation defaults, so it formats prompts exactly
as training did. Eval, the worker and `make fuse` use this folder's own adapter.

## Start the worker

```bash
make worker NAME={name}
# or
.venv/bin/python -m worker --adapter {rel}
```

It reads one JSON request per line on stdin and answers on stdout (docs/PROTOCOL.md):

```bash
printf '%s\\n' '{{"id":"1","prompt":"Em que ano foi fundado o Sporting Clube Farense?"}}' \\
  | .venv/bin/python -m worker --adapter {rel}
```

## From Node.js (clients/node)

```js
import {{ startWorker }} from './clients/node/index.js';

const w = await startWorker({{ adapter: '{rel}' }});
const messages = [{{ role: 'user', content: 'Qual é o estádio do Farense?' }}];
const done = await w.complete({{ messages }});
console.log(done.text);
```

The system prompt is added by the worker when a conversation has none:

> {system if system else '(none)'}

Generation defaults (a request may override them): max_tokens {gen.get('max_tokens')}
(cap {gen.get('max_tokens_cap')}), temperature {gen.get('temperature')}, top_p {gen.get('top_p')},
top_k {gen.get('top_k')}, min_p {gen.get('min_p')}, repetition_penalty {gen.get('repetition_penalty')}.

## Other ways to use it

- Evaluate against the base model: `make eval NAME={name}` (writes eval.json, eval.md).
- A standalone model with the adapter merged in: `make fuse NAME={name}` (models/{name}/fused).
- mlx-lm directly: `python -m mlx_lm generate --model {meta['base_model']} --adapter-path {rel} --prompt "..."`
  (mlx-lm does not add the system prompt; the worker does).
"""


def _shipped(meta):
    if meta.get("adapter_source") == "best":
        return (f"the **best** adapter, the one with the lowest validation loss (step "
                f"{meta.get('adapter_step')}); `make train KEEP=last` ships the last step's instead")
    return (f"the **last** adapter, of the final step {meta.get('adapter_step')} (KEEP=last, or "
            "no validation data)")


def _display(path):
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        try:
            return str(path.relative_to(paths.ROOT))
        except ValueError:
            return str(path)


# --------------------------------------------------------------------------- write

def write(layout, final_checkpoint, *, cfg, state, tokenizer, system_prompt, data_info, base,
          lora_info):
    """Write the bundle into layout.run from the final checkpoint; metadata.json goes last.
    last/ gets the final adapter; the folder's own adapter is best/'s (cfg keep: best) when
    there is one, else the final one."""
    from train.checkpoint import write_adapter_dir

    run_dir, final_checkpoint = layout.run, Path(final_checkpoint)
    write_adapter_dir(final_checkpoint, layout.last, {"last.json": {"step": state["step"]}})
    best = state.get("best") or {}
    ship_best = (cfg.get("keep", "best") == "best" and best.get("step") is not None
                 and (layout.best / ADAPTERS).is_file())
    shipped = layout.best if ship_best else layout.last
    for fname in (ADAPTERS, ADAPTER_CONFIG):
        atomic.write_bytes(run_dir / fname, (shipped / fname).read_bytes())
    atomic.write_text(run_dir / "lora_config.json", dumps(lora_info))
    atomic.write_text(run_dir / "training_config.json", dumps(cfg))
    meta = metadata(layout.name, cfg, state, tokenizer, system_prompt, data_info, base)
    meta["adapter_source"] = "best" if ship_best else "last"
    meta["adapter_step"] = best["step"] if ship_best else state["step"]
    _write_plot(layout, cfg, best.get("step"))
    atomic.write_text(run_dir / "INTEGRATION_GUIDE.md", integration_guide(layout.name, run_dir, meta))
    atomic.write_text(layout.metadata, dumps(finite(meta)))
    return meta


def metadata(name, cfg, state, tokenizer, system_prompt, data_info, base):
    best = state.get("best") or {}
    model = cfg["model"]
    meta = {"format": METADATA_FORMAT, "name": name, "base_model": model}
    if Path(model).exists():
        meta["base_model_path"] = str(Path(model).resolve())
    meta.update({
        "base_model_hash": base["hash"],
        "base_model_hash_method": base["hash_method"],
        "base_model_revision": base.get("revision"),
        "fine_tune_type": cfg["fine_tune_type"],
        "chat_template": chat_template(tokenizer),
        "system_prompt": system_prompt,
        "generation": dict(cfg["generation"]),
        "max_seq_length": cfg["max_seq_length"],
        "data": data_info,
        "steps": state["step"],
        "iters": cfg["iters"],
        "stop_reason": state.get("stop_reason"),
        "batch_size": state.get("batch_size"),
        "best_step": best.get("step"),
        "best_val_loss": best.get("val_loss"),
        "final_val_loss": state.get("final_val_loss"),
        "wall_time_s": round(state.get("elapsed_s", 0.0), 3),
        "tokens_seen": state.get("tokens_seen", 0),
        "packages": packages(),
        "adapter_file": ADAPTERS,
        "best_adapter": "best/" + ADAPTERS if best.get("step") is not None else None,
        "last_adapter": "last/" + ADAPTERS,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    return meta


def _write_plot(layout, cfg, best_step):
    records = read_metrics(layout.metrics)
    try:
        png = loss_plot_png(records, f"{layout.name}: {cfg['fine_tune_type']} on {Path(cfg['model']).name}",
                            best_step)
        atomic.write_bytes(layout.run / "loss.png", png)
    except Exception as e:  # a plot is not worth failing a finished run for
        print(f"train: could not draw loss.png: {type(e).__name__}: {e}", file=sys.stderr)


def finite(obj):
    """JSON has no NaN: such values become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


OUTPUT_FILES = (paths.METADATA, ADAPTERS, ADAPTER_CONFIG, "lora_config.json",
                "training_config.json", "INTEGRATION_GUIDE.md", "loss.png", "eval.json", "eval.md")


# --------------------------------------------------------------------------- read

def read_metadata(run_dir):
    """models/NAME/metadata.json, checked against the contract (every reader: evaluate, fuse,
    the worker); raises BundleError naming the file and the field."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BundleError(f"adapter folder not found: {run_dir}")
    meta_file = run_dir / paths.METADATA
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{meta_file}: missing (an adapter folder is written by training)") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{meta_file}: unreadable: {e}") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_file}: expected a JSON object")
    _check_metadata(meta, meta_file)
    for name in (ADAPTER_CONFIG, ADAPTERS):
        if not (run_dir / name).is_file():
            raise BundleError(f"{run_dir / name}: missing")
    return meta


def _check_metadata(meta, meta_file):
    if meta.get("format") != METADATA_FORMAT:
        raise BundleError(f"{meta_file}: unsupported format {meta.get('format')!r} (expected {METADATA_FORMAT})")
    if not isinstance(meta.get("base_model"), str) or not meta["base_model"]:
        raise BundleError(f"{meta_file}: base_model must be a non-empty string")
    for key in ("chat_template", "system_prompt", "base_model_revision", "base_model_hash"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise BundleError(f"{meta_file}: {key} must be a string or null")
    gen = meta.get("generation", {})
    if not isinstance(gen, dict):
        raise BundleError(f"{meta_file}: generation must be an object")
    for key, value in gen.items():
        if key in GENERATION_KEYS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BundleError(f"{meta_file}: generation.{key} must be a number")
    msl = meta.get("max_seq_length")
    if msl is not None and (isinstance(msl, bool) or not isinstance(msl, int) or msl < 2):
        raise BundleError(f"{meta_file}: max_seq_length must be an integer >= 2")
    adapter_file = meta.get("adapter_file", ADAPTERS)
    if adapter_file != ADAPTERS:
        raise BundleError(f"{meta_file}: adapter_file must be {ADAPTERS!r} (got {adapter_file!r})")


def read_run(run_dir):
    """(metadata.json checked, training_config.json) of a finished run."""
    meta = read_metadata(run_dir)
    try:
        train_cfg = json.loads((Path(run_dir) / "training_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BundleError(f"{e.filename}: missing") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{Path(run_dir) / 'training_config.json'}: unreadable: {e}") from None
    return meta, train_cfg


def base_mismatch(meta, model_path):
    """None when the base at `model_path` is the one the adapter was trained on (or cannot be
    compared), else what differs. Compared as recorded: a hub revision by the snapshot
    folder's name, a folder by the sha256 of its weights and config."""
    want, method = meta.get("base_model_hash"), meta.get("base_model_hash_method")
    path = resolve_model_path(model_path)
    if not want or path is None:
        return None
    if method == "hf-revision":
        have = path.name if path.parent.name == "snapshots" else None
        if have is None:
            return None
        return None if have == want else f"hub revision {have[:12]}, trained on {want[:12]}"
    if method == "sha256:safetensors+config":
        have, _ = folder_hash(path)
        return None if have == want else f"weights sha256 {have[:12]}, trained on {want[:12]}"
    return None
