#!/bin/sh
# Sourced by install-llamacpp.sh and build-llama-server.sh: what llama.cpp is built from and with.
# LLAMA_VERSION: the llama-cpp-python release (its sdist vendors llama.cpp's source, llama-server's
#   included), so the bindings and the server come from one source.
# LLAMA_CMAKE_FLAGS: on x86-64 Linux the portable flags (AVX2/FMA/F16C, no AVX-512/AMX; with
#   llama.cpp's default GGML_NATIVE=ON the build segfaults at the first evaluation on some VMs);
#   elsewhere llama.cpp's own defaults (Metal on a Mac, NEON on aarch64). LLAMA_CMAKE_ARGS overrides.
# LLAMA_KEY: names the build (version, flags, platform), so a change of any of them rebuilds.
LLAMA_VERSION=0.3.36
if [ -n "${LLAMA_CMAKE_ARGS+x}" ]; then
  LLAMA_CMAKE_FLAGS=$LLAMA_CMAKE_ARGS
elif [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
  LLAMA_CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF"
else
  LLAMA_CMAKE_FLAGS=
fi
LLAMA_KEY=$(printf '%s|%s|%s' "$LLAMA_VERSION" "$LLAMA_CMAKE_FLAGS" "$(uname -sm)" \
  | { if command -v shasum >/dev/null 2>&1; then shasum; elif command -v sha1sum >/dev/null 2>&1; then sha1sum; else cksum; fi; } \
  | tr -dc '0-9a-f' | cut -c1-10)
