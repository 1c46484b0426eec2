#!/usr/bin/env bash
# Re-run the committed audits of docs/audits/ (issue 31's "done when"), one at a time: each server is started,
# audited over HTTP with no weights (20 MNIST test images, a budget of 500 queries per image and attack,
# ε = 0.3, seed 0), and stopped before the next starts. Each writes docs/audits/NAME.json (the robustness card,
# validated against docs/card.schema.json), NAME.md, and its per-image state under docs/audits/state/.
#
#   default-rci-on      the embedded default (PGD-AT), RCI on (request scope): square, decision, transfer
#   default-rci-off     the same weights, --no-rci
#   default-labels      the same, RCI on, --output labels: the score attack is skipped (said so in the card)
#   erm-rci-off         the label-only attack's validation: a plain ERM model (docs/weights/erm-seed0), decision only
#   erm-rci-on          the same ERM model with RCI on
#   mlserver            MLServer 1.7.1 serving the default's weights (examples/mlserver), square, decision, transfer
#
# The transfer attack's surrogate is a model the auditor trained itself: another seed of the same method
# (docs/weights/pgd-at-seed1 for the default, erm-seed1 for ERM). Minutes to an hour each on 2 shared cores;
# an interrupted one continues with RESUME=1 (nothing finished is queried again).
#
#   docs/audits/run.sh [NAME ...]        # default: all; PROJECT_PYTHON (default python3), VENV for MLServer
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PROJECT_PYTHON:-python3}
OUT="$ROOT/docs/audits"
W="$ROOT/docs/weights"
PORT=${PORT:-8311}
SERVER=
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null || true' EXIT
mkdir -p "$OUT/state"
ARGS=(--data mnist --images 20 --budget 500 --eps 0.3 --seed 0 --chunk 20 --concurrency 16 --no-progress)

wait_ready() {
  for _ in $(seq 600); do curl -sf "$1" > /dev/null && return 0; sleep 0.5; done
  echo "not ready: $1" >&2; return 1
}

audit() {  # NAME URL ATTACKS SURROGATE [audit options]  (this server: --binary, v2 binary tensors)
  local name=$1 url=$2 attacks=$3 surrogate=$4; shift 4
  echo "== $name: $(uptime)" | tee -a "$OUT/load.log"
  local resume=()
  if [ -n "${RESUME:-}" ]; then resume=(--resume); else rm -f "$OUT/state/$name.json"; fi
  # shellcheck disable=SC2086
  "$PY" -m codedsmooth audit --url "$url" "${ARGS[@]}" --attack $attacks --surrogate "$surrogate" \
    --card "$OUT/$name.json" --state "$OUT/state/$name.json" "${resume[@]}" "$@"
  echo "== $name done: $(uptime)" | tee -a "$OUT/load.log"
}

stop() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=; }

ours() {  # NAME ATTACKS SURROGATE [serve options]  (no --checkpoint: the embedded default)
  local name=$1 attacks=$2 surrogate=$3; shift 3
  "$PY" -m codedsmooth serve --port "$PORT" --metrics-port $((PORT + 1)) "$@" > "/tmp/audit-$name.log" 2>&1 &
  SERVER=$!
  wait_ready "http://127.0.0.1:$PORT/health/ready"
  audit "$name" "http://127.0.0.1:$PORT" "$attacks" "$surrogate" --binary
  stop
}

mlserver() {
  local venv=${VENV:-/tmp/mlserver-venv} dir=/tmp/audit-mlserver  # MLServer's pins conflict with ours: its own venv
  if [ ! -x "$venv/bin/mlserver" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q mlserver==1.7.1
  fi
  local site vsite name
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  vsite=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf '%s\n%s\n' "$ROOT" "$site" > "$vsite/zz-codedsmooth.pth"
  name=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1] + "/config.json"))["name"])' "$W/pgd-at-seed0")
  mkdir -p "$dir"
  cp "$ROOT/examples/mlserver/runtime.py" "$dir/runtime.py"
  cat > "$dir/model-settings.json" <<JSON
{"name": "$name", "implementation": "runtime.CodedSmoothRuntime", "parameters": {"uri": "$W/pgd-at-seed0"},
 "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
 "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]}
JSON
  cat > "$dir/settings.json" <<JSON
{"http_port": $PORT, "grpc_port": $((PORT + 100)), "metrics_port": $((PORT + 200)), "parallel_workers": 0}
JSON
  (cd "$dir" && exec "$venv/bin/mlserver" start .) > /tmp/audit-mlserver.log 2>&1 &
  SERVER=$!
  wait_ready "http://127.0.0.1:$PORT/v2/health/ready"
  audit mlserver "http://127.0.0.1:$PORT" "${MLSERVER_ATTACKS:-square decision}" "$W/pgd-at-seed1" --model "$name" --protocol v2
  stop
}

run() {
  case $1 in
    default-rci-on) ours "$1" "square decision" "$W/pgd-at-seed1" --rci ;;
    default-rci-off) ours "$1" "square decision" "$W/pgd-at-seed1" --no-rci ;;
    default-labels) ours "$1" "square decision" "$W/pgd-at-seed1" --rci --output labels ;;
    erm-rci-off) ours "$1" "decision" "$W/erm-seed1" --checkpoint "$W/erm-seed0" --no-rci ;;
    erm-rci-on) ours "$1" "decision" "$W/erm-seed1" --checkpoint "$W/erm-seed0" --rci ;;
    mlserver) mlserver ;;
    *) echo "unknown audit $1" >&2; return 2 ;;
  esac
}

for name in "${@:-default-rci-on default-rci-off default-labels erm-rci-off erm-rci-on mlserver}"; do
  for n in $name; do run "$n"; done
done
