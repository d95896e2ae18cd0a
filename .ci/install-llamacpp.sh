#!/usr/bin/env bash
# Install llama-cpp-python (the llama.cpp engine's bindings) into .venv, built from its sdist with
# this platform's flags (.ci/llamacpp-env.sh). The wheel is kept in .venv/llama.cpp/<key>/wheel, so
# a reinstall does not rebuild; a change of version or flags builds anew (6-8 min on 2 cores).
# LLAMA_WHEEL=path installs a wheel you built yourself with the same flags instead.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/llamacpp-env.sh
PY=${PY:-.venv/bin/python}
pip=("$PY" -m pip --disable-pip-version-check)
dir=.venv/llama.cpp/$LLAMA_KEY/wheel
pattern="llama_cpp_python-$LLAMA_VERSION-*.whl"
find_wheel() { find "$dir" -maxdepth 1 -name "$pattern" 2>/dev/null | head -n 1; }
mkdir -p "$dir"
if [ -z "$(find_wheel)" ] && [ -n "${LLAMA_WHEEL:-}" ]; then
  case "$(basename "$LLAMA_WHEEL")" in $pattern) ;; *)
    echo "llamacpp: LLAMA_WHEEL=$LLAMA_WHEEL is not a llama_cpp_python-$LLAMA_VERSION wheel" >&2; exit 2;; esac
  cp "$LLAMA_WHEEL" "$dir/"
fi
if [ -z "$(find_wheel)" ]; then
  echo "llamacpp: building llama-cpp-python==$LLAMA_VERSION from its sdist (CMAKE_ARGS=\"$LLAMA_CMAKE_FLAGS\");" \
    "6-8 min on 2 cores, once" >&2
  start=$(date +%s)
  CMAKE_ARGS="$LLAMA_CMAKE_FLAGS" "${pip[@]}" wheel --quiet --no-deps --no-cache-dir \
    --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION" -w "$dir"
  echo "llamacpp: built in $(( $(date +%s) - start )) s" >&2
fi
"${pip[@]}" install --quiet -r requirements-llamacpp.txt
"${pip[@]}" install --quiet --no-deps --force-reinstall "$(find_wheel)"
"$PY" - <<'PY'
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
print(f"llamacpp: llama-cpp-python {llama_cpp.__version__} in .venv ({info.strip()})")
PY
