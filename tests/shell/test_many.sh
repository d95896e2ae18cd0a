#!/usr/bin/env bash
# Several requests in one pipe (prompt, messages, stream, a stop string): each id gets
# exactly one terminal message.
source "$(dirname "$0")/lib.sh"
out="$TMP/out"
printf '%s\n' \
  '{"id":"a","prompt":"Olá","max_tokens":8}' \
  '{"id":"b","messages":[{"role":"system","content":"Responde em português."},{"role":"user","content":"Quem é o Farense?"}],"max_tokens":12}' \
  '{"id":"c","prompt":"Conta a história do Farense.","stream":true,"max_tokens":16}' \
  '{"id":"d","prompt":"Onde fica Faro?","max_tokens":10,"temperature":0.8,"seed":7}' \
  '{"id":"e","prompt":"Qual é o estádio?","max_tokens":10,"stop":["\n"]}' \
  | run_worker "$out"
check_rc 0 "$out"
check "each of a..e answered exactly once" "$out" \
  '[.[] | select(.type == "done" or .type == "error") | .id] | sort == ["a","b","c","d","e"]' \
  'sorted(m["id"] for m in msgs if m["type"] in ("done", "error")) == ["a","b","c","d","e"]'
check "all are done (no error)" "$out" '[.[] | select(.type == "error")] | length == 0' \
  'not any(m["type"] == "error" for m in msgs)'
check "tokens only for the streamed request" "$out" '[.[] | select(.type == "token") | .id] | unique == ["c"]' \
  'sorted({m["id"] for m in msgs if m["type"] == "token"}) == ["c"]'
check_schema "$out"
finish
