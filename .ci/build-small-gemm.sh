#!/usr/bin/env bash
# Build core/native/small_gemm.c (the products decoding makes on the CPU; see core/blas.py) into
# .venv/lib, for the machine it runs on. Linux only: macOS has Accelerate. Without a C compiler
# decoding keeps the BLAS's own kernels (slower); say so and go on.
set -u
[ "$(uname -s)" = Linux ] || exit 0
src=core/native/small_gemm.c
out=${SMALL_GEMM_OUT:-.venv/lib/libsmall_gemm.so} # tests build elsewhere
cc=${CC:-cc}
if ! command -v "$cc" >/dev/null 2>&1; then
  rm -f "$out"
  echo "setup: no C compiler ($cc): CPU decoding uses the BLAS's own kernels (install gcc for ~1.3x faster decoding)" >&2
  exit 0
fi
mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
flags=(-O3 -fPIC -shared -pthread -Wall -o "$tmp" "$src")
# -march=native: the vector width of this CPU (AVX-512 where it has it); plain -O3 where the
# compiler does not know the flag
if "$cc" -march=native "${flags[@]}" 2>/dev/null || "$cc" "${flags[@]}"; then
  mv -f "$tmp" "$out"
  echo "setup: built $out (small products for decoding; SMALL_GEMM=0 turns it off)"
else
  rm -f "$tmp" "$out"
  echo "setup: could not compile $src; CPU decoding uses the BLAS's own kernels" >&2
fi
exit 0
