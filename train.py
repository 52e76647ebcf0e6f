"""
Train a GPT that learns to skip its middle layers (SPEC.md), or a dense baseline.

    python train.py                                     # small gated char model, bundled Shakespeare, few minutes on CPU
    python train.py config/shakespeare_char_gpu.py      # a preset ...
    python train.py config/fineweb_gated.py --batch_size=16 --compile=false   # ... plus --key=value overrides
    torchrun --standalone --nproc_per_node=4 train.py config/fineweb_gated.py
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...
    python train.py --out_dir=out --init_from=resume    # continue exactly where out/ckpt.pt stopped

Settings: the defaults below, then the preset file (executed, as in nanoGPT), then the
--key=value overrides, each checked against the type of the default it replaces.

One optimizer step = tokens_per_step tokens = world_size processes x grad_accum micro-steps
x batch_size x block_size; grad_accum is derived. loss = cross-entropy + controller.loss(gates);
after every step the gate controller reads the per-layer gate means and variances, averaged
over micro-steps and ranks, and updates its coefficients identically on every rank.

Written to out_dir: ckpt.pt (atomically, at every evaluation, at the end, and on SIGTERM/Ctrl-C)
and log.jsonl (one JSON record per log line and per evaluation). A scratch run in a used
out_dir moves the earlier ckpt.pt/log.jsonl to ckpt.prev.pt/log.prev.jsonl when it writes its
own first checkpoint, so a run that fails before that loses nothing. A resumed run
(same settings) reproduces an uninterrupted one exactly on CPU. A non-finite loss stops the run
without saving, so the last good checkpoint stays. Errors in settings or data: one line, exit 1.
"""

import builtins
import contextlib
import difflib
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch

# -----------------------------------------------------------------------------
# default settings: a small gated char-level model on the bundled Shakespeare; a few
# minutes on a 2-core CPU (config/cpu_default.py spells the same values out)
# I/O
out_dir = 'out'
init_from = 'scratch'          # 'scratch' or 'resume' (from out_dir/ckpt.pt)
eval_interval = 200            # evaluate + checkpoint every this many steps, and at the end
eval_tokens = 16384            # validation tokens per evaluation: the first ones of the val split, every time
eval_only = False              # evaluate once and exit
log_interval = 25              # print + log.jsonl every this many steps
always_save_checkpoint = True  # False: checkpoint only when the val loss improves
stop_iter = 0                  # stop (with a checkpoint) after this many steps without changing the schedule; 0 = max_iters
wandb_log = False              # wandb is imported only when this is on
wandb_project = 'skip-middle'
wandb_run_name = 'run'
# data
dataset = 'shakespeare_char'
data_dir = ''                  # '' = data/<dataset>
batch_size = 16                # sequences per micro-step per process
block_size = 128
tokens_per_step = 0            # tokens per optimizer step over all processes; 0 = batch_size*block_size*world_size
# model (GPTConfig)
vocab_size = 0                 # 0 = the data's vocabulary rounded up to a multiple of 64
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
rope_theta = 10000.0
norm_eps = 1e-5
gated = True                   # False: dense baseline (no gate heads, no controller)
gate_init = 'normal'           # 'normal' (the paper's) or 'zero' (dense start; zero-init heads get no gradient)
gate_eps = 1e-6
attn_backend = 'auto'          # 'auto', 'sdpa', 'flex'
# gate controller (SPEC section 4)
controller = 'proportional'    # sparsity, sparsity_variance, adaptive, proportional, proportional_derivative
ctrl_coef = 0.01               # fixed mean coefficient (sparsity kinds)
ctrl_var_coef = -0.01          # fixed variance coefficient (sparsity_variance)
ctrl_target_start = 1.0        # mean target of the outer layers ...
ctrl_target_end = 0.5          # ... falling linearly to this at the middle
ctrl_var_target_delta = 0.0
ctrl_lr = 2e-2                 # coefficient update multiplier; the paper's 1e-3 (fineweb presets) is too slow
                               # for 1000 steps: gates would barely reach 0 (README, Notes)
ctrl_tol = 0.01                # no update where |mean - target| <= tol
ctrl_coef_min = -math.inf
ctrl_coef_max = math.inf
# optimizer and schedule (SPEC section 5)
learning_rate = 1e-3
max_iters = 1000               # optimizer steps in the schedule; 0 = one pass over the train data (as the paper)
weight_decay = 0.0
beta1 = 0.8
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 0.0                # clip the gradient norm at this value; 0 = off (the paper does not clip)
decay_lr = True                # False: constant learning_rate
warmup_frac = 0.1              # linear warmup over this fraction of max_iters ...
warmup_start = 0.1             # ... from this multiple of learning_rate, then cosine ...
min_lr_frac = 0.0              # ... down to this multiple
# system
device = 'auto'                # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'                 # 'auto' (bfloat16 where the GPU has it, else float16 + GradScaler; float32 on CPU/MPS), or explicit
compile = 'auto'               # torch.compile: 'auto' = on for CUDA, off elsewhere; 'true', 'false'
deterministic = 'auto'         # torch.use_deterministic_algorithms: 'auto' = on for CPU only; 'true', 'false'
backend = 'auto'               # torch.distributed backend: 'auto' = nccl on CUDA, gloo on CPU
seed = 1337
# testing aids
debug_nan_step = 0             # make the loss of step N (counted from 1, as in the log) NaN, to test the stop; 0 = off
debug_dump = False             # every rank writes out_dir/debug_rank{R}.pt with its controller state at the end
# -----------------------------------------------------------------------------

DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str)) and k != 'DEFAULTS'}
CHOICES = {
    'init_from': ('scratch', 'resume'),
    'gate_init': ('normal', 'zero'),
    'attn_backend': ('auto', 'sdpa', 'flex'),
    'controller': ('sparsity', 'sparsity_variance', 'adaptive', 'proportional', 'proportional_derivative'),
    'dtype': ('auto', 'float32', 'bfloat16', 'float16'),
    'compile': ('auto', 'true', 'false'),
    'deterministic': ('auto', 'true', 'false'),
    'backend': ('auto', 'nccl', 'gloo'),
}
TRISTATE = ('compile', 'deterministic')  # accept bools too
MODEL_KEYS = ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'rope_theta',
              'norm_eps', 'gated', 'gate_init', 'gate_eps', 'attn_backend')
# settings that do not affect the numbers a resumed run produces
RUN_KEYS = ('out_dir', 'init_from', 'eval_interval', 'eval_only', 'log_interval', 'always_save_checkpoint',
            'stop_iter', 'wandb_log', 'wandb_project', 'wandb_run_name', 'compile', 'debug_dump')
ZERO = 1e-8  # a gate counts as exactly zero below this (SPEC section 4)
CKPT_NAME = 'ckpt.pt'
LOG_NAME = 'log.jsonl'

# Dense bf16 tensor-core peak FLOP/s by a substring of torch.cuda.get_device_name(), most
# specific first (fp16 peak for cards without bf16). Used for MFU; unknown devices get "n/a".
PEAK_FLOPS = [
    ('GH200', 989e12), ('H200', 989e12), ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12),
    ('H800', 989e12), ('H20', 148e12), ('B200', 2250e12), ('B100', 1750e12), ('A100', 312e12), ('A800', 312e12),
    ('L40S', 362e12), ('L40', 181e12), ('L4', 121e12), ('RTX A6000', 155e12), ('RTX 6000 Ada', 364e12),
    ('RTX 4090', 165e12), ('RTX 3090', 71e12), ('V100', 125e12), ('T4', 65e12),
    ('MI300X', 1307e12), ('MI250X', 383e12),
]


class ConfigError(ValueError):
    pass


class StopTraining(Exception):
    pass


# ----------------------------------------------------------------------------- settings

def _coerce(key, value, source):
    """value (a string from the command line, or an object from a preset) as the type of
    DEFAULTS[key]; ConfigError naming the key otherwise."""
    default = DEFAULTS[key]
    want = type(default).__name__
    bad = ConfigError(f"{source}: {key} must be {want} (like the default {default!r}), got {value!r}")
    if key in TRISTATE:
        if isinstance(value, bool):
            value = 'true' if value else 'false'
        if isinstance(value, str):
            value = value.lower()
    if isinstance(value, str) and not isinstance(default, str):
        text = value.strip()
        if isinstance(default, bool):
            if text.lower() not in ('true', 'false', '1', '0'):
                raise bad
            value = text.lower() in ('true', '1')
        elif isinstance(default, int):
            try:
                value = int(text)
            except ValueError:
                try:
                    f = float(text)
                except ValueError:
                    raise bad from None
                if not f.is_integer():
                    raise bad from None
                value = int(f)
        else:
            try:
                value = float(text)
            except ValueError:
                raise bad from None
    # objects (from presets, or parsed above)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif not isinstance(value, str):
        raise bad
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(CHOICES[key])}; got {value!r}")
    return value


def _unknown(key, source):
    close = difflib.get_close_matches(key, DEFAULTS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{source}: unknown setting {key!r}{hint}")


def parse_config(argv):
    """DEFAULTS, then each preset file (config/NAME.py), then --key=value, in order."""
    cfg = dict(DEFAULTS)
    for arg in argv:
        if arg.startswith('--'):
            if '=' not in arg:
                raise ConfigError(f"expected --key=value, got {arg!r}")
            key, value = arg[2:].split('=', 1)
            if key not in DEFAULTS:
                raise _unknown(key, f"--{key}")
            cfg[key] = _coerce(key, value, f"--{key}={value}")
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found (presets live in config/)")
            scope = {'__file__': arg}
            with open(arg) as f:
                exec(builtins.compile(f.read(), arg, 'exec'), scope)  # (compile is also a setting)
            for key, value in scope.items():
                if key.startswith('_') or callable(value) or type(value).__name__ == 'module':
                    continue  # imports, helpers
                if key not in DEFAULTS:
                    raise _unknown(key, arg)
                cfg[key] = _coerce(key, value, arg)
    check_config(cfg)
    return cfg


def check_config(c):
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)
    for key in ('batch_size', 'block_size', 'eval_interval', 'log_interval', 'eval_tokens',
                'n_layer', 'n_head', 'n_kv_head', 'n_embd'):
        need(c[key] > 0, f"{key} must be positive, got {c[key]}")
    for key in ('tokens_per_step', 'vocab_size', 'max_iters', 'stop_iter', 'weight_decay', 'grad_clip', 'min_lr_frac'):
        need(c[key] >= 0, f"{key} must be >= 0, got {c[key]}")
    need(0 <= c['warmup_frac'] < 1, f"warmup_frac must be in [0, 1), got {c['warmup_frac']}")
    need(0 <= c['warmup_start'] <= 1, f"warmup_start must be in [0, 1], got {c['warmup_start']}")
    need(c['learning_rate'] > 0, f"learning_rate must be positive, got {c['learning_rate']}")
    if c['device'] != 'auto':
        try:
            torch.device(c['device'])
        except RuntimeError:
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {c['device']!r}") from None


# ----------------------------------------------------------------------------- data

class TokenStream:
    """Sequential, deterministic reader over the concatenated train shards (memory-mapped).
    A global micro-step takes world*B*T + 1 consecutive tokens; rank r uses its own slice
    [r*B*T, (r+1)*B*T + 1) of them. A window that would cross a shard's end starts the next
    shard instead; after the last shard the stream starts over (epoch + 1).
    The position (shard, pos, epoch) is global, so it resumes under any world size."""

    def __init__(self, paths, shards, B, T, rank, world, vocab_size):
        self.paths, self.shards, self.vocab_size = paths, shards, vocab_size
        self.B, self.T, self.rank, self.world = B, T, rank, world
        need = world * B * T + 1
        small = [(p, len(s)) for p, s in zip(paths, shards) if len(s) < need]
        if small:
            p, n = small[0]
            raise ConfigError(f"shard {p} has {n} tokens, fewer than one micro-step needs "
                              f"(world_size*batch_size*block_size+1 = {need}); lower batch_size or block_size")
        self.shard, self.pos, self.epoch = 0, 0, 0

    def next(self):
        span = self.world * self.B * self.T
        if self.pos + span + 1 > len(self.shards[self.shard]):
            self.shard, self.pos = self.shard + 1, 0
            if self.shard == len(self.shards):
                self.shard, self.epoch = 0, self.epoch + 1
        start = self.pos + self.rank * self.B * self.T
        window = self.shards[self.shard][start:start + self.B * self.T + 1]
        if window.max() >= self.vocab_size:  # checked per window: a full scan of 10B tokens takes minutes
            raise ConfigError(f"{self.paths[self.shard]}: token id {int(window.max())} near offset {start} is not "
                              f"below the data's vocab_size {self.vocab_size} (meta.json); prepare the data again")
        buf = torch.from_numpy(window.astype(np.int64))
        self.pos += span
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def state_dict(self):
        return {'shard': self.shard, 'pos': self.pos, 'epoch': self.epoch,
                'shard_path': os.path.basename(self.paths[self.shard])}

    def load_state_dict(self, s):
        if s['shard'] >= len(self.shards):
            raise ConfigError(f"data_state: checkpoint is at train shard {s['shard']} but the data has "
                              f"only {len(self.shards)} train shards")
        if s.get('shard_path', os.path.basename(self.paths[s['shard']])) != os.path.basename(self.paths[s['shard']]):
            raise ConfigError(f"data_state: checkpoint is at train shard {s['shard_path']} but shard {s['shard']} of "
                              f"this data is {os.path.basename(self.paths[s['shard']])}; the data changed")
        self.shard, self.pos, self.epoch = s['shard'], s['pos'], s['epoch']


def open_data(c, rank, world, local_rank, ddp):
    """meta, train stream, val token array; builds the bundled default dataset if missing."""
    from prepare import DataError, load_meta, prepare, read_shard, shard_paths
    data_dir = c['data_dir'] or os.path.join('data', c['dataset'])
    if not os.path.isdir(data_dir):
        if c['dataset'] == 'shakespeare_char' and not c['data_dir']:
            if local_rank == 0:
                print(f"{data_dir} not found: preparing the bundled shakespeare_char dataset (offline)")
                prepare('shakespeare_char')
            if ddp:
                torch.distributed.barrier()
        else:
            where = '' if data_dir == os.path.join('data', c['dataset']) else f" --out_dir {data_dir}"
            raise DataError(f"data directory {data_dir} not found; run: python prepare.py {c['dataset']}{where}")
    meta = load_meta(data_dir)
    vocab = c['vocab_size'] or -(-meta['vocab_size'] // 64) * 64
    if vocab < meta['vocab_size']:
        raise ConfigError(f"vocab_size={vocab} is smaller than the data's vocabulary of {meta['vocab_size']} "
                          f"tokens ({data_dir}/meta.json); use --vocab_size=0 to follow the data")
    train_paths, val_paths = shard_paths(data_dir, 'train'), shard_paths(data_dir, 'val')
    train = TokenStream(train_paths, [read_shard(p) for p in train_paths],
                        c['batch_size'], c['block_size'], rank, world, meta['vocab_size'])
    # the fixed validation set: the first eval_tokens (+1) tokens of the val split
    want, parts, have = c['eval_tokens'] + 1, [], 0
    for p in val_paths:
        toks = read_shard(p, meta['vocab_size'])
        parts.append(np.array(toks[:want - have]))
        have += len(parts[-1])
        if have >= want:
            break
    val = np.concatenate(parts)
    if len(val) < want and rank == 0:
        print(f"note: eval_tokens={c['eval_tokens']} but the val split has {len(val)} tokens: evaluating on all of them")
    if (len(val) - 1) // c['block_size'] < world:
        raise ConfigError(f"the val split has {len(val)} tokens: too few for one block_size={c['block_size']} "
                          f"sequence per process")
    return data_dir, meta, vocab, train, val


# ----------------------------------------------------------------------------- helpers

def get_lr(step, c):
    """Linear warmup from warmup_start x over the first warmup_frac of max_iters, then
    cosine to min_lr_frac x (SPEC section 5)."""
    lr = c['learning_rate']
    if not c['decay_lr']:
        return lr
    warmup = int(c['warmup_frac'] * c['max_iters'])
    if step < warmup:
        return lr * (c['warmup_start'] + (1 - c['warmup_start']) * step / warmup)
    progress = min(1.0, (step - warmup) / max(1, c['max_iters'] - warmup))
    lo = lr * c['min_lr_frac']
    return lo + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - lo)


def peak_flops(device_type):
    if device_type != 'cuda':
        return None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops
    return None


def rng_state():
    """Every RNG, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'python': random.getstate(), 'numpy': (kind, keys.tolist(), pos, has_gauss, gauss),
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s['python'])
    kind, keys, pos, has_gauss, gauss = s['numpy']
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s['torch'])
    if s['cuda'] is not None and torch.cuda.is_available() and len(s['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s['cuda'])


def save_atomic(obj, path):
    """torch.save to a temp file in the same folder, fsync, then os.replace: a crash at any
    moment leaves either the old checkpoint or the new one, never half of one."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def clean_state_dict(sd):
    """Drop the prefixes torch.compile (_orig_mod.) and DDP (module.) add."""
    out = {}
    for k, v in sd.items():
        while k.startswith(('_orig_mod.', 'module.')):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def fmt_flops(x):
    for unit, scale in (('E', 1e18), ('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def layer_table(stats):
    """Per-layer statistics as a compact table: one row per statistic, one column per layer."""
    L = len(stats['gate_mean'])
    rows = ['  layer     ' + ''.join(f'{i:>7d}' for i in range(L))]
    for name in ('gate_mean', 'gate_var', 'gate_zero', 'resid_norm'):
        rows.append(f'  {name:<10}' + ''.join(f'{v:>7.3f}' if v < 1000 else f'{v:>7.0f}' for v in stats[name]))
    return '\n'.join(rows)


# ----------------------------------------------------------------------------- training

def main(argv):
    c = parse_config(argv)
    from model import GPT, GPTConfig, GateController, gate_moments

    # -- processes and device
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    dev = c['device']
    if dev == 'auto':
        dev = 'cuda' if torch.cuda.is_available() else ('mps' if torch.backends.mps.is_available() else 'cpu')
    if dev == 'cuda' and ddp:
        dev = f'cuda:{local_rank}'
    device = torch.device(dev)
    device_type = device.type
    if device_type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError(f"device={c['device']!r} but CUDA is not available")
        torch.cuda.set_device(device)
    if ddp:
        backend = c['backend'] if c['backend'] != 'auto' else ('nccl' if device_type == 'cuda' else 'gloo')
        torch.distributed.init_process_group(backend=backend)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)

    torch.manual_seed(c['seed'])
    random.seed(c['seed'])
    np.random.seed(c['seed'])
    if c['deterministic'] == 'true' or (c['deterministic'] == 'auto' and device_type == 'cpu'):
        if device_type == 'cuda':
            os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    dtype = c['dtype']
    if dtype == 'auto':
        dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if device_type == 'cuda' else 'float32'
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    autocast = contextlib.nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=ptdtype)
    use_compile = c['compile'] == 'true' or (c['compile'] == 'auto' and device_type == 'cuda')

    # -- data
    B, T = c['batch_size'], c['block_size']
    micro_tokens = B * T * world
    tokens_per_step = c['tokens_per_step'] or micro_tokens
    if tokens_per_step % micro_tokens:
        raise ConfigError(f"tokens_per_step={tokens_per_step} is not divisible by batch_size*block_size*world_size "
                          f"= {B}*{T}*{world} = {micro_tokens}")
    grad_accum = tokens_per_step // micro_tokens
    data_dir, meta, vocab, train_stream, val_tokens = open_data(c, rank, world, local_rank, ddp)
    if c['max_iters'] == 0:  # one pass over the train data, as the paper's runs
        c['max_iters'] = sum(len(s) for s in train_stream.shards) // tokens_per_step
        if c['max_iters'] == 0:
            raise ConfigError(f"max_iters=0 means one pass over the train data, but {data_dir} holds fewer than "
                              f"tokens_per_step={tokens_per_step} train tokens")
    if c['stop_iter'] > c['max_iters']:
        raise ConfigError(f"stop_iter={c['stop_iter']} is beyond max_iters={c['max_iters']}")

    # -- model, optimizer, controller
    model_args = {k: c[k] for k in MODEL_KEYS}
    model_args['vocab_size'] = vocab
    model_args['data_vocab_size'] = meta['vocab_size']  # ids above it are padding: never sampled
    ckpt_path = os.path.join(c['out_dir'], CKPT_NAME)
    ckpt = None
    if c['init_from'] == 'resume':
        if not os.path.isfile(ckpt_path):
            raise ConfigError(f"init_from=resume but there is no checkpoint {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        for k, old in ckpt['model_args'].items():
            new = model_args.get(k)
            if k == 'vocab_size' and old != new:
                raise ConfigError(f"vocab_size: checkpoint {ckpt_path} has vocab_size={old} but this run has "
                                  f"{new} (data {data_dir}: {meta['vocab_size']} tokens, --vocab_size={c['vocab_size']})")
            if old != new:
                raise ConfigError(f"{k}: checkpoint {ckpt_path} has {k}={old!r} but this run's config has "
                                  f"{k}={new!r}; pass --{k}={old} or use another out_dir")
        changed = [k for k in DEFAULTS if k not in RUN_KEYS and k not in MODEL_KEYS
                   and k in ckpt['config'] and ckpt['config'][k] != c[k]]
        if changed:
            say("note: resuming with settings that differ from the checkpoint's (the run will not retrace "
                "an uninterrupted one): " + ", ".join(f"{k} {ckpt['config'][k]!r} -> {c[k]!r}" for k in changed))
    try:
        gptconf = GPTConfig(**model_args)
    except ValueError as e:
        raise ConfigError(str(e).replace('GPTConfig.', '')) from None
    gpt = GPT(gptconf).to(device)
    if ckpt is not None:
        sd = clean_state_dict(ckpt['model'])
        own = gpt.state_dict()
        for k, v in sd.items():
            if k in own and own[k].shape != v.shape:
                raise ConfigError(f"checkpoint {ckpt_path}: parameter {k} has shape {tuple(v.shape)}, "
                                  f"this config builds {tuple(own[k].shape)}")
        gpt.load_state_dict(sd)
    optimizer = gpt.configure_optimizer(c['learning_rate'], (c['beta1'], c['beta2']), c['weight_decay'],
                                        device_type, eps=c['adam_eps'])
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    ctrl = None
    if c['gated']:
        ctrl = GateController(c['controller'], c['n_layer'], coef=c['ctrl_coef'], var_coef=c['ctrl_var_coef'],
                              target_start=c['ctrl_target_start'], target_end=c['ctrl_target_end'],
                              var_target_delta=c['ctrl_var_target_delta'], lr=c['ctrl_lr'], tol=c['ctrl_tol'],
                              coef_min=c['ctrl_coef_min'], coef_max=c['ctrl_coef_max'], device=device)
    step, best_val_loss, train_flops, train_time = 0, math.inf, 0.0, 0.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt.get('scaler') and scaler.is_enabled():
            scaler.load_state_dict(ckpt['scaler'])
        if ctrl is not None:
            ctrl.load_state_dict(ckpt['controller'])
        train_stream.load_state_dict(ckpt['data_state'])
        step, best_val_loss = ckpt['step'], ckpt['best_val_loss']
        train_flops, train_time = ckpt.get('train_flops', 0.0), ckpt.get('train_time', 0.0)
        set_rng_state(ckpt['rng'])
        say(f"resuming from {ckpt_path} at step {step}")
    last_ckpt_step = step if ckpt is not None else None
    ckpt = None  # free memory

    model = torch.compile(gpt) if use_compile else gpt
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device_type == 'cuda' else None)
    no_sync = model.no_sync if ddp else contextlib.nullcontext

    peak = peak_flops(device_type)
    L = c['n_layer']
    say(f"data {data_dir} ({meta.get('tokenizer', '?')} tokens, vocab {meta['vocab_size']} -> model {vocab}); "
        f"model {gpt.num_params() / 1e6:.2f}M non-embedding params, {'gated' if c['gated'] else 'dense'}, "
        f"{L} layers; device {device} x {world} ({'ddp ' + backend if ddp else 'single process'}), "
        f"{dtype}, compile {use_compile}")
    say(f"tokens per step {tokens_per_step:,} = {world} procs x {grad_accum} accum x {B} x {T}; "
        f"{c['max_iters']} steps; fwd FLOPs/token dense {fmt_flops(gpt.flops_per_token(0.0))}")

    os.makedirs(c['out_dir'], exist_ok=True)
    # A scratch run in a used out_dir keeps the earlier run's checkpoint and log until it writes
    # its own first checkpoint; only then are they moved to ckpt.prev.pt / log.prev.jsonl. A run
    # that fails before that leaves out_dir as it found it (its log lines are printed anyway).
    fresh = c['init_from'] == 'scratch' and not c['eval_only']
    pending = [] if fresh and master else None  # log records held back until the first checkpoint
    log_file = open(os.path.join(c['out_dir'], LOG_NAME), 'a') if master and not fresh else None

    def log(record):
        if pending is not None:
            pending.append(record)
        elif log_file is not None:
            log_file.write(json.dumps(record) + '\n')
            log_file.flush()

    log({'type': 'start', 'step': step, 'resumed': last_ckpt_step is not None, 'world_size': world,
         'grad_accum': grad_accum, 'tokens_per_step': tokens_per_step, 'device': str(device), 'dtype': dtype,
         # strict JSON has no Infinity: the unbounded controller limits are written as strings
         'config': {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in c.items()}})
    wandb = None
    if c['wandb_log'] and master:
        import wandb
        wandb.init(project=c['wandb_project'], name=c['wandb_run_name'], config=c)

    stats_dtype = torch.float32 if device_type == 'mps' else torch.float64

    @torch.no_grad()
    def evaluate():
        """Cross-entropy and per-layer gate statistics on the fixed validation sequences
        (sequence i goes to rank i % world_size), summed over ranks."""
        gpt.eval()
        n_seq = (len(val_tokens) - 1) // T
        mine = list(range(rank, n_seq, world))
        sums = torch.zeros(2 + 4 * L, dtype=stats_dtype, device=device)  # ce, tokens, g, g^2, zero, resid
        for i in range(0, len(mine), B):
            rows = mine[i:i + B]
            buf = np.stack([val_tokens[j * T:j * T + T + 1] for j in rows]).astype(np.int64)
            buf = torch.from_numpy(buf).to(device)
            x, y = buf[:, :-1], buf[:, 1:]
            with autocast:  # the uncompiled model: one eval pass needs no compilation
                _, loss, gates, resid = gpt(x, y, resid_norms=True)
            n = x.numel()
            sums[0] += loss.float() * n
            sums[1] += n
            if gates is not None:
                g = gates.float()
                sums[2:2 + L] += g.sum((1, 2))
                sums[2 + L:2 + 2 * L] += (g * g).sum((1, 2))
                sums[2 + 2 * L:2 + 3 * L] += (g.abs() < ZERO).sum((1, 2))
            else:
                sums[2:2 + 2 * L] += n
            sums[2 + 3 * L:] += resid.float() * n
        if ddp:
            torch.distributed.all_reduce(sums)
        gpt.train()
        s = (sums / sums[1]).tolist()
        mean, sq = s[2:2 + L], s[2 + L:2 + 2 * L]
        layers = {'gate_mean': mean, 'gate_var': [max(0.0, q - m * m) for m, q in zip(mean, sq)],
                  'gate_zero': s[2 + 2 * L:2 + 3 * L], 'resid_norm': s[2 + 3 * L:]}
        return s[0], sum(layers['gate_zero']) / L, layers

    def save(val_loss):
        nonlocal pending, log_file
        if not master:
            return
        if pending is not None:  # this run's first checkpoint: now the earlier run moves aside
            for name in (CKPT_NAME, LOG_NAME):
                path = os.path.join(c['out_dir'], name)
                if os.path.exists(path):
                    stem, ext = os.path.splitext(path)
                    os.replace(path, stem + '.prev' + ext)
                    print(f"note: {path} was from an earlier run; moved to {stem + '.prev' + ext} "
                          f"(use --init_from=resume to continue a run)")
            log_file = open(os.path.join(c['out_dir'], LOG_NAME), 'w')
            log_file.writelines(json.dumps(r) + '\n' for r in pending)
            pending = None
        save_atomic({
            'model': gpt.state_dict(), 'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict() if scaler.is_enabled() else None,
            'model_args': model_args, 'config': c, 'controller': ctrl.state_dict() if ctrl else None,
            'step': step, 'rng': rng_state(), 'data_state': train_stream.state_dict(), 'meta': meta,
            'best_val_loss': best_val_loss, 'val_loss': val_loss, 'train_flops': train_flops,
            'train_time': train_time,
        }, ckpt_path)

    def run_eval(force_save=False, may_save=True):
        nonlocal best_val_loss, last_ckpt_step
        t0 = time.time()
        val_loss, sparsity, layers = evaluate()
        fpt = gpt.flops_per_token(sparsity)
        improved = val_loss < best_val_loss
        best_val_loss = min(best_val_loss, val_loss)
        say(f"eval step {step} | val ce {val_loss:.4f} | sparsity {sparsity:.3f} | fwd FLOPs/token "
            f"{fmt_flops(fpt)} (dense {fmt_flops(gpt.flops_per_token(0.0))}) | train FLOPs {fmt_flops(train_flops)} "
            f"in {train_time:.0f}s | eval {time.time() - t0:.1f}s")
        say(layer_table(layers))
        record = {'type': 'eval', 'step': step, 'val_loss': val_loss, 'sparsity': sparsity,
                  'flops_per_token': fpt, 'train_flops': train_flops, 'train_time': train_time,
                  'tokens': step * tokens_per_step, **layers}
        log(record)
        if wandb:
            wandb.log({'val/loss': val_loss, 'val/sparsity': sparsity, 'val/flops_per_token': fpt,
                       'train_flops': train_flops}, step=step)
        if may_save and step > 0 and (improved or c['always_save_checkpoint'] or force_save):
            save(val_loss)
            last_ckpt_step = step
            say(f"saved {ckpt_path} (step {step})")

    if c['eval_only']:
        run_eval(may_save=False)
        return

    # SIGTERM/SIGINT (preemption, Ctrl-C): finish the current step, checkpoint, exit; a second one kills
    stop_signal = []

    def on_signal(signum, frame):
        if stop_signal:
            raise KeyboardInterrupt
        stop_signal.append(signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    end = c['stop_iter'] or c['max_iters']
    evaluated_at = step if last_ckpt_step is not None else None  # a resumed step was evaluated before saving
    stopping = False
    zero = torch.zeros((), device=device)
    while True:
        if (step % c['eval_interval'] == 0 or step >= end or stopping) and step != evaluated_at:
            run_eval(force_save=stopping)
            evaluated_at = step
        if step >= end or stopping:
            break

        lr = get_lr(step, c)
        for group in optimizer.param_groups:
            group['lr'] = lr
        t0 = time.time()
        acc = torch.zeros(4 + 3 * L, dtype=torch.float32, device=device)  # loss, ce, reg, stop, means, vars, zeros
        for micro in range(grad_accum):
            x, y = train_stream.next()
            if device_type == 'cuda':
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            else:
                x, y = x.to(device), y.to(device)
            # gradients are all-reduced only on the last micro-step
            with no_sync() if micro < grad_accum - 1 else contextlib.nullcontext():
                with autocast:
                    _, ce, gates = model(x, y)
                    reg = ctrl.loss(gates) if ctrl is not None else zero
                    loss = ce + reg
                if step + 1 == c['debug_nan_step']:
                    loss = loss * float('nan')
                scaler.scale(loss / grad_accum).backward()
            acc[0] += loss.detach().float()
            acc[1] += ce.detach().float()
            acc[2] += reg.detach().float()
            if gates is not None:
                means, variances = gate_moments(gates)
                acc[4:4 + L] += means
                acc[4 + L:4 + 2 * L] += variances
                acc[4 + 2 * L:] += (gates.detach().abs() < ZERO).float().mean((1, 2))
        acc /= grad_accum
        acc[3] = float(bool(stop_signal))
        if ddp:
            torch.distributed.all_reduce(acc)  # a sum (gloo has no AVG): every rank gets the same numbers
            acc /= world
        vals = acc.tolist()  # the one host sync per step
        loss_f, ce_f, reg_f = vals[:3]
        if not math.isfinite(loss_f):
            where = (f"the last good checkpoint {ckpt_path} (step {last_ckpt_step}) is kept"
                     if last_ckpt_step is not None else "no checkpoint had been written yet")
            raise StopTraining(f"non-finite loss at step {step + 1} (loss {loss_f}, ce {ce_f}, reg {reg_f}); "
                               f"training stopped without saving; {where}")
        if c['grad_clip'] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), c['grad_clip'])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sparsity = 0.0
        if ctrl is not None:
            ctrl.update(acc[4:4 + L], acc[4 + L:4 + 2 * L])  # same inputs on every rank -> same state
            sparsity = sum(vals[4 + 2 * L:]) / L
        fpt = gpt.flops_per_token(sparsity)
        train_flops += 3 * fpt * tokens_per_step
        dt = time.time() - t0
        train_time += dt
        step += 1
        stopping = vals[3] > 0

        if step % c['log_interval'] == 0 or step == end or step == 1 or stopping:
            tok_s = tokens_per_step / dt
            mfu = 3 * fpt * tok_s / (peak * world) if peak else None
            say(f"step {step} | loss {loss_f:.4f} | ce {ce_f:.4f} | reg {reg_f:+.2e} | lr {lr:.2e} | "
                f"sparsity {sparsity:.3f} | {dt * 1000:.1f} ms | {tok_s:,.0f} tok/s | "
                f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
            record = {'type': 'train', 'step': step, 'loss': loss_f, 'ce': ce_f, 'reg': reg_f, 'lr': lr,
                      'sparsity': sparsity, 'ms': dt * 1000, 'tok_s': tok_s, 'mfu': mfu, 'train_flops': train_flops}
            if ctrl is not None:
                record['mean_coefs'], record['var_coefs'] = ctrl.mean_coefs.tolist(), ctrl.var_coefs.tolist()
            log(record)
            if wandb:
                wandb.log({f'train/{k}': v for k, v in record.items() if isinstance(v, float)}, step=step)
        if stopping:
            say(f"stop signal received: checkpointing at step {step} and exiting")

    if c['debug_dump']:
        torch.save({'rank': rank, 'controller': ctrl.state_dict() if ctrl else None,
                    'data_state': train_stream.state_dict(),
                    'param_sum': sum(p.detach().double().sum().item() for p in gpt.parameters())},
                   os.path.join(c['out_dir'], f'debug_rank{rank}.pt'))
    if wandb:
        wandb.finish()
    if log_file:
        log_file.close()


def print_help():
    """The docstring and the settings block of this file, with their defaults and comments."""
    with open(os.path.abspath(__file__)) as f:
        src = f.read()
    start = src.index('# default settings')
    print(__doc__.strip() + '\n\nSettings (--key=value):\n' + src[start:src.index('# ----', start)].rstrip())


if __name__ == '__main__':
    if any(a in ('-h', '--help') for a in sys.argv[1:]):
        print_help()
        sys.exit(0)
    try:
        main(sys.argv[1:])
        code = 0
    except (ValueError, StopTraining) as e:  # ConfigError, prepare.DataError, GPTConfig checks
        print(f"error: {e}", file=sys.stderr)
        code = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # every rank gets here: errors are raised on all of them alike
    sys.exit(code)
