#!/usr/bin/env bash
# The GPU suite in one command, sized for a lent device (about 15 minutes of device time in all,
# 10 per command): gpu-60m-quick, the papers' LLaMA-60M in bf16 for AdamW, GaLore and Fira (their
# own packages), low_rank_restarts and lowrank_sparse, 600 steps of 64×256 tokens each.
#
#   bash benchmarks/gpu_quick.sh             # on the GPU machine: results into $OUT (or benchmarks/results)
#   bash benchmarks/gpu_quick.sh --dry-run   # anywhere, on the CPU: 2 steps of every contender, nothing kept
#
# The device image has PyTorch, transformers and PEFT but not galore-torch and fira: carry their
# wheels in .whl/ (python3 -m pip download --no-deps galore-torch==1.0 fira -d .whl). DATA is the
# corpus (default: shared/data/pydocs in the checkout, else ../shared/data/pydocs, else builtin).
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
data=${DATA:-}
for candidate in shared/data/pydocs ../shared/data/pydocs; do
    if [ -z "$data" ] && [ -d "$candidate" ]; then data=$candidate; fi
done
data=${data:-builtin}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=.venv/bin/python
if [ "$dry" = 1 ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$python" benchmarks/compare.py --suite gpu-60m-quick --data "$data" --out "$work/results" --work "$work/runs" \
        --suite-set device=cpu --suite-set precision=fp32 --suite-set steps=2 --suite-set batch_size=2 \
        --suite-set eval_every=2 --suite-set eval_tokens=512 --suite-set cycle=1 ${CONTENDERS:+--contenders $CONTENDERS}
    "$python" benchmarks/report.py --suite gpu-60m-quick --results "$work/results" --readme /dev/null --docs "$work/docs" >/dev/null
    echo "dry run complete: every contender trained, evaluated and reported"
    exit 0
fi
out=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Leave the command's 10 minutes a margin for start-up and the report.
timeout 320 "$python" benchmarks/compare.py --suite gpu-60m-quick --data "$data" --out "$out" --work /tmp/lowrank-bench --jobs 1 || true
"$python" benchmarks/report.py --suite gpu-60m-quick --results "$out" --readme /dev/null --docs "$out"
# What fits, measured with CUDA's allocator: LLaMA-1B per storage option, and the 7B low-memory row
# (benchmarks/bench_fit.py, rows kept in $out/fit.json as they finish).
cp benchmarks/results/fit.json "$out/fit.json" 2>/dev/null || true
timeout 80 "$python" benchmarks/bench_fit.py --device cuda --models llama_1b --seq-len 1024 --out-dir "$out" || true
timeout 80 "$python" benchmarks/bench_fit.py --device cuda --models llama_7b --methods lowrank_sparse_8bit \
    --options bf16+ckpt,bf16+ckpt+layerwise --seq-len 1024 --out-dir "$out" || true
