"""
Sample from a checkpoint written by train.py, or from one of the authors' released models, with
a KV cache and real layer skipping.

    python sample.py                                   # out/ckpt.pt, a newline as the prompt
    python sample.py --out_dir=out --start="ROMEO:" --num_samples=2 --max_new_tokens=300
    python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_k=50 --top_p=0.95
    python sample.py --show_skips                      # colour each token by the layers it ran
    python sample.py --init_from=tim-lawson/skip-middle-fineweb-gated-target-end-0.6 \
        --start="The meaning of life is" --show_skips   # a released model (see checkpoints.py)

It prints the samples, then tokens/s, the mean number of layers each new token ran, and the
estimated compute saved versus running every layer.
"""
import os
import sys
import time

import torch

from checkpoints import load_checkpoint, load_released
from configurator import check_out_dir, configure, device_and_dtype
from data import DataError, get_tokenizer, text_or_file

# settings
init_from = 'resume'     # 'resume': out_dir/ckpt.pt; or a released model: a Hugging Face hub
                         # id (tim-lawson/skip-middle-...) or a folder (see checkpoints.py)
out_dir = 'out'          # the folder holding ckpt.pt
start = '\n'             # the prompt, or FILE:path to read it from a file
num_samples = 1
max_new_tokens = 200
temperature = 0.8        # 0 is greedy
top_k = 0                # sample from the k most likely tokens only; 0 = from all
top_p = 1.0              # ... and from the fewest whose probabilities reach top_p; 1.0 = all
seed = 1337
device = 'auto'          # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'           # 'auto': bfloat16 on GPUs that have it (else float16), else float32
show_skips = False       # colour each new token by the number of layers it ran; skip histogram
plain = False            # True: model.py's plain definitions only: attention() itself, and a full
                         # forward pass per new token instead of the KV cache that skips
no_color = False         # with show_skips: tag tokens as [token|layers run] instead of colouring
# end of settings
configure(globals())
if num_samples < 1 or max_new_tokens < 1:
    sys.exit("error: --num_samples and --max_new_tokens must be at least 1")
if not 0 < top_p <= 1 or temperature < 0 or top_k < 0:
    sys.exit("error: --top_p must be in (0, 1], --temperature and --top_k must be >= 0")

# 256-colour ANSI codes for "ran this share of the layers", from few (blue) to nearly all (red)
PALETTE = [21, 27, 33, 39, 45, 50, 48, 82, 118, 154, 190, 226, 220, 214, 208]


def colour(n, n_layer):
    return PALETTE[round(n / n_layer * (len(PALETTE) - 1))]


def mark_skips(pieces, layers_run, n_layer, color):
    """The text with each token coloured (or, plain, tagged) by how many layers it ran."""
    if not color:
        return "".join(p if n == n_layer else f"[{p}|{n}]" for p, n in zip(pieces, layers_run))
    return "".join(p if n == n_layer else f"\033[38;5;{colour(n, n_layer)}m{p}\033[0m"
                   for p, n in zip(pieces, layers_run))


def legend(n_layer, color):
    if not color:
        return f"legend: [token|n] = the token ran n of {n_layer} layers; untagged tokens ran all"
    # skipped spans are symmetric, so a token runs an even number of layers
    keys = " ".join(f"\033[38;5;{colour(n, n_layer)}m{n}\033[0m" for n in range(0, n_layer, 2))
    return f"legend: layers run per token: {keys} {n_layer} (plain = all {n_layer})"


def histogram(gates, n_layer, width=40):
    """How often each layer was skipped (gate exactly 0) by the new tokens."""
    lines = ["per-layer skip rate of the new tokens:"]
    for layer in range(n_layer):
        rate = (gates[layer] == 0).float().mean().item()
        bar = '#' * round(rate * width)
        lines.append(f"  layer {layer:2d} |{bar:<{width}}| {100 * rate:5.1f}%")
    return "\n".join(lines)


device, dtype = device_and_dtype(device, dtype)
torch.manual_seed(seed)
if init_from == 'resume':
    check_out_dir(out_dir)
    model, ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), device)
    meta, source = ckpt['meta'], f"{out_dir}/ckpt.pt (step {ckpt['step']})"
else:  # the released models read GPT-2 tokens
    model = load_released(init_from).to(device)
    meta, source = {'tokenizer': 'gpt2', 'vocab_size': 50257}, init_from
model.use_plain(plain).eval()  # float32 weights; bf16/fp16 via autocast, as in training
autocast = torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != 'float32')
cfg = model.config
encode, decode = get_tokenizer(meta)
prompt = text_or_file(start, 'start')
ids = encode(prompt)
if not ids:
    raise DataError("--start is empty after tokenizing: give at least one character")
x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
color = sys.stdout.isatty() and not no_color
if hasattr(sys.stdout, 'reconfigure'):  # a console that cannot show a character shows '?'
    sys.stdout.reconfigure(errors='replace')
print(f"# {source}, {model.num_params() / 1e6:.2f}M non-embedding params, "
      f"{'gated' if cfg.gated else 'dense'} n_layer={cfg.n_layer}, {device} {dtype}",
      file=sys.stderr)

t0 = time.perf_counter()
with autocast:
    out, gates = model.generate(x, max_new_tokens, temperature, top_k or None, top_p,
                                generator=torch.Generator(device=device).manual_seed(seed),
                                return_gates=True)
if device.type == 'cuda':
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
T0 = out.size(1) - max_new_tokens  # the prompt's length after any cropping
new_gates = gates[:, :, T0:] if gates is not None else None
for b in range(num_samples):
    new = out[b, T0:].tolist()
    if show_skips and new_gates is not None:
        layers_run = (new_gates[:, b] > 0).sum(0).tolist()
        print(prompt + mark_skips([decode([t]) for t in new], layers_run, cfg.n_layer, color))
    else:
        print(prompt + decode(new))
    print('-' * 40)

n_new = num_samples * max_new_tokens
layers_run = cfg.n_layer if new_gates is None else (new_gates > 0).float().sum(0).mean().item()
sparsity = 0.0 if new_gates is None else (new_gates == 0).float().mean().item()
saved = 1 - model.flops_per_token(sparsity) / model.flops_per_token(0.0)
if show_skips and new_gates is not None:
    print(legend(cfg.n_layer, color))
    print(histogram(new_gates, cfg.n_layer))
print(f"{n_new} tokens in {seconds:.2f}s ({n_new / seconds:.1f} tokens/s incl. prefill); "
      f"{layers_run:.2f} of {cfg.n_layer} layers run per new token; "
      f"estimated compute saved vs running every layer: {100 * saved:.1f}%")
