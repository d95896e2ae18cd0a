#!/usr/bin/env bash
# The Express example's OpenAI route with curl: non-streaming JSON, SSE ending with [DONE],
# a 400 OpenAI error object for an unknown field, 400 for a client system message.
source "$(dirname "$0")/lib.sh"
command -v node >/dev/null 2>&1 || { echo "  skip: node not installed"; exit 77; }
command -v curl >/dev/null 2>&1 || { echo "  skip: curl not installed"; exit 77; }
[[ -d examples/express/node_modules/express ]] || { echo "  skip: run make node-setup (examples/express/node_modules)"; exit 77; }

log="$TMP/server.log"
PORT=0 MODEL="$MODEL" PYTHON="$PY" node examples/express/server.js >"$TMP/server.out" 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$TMP"' EXIT
url=""
for _ in $(seq 1 600); do        # up to 60 s for the worker to load
  url="$(sed -n 's/^listening on //p' "$TMP/server.out")"
  [[ -n "$url" ]] && curl -sf "$url/healthz" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || break
  sleep 0.1
done
curl -sf "$url/healthz" >/dev/null 2>&1 || { fail "server not ready; log: $(tail -n 5 "$log")"; finish; }

post() { curl -s -o "$TMP/$1" -w '%{http_code}' "$url/v1/chat/completions" -H 'content-type: application/json' -d "$2"; }
USER='[{"role":"user","content":"Quem fundou o Farense?"}]'

code="$(post plain.json "{\"model\":\"farense\",\"messages\":$USER,\"max_tokens\":6}")"
[[ "$code" == 200 ]] && ok "non-streaming: 200" || fail "non-streaming: HTTP $code"
check "chat.completion with one assistant choice and usage" "$TMP/plain.json" \
  '.[0].object == "chat.completion" and .[0].choices[0].message.role == "assistant" and .[0].usage.completion_tokens == 6' \
  'msgs[0]["object"] == "chat.completion" and msgs[0]["choices"][0]["message"]["role"] == "assistant" and msgs[0]["usage"]["completion_tokens"] == 6'

code="$(post stream.txt "{\"model\":\"farense\",\"messages\":$USER,\"max_tokens\":6,\"stream\":true}")"
[[ "$code" == 200 ]] && ok "streaming: 200" || fail "streaming: HTTP $code"
[[ "$(tail -n 2 "$TMP/stream.txt" | head -n 1)" == "data: [DONE]" ]] && ok "stream ends with data: [DONE]" \
  || fail "stream end: $(tail -n 3 "$TMP/stream.txt")"
grep -c '"chat.completion.chunk"' "$TMP/stream.txt" | grep -qv '^0$' && ok "chat.completion.chunk events" || fail "no chunks"

code="$(post unknown.json "{\"model\":\"farense\",\"messages\":$USER,\"logit_bias\":{}}")"
[[ "$code" == 400 ]] && ok "unknown field: 400" || fail "unknown field: HTTP $code"
check "OpenAI error object naming the field" "$TMP/unknown.json" \
  '.[0].error.type == "invalid_request_error" and .[0].error.param == "logit_bias"' \
  'msgs[0]["error"]["type"] == "invalid_request_error" and msgs[0]["error"]["param"] == "logit_bias"'

code="$(post system.json "{\"model\":\"farense\",\"messages\":[{\"role\":\"system\",\"content\":\"x\"},{\"role\":\"user\",\"content\":\"y\"}]}")"
[[ "$code" == 400 ]] && ok "client system message: 400" || fail "client system message: HTTP $code"
check "refused with code system_message_refused" "$TMP/system.json" \
  '.[0].error.code == "system_message_refused"' 'msgs[0]["error"]["code"] == "system_message_refused"'
finish
