#!/usr/bin/env bash
# A prompt: `ready` first, then one `done` with non-empty text; nothing else on stdout.
source "$(dirname "$0")/lib.sh"
out="$TMP/out"
printf '%s\n' '{"id":"1","prompt":"Olá! Quem fundou o Farense?","max_tokens":24}' | run_worker "$out"
check_rc 0 "$out"
# (the protocol version itself is pinned by docs/protocol.schema.json: check_schema below)
check "ready first, once" "$out" \
  '.[0].type == "ready" and (.[0].protocol | type) == "number" and ([.[] | select(.type == "ready")] | length) == 1' \
  'msgs[0]["type"] == "ready" and isinstance(msgs[0]["protocol"], int) and sum(m["type"] == "ready" for m in msgs) == 1'
check "exactly two lines: ready, done" "$out" 'length == 2 and .[1].type == "done" and .[1].id == "1"' \
  'len(msgs) == 2 and msgs[1]["type"] == "done" and msgs[1]["id"] == "1"'
check "done text non-empty, finish_reason stop|length" "$out" \
  '(.[1].text | length) > 0 and (.[1].finish_reason | IN("stop", "length")) and .[1].usage.completion_tokens >= 1' \
  'len(msgs[1]["text"]) > 0 and msgs[1]["finish_reason"] in ("stop", "length") and msgs[1]["usage"]["completion_tokens"] >= 1'
check_schema "$out"
finish
