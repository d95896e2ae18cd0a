#!/bin/sh
# Prints the path of a Python new enough for the pinned packages, for `make setup` to build
# .venv with (it runs before .venv exists). PYTHON3=/path/to/python overrides the search.
# Otherwise: python3.13, python3.12, python3.11, then python3, first on PATH that is new enough.
# None: one line on stderr naming what to install, exit 1. POSIX sh (macOS's /bin/sh too).
# MIN_MINOR: the highest Requires-Python of the pins (numpy 2.4.6, mlx-lm 0.32.2 and
# transformers 5.23.0 need >= 3.11; tests/test_portability.py checks it against them).
MIN_MINOR=11
CANDIDATES="python3.13 python3.12 python3.11 python3"

# version_of CMD: prints "3.X" (nothing if CMD does not run)
version_of() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

new_enough() {
  case "$1" in
    3.*) minor="${1#3.}"; [ "$minor" -ge "$MIN_MINOR" ] 2>/dev/null ;;
    *) return 1 ;;
  esac
}

need="Python >= 3.$MIN_MINOR"
hint="install one (macOS: brew install python@3.12, or the installer from python.org; Linux: your package manager, e.g. apt install python3.11-venv) or set PYTHON3=/path/to/python3"

if [ -n "${PYTHON3:-}" ]; then
  path="$(command -v "$PYTHON3" 2>/dev/null)"
  if [ -z "$path" ]; then
    echo "setup: PYTHON3=$PYTHON3 not found; $need is needed: $hint" >&2; exit 1
  fi
  v="$(version_of "$path")"
  if new_enough "$v"; then echo "$path"; exit 0; fi
  echo "setup: PYTHON3=$PYTHON3 is Python ${v:-of unknown version}; $need is needed (numpy 2.4, mlx-lm 0.32, transformers 5): $hint" >&2
  exit 1
fi

found=""
for c in $CANDIDATES; do
  path="$(command -v "$c" 2>/dev/null)" || continue
  [ -n "$path" ] || continue
  v="$(version_of "$path")"
  if new_enough "$v"; then echo "$path"; exit 0; fi
  found="$found${found:+, }$c ${v:-(does not run)}"
done
echo "setup: $need is needed (numpy 2.4, mlx-lm 0.32, transformers 5) and PATH has ${found:-no python3}: $hint" >&2
exit 1
