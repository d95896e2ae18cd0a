#!/usr/bin/env bash
# Runs every tests/shell/test_*.sh (each pipes NDJSON into `python -m worker` on
# models/tiny-mistral) and ends with a line `N passed, N failed`. Exit status 1 on failure.
# A test that exits 77 is skipped (not counted). Env: PY (default .venv/bin/python), NO_JQ=1.
set -u
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
passed=0 failed=0 skipped=0
failures=()
for t in "$DIR"/test_*.sh; do
  name="$(basename "$t")"
  log="$(bash "$t" 2>&1)"
  rc=$?
  if [[ $rc == 0 ]]; then
    passed=$((passed + 1)); echo "PASS $name"
  elif [[ $rc == 77 ]]; then
    skipped=$((skipped + 1)); echo "SKIP $name"; printf '%s\n' "$log"
  else
    failed=$((failed + 1)); failures+=("$name"); echo "FAIL $name (exit $rc)"; printf '%s\n' "$log"
  fi
done
[[ $skipped -gt 0 ]] && echo "($skipped skipped)"
echo "$passed passed, $failed failed"
[[ $failed == 0 ]]
