# Shared helpers for tests/shell/test_*.sh (sourced, not run).
# ROOT: the repository root, from this file's location. PY: the Python interpreter
# (default .venv/bin/python at the root). Checks use jq, or Python when jq is missing
# (or when NO_JQ=1). No GNU-only tools (macOS): timeouts go through with_timeout (Python).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-${PYTHON:-$ROOT/.venv/bin/python}}"
MODEL="${MODEL:-models/tiny-mistral}"
WORKER_TIMEOUT="${WORKER_TIMEOUT:-120}"
cd "$ROOT" || exit 1

if [[ "${NO_JQ:-0}" != 1 ]] && command -v jq >/dev/null 2>&1; then HAVE_JQ=1; else HAVE_JQ=0; fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
FAILED=0

fail() { echo "  FAIL: $*"; FAILED=1; }
ok() { echo "  ok: $*"; }

# with_timeout SECONDS CMD [ARGS...]: CMD with stdin/stdout/stderr inherited, killed after
# SECONDS; exit status CMD's, 124 on timeout (as GNU timeout, which macOS does not have).
with_timeout() {
  "$PY" -c '
import signal, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
try:
    rc = p.wait(timeout=float(sys.argv[1]))
except subprocess.TimeoutExpired:
    p.terminate()
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        p.kill(); p.wait()
    sys.exit(124)
except KeyboardInterrupt:
    p.send_signal(signal.SIGINT); rc = p.wait()
sys.exit(128 - rc if rc < 0 else rc)
' "$@"
}

# run_worker FILE [worker args...]: stdin -> worker; stdout in FILE, stderr in FILE.err,
# exit status in FILE.rc and $WORKER_RC. (`printf ... | run_worker` runs it in a subshell, so
# check_rc reads FILE.rc: macOS's bash 3.2 has no `shopt -s lastpipe`.)
run_worker() {
  local out="$1"; shift
  with_timeout "$WORKER_TIMEOUT" "$PY" -m worker --model "$MODEL" "$@" >"$out" 2>"$out.err"
  WORKER_RC=$?
  echo "$WORKER_RC" >"$out.rc"
}

# check DESCRIPTION FILE JQ_EXPR PY_EXPR
# JQ_EXPR runs with `jq -s` over FILE (one JSON value per line) and must print true.
# PY_EXPR is the same check in Python over `msgs` (the list of parsed lines).
check() {
  local desc="$1" file="$2" jqexpr="$3" pyexpr="$4" res
  if [[ $HAVE_JQ == 1 ]]; then
    res="$(jq -s "$jqexpr" "$file" 2>&1)"
  else
    res="$("$PY" - "$file" "$pyexpr" <<'PYEOF' 2>&1
import json, sys
msgs = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8") if l.strip()]
print("true" if eval(sys.argv[2], {"msgs": msgs}) else "false")
PYEOF
)"
  fi
  if [[ "$res" == true ]]; then ok "$desc"; else fail "$desc (got: ${res:0:300})"; fi
}

# check_schema FILE: every stdout line is one JSON object valid against docs/protocol.schema.json
check_schema() {
  local res
  res="$("$PY" - "$1" "$ROOT/docs/protocol.schema.json" <<'PYEOF' 2>&1
import json, sys
try:
    import jsonschema
except ImportError:
    print("skip"); sys.exit(0)
schema = json.load(open(sys.argv[2], encoding="utf-8"))
v = jsonschema.Draft202012Validator(schema)
bad = []
for n, line in enumerate(open(sys.argv[1], encoding="utf-8"), 1):
    try:
        msg = json.loads(line)
    except ValueError as e:
        bad.append(f"line {n}: not JSON: {line[:80]!r}"); continue
    errs = [e.message for e in v.iter_errors(msg)]
    if errs: bad.append(f"line {n}: {errs[0][:200]}")
print("\n".join(bad) if bad else "true")
PYEOF
)"
  case "$res" in
    true) ok "every stdout line validates against docs/protocol.schema.json" ;;
    skip) ok "schema check skipped (no jsonschema)" ;;
    *) fail "schema: $res" ;;
  esac
}

# check_rc EXPECTED FILE: the exit status run_worker FILE recorded (else $WORKER_RC)
check_rc() {
  [[ -f "$2.rc" ]] && WORKER_RC="$(cat "$2.rc")" && rm -f "$2.rc"
  if [[ "$WORKER_RC" == "$1" ]]; then ok "exit status $1"; else fail "exit status $WORKER_RC, expected $1; stderr tail: $(tail -n 5 "$2.err" 2>/dev/null)"; fi
}

finish() { exit "$FAILED"; }
