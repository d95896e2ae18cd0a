#!/usr/bin/env bash
# stream:true: token texts (non-empty) come before done and concatenate to done.text.
source "$(dirname "$0")/lib.sh"
out="$TMP/out"
printf '%s\n' '{"id":"s1","messages":[{"role":"user","content":"Qual é o estádio do Farense? São Luís?"}],"stream":true,"max_tokens":48}' \
  | run_worker "$out"
check_rc 0 "$out"
check "at least one token, all non-empty, all for s1" "$out" \
  '[.[] | select(.type == "token")] | length > 0 and all(.[]; .id == "s1" and (.text | length) > 0)' \
  'any(m["type"] == "token" for m in msgs) and all(m["id"] == "s1" and m["text"] for m in msgs if m["type"] == "token")'
check "tokens concatenate to the done text" "$out" \
  '([.[] | select(.type == "token") | .text] | join("")) == (.[] | select(.type == "done") | .text)' \
  '"".join(m["text"] for m in msgs if m["type"] == "token") == next(m["text"] for m in msgs if m["type"] == "done")'
check "done is the last line" "$out" '.[-1].type == "done" and .[-1].id == "s1"' \
  'msgs[-1]["type"] == "done" and msgs[-1]["id"] == "s1"'
check_schema "$out"
finish
