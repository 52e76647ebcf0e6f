# nanoGPT's shakespeare_char baby GPT, gated, on one GPU (a few minutes on an A100/H100).
#   python train.py config/shakespeare_char_gpu.py
#   python train.py config/shakespeare_char_gpu.py --gated=false --out_dir=out-shakespeare-char-dense
out_dir = 'out-shakespeare-char'
dataset = 'shakespeare_char'
eval_interval = 250
eval_tokens = 65536
log_interval = 10

batch_size = 64
block_size = 256
tokens_per_step = 16384  # 64 x 256: one micro-batch on one GPU

n_layer = 6
n_head = 6
n_kv_head = 6
n_embd = 384
gated = True
controller = 'proportional'
ctrl_target_start = 1.0
ctrl_target_end = 0.5
ctrl_lr = 1e-2           # faster than the paper's 1e-3, which is tuned for ~19,000 steps

learning_rate = 1e-3
max_iters = 5000
