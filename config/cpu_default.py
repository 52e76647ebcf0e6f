# The default run, spelled out: `python train.py` and `python train.py config/cpu_default.py`
# are the same. A small gated char-level model on the bundled Shakespeare; a few minutes on a
# 2-core CPU (train.py picks CUDA or MPS when present; then it is simply faster).
out_dir = 'out'
dataset = 'shakespeare_char'
eval_interval = 200
eval_tokens = 16384
log_interval = 25

batch_size = 16
block_size = 128
tokens_per_step = 0      # = batch_size * block_size * world_size: no accumulation

n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
gated = True
controller = 'proportional'
ctrl_target_start = 1.0
ctrl_target_end = 0.5
ctrl_lr = 2e-2           # 20x the paper's rate: a 1000-step run needs a faster controller

learning_rate = 1e-3
max_iters = 1000
