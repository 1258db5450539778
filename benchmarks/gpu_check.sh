#!/usr/bin/env bash
# Optional GPU checks, for a session lent a GPU machine (the workplace's `device` tool);
# nothing else depends on them. Runs from the repository root with the machine's own
# python3 (its CUDA torch) and writes each figure to $OUT (default /tmp/gpu_check):
#   1. SAE encode on the GPU: encode_sparse tokens/s against the bare x @ W_enc of the
#      same shape and dtype (benchmarks/sae_encode.py --device cuda).
#   2. vLLM's CUDA build with capture, when it is installed there: the capture overhead
#      (5 % of tokens, layer 15, 16 concurrent requests, on vs off in one eager engine)
#      and the price of eager mode itself (the same requests with CUDA graphs, capture
#      off: hooks do not fire inside a captured graph, so capture needs eager mode).
# Usage: bash benchmarks/gpu_check.sh   (about 5 minutes; step 2 needs the SmolLM2 copy
# under $FEATUREWATCH_HOME/models, carried or converted there)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' \
	| tee -a "$OUT/gpu.txt"

echo "== SAE encode on the GPU"
timeout 240 python3 benchmarks/sae_encode.py --device cuda --tokens 262144 2>&1 \
	| tee "$OUT/sae_encode_cuda.txt"

echo "== vLLM (CUDA build) with capture"
if ! python3 -c 'import vllm' 2>/dev/null; then
	echo "vLLM is not installed on this machine: step 2 skipped" | tee "$OUT/vllm.txt"
	exit 0
fi
timeout 300 python3 benchmarks/capture_overhead.py --engine vllm --rounds 4 --max-tokens 64 \
	--concurrency 16 2>&1 | tee "$OUT/vllm.txt"
timeout 300 python3 benchmarks/capture_overhead.py --engine vllm --rounds 4 --max-tokens 64 \
	--concurrency 16 --graphs 2>&1 | tee -a "$OUT/vllm.txt"
