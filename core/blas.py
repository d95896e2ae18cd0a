"""Load an optimised BLAS into this process before mlx is imported (Linux CPU only).

The mlx[cpu] wheel links the unoptimised reference BLAS. Loading OpenBLAS or MKL with
RTLD_GLOBAL first makes their cblas_* symbols win when libmlx.so is loaded, which makes a
float32 matmul 10-60x faster on x86-64. macOS (Accelerate) and CUDA need nothing.

OpenBLAS 0.3.21 (Debian 12) does not recognise recent x86 CPUs and falls back to its SSE3
"Prescott" kernels; unless OPENBLAS_CORETYPE is already set, it is set from the CPU's flags
before the library loads (measured: prefill 2x, 8 concurrent streams 1.4x; docs/PERFORMANCE.md).

Opt out with FAST_BLAS=0; force a library with FAST_BLAS_LIB=/path/to/lib.so. Intel MKL
(`pip install mkl`, which puts libmkl_rt.so.3 in the venv's lib/; `make setup` does on Linux
x86-64) is preferred when present: about 2x OpenBLAS 0.3.21 in decoding (docs/PERFORMANCE.md).

Small products (decoding): `make setup` compiles core/native/small_gemm.c into the venv's lib/
where a C compiler exists. When that library is there it is loaded ahead of the BLAS, takes
libmlx's cblas_sgemm for the products decoding makes (M rows of activations against a weight
matrix, M in SMALL_GEMM_MIN_M..SMALL_GEMM_MAX_M, default 1..128) and hands every other call to
the BLAS: on the 2-core AMD EPYC it was tuned on, decoding's products run 2-3x as fast as MKL's
(1-16 streams); on a 2-core Intel Xeon its M < 4 kernels lose to MKL's and M = 4-16 win
(docs/PERFORMANCE.md). Opt out with SMALL_GEMM=0; SMALL_GEMM_THREADS and SMALL_GEMM_SPIN_US tune
it (read when it loads); SMALL_GEMM_LIB=path loads another build of it.

Measured, not assumed: `make setup` runs core/calibrate.py once per CPU (`make calibrate` again),
which times the libraries present, the thread policies (POLICIES: "sleep", threads sleep as soon
as a call ends, the default; "spin", the libraries' own) and small_gemm's row ranges, per role
(decode: the worker; train: training), and stores the winners in CALIBRATION_PATH. A process
applies its role's choice here (FAST_BLAS_ROLE, set by worker/ and train/; decode otherwise).
What is set by hand wins: FAST_BLAS_LIB, FAST_BLAS_POLICY=sleep|spin, KMP_BLOCKTIME,
OPENBLAS_THREAD_TIMEOUT, MKL_DYNAMIC, SMALL_GEMM*; FAST_BLAS_CALIBRATION=0 ignores the
calibration (the tests do). loaded_state() reads back what the libraries really run with.
"""

import ctypes
import ctypes.util
import json
import os
import sys

CANDIDATES = (
    os.path.join(sys.prefix, "lib", "libmkl_rt.so.3"),  # the PyPI mkl wheel
    "libmkl_rt.so",
    "libmkl_rt.so.2",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblas.so.0",
    "libopenblas.so",
)

# Thread policies, read by the libraries when they load (and set here, when unset, before
# that): "sleep": no BLAS thread spins between calls, so a worker that is idle, or between two
# matmuls, leaves the cores to the other processes; "spin": the libraries' own defaults (Intel
# OpenMP spins 200 ms after a parallel region, OpenBLAS ~0.1 s), faster when the next product
# comes soon and a core is free. `make calibrate` chooses per role; FAST_BLAS_POLICY forces one.
POLICIES = {
    "sleep": {"KMP_BLOCKTIME": "0", "OPENBLAS_THREAD_TIMEOUT": "4"},
    "spin": {"KMP_BLOCKTIME": "200", "OPENBLAS_THREAD_TIMEOUT": "28"},
}
DEFAULT_POLICY = "sleep"
ALWAYS = {"MKL_DYNAMIC": "TRUE"}  # MKL may use fewer threads than cores for small products
SHARED_MACHINE_THREADS = {**POLICIES["sleep"], **ALWAYS}
KERNEL_KEYS = ("SMALL_GEMM", "SMALL_GEMM_MIN_M", "SMALL_GEMM_MAX_M")  # a calibrated choice may set these
AUTO_KEYS = "FAST_BLAS_AUTO"  # NAME=VALUE of those set here: a child recomputes them unless changed
# where `make calibrate` stores its choice (FAST_BLAS_CALIBRATION_FILE: elsewhere, for tests)
CALIBRATION_PATH = os.environ.get("FAST_BLAS_CALIBRATION_FILE") or os.path.join(
    sys.prefix, "blas-calibration.json"
)

SMALL_GEMM_PATH = os.environ.get("SMALL_GEMM_LIB") or os.path.join(sys.prefix, "lib", "libsmall_gemm.so")

# What happened in this process: None (not tried), a path, or a reason string.
loaded_path = None
status = "not tried"
role = None  # decode or train: whose calibrated settings this process took
policy = None  # the thread policy chosen (the variables set by hand still win)
calibration = "not read"  # where the settings came from, in words
small_gemm = None  # the loaded small-product library (ctypes.CDLL), when it is in use


def _find(calibrated=None):
    forced = os.environ.get("FAST_BLAS_LIB")
    if forced:
        return [forced]
    found = ctypes.util.find_library("openblas")
    return ([calibrated] if calibrated else []) + list(CANDIDATES) + ([found] if found else [])


def cpu_identity():
    """What a calibration is valid for: the CPU's name, family/model/stepping and CPU count."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if (
                    key.strip() in ("model name", "cpu family", "model", "stepping")
                    and key.strip() not in info
                ):
                    info[key.strip()] = value.strip()
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "name": info.get("model name", "?"),
        "id": "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "cpus": cpus,
    }


def read_calibration(path=None):
    """The stored calibration (core/calibrate.py) when it was made on this CPU, else None."""
    try:
        with open(path or CALIBRATION_PATH) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _log(True, f"fast-blas: ignoring {path or CALIBRATION_PATH}: {e}; `make calibrate` writes it again")
        return None
    return record if record.get("cpu") == cpu_identity() else None


def calibrated_choice():
    """This process's role's settings from the calibration ({} where none applies). The role:
    FAST_BLAS_ROLE (decode or train; set by worker/ and train/ before they import core, and
    consumed here so that a child process chooses its own), decode when unset."""
    global role, calibration
    role = os.environ.pop("FAST_BLAS_ROLE", "") or "decode"
    if os.environ.get("FAST_BLAS_CALIBRATION", "1") == "0":
        calibration = "off (FAST_BLAS_CALIBRATION=0)"
        return {}
    record = read_calibration()
    if record is None:
        calibration = f"none for this CPU in {CALIBRATION_PATH} (defaults; `make calibrate`)"
        return {}
    calibration = (
        f"{record.get('when')} ({role}: {record.get('decision', {}).get(role, {}).get('choice', '?')})"
    )
    return record.get("choice", {}).get(role, {})


def _set_policy(chosen):
    """Set the thread variables (when not set by hand) for FAST_BLAS_POLICY, else the calibrated
    policy, else DEFAULT_POLICY, and the calibrated kernel range (KERNEL_KEYS); remember which
    were set here (AUTO_KEYS) so that a child process recomputes them for its own role."""
    global policy
    for item in filter(None, os.environ.pop(AUTO_KEYS, "").split(",")):
        key, _, value = item.partition("=")
        if os.environ.get(key) == value:
            del os.environ[key]  # as a parent's core.blas set it, not changed by hand since
    policy = os.environ.get("FAST_BLAS_POLICY") or chosen.get("FAST_BLAS_POLICY") or DEFAULT_POLICY
    if policy not in POLICIES:
        _log(
            True,
            f"fast-blas: FAST_BLAS_POLICY={policy!r} is not one of {', '.join(POLICIES)}; using {DEFAULT_POLICY}",
        )
        policy = DEFAULT_POLICY
    auto = []
    kernel = {k: v for k, v in chosen.items() if k in KERNEL_KEYS}
    for key, value in {**POLICIES[policy], **ALWAYS, **kernel}.items():
        if key not in os.environ:
            os.environ[key] = value  # read by the libraries when they load
            auto.append(f"{key}={value}")
    os.environ[AUTO_KEYS] = ",".join(auto)


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def openblas_coretype(flags=None):
    """The OpenBLAS DYNAMIC_ARCH core for this CPU's instruction set (None: leave it)."""
    flags = cpu_flags() if flags is None else flags
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "Cooperlake" if "avx512_bf16" in flags else "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def load_fast_blas(log=True):
    """Idempotent. Returns the loaded library path, or None."""
    global loaded_path, status
    if status != "not tried":
        return loaded_path
    if not sys.platform.startswith("linux"):
        status = "not needed on this platform"
        return None
    if os.environ.get("FAST_BLAS", "1").lower() in ("0", "off", "false", "no"):
        status = "disabled by FAST_BLAS=0"
        _log(log, f"fast-blas: {status}; using the reference BLAS bundled with mlx")
        return None
    if "mlx.core" in sys.modules:
        status = "too late: mlx was imported before core.blas"
        _log(log, f"fast-blas: {status}")
        return None
    if "OPENBLAS_CORETYPE" not in os.environ and (core := openblas_coretype()):
        os.environ["OPENBLAS_CORETYPE"] = core  # read by OpenBLAS when it is loaded
    chosen = calibrated_choice()
    _set_policy(chosen)
    for name in _find(chosen.get("FAST_BLAS_LIB")):
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_LOCAL)  # global once we know it is a BLAS
        except OSError:
            continue
        if not hasattr(lib, "cblas_sgemm"):
            continue
        _load_small_gemm(lib)  # before the BLAS enters the global scope: its cblas_sgemm wins
        ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
        loaded_path = _resolve(name)
        status = "loaded"
        core = _corename(lib)
        small = f"; small products: {SMALL_GEMM_PATH}" if small_gemm else ""
        _log(
            log,
            f"fast-blas: loaded {loaded_path}{f' ({core} kernels)' if core else ''}{small} (FAST_BLAS=0 to opt out)",
        )
        return loaded_path
    status = "no optimised BLAS found"
    _log(
        log,
        "fast-blas: no optimised BLAS found; mlx uses its slow reference BLAS. "
        "Install one: apt-get install libopenblas0-pthread (or run `make setup` as root)",
    )
    return None


def _load_small_gemm(blas_lib):
    """Put core/native/small_gemm.c's cblas_sgemm ahead of `blas_lib`'s, forwarding to it."""
    global small_gemm
    if os.environ.get("SMALL_GEMM", "1").lower() in ("0", "off", "false", "no"):
        return
    if not os.path.exists(SMALL_GEMM_PATH):
        return
    try:
        lib = ctypes.CDLL(SMALL_GEMM_PATH, mode=os.RTLD_GLOBAL)
    except OSError as e:
        _log(True, f"fast-blas: could not load {SMALL_GEMM_PATH} ({e}); decoding uses the BLAS alone")
        return
    lib.small_gemm_set_fallback(ctypes.cast(blas_lib.cblas_sgemm, ctypes.c_void_p))
    small_gemm = lib


def small_gemm_counts():
    """(products computed by small_gemm, products forwarded to the BLAS) in this process."""
    if small_gemm is None:
        return None
    done, forwarded = ctypes.c_long(), ctypes.c_long()
    small_gemm.small_gemm_counts(ctypes.byref(done), ctypes.byref(forwarded))
    return done.value, forwarded.value


def loaded_state():
    """What this process really runs with, read back from the loaded libraries: the BLAS file,
    whether small_gemm took cblas_sgemm, Intel OpenMP's block time and MKL's dynamic flag (None
    where that library is not loaded), and OpenBLAS's thread timeout as it read it at load."""
    state = {"blas": loaded_path, "status": status, "small_gemm": small_gemm is not None}
    state["small_gemm_lib"] = SMALL_GEMM_PATH if small_gemm is not None else None
    if small_gemm is not None and hasattr(small_gemm, "small_gemm_min_m"):  # builds before 2026-12-05: no min
        state["small_gemm_rows"] = [small_gemm.small_gemm_min_m(), small_gemm.small_gemm_max_m()]
    state["kmp_blocktime"] = _call_mapped("libiomp5", "kmp_get_blocktime")
    state["mkl_dynamic"] = _call_mapped("libmkl_rt", "mkl_get_dynamic")
    state["mkl_threads"] = _call_mapped("libmkl_rt", "mkl_get_max_threads")
    openblas = loaded_path is not None and "openblas" in os.path.basename(loaded_path)
    state["openblas_thread_timeout"] = os.environ.get("OPENBLAS_THREAD_TIMEOUT") if openblas else None
    return state


def _call_mapped(base, fn_name):
    """fn_name() of the library `base` when it is mapped into this process, else None."""
    path = _resolve(base)
    if path == base:
        return None
    try:
        return int(getattr(ctypes.CDLL(path, mode=os.RTLD_NOLOAD), fn_name)())
    except (OSError, AttributeError):
        return None


def _corename(lib):
    try:
        fn = lib.openblas_get_corename
    except AttributeError:
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def _resolve(name):
    """The file the dynamic loader actually mapped for `name` (from /proc/self/maps)."""
    base = os.path.basename(name).split(".so")[0]
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if base in os.path.basename(path):
                    return path
    except OSError:
        pass
    return name


def _log(enabled, message):
    if not enabled or os.environ.get("FAST_BLAS_QUIET") == "1":
        return
    if os.environ.get("LOG_FORMAT") == "json":  # the worker's structured logs
        import json
        import time

        message = json.dumps({"ts": round(time.time(), 3), "level": "info", "msg": message})
    print(message, file=sys.stderr, flush=True)
