#!/usr/bin/env bash
# The GPU path, in two parts that each fit in 8 minutes on one H100 (cold compiles included):
#   ./gpu_check.sh core   # the CUDA tests; a compiled bf16 training step at the paper's size,
#                         # dense vs gated, with MFU; 20 steps of a char model under torchrun (NCCL)
#   ./gpu_check.sh rest   # skip=True vs the masked path at the paper's size; 150 steps under
#                         # torchrun, a resume to 300, and sampling from that checkpoint
# Every step has a timeout; a step whose input failed is skipped; the summary names each step
# that failed, and the exit status is 1 if any did (2: no CUDA here, or a bad part name).
# Output goes to $OUT/gpu_check_<part>.log (or ./). Needs no network: the data is bundled.
# Python: $PYTHON, else python3.
set -u
cd "$(dirname "$0")"
part=${1:-core}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # through tee, output must not wait in a buffer that a kill would lose
log="${OUT:-.}/gpu_check_${part}.log"
case $part in core|rest) ;; *) echo "usage: ./gpu_check.sh core|rest" >&2; exit 2 ;; esac
if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "error: gpu_check.sh needs a CUDA GPU, and $py sees none" >&2
  exit 2
fi
: > "$log"
summary=() failed=()

step() {  # step NAME SECONDS COMMAND...: run it with a timeout into the log, note how it went
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "== $name (at most ${limit}s): $*" | tee -a "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  case $rc in 124|137) echo "== $name: stopped at its limit of ${limit}s" | tee -a "$log" ;; esac
  summary+=("$([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)")  $((SECONDS - t0))s  $name")
  [ "$rc" -eq 0 ] || failed+=("$name")
  return "$rc"
}

skipped() {  # skipped NAME REASON
  summary+=("skipped  $1 ($2)")
  echo "== $1: skipped ($2)" | tee -a "$log"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee -a "$log"
paper=(--n_layer=12 --n_embd=768 --n_head=12 --n_kv_head=12 --block_size=1024 --vocab_size=50304)
run_dir=$(mktemp -d)
torchrun=("$py" -m torch.distributed.run --standalone --nproc_per_node=1 train.py
          config/shakespeare_char_gpu.py --out_dir="$run_dir")
if [ "$part" = core ]; then
  step "CUDA tests" 150 "$py" -m pytest -q -rs tests/test_gpu.py
  step "training step at the paper's size (bf16, compiled)" 240 \
    "$py" bench.py train "${paper[@]}" --batch_size=16 --steps=10 --repeats=3
  step "20 steps under torchrun (NCCL)" 90 "${torchrun[@]}" --max_iters=20 --eval_interval=20 \
    --log_interval=5 --eval_tokens=16384
else
  step "skipping at the paper's size" 200 \
    "$py" bench.py skip "${paper[@]}" --batch_size=8 --steps=3 --repeats=3
  train=("${torchrun[@]}" --max_iters=300 --eval_interval=150 --log_interval=50)
  if step "150 steps under torchrun (NCCL)" 100 "${train[@]}" --stop_iter=150; then
    if step "resume to step 300" 100 "${train[@]}" --init_from=resume; then
      step "sampling on CUDA" 60 "$py" sample.py --out_dir="$run_dir" --show_skips --no_color \
        --max_new_tokens=300
    else
      skipped "sampling on CUDA" "the resume failed"
    fi
  else
    skipped "resume to step 300" "the first 150 steps failed"
    skipped "sampling on CUDA" "the first 150 steps failed"
  fi
fi

echo "== summary ($part)" | tee -a "$log"
printf '%s\n' "${summary[@]}" | tee -a "$log"
grep -E '^\| (dense|gated|forward)|step-time ratio|^eval step|^step (20|150|300) \||layers run per new token' \
  "$log" | tee -a "$log"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}" | tee -a "$log"
  exit 1
fi
