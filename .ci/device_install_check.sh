#!/usr/bin/env bash
# The device install works: `pip install .` without extras (torch absent) runs quantize
# with every scheme, evaluate, optimize and bench on an ONNX model; and the device side:
# a signed bundle with the monitor's sketch installed over HTTP, the runtime answering a
# noisy stream (the monitor flags it), the owner's telemetry budget.
#
# Everything happens in one temp folder, removed at the end: a copy of the sources (so the
# build leaves no build/ or egg-info in the checkout), a fresh venv, pip's cache, the model,
# the data and every output. The commands run in an empty folder that must afterwards hold
# only what their --out options name.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
started=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/edgeloop-device-check.XXXXXX")
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

mkdir "$work/src" "$work/run"
cp -r pyproject.toml README.md constraints.txt src "$work/src/"
"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
export PIP_CACHE_DIR="$work/pip-cache" PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$py" -m pip install --constraint "$work/src/constraints.txt" "$work/src" \
        > "$work/pip.log" 2>&1; then
    cat "$work/pip.log" >&2
    exit 1
fi
rm -rf "$work/src"

if "$py" -c "import torch" 2>/dev/null; then
    echo "device install check: torch is importable in the plain install" >&2
    exit 1
fi

# A small MLP on MNIST-1D (40 inputs, 10 classes): random hidden features with a readout
# fitted by least squares on the training split, so accuracy means something.
cd "$work/run"
export EDGELOOP_QUIET=1
edgeloop="$work/venv/bin/edgeloop"
for split in train calib val test; do
    "$edgeloop" data mnist1d --split "$split" --out "$work/$split.npz" >/dev/null
done
"$py" - "$work" <<'EOF'
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

work = sys.argv[1]
with np.load(f"{work}/train.npz") as f:
    x, y = f["x"], f["labels"]
rng = np.random.default_rng(0)
w1 = (rng.standard_normal((40, 256)) / np.sqrt(40)).astype(np.float32)
b1 = np.zeros(256, np.float32)
hidden = np.maximum(x @ w1 + b1, 0)
w2 = np.linalg.lstsq(hidden, np.eye(10)[y], rcond=None)[0].astype(np.float32)
graph = helper.make_graph(
    [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
     helper.make_node("MatMul", ["r", "w2"], ["logits"])], "mlp",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 40])],
    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
    [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
     numpy_helper.from_array(w2, "w2")])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
          f"{work}/model.onnx")
EOF

model="$work/model.onnx"
for scheme in int8 int8-static int8-dynamic int4-weight binary ort-static ort-dynamic; do
    # int8 refuses a model no faster than float; on this tiny MLP that is timing noise
    extra=()
    [ "$scheme" = int8 ] && extra=(--allow-slower)
    "$edgeloop" quantize "$model" --scheme "$scheme" --data "$work/calib.npz" \
        --out "q-$scheme.onnx" "${extra[@]}" >/dev/null
done
"$edgeloop" evaluate q-int8.onnx --data "$work/test.npz" --reference "$model" --runs 20 \
    --seconds 1 --json > "$work/evaluate.json"
"$py" - "$work/evaluate.json" <<'EOF'
import json
import sys

report = json.load(open(sys.argv[1]))
assert report["accuracy"] > 0.3 and report["fidelity"]["mean_cosine"] > 0.99, report
assert report["peak_rss_mb"] > 0, report
EOF
"$edgeloop" optimize "$model" --data "$work/calib.npz" --val "$work/test.npz" \
    --time-budget 40s --out opt >/dev/null
"$edgeloop" bench "$model" --duration 1 --warmup 0.2 --plot bench.png --json \
    > "$work/bench.json"

# the device side, its files outside the working folder
"$edgeloop" repo init "$work/repo" --keys "$work/keys" >/dev/null
"$edgeloop" publish "$model" --repo "$work/repo" --keys "$work/keys" --name mlp \
    --version 1.0.0 --golden "$work/val.npz" >/dev/null
"$edgeloop" repo serve "$work/repo" --port 0 > "$work/serve.log" 2>&1 &
server=$!
url=""
for _ in $(seq 100); do
    url=$(grep -o 'http://127.0.0.1:[0-9]*' "$work/serve.log" || true)
    [ -n "$url" ] && break
    sleep 0.1
done
"$edgeloop" device init "$work/device" --trusted-root "$work/repo/metadata/1.root.json" \
    --golden "$work/val.npz" >/dev/null
"$edgeloop" device update "$work/device" --repo "$url" --name mlp >/dev/null
"$py" - "$work" <<'EOF'
import sys

import numpy as np

work = sys.argv[1]
with np.load(f"{work}/test.npz") as f:
    x = f["x"]
noisy = x + np.random.default_rng(0).normal(0, x.std(), x.shape)
np.savez(f"{work}/noisy.npz", x=np.tile(noisy, (12, 1)).astype(np.float32))
EOF
"$edgeloop" device run "$work/device" --data "$work/noisy.npz" >/dev/null
"$edgeloop" device status "$work/device" --json > "$work/status.json"
"$py" -c "import json, sys; m = json.load(open(sys.argv[1]))['monitor']; \
assert m['drifted'] and m['alerts'], m" "$work/status.json"
"$edgeloop" device privacy "$work/device" --budget 4 --period 1d >/dev/null

left=$(ls -A | sort | tr '\n' ' ')
expected="bench.png opt q-binary.onnx q-int4-weight.onnx q-int8-dynamic.onnx q-int8-static.onnx \
q-int8.onnx q-ort-dynamic.onnx q-ort-static.onnx "
if [ "$left" != "$expected" ]; then
    echo "device install check: the working folder holds '$left', expected '$expected'" >&2
    exit 1
fi
echo "device install check passed in $(( $(date +%s) - started )) s (no torch; quantize with" \
     "every scheme, evaluate, optimize, bench; a bundle installed and run, drift flagged)"
