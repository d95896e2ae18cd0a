"""What machine a benchmark ran on, and what its memory bandwidth allows."""

import os
import platform
import socket
import threading
import time

import numpy as np


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_ids():
    """(family, model) numbers of the CPU from /proc/cpuinfo (None where unknown)."""
    family = model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "cpu family" and family is None:
                    family = int(value)
                elif key == "model" and model is None:
                    model = int(value)
                if family is not None and model is not None:
                    break
    except (OSError, ValueError):
        pass
    return family, model


def blas_core(path):
    """The kernel set OpenBLAS chose in this process (openblas_get_corename), or None.

    OpenBLAS falls back to its generic "Prescott" (SSE3) kernels on a CPU it does not know.
    """
    if not path or "openblas" not in os.path.basename(path):
        return None
    try:
        import ctypes

        lib = ctypes.CDLL(path)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return lib.openblas_get_corename().decode()
    except Exception:
        return None


def describe():
    import mlx.core as mx

    from core import blas

    info = {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "backend": "gpu" if mx.default_device() == mx.gpu else "cpu",
        "blas": blas.loaded_path or blas.status,
        "blas_core": blas_core(blas.loaded_path),
        "mlx": mx.__version__,
    }
    info["cpu_family"], info["cpu_model_number"] = cpu_ids()
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except Exception:
        pass
    return info


def memory_read_bandwidth(gib=1.0, threads=None, repeats=5, samples=False):
    """Bytes/s read by summing a large float32 array with one thread per core (median; with
    samples=True, the list of every timed pass).

    numpy's sum releases the GIL, so the threads read their slices in parallel.
    """
    threads = threads or os.cpu_count() or 1
    data = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    slices = np.array_split(data, threads)
    results = []
    for _ in range(repeats + 1):
        workers = [threading.Thread(target=np.sum, args=(s,)) for s in slices]
        tic = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        results.append(data.nbytes / (time.perf_counter() - tic))
    if samples:
        return [float(r) for r in results[1:]]
    return float(np.median(results[1:]))  # the first pass warms the pages
