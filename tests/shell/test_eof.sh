#!/usr/bin/env bash
# stdin EOF: the worker answers what it has read, then exits 0 (also with no request at all).
source "$(dirname "$0")/lib.sh"
out="$TMP/out"
run_worker "$out" </dev/null
check_rc 0 "$out"
check "empty input: only ready" "$out" 'length == 1 and .[0].type == "ready"' \
  'len(msgs) == 1 and msgs[0]["type"] == "ready"'
# no trailing newline on the last request: still a request at EOF
printf '%s\n%s' '{"id":"x","prompt":"Olá","max_tokens":6}' '{"id":"y","prompt":"Olá","max_tokens":6}' | run_worker "$out"
check_rc 0 "$out"
check "requests read before EOF are answered" "$out" \
  '[.[] | select(.type == "done") | .id] | sort == ["x","y"]' \
  'sorted(m["id"] for m in msgs if m["type"] == "done") == ["x","y"]'
check_schema "$out"
finish
