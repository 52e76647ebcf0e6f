"""
Train a GPT that learns to skip its middle layers, or a dense baseline.

    python train.py                                  # small gated char model, bundled Shakespeare
    python train.py config/shakespeare_char_gpu.py   # a preset, then --key=value overrides
    torchrun --standalone --nproc_per_node=8 train.py config/fineweb_gated.py
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=HOST train.py ...  # R = 0, 1
    python train.py --out_dir=out --init_from=resume   # go on where out/ckpt.pt stopped
    python train.py --out_dir=out --eval_only          # evaluate out/ckpt.pt; writes nothing

One optimizer step = tokens_per_step tokens = processes x grad_accum micro-steps x batch_size x
block_size. The loss is cross-entropy + the gate regularizer; after each step the controller
reads the gate means and variances of the whole step. out_dir gets ckpt.pt (at evaluations, at
the end, on SIGTERM or Ctrl-C) and log.jsonl (checkpoints.RunFiles). A resumed run takes the
settings in its checkpoint, this command's on top, and retraces an uninterrupted run exactly.
"""
import contextlib
import math
import os
import signal
import sys
import time

import numpy as np
import torch

from checkpoints import (RunFiles, check_model_args, check_same_model, load_checkpoint,
                         load_released, resume_settings, rng_state, set_rng_state)
from configurator import (check_out_dir, check_train_settings, configure, device_and_dtype,
                          gate_controller, model_config, peak_flops, sum_over_processes)
from data import DataError, open_dataset, same_tokens
from model import GPT, controller_kinds, gate_moments, pooled_variance
from prepare import prepare

# settings
# I/O
out_dir = 'out'
init_from = 'scratch'          # 'scratch', 'resume' (out_dir/ckpt.pt), or a released model of the
                               # paper's authors: a hub id or folder (checkpoints.py), GPT-2 data
eval_interval = 200            # evaluate and checkpoint every this many steps, and at the end
eval_tokens = 16384            # validation tokens per evaluation: always the first ones of val
eval_only = False              # evaluate out_dir/ckpt.pt (or --init_from's model); write nothing
log_interval = 25              # print and log every this many steps
always_save_checkpoint = True  # False: checkpoint only when the val loss improves
stop_iter = 0                  # stop with a checkpoint after this many steps, schedule unchanged
wandb_log = False              # wandb is optional: imported only when this is on
wandb_project = 'skip-middle'
wandb_run_name = 'run'
# data
dataset = 'shakespeare_char'
data_dir = ''                  # '' = data/<dataset>
batch_size = 16                # sequences per micro-step per process
block_size = 128
tokens_per_step = 0            # tokens per optimizer step, all processes; 0 = one micro-step each
# model
vocab_size = 0                 # 0 = the data's vocabulary rounded up to a multiple of 64
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
rope_theta = 10000.0
norm_eps = 1e-5
gated = True                   # False: a dense baseline (no gate heads, no controller)
gate_init = 'normal'           # 'normal', or 'zero' (a dense start whose heads never learn)
gate_eps = 1e-6                # the attention key bias is log(max(g, gate_eps))
hide_closed_keys = True        # False: closed gates' keys stay visible (the authors' releases)
skip = 'auto'                  # gated: run each layer only on the tokens whose gate is above 0
                               # (the same function as the masked path 'false', less compute);
                               # 'auto' = on when not compiled, 'true', 'false'
plain = False                  # True: model.py's plain definitions only (its attention(), every
                               # token through every layer): the code you read and change runs
# gate controller (the README lists the rules)
controller = 'proportional'    # or sparsity, sparsity_variance(_l2), adaptive, ..._derivative,
                               # ..._integral, or a rule you add to model.TARGET_RULES
ctrl_coef = None               # the mean coefficient: a fixed kind's, or where a target kind
                               # starts; None = the kind's default (fixed: 0.01, l2: 0.1; else 0)
ctrl_var_coef = None           # ... the variance coefficient (sparsity_variance -0.01, l2 0.1)
ctrl_target_start = 1.0        # the mean gate target of the outer layers ...
ctrl_target_end = 0.5          # ... falling linearly to this in the middle
ctrl_var_target_delta = 0.0    # added to the variance targets t(1 - t)
ctrl_lr = 2e-2                 # the rule's step; the paper's 1e-3 suits runs of ~19,000 steps
ctrl_tol = 0.01                # no update where |mean - target| <= tol
ctrl_coef_min = float('-inf')
ctrl_coef_max = float('inf')
# optimizer and schedule
learning_rate = 1e-3
max_iters = 1000               # optimizer steps; 0 = one pass over the train data (as the paper)
weight_decay = 0.0
beta1 = 0.8
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 0.0                # clip the gradient norm at this; 0 = off (the paper does not clip)
decay_lr = True                # False: constant learning_rate
warmup_frac = 0.1              # linear warmup over this fraction of max_iters ...
warmup_start = 0.1             # ... from this multiple of learning_rate, then cosine ...
min_lr_frac = 0.0              # ... down to this multiple
# system
device = 'auto'                # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'                 # 'auto': bfloat16 on GPUs that have it (else float16), CPU float32
compile = 'auto'               # torch.compile: 'auto' = on for CUDA only, 'true', 'false'
deterministic = 'auto'         # torch.use_deterministic_algorithms: 'auto' = on for CPU only
backend = 'auto'               # torch.distributed backend: 'auto' = nccl on CUDA, else gloo
seed = 1337
# end of settings
config, given = configure(globals())
# A resumed or evaluated run takes what defines the run from its checkpoint (model, data, optimizer,
# schedule, controller, its log's intervals); these, where and how it runs or is watched, from here
THIS_COMMAND = ('out_dir', 'init_from', 'eval_only', 'stop_iter', 'device', 'dtype', 'compile',
                'deterministic', 'backend', 'plain', 'wandb_log', 'wandb_project',
                'wandb_run_name')
inherited = set()  # the settings this run took from its checkpoint

def need(ok, message, setting=None):
    """Exits with one line unless ok; it names the checkpoint when the setting came from there."""
    if not ok:
        if setting in inherited:
            message += (f" ({setting}={config[setting]!r} came from {ckpt_path}: pass --{setting}"
                        f"=... to override it)")
        sys.exit(f"error: {message}")

# -----------------------------------------------------------------------------
# processes, the run's settings, device and precision
ddp = 'RANK' in os.environ  # launched by torchrun
rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) \
    if ddp else (0, 0, 1)
master = rank == 0  # the process that prints, logs and checkpoints
say = print if master else (lambda *args, **kwargs: None)
check_out_dir(out_dir)  # a file is no out_dir
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if eval_only and init_from == 'scratch':  # evaluate the run that is there, never a new model
    need(os.path.isfile(ckpt_path), f"--eval_only evaluates a trained model, and {out_dir} holds "
         f"no ckpt.pt; pass the out_dir of a run, or --init_from=<a released model>")
    init_from = config['init_from'] = 'resume'
if init_from == 'resume':  # the run's saved settings, but for this command's and THIS_COMMAND
    updates, notes = resume_settings(ckpt_path, config, given, THIS_COMMAND)
    config.update(updates)
    globals().update(updates)
    inherited = set(updates)
check_out_dir(out_dir, write=master and not eval_only)  # before any work: it must be writable
check_train_settings(config, controller_kinds())  # one line for a setting that cannot work
device, dtype = device_and_dtype(device, dtype, local_rank if ddp else None, deterministic)
if ddp:
    torch.distributed.init_process_group(backend if backend != 'auto' else
                                         'nccl' if device.type == 'cuda' else 'gloo')
torch.manual_seed(seed)  # the only randomness: initial weights (the data order is fixed)
autocast = (contextlib.nullcontext() if dtype == 'float32' else
            torch.autocast(device.type, dtype=getattr(torch, dtype)))
use_compile = compile == 'true' or (compile == 'auto' and device.type == 'cuda')
peak = peak_flops(device)  # for the MFU; None on CPUs and unknown GPUs

# -----------------------------------------------------------------------------
# data: a deterministic stream of train batches, and a fixed validation set
B, T = batch_size, block_size
tokens_per_step = tokens_per_step or B * T * world
grad_accum = tokens_per_step // (B * T * world)
need(grad_accum * B * T * world == tokens_per_step, f"tokens_per_step={tokens_per_step} is not a "
     f"multiple of batch_size*block_size*world_size = {B}*{T}*{world} = {B * T * world}",
     'tokens_per_step')
data_dir = data_dir or os.path.join('data', dataset)
bundled = dataset == 'shakespeare_char' and not config['data_dir']  # needs no network
if bundled and not os.path.isfile(os.path.join(data_dir, 'meta.json')) and local_rank == 0:
    # one process per node; nodes that share a filesystem take turns (prepare.py locks it)
    print(f"{data_dir} is not prepared: preparing the bundled shakespeare_char dataset")
    prepare('shakespeare_char')
if ddp:
    torch.distributed.barrier()  # every process waits for its node's preparation
try:
    meta, train_stream, val_tokens = open_dataset(data_dir, B, T, rank, world, eval_tokens)
except DataError as e:
    need(False, str(e), 'data_dir' if config['data_dir'] else 'dataset')
if len(val_tokens) <= eval_tokens:
    say(f"note: eval_tokens={eval_tokens}, but the val split has {len(val_tokens)}: using them all")
need(vocab_size == 0 or vocab_size >= meta['vocab_size'], f"vocab_size={vocab_size} is smaller "
     f"than the {meta['vocab_size']} tokens of {data_dir}/meta.json; use --vocab_size=0 to follow "
     f"the data")
if max_iters == 0:  # one pass over the train data, as the paper's runs
    max_iters = sum(len(s) for s in train_stream.shards) // tokens_per_step
    need(max_iters > 0, f"max_iters=0 means one pass over the train data, but {data_dir} holds "
         f"fewer than tokens_per_step={tokens_per_step} train tokens")
need(stop_iter <= max_iters, f"stop_iter={stop_iter} is beyond max_iters={max_iters}")

# -----------------------------------------------------------------------------
# model, optimizer and gate controller: new, resumed from out_dir/ckpt.pt, or a released model
ckpt = None
if init_from == 'resume':
    model, ckpt = load_checkpoint(ckpt_path, 'cpu')
    same_tokens(ckpt['meta'], meta, data_dir)  # data prepared again since: ids would change meaning
    if ckpt['config']['init_from'] in ('scratch', 'resume'):  # else the release set the model
        check_model_args(ckpt_path, ckpt['model_args'],
                         vars(model_config(config, meta['vocab_size'])))
    if not eval_only:  # an evaluation trains nothing and logs to nothing
        for note in notes:
            say(f"note: {note}")
elif init_from != 'scratch':  # one of the authors' released models, which read GPT-2 tokens
    need(meta['tokenizer'] == 'gpt2', f"--init_from={init_from} reads GPT-2 tokens, but {data_dir} "
         f"holds {meta['tokenizer']} tokens; prepare GPT-2 data (`python prepare.py shakespeare`)")
    model = load_released(init_from)
    say(f"note: --init_from={init_from} sets the model (its own sizes and semantics, "
        f"hide_closed_keys={model.config.hide_closed_keys}); this run's model settings are unused"
        + (f"; an evaluation neither reads nor writes {out_dir}" if eval_only else ""))
else:
    model = GPT(model_config(config, meta['vocab_size']))
model_args = dict(vars(model.config))  # what was built, for every checkpoint this run writes
if master and init_from != 'resume' and not eval_only and os.path.exists(ckpt_path):
    check_same_model(ckpt_path, model_args)  # a new run never pushes aside another model's run
n_layer, gated, hide_closed_keys = (model_args[k] for k in ('n_layer', 'gated', 'hide_closed_keys'))
need(T <= model.config.block_size and meta['vocab_size'] <= model.config.vocab_size,
     f"block_size={T} or the data's vocabulary ({meta['vocab_size']}) exceeds the model's "
     f"({model.config.block_size}, {model.config.vocab_size})")
need(skip != 'true' or hide_closed_keys, "--skip=true needs closed keys hidden (hide_closed_keys): "
     "with them visible every token's key is needed in every layer")
# packing syncs with the host once per layer, which breaks a compiled graph into pieces
skip = gated and hide_closed_keys and not plain and (skip == 'true' or (skip == 'auto' and
                                                                      not use_compile))
model.use_plain(plain).to(device)
optimizer = model.configure_optimizer(learning_rate, (beta1, beta2), weight_decay, device.type,
                                      adam_eps)
scaler = torch.amp.GradScaler(device.type, enabled=dtype == 'float16')  # bf16 needs no scaling
ctrl = gate_controller(config, n_layer, device) if gated else None
step, best_val_loss, train_flops, train_time = 0, math.inf, 0.0, 0.0
if ckpt is not None:
    optimizer.load_state_dict(ckpt['optimizer'])
    if scaler.is_enabled() and ckpt['scaler']:
        scaler.load_state_dict(ckpt['scaler'])
    if ctrl is not None:
        ctrl.load_state_dict(ckpt['controller'])
    train_stream.load_state_dict(ckpt['data_state'])
    step, best_val_loss, train_flops, train_time = (ckpt[k] for k in (
        'step', 'best_val_loss', 'train_flops', 'train_time'))
    set_rng_state(ckpt['rng'])
    say(f"{'evaluating' if eval_only else 'resuming from'} {ckpt_path} at step {step}")
    if step >= max_iters and not eval_only:
        say(f"note: the run is complete (step {step} of max_iters={max_iters}): nothing to train; "
            f"pass a larger --max_iters to train on")
    ckpt = None  # free the memory
train_model = torch.compile(model) if use_compile else model
if ddp:
    train_model = torch.nn.parallel.DistributedDataParallel(
        train_model, device_ids=[local_rank] if device.type == 'cuda' else None)
say(f"data {data_dir} ({meta['tokenizer']}, vocab {meta['vocab_size']} -> model "
    f"{model.config.vocab_size}); model {model.num_params() / 1e6:.2f}M non-embedding params, "
    f"{('gated, skip ' + ('on' if skip else 'off (masked)')) if gated else 'dense'}"
    f"{', plain definitions' if plain else ''}, "
    f"{n_layer} layers; device {device} x {world} "
    f"({f'ddp {torch.distributed.get_backend()}' if ddp else 'single process'}), {dtype}, "
    f"compile {use_compile}")
say(f"tokens per step {tokens_per_step:,} = {world} procs x {grad_accum} accum x {B} x {T}; "
    f"{max_iters} steps; fwd FLOPs/token dense {model.flops_per_token(0.0):.3g}; MFU counts the "
    f"(token, layer) pairs computed ({'the unskipped ones' if skip else 'all of them'})")

# -----------------------------------------------------------------------------
# the learning rate, evaluation, checkpoints

def get_lr(it):
    """Linear warmup from warmup_start x over warmup_frac of max_iters, cosine to min_lr_frac x."""
    if not decay_lr:
        return learning_rate
    warmup = int(warmup_frac * max_iters)
    if it < warmup:
        return learning_rate * (warmup_start + (1 - warmup_start) * it / warmup)
    progress = min(1.0, (it - warmup) / max(1, max_iters - warmup))
    low = learning_rate * min_lr_frac
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - low)

@torch.no_grad()
def evaluate():
    """Cross-entropy, sparsity and per-layer statistics (gate mean, variance, share of zeros,
    residual-stream norm) on the fixed validation sequences; sequence i goes to process
    i % world_size. The uncompiled model: an evaluation is too short to pay for compiling."""
    model.eval()
    mine = list(range(rank, (len(val_tokens) - 1) // T, world))
    f64 = torch.float32 if device.type == 'mps' else torch.float64  # long sums (MPS has no fp64)
    sums = {k: torch.zeros(() if k in ('ce', 'tokens') else n_layer, device=device, dtype=f64)
            for k in ('ce', 'tokens', 'gate_mean', 'gate_sq', 'gate_zero', 'resid_norm')}
    for i in range(0, len(mine), B):
        rows = np.stack([val_tokens[j * T:j * T + T + 1] for j in mine[i:i + B]]).astype(np.int64)
        x, y = torch.from_numpy(rows[:, :-1]).to(device), torch.from_numpy(rows[:, 1:]).to(device)
        norms = []
        with autocast:
            _, ce, gates = model(x, y, skip=skip, norms=norms)
        n = x.numel()
        g = gates.to(f64) if gates is not None else torch.ones(n_layer, *x.shape).to(device, f64)
        sums['ce'] += ce.to(f64) * n
        sums['tokens'] += n
        sums['gate_mean'] += g.sum((1, 2))
        sums['gate_sq'] += (g * g).sum((1, 2))
        sums['gate_zero'] += (g == 0).sum((1, 2))  # a skipped (token, layer): gate exactly 0
        sums['resid_norm'] += torch.stack(norms).to(f64) * n
    model.train()
    s = sum_over_processes(sums)
    n, mean = s['tokens'], [v / s['tokens'] for v in s['gate_mean']]
    layers = {'gate_mean': mean, 'gate_var': [max(0.0, q / n - m * m) for q, m in
                                              zip(s['gate_sq'], mean)],
              'gate_zero': [v / n for v in s['gate_zero']],
              'resid_norm': [v / n for v in s['resid_norm']]}
    return s['ce'] / n, sum(layers['gate_zero']) / n_layer, layers

def checkpoint():
    return {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'model_args': model_args, 'config': config, 'meta': meta, 'step': step,
            'scaler': scaler.state_dict() if scaler.is_enabled() else None, 'rng': rng_state(),
            'controller': ctrl.state_dict() if ctrl else None,
            'data_state': train_stream.state_dict(), 'best_val_loss': best_val_loss,
            'train_flops': train_flops, 'train_time': train_time}

run = RunFiles(out_dir, step if init_from == 'resume' else None, write=master and not eval_only,
               wandb_settings=(wandb_project, wandb_run_name, config) if wandb_log else None)
run.log({'type': 'start', 'step': step, 'resumed': init_from == 'resume', 'world_size': world,
         'grad_accum': grad_accum, 'tokens_per_step': tokens_per_step, 'device': str(device),
         'dtype': dtype,  # strict JSON has no Infinity: unbounded controller limits as strings
         'config': {k: str(v) if v in (math.inf, -math.inf) else v for k, v in config.items()}})
stop_signal = []  # SIGTERM or Ctrl-C (preemption): finish the step, checkpoint, exit

def on_signal(signum, frame):
    if stop_signal:  # a second one does not wait
        raise KeyboardInterrupt
    stop_signal.append(signum)

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)

# -----------------------------------------------------------------------------
# the training loop
end = stop_iter or max_iters
evaluated_at = step if init_from == 'resume' and not eval_only else None  # saved after its eval
stopping = False
while True:
    if (step % eval_interval == 0 or step >= end or stopping or eval_only) and step != evaluated_at:
        t0 = time.time()
        val_loss, sparsity, layers = evaluate()
        eval_time, flops = time.time() - t0, model.flops_per_token(sparsity)
        say(f"eval step {step} | val ce {val_loss:.4f} | sparsity {sparsity:.3f} | fwd FLOPs/token "
            f"{flops:.3g} (dense {model.flops_per_token(0.0):.3g}) | train FLOPs {train_flops:.3g} "
            f"in {train_time:.0f}s | eval {eval_time:.1f}s")
        for name, values in {'layer': range(n_layer), **layers}.items():  # a column per layer
            say(f"  {name:<10}" + ''.join(f" {v:6d}" if name == 'layer' else f" {v:6.3f}"
                                          if v < 100 else f" {v:6.1f}" for v in values))
        run.log({'type': 'eval', 'step': step, 'val_loss': val_loss, 'sparsity': sparsity,
                 'flops_per_token': flops, 'train_flops': train_flops, 'train_time': train_time,
                 'eval_time': eval_time, 'eval_tokens': (len(val_tokens) - 1) // T * T,
                 'tokens': step * tokens_per_step, **layers})
        improved, best_val_loss = val_loss < best_val_loss, min(best_val_loss, val_loss)
        if step > 0 and (improved or always_save_checkpoint or stopping):
            run.save(checkpoint(), step)
        evaluated_at = step
    if step >= end or stopping or eval_only:
        break

    lr = get_lr(step)
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
            means, squares = gate_moments(gates)
            stats['gate_mean'] += means * share
            stats['gate_sq'] += squares * share
            stats['gate_zero'] += (gates.detach() == 0).float().mean((1, 2)) * share
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
    sparsity = 0.0
    if ctrl is not None:  # the same inputs on every process, so the same state everywhere
        mean, square = (torch.tensor(s[k], device=device) for k in ('gate_mean', 'gate_sq'))
        variance = pooled_variance(mean, square)  # the whole step's
        ctrl.update(mean, variance)
        sparsity = sum(s['gate_zero']) / n_layer
    train_flops += 3 * model.flops_per_token(sparsity) * tokens_per_step
    dt = time.time() - t0
    train_time += dt
    step += 1
    stopping = s['stop'] > 0

    if step % log_interval == 0 or step == end or step == 1 or stopping:
        tok_s = tokens_per_step / dt
        computed = sparsity if skip else 0.0  # MFU counts the (token, layer) pairs computed
        mfu = 3 * model.flops_per_token(computed) * tok_s / world / peak if peak else None
        say(f"step {step} | loss {loss:.4f} | ce {s['ce']:.4f} | reg {s['reg']:+.2e} | "
            f"lr {lr:.2e} | sparsity {sparsity:.3f} | {dt * 1000:.1f} ms | {tok_s:,.0f} tok/s | "
            f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
        record = {'type': 'train', 'step': step, 'loss': loss, 'ce': s['ce'], 'reg': s['reg'],
                  'lr': lr, 'sparsity': sparsity, 'ms': dt * 1000, 'tok_s': tok_s, 'mfu': mfu,
                  'train_flops': train_flops}
        if ctrl is not None:
            record.update(gate_mean=s['gate_mean'], gate_var=variance.tolist(),
                          mean_coefs=ctrl.mean_coefs.tolist(), var_coefs=ctrl.var_coefs.tolist())
        run.log(record)
    if stopping:
        say(f"stop signal received: checkpointing at step {step} and exiting")

run.close()
if ddp:  # every process waits for the last checkpoint before the group goes down
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
