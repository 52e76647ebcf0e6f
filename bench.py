"""
Benchmarks, printed as tables you can paste into the README (device and date included).

    python bench.py train    # a training step (forward, backward, AdamW): dense vs gated, same size
    python bench.py decode   # decoding tokens/s: KV cache or not, skipped layers computed or not
    python bench.py skip     # forward and forward + backward: every (token, layer) computed and
                             # masked, or only those not skipped (skip=True), at 0/25/50% skipped
    python bench.py run      # the default `python train.py` run itself: ms per step, gated with
                             # and without skipping vs its dense twin (--gated=false)

Settings are --key=value (below); e.g. the paper's size on a GPU:
    python bench.py train --n_layer=12 --n_embd=768 --n_head=12 --n_kv_head=12 --block_size=1024 \\
        --batch_size=16 --vocab_size=50304
"""
import functools
import math
import os
import platform
import statistics
import sys
import time

import torch

from configurator import configure, gate_controller, joined, model_config, settings_block
from model import GPT, GateController, GPTConfig, gate_moments, pooled_variance
from skipping import KVCache, cached_forward
from data import TokenStream, load_meta, shard_paths
from prepare import prepare
from system import device_and_dtype, peak_flops

MODES = ('train', 'decode', 'skip', 'run')
# settings
n_layer = 6
n_embd = 384
n_head = 6
n_kv_head = 6
vocab_size = 512
block_size = 256         # train, skip: tokens per sequence
batch_size = 8           # train, skip: sequences per step
steps = 5                # train, skip: steps per timed repeat
repeats = 5              # timed repeats; tables show the median
run_steps = 150          # run: steps of the default run to take; steps 50.. are timed
context = 512            # decode: prompt tokens before the timed ones
new_tokens = 32          # decode: tokens timed, one at a time
skip_fraction = 0.5      # decode: share of the tokens whose gates close the middle layers
device = 'auto'          # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'mps'
dtype = 'auto'           # train, skip: 'auto' = bfloat16 on GPUs that have it, else float32
compile = 'auto'         # train, skip: torch.compile, 'auto' = on for CUDA only, 'true', 'false'
hide_closed_keys = True  # decode: False computes skipped tokens' keys (the released models)
seed = 0
# end of settings
argv = joined(sys.argv[1:], globals())
_, given = configure(globals(), [a for a in argv if a not in MODES])
mode = next((a for a in argv if a in MODES), 'train')
MODEL = 'n_layer n_embd n_head n_kv_head vocab_size device seed '
USES = {'train': MODEL + 'block_size batch_size steps repeats dtype compile hide_closed_keys',
        'skip': MODEL + 'block_size batch_size steps repeats dtype compile',
        'decode': MODEL + 'repeats context new_tokens skip_fraction hide_closed_keys',
        'run': 'run_steps device'}  # run: the rest is train.py's defaults
for key in sorted(given - set(USES[mode].split())):
    sys.exit(f"error: bench.py {mode} does not use --{key}; it reads {USES[mode].strip()}")


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def stamp(device):
    """What ran the benchmark, and when, for the table's heading."""
    name = (torch.cuda.get_device_name(device) if device.type == 'cuda' else
            f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    return f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def make_model(model_args, gated, seq_len, device, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**model_args, block_size=seq_len, gated=gated)).to(device)


def skipping_model(model_args, seq_len, n_skip_ids, device, seed=0):
    """A gated model in which the tokens with ids below n_skip_ids skip layers 1 .. L-2:
    embedding feature 0 is +1 for them and -1 for the others, and gate head 1 reads it with
    weight 100, so their gate there is exactly 0 (all other gates are 1)."""
    model = make_model(model_args, True, seq_len, device, seed).eval()
    with torch.no_grad():
        for head in model.gate_heads:
            head.weight.zero_()
            head.bias.zero_()
        model.tok_emb.weight[:, 0] = -1.0
        model.tok_emb.weight[:n_skip_ids, 0] = 1.0
        model.gate_heads[1].weight[0, 0] = 100.0
    return model


def seconds(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def train_step(model, optimizer, ctrl, x, dtype):
    with torch.autocast(x.device.type, getattr(torch, dtype), dtype != 'float32'):
        _, loss, gates = model(x, x)
        if ctrl is not None:
            loss = loss + ctrl.loss(gates)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_train(model_args, B, T, steps, repeats, device, dtype, use_compile, seed=0):
    """Median ms per training step of a dense and a gated model of the same size."""
    x = torch.randint(0, model_args['vocab_size'], (B, T), device=device)
    runs = {}
    for name in ('dense', 'gated'):
        gated = name == 'gated'
        model = make_model(model_args, gated, T, device, seed)
        optimizer = model.configure_optimizer(1e-3, (0.8, 0.95), 0.0, device.type)
        ctrl = GateController('proportional', model_args['n_layer'], device=device)
        ctrl = ctrl if gated else None
        step_model = torch.compile(model) if use_compile else model
        step = functools.partial(train_step, step_model, optimizer, ctrl, x, dtype)
        for _ in range(3):  # warm up (and compile)
            step()
        runs[name] = (model, step, [])
    for _ in range(repeats):  # interleaved, so slow drifts of the machine hit both alike
        for model, step, times in runs.values():
            times.append(seconds(lambda: [step() for _ in range(steps)], device) / steps)
    print(f"# bench.py train on {stamp(device)}")
    print(f"# n_layer={model_args['n_layer']} n_embd={model_args['n_embd']} T={T} B={B} "
          f"vocab={model_args['vocab_size']} dtype={dtype} compile={use_compile}")
    print("| model | ms/step (median) | tokens/s | MFU |\n|---|---|---|---|")
    for name, (model, step, times) in runs.items():
        step_s = statistics.median(times)
        peak = peak_flops(device)
        mfu = 3 * model.flops_per_token(0.0, T) * B * T / step_s / peak if peak else None
        print(f"| {name} | {1e3 * step_s:.1f} | {B * T / step_s:,.0f} | "
              f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} |")
    ratio = statistics.median(g / d for g, d in zip(runs['gated'][2], runs['dense'][2]))
    print(f"gated/dense step-time ratio (median of the per-repeat ratios): {ratio:.3f}")


@torch.no_grad()
def decode_seconds(model, prompt, tokens, cache=True, skip=True):
    """Seconds to decode `tokens` (1, n) one at a time after `prompt` (1, T), teacher-forced so
    every variant does the same work; with a cache, the prompt's prefill is not timed."""
    n = tokens.size(1)
    if not cache:  # recompute the whole context for every new token
        contexts = [torch.cat([prompt, tokens[:, :t + 1]], dim=1) for t in range(n)]
        return seconds(lambda: [model(c) for c in contexts], prompt.device)
    kv = KVCache(model, 1, prompt.size(1) + n, prompt.device)
    cached_forward(model, prompt, kv, skip)
    return seconds(lambda: [cached_forward(model, tokens[:, t:t + 1], kv, skip) for t in range(n)],
                   prompt.device)


def bench_decode(model_args, context, new_tokens, skip_fraction, repeats, device, seed=0):
    """Decode tokens/s without a cache, with one, and with one and skipping; the variants take
    turns in every repeat, and speed-ups are medians of the per-repeat ratios."""
    L = model_args['n_layer']
    n_skip_ids = int(skip_fraction * model_args['vocab_size'])
    model = skipping_model(model_args, context + new_tokens, n_skip_ids, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    seq = torch.randint(0, model_args['vocab_size'], (1, context + new_tokens), device=device,
                        generator=gen)
    prompt, tokens = seq[:, :context], seq[:, context:]
    with torch.no_grad():
        decoded = model(seq)[2][:, 0, context:]  # the gates of the timed tokens
    layers_run = (decoded > 0).float().sum(0).mean().item()
    middle_zero = (decoded[1:L - 1] == 0).float().mean().item()
    variants = {'uncached': dict(cache=False), 'every_layer': dict(skip=False), 'skipping': dict()}
    times = {name: [] for name in variants}
    decode_seconds(model, prompt, tokens, skip=True)  # warm up
    for _ in range(repeats):
        for name, kw in variants.items():
            times[name].append(decode_seconds(model, prompt, tokens, **kw))
    rate = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))
    ideal, speedup = L / layers_run, ratio('every_layer', 'skipping')
    print(f"# bench.py decode on {stamp(device)}")
    print(f"# n_layer={L} n_embd={model_args['n_embd']} vocab={model_args['vocab_size']}, batch 1, "
          f"float32, {new_tokens} tokens decoded after a {context}-token prompt (prefill not "
          f"timed)")
    print(f"# {100 * middle_zero:.0f}% of (decoded token, middle layer) gates are 0: "
          f"{layers_run:.2f} of {L} layers run per token on average")
    print("| decoding | tokens/s |\n|---|---|")
    print(f"| full forward per token, no cache | {rate['uncached']:,.1f} |")
    print(f"| KV cache, every layer computed (skip=False) | {rate['every_layer']:,.1f} |")
    how = "not computed" if model.config.hide_closed_keys else "only their keys and values computed"
    print(f"| KV cache, skipped layers {how} (skip=True) | {rate['skipping']:,.1f} |")
    print(f"KV cache speed-up: {ratio('uncached', 'every_layer'):.1f}x")
    print(f"skipping speed-up: {speedup:.2f}x measured vs {ideal:.2f}x ideal from the layers "
          f"skipped = {100 * (speedup - 1) / (ideal - 1):.0f}% of the ideal saving")


def skip_batch(B, T, fraction, n_skip_ids, vocab_size, device, gen):
    """Token ids (B, T) in which exactly round(fraction * T) random positions of every row hold
    an id that skips the middle layers (below n_skip_ids), and the others an id that does not."""
    idx = torch.randint(n_skip_ids, vocab_size, (B, T), generator=gen)
    for row in idx:
        where = torch.randperm(T, generator=gen)[:round(fraction * T)]
        row[where] = torch.randint(0, n_skip_ids, (len(where),), generator=gen)
    return idx.to(device)


def forward(model, idx, skip, dtype):
    amp = torch.autocast(idx.device.type, getattr(torch, dtype), dtype != 'float32')
    with torch.no_grad(), amp:
        model(idx, skip=skip)


def forward_backward(model, idx, skip, dtype):
    with torch.autocast(idx.device.type, getattr(torch, dtype), dtype != 'float32'):
        _, loss, _ = model(idx, idx.roll(-1, 1), skip=skip)
    loss.backward()
    model.zero_grad(set_to_none=True)


def bench_skip(model_args, B, T, steps, repeats, device, dtype, use_compile, seed=0):
    """A forward pass (as in prefill and evaluation) and forward + backward (a training step
    without the optimizer), with every (token, layer) computed and masked (skip=False) or only
    the ones whose gate is above 0 (skip=True), at 0, 25 and 50% of the tokens skipping layers
    1 .. L-2. The ideal speed-up is all (token, layer) pairs over those that run."""
    n_skip_ids = model_args['vocab_size'] // 8
    model = skipping_model(model_args, T, n_skip_ids, device, seed)
    run_model = torch.compile(model) if use_compile else model
    gen = torch.Generator().manual_seed(seed)
    print(f"# bench.py skip on {stamp(device)}")
    print(f"# n_layer={model_args['n_layer']} n_embd={model_args['n_embd']} T={T} B={B} "
          f"vocab={model_args['vocab_size']} dtype={dtype} compile={use_compile}; medians of "
          f"{repeats} interleaved repeats of {steps} passes")
    print("| pass | tokens skipping layers 1..L-2 | masked ms | skip=True ms | speed-up | ideal | "
          "share of the ideal saving |\n|---|---|---|---|---|---|---|")
    for fraction in (0.0, 0.25, 0.5):
        idx = skip_batch(B, T, fraction, n_skip_ids, model_args['vocab_size'], device, gen)
        with torch.no_grad():
            gates = model(idx)[2]
        ideal = gates.numel() / (gates > 0).sum().item()
        for name, fn in (('forward', forward), ('forward + backward', forward_backward)):
            times = {False: [], True: []}
            for skip in (False, True, False, True):  # warm up (and compile)
                fn(run_model, idx, skip, dtype)
            for _ in range(repeats):
                for skip in (False, True):
                    passes = lambda: [fn(run_model, idx, skip, dtype) for _ in range(steps)]
                    times[skip].append(seconds(passes, device) / steps)
            speedup = statistics.median(a / b for a, b in zip(times[False], times[True]))
            share = (f"{100 * (speedup - 1) / (ideal - 1):.0f}%" if ideal > 1 else
                     f"n/a: skip=True costs {100 * (1 / speedup - 1):+.1f}%")
            masked, packed = (1e3 * statistics.median(times[k]) for k in (False, True))
            print(f"| {name} | {100 * fraction:.0f}% | {masked:.1f} | {packed:.1f} | "
                  f"{speedup:.2f}x | {ideal:.2f}x | {share} |")


def train_settings():
    """train.py's default settings (its settings block, run as Python)."""
    s = {}
    exec(settings_block(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')), s)
    return s


def default_lr(it, s, max_iters):
    """train.py's learning rate at step it of a max_iters-step run with settings s."""
    if not s['decay_lr']:
        return s['learning_rate']
    warmup = int(s['warmup_frac'] * max_iters)
    if it < warmup:
        return s['learning_rate'] * (s['warmup_start'] + (1 - s['warmup_start']) * it / warmup)
    progress = min(1.0, (it - warmup) / max(1, max_iters - warmup))
    low = s['learning_rate'] * s['min_lr_frac']
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (s['learning_rate'] - low)


def bench_run(max_iters, device):
    """The default `python train.py` run's training steps, cut to max_iters (as train.py
    --max_iters=max_iters would take them: same model, data, optimizer, schedule and gate
    controller, from train.py's settings), as the dense twin (--gated=false), gated on the
    masked path (--skip=false) and gated with skipping (the default), stepping in turns on the
    same batches so that the machine's drifts hit all three alike. Median ms per step from
    step 50 (the gates need some steps to close; from max_iters/2 in shorter runs), the median
    of the per-step ratios to dense, and each run's last loss (train.py's, to the last digit)."""
    s = train_settings()
    data_dir = s['data_dir'] or os.path.join('data', s['dataset'])
    if not os.path.isfile(os.path.join(data_dir, 'meta.json')):
        prepare(s['dataset'])
    meta = load_meta(data_dir)
    B, T, L = s['batch_size'], s['block_size'], s['n_layer']
    runs = {}
    for name, gated, skip in (('dense (--gated=false)', False, False),
                              ('gated, masked (--skip=false)', True, False),
                              ('gated, skipping (the default)', True, True)):
        torch.manual_seed(s['seed'])
        model = GPT(model_config(dict(s, gated=gated), meta['vocab_size'])).to(device)
        opt = model.configure_optimizer(s['learning_rate'], (s['beta1'], s['beta2']),
                                        s['weight_decay'], device.type, s['adam_eps'])
        ctrl = gate_controller(s, L, device) if gated else None
        stream = TokenStream(shard_paths(data_dir, 'train'), B, T, 0, 1, meta['vocab_size'])
        runs[name] = dict(model=model, opt=opt, ctrl=ctrl, stream=stream, skip=skip, ms=[],
                          zero=[], loss=None)
    for it in range(max_iters):
        for r in runs.values():
            t0 = time.perf_counter()
            x, y = (torch.from_numpy(a).to(device) for a in r['stream'].next())
            _, loss, gates = r['model'](x, y, skip=r['skip'])
            if r['ctrl'] is not None:
                loss = loss + r['ctrl'].loss(gates)
            loss.backward()
            if s['grad_clip'] > 0:
                torch.nn.utils.clip_grad_norm_(r['model'].parameters(), s['grad_clip'])
            for group in r['opt'].param_groups:
                group['lr'] = default_lr(it, s, max_iters)
            r['opt'].step()
            r['opt'].zero_grad(set_to_none=True)
            if r['ctrl'] is not None:
                means, squares = gate_moments(gates)
                r['ctrl'].update(means, pooled_variance(means, squares))
                r['zero'].append((gates == 0).float().mean().item())
            r['loss'] = loss.item()
            sync(device)
            r['ms'].append(1e3 * (time.perf_counter() - t0))
    first = min(50, max_iters // 2)
    dense = runs['dense (--gated=false)']['ms'][first:]
    print(f"# bench.py run on {stamp(device)}")
    print(f"# the default run's training steps (train.py's defaults, cut to {max_iters} steps), "
          f"the three variants in turns; medians over steps {first}..{max_iters}")
    print("| run | ms/step | sparsity | / dense (median of per-step ratios) | last loss |\n"
          "|---|---|---|---|---|")
    for name, r in runs.items():
        ms = r['ms'][first:]
        ratio = statistics.median(a / b for a, b in zip(ms, dense))
        zero = statistics.mean(r['zero'][first:]) if r['zero'] else 0.0
        print(f"| {name} | {statistics.median(ms):.1f} | {zero:.3f} | {ratio:.2f} | "
              f"{r['loss']!r} |")


if mode == 'run':  # with train.py's deterministic kernels, so that its losses are train.py's
    device, dtype = device_and_dtype(device, dtype,
                                     deterministic=train_settings()['deterministic'])
    bench_run(run_steps, device)
    sys.exit(0)
device, dtype = device_and_dtype(device, dtype)
model_args = dict(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                  n_embd=n_embd, hide_closed_keys=hide_closed_keys)
use_compile = compile == 'true' or (compile == 'auto' and device.type == 'cuda')
if mode == 'train':
    bench_train(model_args, batch_size, block_size, steps, repeats, device, dtype, use_compile,
                seed)
elif mode == 'skip':
    bench_skip(model_args, batch_size, block_size, steps, repeats, device, dtype, use_compile, seed)
else:
    bench_decode(model_args, context, new_tokens, skip_fraction, repeats, device, seed)
