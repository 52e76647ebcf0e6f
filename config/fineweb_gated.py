# The paper's gated run: FineWeb 10B with GPT-2 tokens, 12 layers, d 768,
# 12 heads, T 1024, 524,288 tokens per optimizer step, AdamW lr 1e-3 betas (0.8, 0.95) eps 1e-10
# no weight decay, 10% warmup from 0.1x then cosine, proportional controller with mean targets
# 1.0 (outer layers) -> 0.5 (middle), bf16 autocast. One pass over the prepared train shards.
#   python prepare.py fineweb10B --shards 103          # 103 x 100M tokens (fewer for a shorter run)
#   torchrun --standalone --nproc_per_node=4 train.py config/fineweb_gated.py
# grad_accum = 524288 / (batch_size * 1024 * world_size): 4 on 4 GPUs, 16 on one.
out_dir = 'out-fineweb-gated'
dataset = 'fineweb10B'
eval_interval = 250
eval_tokens = 10485760   # the first 10M tokens of fineweb_val_000000.bin (the paper evaluated on all of it)
log_interval = 10

batch_size = 32          # sequences per GPU per micro-step (the paper's device batch)
block_size = 1024
tokens_per_step = 524288
vocab_size = 0           # 50257 rounded up to 50304

n_layer = 12
n_head = 12
n_kv_head = 12
n_embd = 768
gated = True
gate_init = 'normal'
controller = 'proportional'
ctrl_target_start = 1.0
ctrl_target_end = 0.5
ctrl_lr = 1e-3

learning_rate = 1e-3
beta1 = 0.8
beta2 = 0.95
adam_eps = 1e-10
weight_decay = 0.0
grad_clip = 0.0
warmup_frac = 0.1
warmup_start = 0.1
max_iters = 0            # one pass over the train shards (10B tokens -> ~19,000 steps)
