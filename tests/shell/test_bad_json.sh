#!/usr/bin/env bash
# A bad JSON line gets one error with id null; the worker goes on with the next request.
source "$(dirname "$0")/lib.sh"
out="$TMP/out"
printf '%s\n' 'this is not json' '{"id":"after","prompt":"Olá","max_tokens":8}' '[1,2]' '{"prompt":"no id"}' '{"id":"last","prompt":"Olá","max_tokens":4}' \
  | run_worker "$out"
check_rc 0 "$out"
check "first reply after ready: bad_json error with id null" "$out" \
  '.[1].type == "error" and .[1].id == null and .[1].code == "bad_json" and (.[1].message | length) > 0' \
  'msgs[1]["type"] == "error" and msgs[1]["id"] is None and msgs[1]["code"] == "bad_json" and msgs[1]["message"]'
check "three errors with id null (not JSON, not an object, no id)" "$out" \
  '[.[] | select(.type == "error" and .id == null)] | length == 3' \
  'sum(1 for m in msgs if m["type"] == "error" and m["id"] is None) == 3'
check "the next requests are still answered" "$out" \
  '[.[] | select(.type == "done") | .id] | sort == ["after","last"]' \
  'sorted(m["id"] for m in msgs if m["type"] == "done") == ["after","last"]'
check_schema "$out"
finish
