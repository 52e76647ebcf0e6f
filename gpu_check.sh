#!/usr/bin/env bash
# The GPU path in one command, on a machine with one CUDA GPU (about 8 minutes on an H100,
# compilation included): the CUDA tests; a training step at the paper's size, dense vs gated
# (bf16, compiled, FlexAttention), with MFU; the same size masked vs skip=True at 0/25/50%
# skipped; 150 steps under torchrun (NCCL), a resume to step 300, and sampling from that
# checkpoint. Needs no network: the data is the bundled corpus.
# The whole output goes to $OUT/gpu_check.log (or ./gpu_check.log); a summary ends it.
set -u
cd "$(dirname "$0")"
log="${OUT:-.}/gpu_check.log"
run_dir=$(mktemp -d)
: > "$log"
summary=()

step() {  # step NAME COMMAND...: run it into the log and note how it went
  local name=$1 t0=$SECONDS
  shift
  echo "== $name: $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  summary+=("$([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)")  $((SECONDS - t0))s  $name")
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee -a "$log"
step "CUDA tests" python -m pytest -q -rs test_gpu.py
step "training step at the paper's size" python bench.py train --n_layer=12 --n_embd=768 --n_head=12 \
    --n_kv_head=12 --block_size=1024 --batch_size=16 --vocab_size=50304 --steps=10 --repeats=3
step "skipping at the paper's size" python bench.py skip --n_layer=12 --n_embd=768 --n_head=12 \
    --n_kv_head=12 --block_size=1024 --batch_size=8 --vocab_size=50304 --steps=3 --repeats=3
train=(torchrun --standalone --nproc_per_node=1 train.py config/shakespeare_char_gpu.py --max_iters=300
       --eval_interval=150 --log_interval=50 --out_dir="$run_dir")
step "150 steps under torchrun (NCCL)" "${train[@]}" --stop_iter=150
step "resume to step 300" "${train[@]}" --init_from=resume
step "sampling on CUDA" python sample.py --out_dir="$run_dir" --show_skips --no_color --max_new_tokens=300

echo "== summary" | tee -a "$log"
printf '%s\n' "${summary[@]}" | tee -a "$log"
grep -E '^\| (dense|gated|forward)|step-time ratio|^eval step|^step (150|300) \||layers run per new token' "$log" \
    | tee -a "$log"
