#!/usr/bin/env bash
# The GPU paths in one call: tests/megatron/test_gpu_paths.py (NCCL collectives, Transformer Engine
# linears, TE grouped experts) plus `lora-harness verify --backend nccl` at the layouts the
# GPUs allow (--tp up to the largest power of two <= the GPU count, dense and MoE), then a
# summary. Without CUDA GPUs it prints why it skips and exits 0.
#   bash ci/gpu_check.sh [--examples N]   (after ci/setup.sh; default 4 examples per property and layout)
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
examples=4
[ "${1:-}" = "--examples" ] && examples="${2:?--examples needs a number}"

gpus=$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [ "${gpus:-0}" -lt 1 ]; then
  echo "ci/gpu_check.sh: skipped: no CUDA GPU visible to torch (torch.cuda.is_available() is False); the CPU suite (ci/test.sh, gloo) covers the rest"
  exit 0
fi
tp=1
while [ $((tp * 2)) -le "$gpus" ]; do tp=$((tp * 2)); done
te=$(python -c 'import importlib.util as u; print("yes" if u.find_spec("transformer_engine") else "no")')
echo "ci/gpu_check.sh: $gpus GPU(s), transformer_engine: $te; verify on nccl up to --tp $tp"

pytest tests/megatron/test_gpu_paths.py -q -rsx -p no:cacheprovider
pytest_rc=$?
if [ "$tp" -ge 2 ]; then
  lora-harness verify --backend nccl --tp "$tp" --examples "$examples"
  verify_rc=$?
  verify_what="lora-harness verify --backend nccl --tp $tp --examples $examples"
else
  verify_rc=0
  verify_what="lora-harness verify --backend nccl: skipped (1 GPU: NCCL needs one GPU per rank, TP=2 needs 2)"
fi

echo
echo "== GPU check summary =="
echo "GPUs: $gpus, transformer_engine: $te"
echo "pytest tests/megatron/test_gpu_paths.py: $([ $pytest_rc -eq 0 ] && echo passed || echo "FAILED (exit $pytest_rc)")"
echo "$verify_what: $([ $verify_rc -eq 0 ] && echo passed || echo "FAILED (exit $verify_rc)")"
[ $pytest_rc -eq 0 ] && [ $verify_rc -eq 0 ]
