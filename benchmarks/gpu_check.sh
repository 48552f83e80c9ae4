#!/usr/bin/env bash
# Everything only a CUDA GPU can check, in one run of under 10 minutes, one table at the end:
# the GPU tests (bf16 training, CUDA-graph decoding equal to eager, int8/int4 weights on the
# GPU equal to the dequantized product, FSDP2 with its bf16 policy on one GPU over NCCL) and
# the GPU benchmarks (gpt2 and llama-1b training tokens/s and MFU in bf16 with compile;
# SmolLM2-135M-shaped decoding at batch 1 and 32).
#
#   bash benchmarks/gpu_check.sh
#
# On a machine with no CUDA GPU it says so and exits 0. On a GPU machine that cannot reach a
# package index, the packages lmforge needs beyond PyTorch's usual company travel as wheels:
# run `bash benchmarks/gpu_check.sh --fetch-wheels` first where PyPI is reachable (it fills
# .gpu-wheels/ for the GPU machine's Python, PYTHON_VERSION, default 3.12), and bring that
# folder along.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
WHEELS=.gpu-wheels
# lmforge's own dependencies that a CUDA image with PyTorch, transformers and friends lacks
# (and the test runner's): fetched without their dependencies, which such an image has.
NEEDED="llguidance gguf platformdirs fastapi starlette uvicorn pydantic pydantic-core
annotated-types typing-inspection pytest-timeout"

if [ "${1:-}" = "--fetch-wheels" ]; then
    "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: --dest "$WHEELS" \
        --python-version "${PYTHON_VERSION:-3.12}" --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 $NEEDED \
        && ls "$WHEELS" && exit 0
    exit 1
fi

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no GPU: PyTorch sees no CUDA device on this machine, so there is nothing to check here"
    echo "(run benchmarks/gpu_check.sh on a CUDA machine)"
    exit 0
fi
if [ -d "$WHEELS" ]; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS=$(mktemp -d)
NAMES=() RESULTS=() SECONDS_TAKEN=()
failed=0

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, keep its log, note pass or fail
    local name=$1 limit=$2 start=$SECONDS log="$LOGS/${#NAMES[@]}.log"
    shift 2
    echo "== $name"
    if timeout "$limit" "$@" >"$log" 2>&1; then
        RESULTS+=("ok")
    else
        RESULTS+=("FAILED (exit $?; log: $log)")
        failed=1
        tail -n 30 "$log"
    fi
    NAMES+=("$name")
    SECONDS_TAKEN+=($((SECONDS - start)))
}

"$PYTHON" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
step "GPU tests (bf16 training, CUDA graphs, int weights, FSDP2 + NCCL)" 240 \
    "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
step "training throughput: gpt2, llama-1b (bf16, compile)" 270 \
    "$PYTHON" benchmarks/gpu_train.py --steps 30
step "decoding: SmolLM2-135M shape, batch 1 and 32" 150 \
    "$PYTHON" benchmarks/decode.py --gpu --repeats 2

echo
echo "| check | result | seconds |"
echo "|---|---|---|"
for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${SECONDS_TAKEN[$i]} |"
done
echo "| 2:4 sparse kernels | not applicable: pruned weights are kept and multiplied dense | - |"
echo
grep -h "passed\|failed" "$LOGS/0.log" | tail -n 1
for i in 1 2; do grep -h "^|" "$LOGS/$i.log"; echo; done
echo "targets on an H200: gpt2 >= 45% MFU, llama-1b >= 40% MFU"
exit $failed
