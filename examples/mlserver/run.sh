#!/usr/bin/env bash
# Audit a server no one here wrote: MLServer (Seldon's Open Inference Protocol v2 server) serving the
# default checkpoint through runtime.py, then this project's server (RCI off) with the same sample and seed.
# MLServer's pins (fastapi < 0.116, protobuf < 7) conflict with this project's, so it gets a virtualenv of
# its own; torch and codedsmooth come from the project's environment (PROJECT_PYTHON), appended to that
# virtualenv's path after MLServer's own packages. Not part of CI.
#
#   examples/mlserver/run.sh            # IMAGES=20 BUDGET=500 PORT=8081 OUT=/tmp/mlserver-audit
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PROJECT_PYTHON=${PROJECT_PYTHON:-$(command -v python3)}
VENV=${VENV:-/tmp/mlserver-venv}
PORT=${PORT:-8081}; OURS=${OURS:-8082}; IMAGES=${IMAGES:-20}; BUDGET=${BUDGET:-500}; OUT=${OUT:-/tmp/mlserver-audit}
mkdir -p "$OUT/model"

if [ ! -x "$VENV/bin/mlserver" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q mlserver==1.7.1
fi
# torch, safetensors and codedsmooth from the project's environment, after MLServer's packages
SITE=$("$PROJECT_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
VSITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n%s\n' "$ROOT" "$SITE" > "$VSITE/zz-codedsmooth.pth"

CKPT=$("$PROJECT_PYTHON" -c 'from codedsmooth.models import default_checkpoint_path; print(default_checkpoint_path())')
NAME=$("$PROJECT_PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1] + "/config.json"))["name"])' "$CKPT")
cp "$ROOT/examples/mlserver/runtime.py" "$OUT/model/runtime.py"
cat > "$OUT/model/model-settings.json" <<JSON
{"name": "$NAME", "implementation": "runtime.CodedSmoothRuntime", "parameters": {"uri": "$CKPT"},
 "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
 "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]}
JSON
cat > "$OUT/model/settings.json" <<JSON
{"http_port": $PORT, "grpc_port": $((PORT + 100)), "metrics_port": $((PORT + 200)), "parallel_workers": 0}
JSON

(cd "$OUT/model" && exec "$VENV/bin/mlserver" start .) > "$OUT/mlserver.log" 2>&1 &
MLSERVER=$!
"$PROJECT_PYTHON" -m codedsmooth serve --no-rci --port "$OURS" --metrics-port $((OURS + 200)) > "$OUT/codedsmooth.log" 2>&1 &
OURSERVER=$!
trap 'kill $MLSERVER $OURSERVER 2>/dev/null || true' EXIT
for url in "http://127.0.0.1:$PORT/v2/health/ready" "http://127.0.0.1:$OURS/health/ready"; do
  for _ in $(seq 240); do curl -sf "$url" > /dev/null && break; sleep 0.5; done
done

ARGS=(--data mnist --attack square decision --budget "$BUDGET" --images "$IMAGES" --seed 0 --no-progress)
"$PROJECT_PYTHON" -m codedsmooth audit --url "http://127.0.0.1:$PORT" --model "$NAME" --protocol v2 "${ARGS[@]}" --card "$OUT/mlserver-card.json"
"$PROJECT_PYTHON" -m codedsmooth audit --url "http://127.0.0.1:$OURS" "${ARGS[@]}" --card "$OUT/codedsmooth-card.json"
cat "$OUT/mlserver-card.md" "$OUT/codedsmooth-card.md"
"$PROJECT_PYTHON" - "$OUT" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{n}-card.json")) for n in ("mlserver", "codedsmooth"))
assert a["samples"]["audit"] == b["samples"]["audit"]
n = len(a["samples"]["audit"])
print("clean accuracy: MLServer", round(a["clean_accuracy"] * n), "codedsmooth", round(b["clean_accuracy"] * n), "of", n)
for x, y in zip(a["measurements"], b["measurements"]):
    ra, rb = x["interval"], y["interval"]
    print(f'{x["attack"]}: MLServer {x["robust_accuracy"]:.3f} [{ra[0]:.3f}, {ra[1]:.3f}], codedsmooth {y["robust_accuracy"]:.3f} [{rb[0]:.3f}, {rb[1]:.3f}]')
PY
