#!/usr/bin/env bash
# Install an optimised BLAS on Linux where we can (Debian's OpenBLAS, as root); hint otherwise.
set -u
[ "$(uname -s)" = Linux ] || exit 0
# Intel MKL in the venv (make setup's default on Linux x86-64) is what core/blas.py loads first.
[ -e .venv/lib/libmkl_rt.so.3 ] && exit 0
if ldconfig -p 2>/dev/null | grep -qE 'libopenblas\.so\.0|libmkl_rt\.so'; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing libopenblas0-pthread (fast BLAS for mlx on the CPU)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null \
    || echo "setup: could not install libopenblas0-pthread; training and decoding will be slow" >&2
else
  echo "setup: hint: install an optimised BLAS (sudo apt-get install libopenblas0-pthread) for 5-10x faster CPU training" >&2
fi
exit 0
