"""llama.cpp through llama-cpp-python, the one place it is imported: with an error that says how
to install it (`make llamacpp`), a GGUF model loaded quietly, the logits of token ids, a greedy
continuation, quantizing a GGUF. Token ids in, token ids out: prompts are rendered and tokenized
by core/prompt.py, never by llama.cpp."""

import contextlib
import os

LLAMA_CPP_VERSION = "0.3.36"  # .ci/llamacpp-env.sh builds it
INSTALL_HINT = (
    f"llama.cpp is not installed in .venv: run `make llamacpp` (or `make setup ENGINE=llamacpp`); it "
    f"builds llama-cpp-python {LLAMA_CPP_VERSION} from source once (6-8 min on 2 cores)"
)
# The types quantize() accepts: llama.cpp's llama_ftype names (llama-quantize's)
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "F16", "F32")
# llama.cpp's CPU build runs its threads with OpenMP (libgomp, loaded by the import below and
# reading its settings then), whose idle threads spin by default: on a loaded 2-core machine the
# worker's llama.cpp engine decoded SmolLM2 at 1.5 tok/s spinning and 16 tok/s passive (measured
# under load). Passive unless the caller chose; bench/llamacpp.py runs llama-server the same way.
OMP_WAIT_POLICY = "PASSIVE"


class NotInstalled(ImportError):
    """llama-cpp-python is missing (or is not the version .ci/llamacpp-env.sh builds)."""


def require():
    """The llama_cpp module, or NotInstalled saying how to install it."""
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    try:
        import llama_cpp
    except ImportError as e:
        raise NotInstalled(f"{INSTALL_HINT} ({e})") from e
    if llama_cpp.__version__ != LLAMA_CPP_VERSION:
        raise NotInstalled(
            f"llama-cpp-python {llama_cpp.__version__} is installed, this project pins "
            f"{LLAMA_CPP_VERSION}: run `make llamacpp`"
        )
    return llama_cpp


def installed():
    try:
        require()
    except NotInstalled:
        return False
    return True


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs to file descriptor 2 from C (loading, quantizing): hidden while it works."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load(path, n_ctx=2048, threads=None, vocab_only=False):
    """A GGUF model in llama.cpp, every position's logits kept (for logits()); vocab_only: its
    tokenizer alone."""
    llama_cpp = require()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with quiet_stderr():
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            n_threads=threads or os.cpu_count(),
            logits_all=True,
            vocab_only=vocab_only,
            verbose=False,
        )


def logits(model, ids):
    """llama.cpp's logits for each position of `ids` (float32, [len(ids), vocab]), from a fresh
    context."""
    import numpy as np

    model.reset()
    model.eval(list(ids))
    return np.array(model.scores[: len(ids)], dtype=np.float32)


def greedy(model, ids, max_tokens, stop_ids=()):
    """The argmax continuation of `ids` (stop ids included when met) and each step's logits."""
    import numpy as np

    model.reset()
    model.eval(list(ids))
    out, steps = [], []
    for _ in range(max_tokens):
        row = np.array(model.scores[model.n_tokens - 1], dtype=np.float32)
        token = int(row.argmax())
        out.append(token), steps.append(row)
        if token in stop_ids:
            break
        model.eval([token])
    return out, steps


def n_params(model):
    return int(require().llama_model_n_params(model._model.model))


def quantize(src, dst, type_name, threads=None):
    """llama.cpp's llama_model_quantize (what llama-quantize runs): src GGUF -> dst as `type_name`
    (QUANT_TYPES). Tensors whose rows the type's block does not divide fall back to a type that
    fits (llama.cpp's choice, as its own tool does)."""
    import ctypes

    llama_cpp = require()
    if type_name not in QUANT_TYPES:
        raise ValueError(f"quantization type {type_name!r}: expected one of {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(
        llama_cpp, "LLAMA_FTYPE_ALL_F32" if type_name == "F32" else f"LLAMA_FTYPE_MOSTLY_{type_name}"
    )
    params.nthread = threads or os.cpu_count() or 1
    with quiet_stderr():
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {type_name} (status {status})")
