"""What this machine is, for the table's head: Python, OS, mlx and its device and backend,
mlx-lm, the BLAS, memory, Node."""

import platform
import shutil
import subprocess
import sys


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _os_name():
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]} ({platform.machine()})"
    try:
        distro = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        distro = ""
    libc = " ".join(platform.libc_ver()).strip() or "libc ?"
    return f"{platform.system()} {platform.release()} ({platform.machine()}, {libc}){', ' + distro if distro else ''}"


def node_version():
    node = shutil.which("node")
    if not node:
        return None
    try:
        return subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def versions():
    import mlx.core as mx

    from core import blas

    info = {}
    try:
        info = dict(mx.device_info())
    except Exception:
        pass
    metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    cuda = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
    device = mx.default_device()
    return {
        "python": f"{platform.python_version()} ({platform.python_implementation()}) {sys.executable}",
        "os": _os_name(),
        "mlx": mx.__version__,
        "mlx-lm": _version("mlx-lm"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "device": f"{'gpu' if device == mx.gpu else 'cpu'}: {info.get('device_name') or platform.processor() or '?'}"
        f" ({info.get('architecture') or platform.machine()})",
        "backend": "metal" if metal else "cuda" if cuda else "cpu",
        "memory": _memory_info(info),
        "blas": blas.loaded_path or blas.status or "-",
        "small products": blas.SMALL_GEMM_PATH if blas.small_gemm else "BLAS only (small_gemm not loaded)",
        "node": node_version() or "not found",
    }


def _memory_info(info):
    import psutil

    total = psutil.virtual_memory().total
    text = f"{total / 2**30:.1f} GiB RAM"
    ws = info.get("max_recommended_working_set_size")
    if ws:
        text += f", recommended working set {ws / 2**30:.1f} GiB"
    return text
