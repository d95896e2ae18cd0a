#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the source vendored in llama-cpp-python's sdist (the
# same source and CMake flags as the bindings: .ci/llamacpp-env.sh) into
# .venv/llama.cpp/<key>/bin/llama-server: the bench's anchor. Static, server only (no tests,
# examples, web UI, curl or OpenSSL). Cached: nothing happens when that binary is there.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/llamacpp-env.sh
PY=${PY:-.venv/bin/python}
root=.venv/llama.cpp
out=$root/$LLAMA_KEY/bin/llama-server
if [ -x "$out" ]; then echo "$out"; exit 0; fi
command -v cmake >/dev/null || { echo "llama-server: needs cmake (apt-get install cmake, brew install cmake)" >&2; exit 2; }
src=$root/src/llama_cpp_python-$LLAMA_VERSION
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
  mkdir -p "$root/src"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_VERSION" -d "$root/src"
  tar -xzf "$root/src/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$root/src"
fi
build=$root/$LLAMA_KEY/build
mkdir -p "$root/$LLAMA_KEY"
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
jobs=$( (nproc || sysctl -n hw.ncpu) 2>/dev/null || echo 2)
start=$(date +%s)
# shellcheck disable=SC2086 # the flags are words
cmake -S "$src/vendor/llama.cpp" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF $LLAMA_CMAKE_FLAGS >"$build.log" 2>&1 \
  || { tail -30 "$build.log" >&2; exit 1; }
cmake --build "$build" --target llama-server -j "$jobs" >>"$build.log" 2>&1 || { tail -30 "$build.log" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
cp "$build/bin/llama-server" "$out.tmp" && mv -f "$out.tmp" "$out"
echo "llama-server: built $out in $(( $(date +%s) - start )) s (log: $build.log)" >&2
echo "$out"
