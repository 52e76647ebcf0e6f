"""
Train a GPT that learns to skip its middle layers, or a dense baseline: the loss is cross-entropy
plus the gate regularizer, whose controller then reads the gate statistics of the whole step.

    python train.py                                  # small gated char model, bundled Shakespeare
    python train.py config/shakespeare_char_gpu.py   # a preset, then --key=value overrides
    torchrun --standalone --nproc_per_node=8 train.py config/fineweb_gated.py
    python train.py --out_dir=out --init_from=resume   # go on where out/ckpt.pt stopped
    python train.py --out_dir=out --eval_only          # evaluate out/ckpt.pt; writes nothing
"""
import contextlib
import math
import os
import sys
import time

import torch

from checkpoints import (RunFiles, check_out_dir, restore_run, run_settings, run_state,
                         start_model, stop_signals)
from configurator import check_train_settings, configure, gate_controller
from data import DataError, eval_rows, open_dataset, text_tokens
from model import controller_kinds, gate_moments, pooled_variance
from prepare import prepare
from skipping import use_plain
from system import device_and_dtype, peak_flops, sum_over_processes

# settings
# I/O
out_dir = 'out'
init_from = 'scratch'          # 'scratch', 'resume' (out_dir/ckpt.pt), or a released model
eval_interval = 200            # evaluate and checkpoint every this many steps, and at the end
eval_tokens = 16384            # the first this many validation tokens
eval_only = False              # evaluate out_dir/ckpt.pt (or --init_from's model); write nothing
eval_text = ''                 # with eval_only: on every token of this text file instead
log_interval = 25
always_save_checkpoint = True  # False: checkpoint only when the val loss improves
stop_iter = 0                  # stop (with a checkpoint) after this many steps
wandb_log = False              # wandb is optional
wandb_project = 'skip-middle'
wandb_run_name = 'run'
# data
dataset = 'shakespeare_char'
data_dir = ''                  # '' = data/<dataset>
batch_size = 16                # sequences per micro-step per process
block_size = 128
tokens_per_step = 0            # per optimizer step; 0 = one micro-step per process
# model
vocab_size = 0                 # 0 = the data's, rounded up to a multiple of 64
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
rope_theta = 10000.0
norm_eps = 1e-5
gated = True                   # False: a dense baseline
gate_init = 'normal'           # or 'zero': a dense start whose gate heads never learn
gate_eps = 1e-6                # an open gate's key bias is log(max(g, gate_eps))
hide_closed_keys = True        # False: closed keys stay visible (the authors' releases)
skip = 'auto'                  # leave skipped pairs out: 'true', 'false', 'auto' = unless compiled
plain = False                  # True: model.py's plain definitions only, the code you read
# gate controller (the README lists the kinds; 'off': no regularizer)
controller = 'proportional'
ctrl_coef = None               # c: a fixed kind's, or a target kind's start; None: default
ctrl_var_coef = None           # k, likewise
ctrl_target_start = 1.0        # the mean gate target of the outer layers ...
ctrl_target_end = 0.5          # ... falling linearly to this in the middle
ctrl_var_target_delta = 0.0    # added to the variance targets t(1 - t)
ctrl_lr = 2e-2                 # the rule's step (the paper's 1e-3 suits ~19,000 steps)
ctrl_tol = 0.01                # no step where |mean - target| <= tol
ctrl_coef_min = float('-inf')
ctrl_coef_max = float('inf')
# optimizer and schedule
learning_rate = 1e-3
max_iters = 1000               # optimizer steps; 0 = one pass over the data (as the paper)
weight_decay = 0.0
beta1 = 0.8
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 0.0                # clip the gradient norm at this; 0 = off
decay_lr = True                # False: constant learning_rate
warmup_frac = 0.1              # linear warmup over this share of max_iters ...
warmup_start = 0.1             # ... from this multiple of learning_rate, then cosine ...
min_lr_frac = 0.0              # ... down to this multiple
lr_decay_iters = 0             # ... at this step, then held; 0 = max_iters
# system
device = 'auto'                # 'auto' (cuda, mps, cpu), or one of them, or 'cuda:1'
dtype = 'auto'                 # 'auto': bfloat16 (or float16) on GPUs, float32 on CPUs
compile = 'auto'               # torch.compile: 'auto' = on CUDA only, 'true', 'false'
deterministic = 'auto'         # deterministic kernels: 'auto' = on for CPUs (exact resumes)
backend = 'auto'               # torch.distributed: 'auto' = nccl on CUDA, else gloo
seed = 1337
# end of settings
config, given = configure(globals())

def need(ok, message, setting=None):
    """Exits with one line unless ok; it names the checkpoint when the setting came from there."""
    if not ok:
        if setting in inherited:
            message += (f" ({setting}={config[setting]!r} came from {ckpt_path}: pass --{setting}"
                        f"=... to override it)")
        sys.exit(f"error: {message}")

# -------------------------------------------- processes, the run's settings, device and precision
ddp = 'RANK' in os.environ  # launched by torchrun
rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) \
    if ddp else (0, 0, 1)
master = rank == 0  # the process that prints, logs and checkpoints
say = print if master else (lambda *args, **kwargs: None)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
# a resume or an evaluation takes what defines the run from its checkpoint (checkpoints.py)
inherited, notes = run_settings(out_dir, config, given)
config.update(inherited)
globals().update(inherited)
check_out_dir(out_dir, write=master and not eval_only)  # writable, before any work
check_train_settings(config, ('off', *controller_kinds()))
device, dtype = device_and_dtype(device, dtype, local_rank if ddp else None, deterministic)
if ddp:
    torch.distributed.init_process_group(backend if backend != 'auto' else
                                         'nccl' if device.type == 'cuda' else 'gloo')
torch.manual_seed(seed)  # the only randomness: initial weights (the data order is fixed)
autocast = torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != 'float32')
use_compile = compile == 'true' or (compile == 'auto' and device.type == 'cuda')

# ---------------------- data: a deterministic stream of train batches, and a fixed validation set
B, T = batch_size, block_size
tokens_per_step = tokens_per_step or B * T * world
grad_accum = tokens_per_step // (B * T * world)
need(grad_accum * B * T * world == tokens_per_step, f"tokens_per_step={tokens_per_step} is not a "
     f"multiple of batch_size*block_size*processes = {B * T * world}", 'tokens_per_step')
data_dir = data_dir or os.path.join('data', dataset)
if (dataset == 'shakespeare_char' and not config['data_dir'] and local_rank == 0
        and not os.path.isfile(os.path.join(data_dir, 'meta.json'))):
    prepare('shakespeare_char')  # the bundled text, offline; nodes sharing a disk take turns
if ddp:
    torch.distributed.barrier()  # every process waits for its node's preparation
try:
    meta, train_stream, val_tokens = open_dataset(data_dir, B, T, rank, world, eval_tokens)
except DataError as e:
    need(False, str(e), 'data_dir' if config['data_dir'] else 'dataset')
if eval_text:  # every token of a file instead, as the run's data tokenizes text
    val_tokens = text_tokens(eval_text, meta)
n_val = len(val_tokens) - 1 if eval_text else (len(val_tokens) - 1) // T * T  # tokens predicted
if max_iters == 0:  # one pass over the train data, as the paper's runs
    max_iters = sum(len(s) for s in train_stream.shards) // tokens_per_step
    need(max_iters > 0, f"max_iters=0 is one pass over the train data, but {data_dir} holds less "
         f"than a step's")
need(stop_iter <= max_iters, f"stop_iter={stop_iter} is beyond max_iters={max_iters}")

# -------- model, optimizer and gate controller: new, resumed from its checkpoint, or released
model, ckpt, model_notes = start_model(config, meta, data_dir, writes=master and not eval_only)
for note in model_notes + ([] if eval_only else notes):  # an evaluation trains and logs nothing
    say(f"note: {note}")
model_args = dict(vars(model.config))  # what was built, for its checkpoints
n_layer, gated, hide_closed_keys = (model_args[k] for k in ('n_layer', 'gated', 'hide_closed_keys'))
need(T <= model.config.block_size and meta['vocab_size'] <= model.config.vocab_size,
     f"block_size={T} or the data's vocabulary ({meta['vocab_size']}) exceeds the model's")
# packing syncs with the host once per layer, which breaks a compiled graph into pieces
skip = gated and hide_closed_keys and not plain and (skip == 'true' or (skip == 'auto' and
                                                                      not use_compile))
use_plain(model, plain).to(device)
optimizer = model.configure_optimizer(learning_rate, (beta1, beta2), weight_decay, device.type,
                                      adam_eps)
scaler = torch.amp.GradScaler(device.type, enabled=dtype == 'float16')  # bf16 needs no scaling
ctrl = gate_controller(config, n_layer, device) if gated and controller != 'off' else None
step, best_val_loss, train_flops, train_time, saved_decay_end = 0, math.inf, 0.0, 0.0, 0
if ckpt is not None:  # the rest of where the run stopped
    step, best_val_loss, train_flops, train_time = restore_run(ckpt, optimizer, scaler, ctrl,
                                                               train_stream)
    say(f"{'evaluating' if eval_only else 'resuming from'} {ckpt_path} at step {step}")
    saved_decay_end = ckpt['config'].get('lr_decay_iters', 0) or ckpt['config']['max_iters']
    if step >= max_iters and not eval_only:
        say(f"note: the run is complete (step {step} of max_iters={max_iters}); pass a larger "
            f"--max_iters to train on")
    ckpt = None  # free the memory
train_model = torch.compile(model) if use_compile else model
if ddp:
    train_model = torch.nn.parallel.DistributedDataParallel(
        train_model, device_ids=[local_rank] if device.type == 'cuda' else None)
mode = ('gated, skip ' + ('on' if skip else 'off (masked)')) if gated else 'dense'
say(f"data {data_dir} ({meta['tokenizer']}, vocab {meta['vocab_size']}, "
    f"{n_val:,} val tokens); {model.num_params() / 1e6:.2f}M non-embed. "
    f"params, {n_layer} layers, {mode}{', plain definitions' if plain else ''}; {device} x {world} "
    f"({f'ddp {torch.distributed.get_backend()}' if ddp else 'one process'}), {dtype}, compile "
    f"{use_compile}; {tokens_per_step:,} tokens per step = {world} procs x {grad_accum} accum x "
    f"{B} x {T}; {max_iters} steps")

# ----------------------------------------- the learning rate, statistics, evaluation, checkpoints

def get_lr(it, end):
    """Linear warmup from warmup_start x over warmup_frac of end, cosine to min_lr_frac x at end."""
    if not decay_lr:
        return learning_rate
    warmup = int(warmup_frac * end)
    if it < warmup:
        return learning_rate * (warmup_start + (1 - warmup_start) * it / warmup)
    progress = min(1.0, (it - warmup) / max(1, end - warmup))
    low = learning_rate * min_lr_frac
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - low)

decay_end = lr_decay_iters or max_iters
if saved_decay_end and not eval_only and get_lr(step, decay_end) != get_lr(step, saved_decay_end):
    say(f"note: the learning rate schedule now ends at step {decay_end}, not {saved_decay_end}: "
        f"at step {step} it is {get_lr(step, decay_end):.2e}, not "
        f"{get_lr(step, saved_decay_end):.2e}; --lr_decay_iters={saved_decay_end} keeps the end "
        f"where it was")

def add_gate_stats(stats, gates, weight):
    """Adds weight x each layer's gate mean, mean square and share of zeros (skipped pairs)."""
    means, squares = gate_moments(gates)
    stats['gate_mean'] += means * weight
    stats['gate_sq'] += squares * weight
    stats['gate_zero'] += (gates.detach() == 0).float().mean((1, 2)) * weight

@torch.no_grad()
def evaluate():
    """Cross-entropy, sparsity and per-layer statistics (gate mean, variance, share of zeros,
    residual-stream norm) on the fixed validation sequences; sequence i goes to process
    i % world_size. The uncompiled model: an evaluation is too short to pay for compiling."""
    model.eval()
    mine = list(range(rank, -(-n_val // T), world))
    f64 = torch.float32 if device.type == 'mps' else torch.float64  # long sums (MPS has no fp64)
    sums = {k: torch.zeros(() if k in ('ce', 'tokens') else n_layer, device=device, dtype=f64)
            for k in ('ce', 'tokens', 'gate_mean', 'gate_sq', 'gate_zero', 'resid_norm')}
    for i in range(0, len(mine), B):
        x, y = (torch.from_numpy(a).to(device) for a in eval_rows(val_tokens, T, mine[i:i + B]))
        norms = []
        with autocast:
            _, ce, gates = model(x, y, skip=skip, norms=norms)
        n = int((y >= 0).sum())
        gates = torch.ones(n_layer, *x.shape, device=device) if gates is None else gates  # dense
        if n < y.numel():
            gates = gates[:, y >= 0][:, None]  # (L, 1, n): the gates of the targets counted
        add_gate_stats(sums, gates, n)
        sums['ce'] += ce.to(f64) * n
        sums['tokens'] += n
        sums['resid_norm'] += torch.stack(norms).to(f64) * n
    model.train()
    s = {k: torch.tensor(v, dtype=torch.float64) for k, v in sum_over_processes(sums).items()}
    mean, square, zero, norm = (s[k] / s['tokens'] for k in (
        'gate_mean', 'gate_sq', 'gate_zero', 'resid_norm'))
    layers = {'gate_mean': mean.tolist(), 'gate_var': pooled_variance(mean, square).tolist(),
              'gate_zero': zero.tolist(), 'resid_norm': norm.tolist()}
    return (s['ce'] / s['tokens']).item(), zero.mean().item(), layers

run = RunFiles(out_dir, step if init_from == 'resume' else None, write=master and not eval_only,
               wandb_settings=(wandb_project, wandb_run_name, config) if wandb_log else None)
run.log({'type': 'start', 'step': step, 'resumed': init_from == 'resume', 'world_size': world,
         'grad_accum': grad_accum, 'tokens_per_step': tokens_per_step, 'device': str(device),
         'dtype': dtype,  # strict JSON has no Infinity: unbounded controller limits as strings
         'config': {k: str(v) if v in (math.inf, -math.inf) else v for k, v in config.items()}})
stop_signal = stop_signals()  # SIGTERM or Ctrl-C: finish the step, checkpoint, exit
peak = peak_flops(device)  # for the MFU

# ------------------------------------------------------------------------------ the training loop
end = stop_iter or max_iters
evaluated_at = step if init_from == 'resume' and not eval_only else None  # saved after its eval
logged = (step, train_time)  # the step and training time of the last log line
stopping = False
while True:
    if (step % eval_interval == 0 or step >= end or stopping or eval_only) and step != evaluated_at:
        t0 = time.time()
        val_loss, sparsity, layers = evaluate()
        eval_time, flops = time.time() - t0, model.flops_per_token(sparsity)
        say(f"eval step {step} | val ce {val_loss:.4f} | sparsity {sparsity:.3f} | fwd FLOPs/token "
            f"{flops:.3g} (dense {model.flops_per_token(0.0):.3g}) | train FLOPs {train_flops:.3g} "
            f"in {train_time:.0f}s | eval {eval_time:.1f}s")
        if eval_text:
            say(f"{eval_text}: {len(val_tokens):,} tokens ({n_val:,} predicted) | loss "
                f"{val_loss:.4f} | perplexity {math.exp(val_loss):.2f} | sparsity {sparsity:.3f}")
        for name, values in {'layer': range(n_layer), **layers}.items():  # a column per layer
            say(f"  {name:<10}" + ''.join(f" {v:6}" if name == 'layer' else
                                          f" {v:6.{3 if v < 100 else 1}f}" for v in values))
        run.log({'type': 'eval', 'step': step, 'val_loss': val_loss, 'sparsity': sparsity,
                 'flops_per_token': flops, 'train_flops': train_flops, 'train_time': train_time,
                 'eval_time': eval_time, 'eval_tokens': n_val,
                 'tokens': step * tokens_per_step, **layers})
        improved, best_val_loss = val_loss < best_val_loss, min(best_val_loss, val_loss)
        if step > 0 and (improved or always_save_checkpoint or stopping):
            run.save(run_state(model, optimizer, scaler, ctrl, train_stream, model_args=model_args,
                               config=config, meta=meta, step=step, best_val_loss=best_val_loss,
                               train_flops=train_flops, train_time=train_time), step)
        evaluated_at = step
    if step >= end or stopping or eval_only:
        break

    lr = get_lr(step, decay_end)
    for group in optimizer.param_groups:
        group['lr'] = lr
    t0 = time.time()
    # this step's averages over micro-steps and processes: each adds its share, then one sum
    stats = {k: torch.zeros(n_layer if k.startswith('gate') else (), device=device)
             for k in ('ce', 'reg', 'gate_mean', 'gate_sq', 'gate_zero', 'stop')}
    share = 1 / (grad_accum * world)
    for micro in range(grad_accum):
        x, y = (torch.from_numpy(a) for a in train_stream.next())
        if device.type == 'cuda':  # from pinned memory the copy overlaps with compute
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # gradients are averaged across processes only on the last micro-step
        last = not ddp or micro == grad_accum - 1
        with contextlib.nullcontext() if last else train_model.no_sync():
            with autocast:
                _, ce, gates = train_model(x, y, skip=skip)
                reg = ctrl.loss(gates) if ctrl is not None else torch.zeros((), device=device)
            scaler.scale((ce + reg) / grad_accum).backward()
        stats['ce'] += ce.detach().float() * share
        stats['reg'] += reg.detach().float() * share
        if gates is not None:
            add_gate_stats(stats, gates, share)
    stats['stop'] += float(bool(stop_signal))  # a signal to any process stops them all
    s = sum_over_processes(stats)  # every process gets the same numbers
    loss = s['ce'] + s['reg']
    need(math.isfinite(loss), f"non-finite loss at step {step + 1} (ce {s['ce']}, reg {s['reg']}); "
         f"training stopped without saving; {run.kept()}")
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    sparsity, record = 0.0, {}
    if gated:  # the same inputs on every process, so the same controller state everywhere
        mean, square = (torch.tensor(s[k], device=device) for k in ('gate_mean', 'gate_sq'))
        variance = pooled_variance(mean, square)  # the whole step's
        sparsity = sum(s['gate_zero']) / n_layer
        record = dict(gate_mean=s['gate_mean'], gate_var=variance.tolist())
    if ctrl is not None:
        if ctrl.rule is not None:  # a target kind (a fixed kind's coefficients never move)
            ctrl.update(mean, variance)
        record.update(mean_coefs=ctrl.mean_coefs.tolist(), var_coefs=ctrl.var_coefs.tolist())
    train_flops += 3 * model.flops_per_token(sparsity) * tokens_per_step
    dt = time.time() - t0
    train_time += dt
    step += 1
    stopping = s['stop'] > 0
    if step % log_interval == 0 or step == end or step == 1 or stopping:
        dt = (train_time - logged[1]) / (step - logged[0])  # a step's, since the last log line
        logged, tok_s, eta = (step, train_time), tokens_per_step / dt, (end - step) * dt
        computed = sparsity if skip else 0.0  # MFU counts the (token, layer) pairs computed
        mfu = 3 * model.flops_per_token(computed) * tok_s / world / peak if peak else None
        say(f"step {step} | loss {loss:.4f} | ce {s['ce']:.4f} | reg {s['reg']:+.2e} | "
            f"lr {lr:.2e} | sparsity {sparsity:.3f} | {dt * 1000:.1f} ms | {tok_s:,.0f} tok/s | "
            f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
            f"eta {eta // 3600:.0f}:{eta % 3600 // 60:02.0f}:{eta % 60:02.0f}")
        run.log({'type': 'train', 'step': step, 'loss': loss, 'ce': s['ce'], 'reg': s['reg'],
                 'lr': lr, 'sparsity': sparsity, 'ms': dt * 1000, 'tok_s': tok_s, 'mfu': mfu,
                 'train_flops': train_flops, **record})
    if stopping:
        say(f"stop signal received: checkpointing at step {step} and exiting")

run.close()
if ddp:  # every process waits for the last checkpoint before the group goes down
    torch.distributed.barrier()
    del train_model  # DDP's reducer holds the group's work: it goes first
    torch.distributed.destroy_process_group()
