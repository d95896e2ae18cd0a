#!/usr/bin/env bash
# The one-shot CLI: `python -m worker.cli "prompt"` prints one JSON object.
source "$(dirname "$0")/lib.sh"
if [[ ! -f "$ROOT/worker/cli.py" ]]; then
  echo "  skip: worker/cli.py not present"
  exit 77
fi
out="$TMP/out"
with_timeout "$WORKER_TIMEOUT" "$PY" -m worker.cli --model "$MODEL" --max-tokens 12 "Olá! Quem fundou o Farense?" >"$out" 2>"$out.err"
WORKER_RC=$?
check_rc 0 "$out"
check "one JSON object on stdout, with a non-empty text" "$out" \
  'length == 1 and (.[0] | type) == "object" and (.[0].text | type) == "string" and (.[0].text | length) > 0' \
  'len(msgs) == 1 and isinstance(msgs[0], dict) and isinstance(msgs[0].get("text"), str) and msgs[0]["text"]'
check "finish_reason and usage, --max-tokens honoured" "$out" \
  '(.[0].finish_reason | IN("stop", "length")) and .[0].usage.completion_tokens >= 1 and .[0].usage.completion_tokens <= 12' \
  'msgs[0]["finish_reason"] in ("stop", "length") and 1 <= msgs[0]["usage"]["completion_tokens"] <= 12'
# a model that cannot be loaded: still one JSON object (an error), non-zero exit
with_timeout "$WORKER_TIMEOUT" "$PY" -m worker.cli --model "$TMP/no-such-model" "Olá" >"$out" 2>"$out.err"
WORKER_RC=$?
if [[ $WORKER_RC != 0 ]]; then ok "exit status $WORKER_RC for a missing model"; else fail "exit status 0 for a missing model"; fi
check "one JSON object with an error" "$out" \
  'length == 1 and (.[0].error.code | type) == "string" and (.[0].error.message | type) == "string"' \
  'len(msgs) == 1 and isinstance(msgs[0]["error"]["code"], str) and isinstance(msgs[0]["error"]["message"], str)'
finish
