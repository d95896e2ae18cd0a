"""core/native/small_gemm.c: the small products decoding makes, in front of the BLAS.

Checked against numpy in float64 through its exported cblas_sgemm (every case it computes and
the ones it forwards), through mlx (libmlx's calls really land in it), from several threads at
once, after fork(), and the build script with and without a compiler.
"""

import ctypes
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from core import blas

ROOT = Path(__file__).resolve().parent.parent
ROW, COL, NO, T = 101, 102, 111, 112

needs_lib = pytest.mark.skipif(
    blas.small_gemm is None,
    reason=f"small_gemm not loaded ({blas.SMALL_GEMM_PATH} absent: Linux with a C compiler at `make setup`, "
    "or SMALL_GEMM=0, or no optimised BLAS)",
)


def sgemm(fn):
    P, N, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    fn.argtypes = [N] * 6 + [F, P, N, P, N, F, P, N]
    fn.restype = None
    return fn


def counts():
    return blas.small_gemm_counts()


def buffer_at(rng, rows, cols, ld, offset):
    """A (rows, cols) float32 view with leading dimension ld, `offset` floats into its buffer
    (mlx maps weights at any offset; the kernel aligns itself to them)."""
    base = rng.standard_normal(offset + rows * ld + 16).astype(np.float32)
    view = base[offset : offset + rows * ld].reshape(rows, ld)
    return base, view


def run_case(fn, rng, m, n, k, pad=0, w_offset=0, alpha=1.0, beta=0.0):
    """C = alpha * A @ W^T + beta * C through fn; returns (got, want)."""
    a_buf, a = buffer_at(rng, m, k, k + pad, 3)
    w_buf, w = buffer_at(rng, n, k, k + pad, w_offset)
    c = rng.standard_normal((m, n + pad)).astype(np.float32)
    if beta == 0.0:
        c[:] = np.nan  # beta 0: C must be overwritten, not read
    want = alpha * (a[:, :k].astype(np.float64) @ w[:, :k].T.astype(np.float64))
    if beta != 0.0:
        want += beta * c[:, :n].astype(np.float64)
    fn(
        ROW,
        NO,
        T,
        m,
        n,
        k,
        alpha,
        a.ctypes.data,
        k + pad,
        w.ctypes.data,
        k + pad,
        beta,
        c.ctypes.data,
        n + pad,
    )
    assert a_buf is not None and w_buf is not None  # the buffers outlive the call
    return c[:, :n], want


@needs_lib
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16, 17, 40, 128])
@pytest.mark.parametrize("k", [1, 15, 16, 17, 768, 2051])
def test_products_match_numpy(m, k):
    fn = sgemm(blas.small_gemm.cblas_sgemm)
    rng = np.random.default_rng(m * 10_000 + k)
    before = counts()
    for n, pad, w_offset, alpha, beta in [
        (1, 0, 0, 1.0, 0.0),
        (3, 5, 6, 0.5, 0.25),
        (300, 16, 6, 1.0, 0.0),
        (64, 0, 1, 2.0, 1.0),
    ]:
        got, want = run_case(fn, rng, m, n, k, pad, w_offset, alpha, beta)
        scale = np.abs(want).max() + 1e-6
        assert np.isfinite(got).all(), (m, n, k, pad, w_offset)
        assert np.abs(got - want).max() / scale < 1e-5, (m, n, k, pad, w_offset, alpha, beta)
    assert counts()[0] - before[0] == 4  # all computed by the kernel, none forwarded


@needs_lib
@pytest.mark.parametrize("layout", ["B not transposed", "A transposed", "column-major", "M=129", "M=256"])
def test_other_products_are_forwarded_to_the_blas(layout):
    fn = sgemm(blas.small_gemm.cblas_sgemm)
    rng = np.random.default_rng(7)
    m, n, k = {"M=129": 129, "M=256": 256}.get(layout, 4), 40, 33
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    c = np.zeros((m, n), np.float32)  # row-major x @ w.T in every layout below
    calls = {
        "B not transposed": (ROW, NO, NO, m, n, k, x, k, np.ascontiguousarray(w.T), n),
        "A transposed": (ROW, T, T, m, n, k, np.ascontiguousarray(x.T), m, w, k),
        "column-major": (COL, T, NO, n, m, k, w, k, x, k),  # C^T (n x m, column-major) = w @ x^T
    }
    order, ta, tb, mm, nn, kk, a, lda, b, ldb = calls.get(layout, (ROW, NO, T, m, n, k, x, k, w, k))
    before = counts()
    fn(order, ta, tb, mm, nn, kk, 1.0, a.ctypes.data, lda, b.ctypes.data, ldb, 0.0, c.ctypes.data, n)
    assert np.allclose(c, x @ w.T, atol=1e-4)
    assert counts()[1] - before[1] == 1 and counts()[0] == before[0]


@needs_lib
def test_mlx_products_land_in_the_kernel():
    import mlx.core as mx

    rng = np.random.default_rng(1)
    w_np = rng.standard_normal((512, 768)).astype(np.float32)
    w = mx.array(w_np)
    for m, computed in [(1, True), (8, True), (128, True), (129, False)]:
        x_np = rng.standard_normal((m, 768)).astype(np.float32)
        before = counts()
        y = x_np @ w_np.T
        got = mx.matmul(mx.array(x_np), w.T)
        mx.eval(got)
        after = counts()
        assert np.allclose(np.array(got), y, atol=1e-3)
        assert (after[0] - before[0], after[1] - before[1]) == ((1, 0) if computed else (0, 1)), m


@needs_lib
def test_the_row_range_forwards_what_lies_outside_it():
    """small_gemm_set_range (calibration, within a process) and SMALL_GEMM_MIN_M/_MAX_M (read when
    it loads): products with M outside [min, max] go to the BLAS, and are still right."""
    lib, fn = blas.small_gemm, sgemm(blas.small_gemm.cblas_sgemm)
    if not hasattr(lib, "small_gemm_set_range"):
        pytest.skip(f"{blas.SMALL_GEMM_PATH} was built before the row range: `make setup` builds it again")
    rng = np.random.default_rng(3)
    loaded = (lib.small_gemm_min_m(), lib.small_gemm_max_m())
    try:
        for (lo, hi), m, computed in [
            ((4, 128), 3, False),
            ((4, 128), 4, True),
            ((1, 0), 1, False),
            ((1, 8), 9, False),
        ]:
            lib.small_gemm_set_range(lo, hi)
            assert (lib.small_gemm_min_m(), lib.small_gemm_max_m()) == (lo, hi)
            before = counts()
            got, want = run_case(fn, rng, m, 40, 33)
            assert np.abs(got - want).max() < 1e-4
            assert (counts()[0] - before[0], counts()[1] - before[1]) == ((1, 0) if computed else (0, 1)), (
                lo,
                hi,
                m,
            )
    finally:
        lib.small_gemm_set_range(*loaded)
    code = "import core; from core import blas; print(blas.loaded_state()['small_gemm_rows'])"
    assert run_python(code, SMALL_GEMM_MIN_M="4").stdout.strip() == "[4, 128]"
    assert run_python(code, SMALL_GEMM_MIN_M="0", SMALL_GEMM_MAX_M="64").stdout.strip() == "[1, 64]"


@needs_lib
def test_threads_at_once_get_their_own_results():
    fn = sgemm(blas.small_gemm.cblas_sgemm)
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(30):
            got, want = run_case(fn, rng, 1 + seed % 8, 700, 512, w_offset=seed % 16)
            if np.abs(got - want).max() > 1e-3 * (np.abs(want).max() + 1):
                errors.append(seed)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]  # ctypes drops the GIL
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@needs_lib
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_a_forked_child_computes_with_a_fresh_pool():
    fn = sgemm(blas.small_gemm.cblas_sgemm)
    rng = np.random.default_rng(3)
    run_case(fn, rng, 1, 2048, 768)  # the parent's helper threads exist now
    pid = os.fork()
    if pid == 0:  # the child has none: it must not wait for them
        got, want = run_case(fn, rng, 4, 2048, 768)
        os._exit(0 if np.abs(got - want).max() < 1e-3 * np.abs(want).max() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@needs_lib
@pytest.mark.parametrize("spin_us", ["0", "1000"])
def test_products_in_a_row_with_more_helpers_than_cpus(spin_us):
    """Chunks are claimed by whichever thread is free: late and stale helpers (6 threads on
    this machine's CPUs, sleeping or spinning between products) must neither skip a chunk nor
    run one with the previous product's shapes."""
    code = """
import numpy as np, core
from core import blas
from tests.test_small_gemm import sgemm, run_case
fn, rng, bad = sgemm(blas.small_gemm.cblas_sgemm), np.random.default_rng(5), 0
for i in range(300):
    m, n, k = (1, 2048, 768) if i % 3 == 0 else (1 + i % 9, 256 + 16 * (i % 7), 768 + i % 5)
    got, want = run_case(fn, rng, m, n, k, w_offset=i % 16)
    bad += not np.abs(got - want).max() <= 1e-4 * (np.abs(want).max() + 1)
print(blas.small_gemm.small_gemm_threads(), bad)
"""
    done = run_python(code, SMALL_GEMM_THREADS="6", SMALL_GEMM_SPIN_US=spin_us)
    assert done.stdout.split() == ["6", "0"], done.stderr


def run_python(code, **env):
    full = {**os.environ, "FAST_BLAS_QUIET": "1", **env}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120
    )


@needs_lib
def test_threads_follow_the_cpus_this_process_may_use():
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= blas.small_gemm.small_gemm_threads() <= min(usable, 8)
    code = "import core; from core import blas; print(blas.small_gemm.small_gemm_threads())"
    assert run_python(code, SMALL_GEMM_THREADS="3").stdout.strip() == "3"
    if hasattr(os, "sched_setaffinity") and shutil.which("taskset"):
        pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                                text=True, env={**os.environ, "FAST_BLAS_QUIET": "1"}, timeout=120)  # fmt: skip
        assert pinned.stdout.strip() == "1", pinned.stderr


@needs_lib
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroup v2 quotas are Linux's")
def test_a_cgroup_cpu_quota_caps_the_threads(tmp_path):
    """In a container the quota, not the host's CPUs, is what the helpers can have."""
    code = "import core; from core import blas; print(blas.small_gemm.small_gemm_cpus())"
    usable = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    for text, want in [
        ("max 100000", usable),
        ("50000 100000", 1),
        ("150000 100000", min(2, usable)),
        ("junk", usable),
    ]:
        cpu_max.write_text(text + "\n")
        assert run_python(code, SMALL_GEMM_CPU_MAX=str(cpu_max)).stdout.strip() == str(want), text


@needs_lib
def test_helpers_spin_only_with_a_cpu_to_spare():
    code = (
        "import core; from core import blas; g = blas.small_gemm; "
        "print(g.small_gemm_threads(), g.small_gemm_spin_us(), g.small_gemm_cpus())"
    )
    assert run_python(code, SMALL_GEMM_THREADS="1").stdout.split()[:2] == ["1", "0"]  # no helper
    assert run_python(code, SMALL_GEMM_SPIN_US="40").stdout.split()[1] == "40"
    threads, spin, cpus = map(int, run_python(code).stdout.split())  # cpus: affinity and cgroup quota
    assert spin == (100 if 1 < threads < cpus else 0)  # every CPU taken: the Python thread needs it
    if cpus >= 2:
        assert run_python(code, SMALL_GEMM_THREADS=str(cpus - 1)).stdout.split()[1] == (
            "100" if cpus > 2 else "0"
        )


@needs_lib
def test_small_gemm_lib_loads_another_build(tmp_path):
    code = "import core; from core import blas; print(blas.SMALL_GEMM_PATH, blas.small_gemm is not None)"
    copy = tmp_path / "other.so"
    shutil.copy(blas.SMALL_GEMM_PATH, copy)
    assert run_python(code, SMALL_GEMM_LIB=str(copy)).stdout.split() == [str(copy), "True"]
    assert run_python(code, SMALL_GEMM_LIB=str(tmp_path / "absent.so")).stdout.split()[1] == "False"


@needs_lib
def test_small_gemm_0_leaves_the_blas_alone():
    code = "import core; from core import blas; print(blas.status, blas.small_gemm is None)"
    assert run_python(code, SMALL_GEMM="0").stdout.split() == ["loaded", "True"]
    assert run_python(code).stdout.split() == ["loaded", "False"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="built on Linux only (macOS has Accelerate)")
def test_build_script_builds_or_explains(tmp_path):
    out = tmp_path / "libsmall_gemm.so"
    script = ROOT / ".ci" / "build-small-gemm.sh"
    missing = subprocess.run(
        ["bash", str(script)], cwd=ROOT, env={**os.environ, "CC": "no-such-cc", "SMALL_GEMM_OUT": str(out)},
        capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 0 and not out.exists()
    assert "no C compiler (no-such-cc)" in missing.stderr
    if subprocess.run(["sh", "-c", "command -v cc"], capture_output=True).returncode != 0:
        pytest.skip("no C compiler on this machine: the build itself is not checked")
    built = subprocess.run(
        ["bash", str(script)],
        cwd=ROOT,
        env={**os.environ, "SMALL_GEMM_OUT": str(out)},
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0 and out.exists(), built.stderr
    lib = ctypes.CDLL(str(out), mode=os.RTLD_LOCAL)
    assert lib.small_gemm_max_m() == 128 and lib.small_gemm_threads() >= 1
