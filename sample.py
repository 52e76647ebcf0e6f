"""
Sample from a checkpoint of train.py, or an authors' released model, with a KV cache in which
each new token runs only the layers its gates leave open.

    python sample.py --out_dir=out --start="ROMEO:" --num_samples=2 --max_new_tokens=300
    python sample.py --start=FILE:prompt.txt --show_skips   # colour tokens by the layers they ran
"""
import os
import sys
import time

import torch

from checkpoints import check_out_dir, load_checkpoint, load_released
from configurator import configure
from data import DataError, get_tokenizer, text_or_file
from skipping import generate, use_plain
from system import device_and_dtype

# settings
init_from = 'resume'     # 'resume': out_dir/ckpt.pt; or a released model's hub id or folder
out_dir = 'out'          # the folder holding ckpt.pt
start = '\n'             # the prompt, or FILE:path to read it from a file
num_samples = 1
max_new_tokens = 200
temperature = 0.8        # 0 is greedy
top_k = 0                # sample from the k most likely tokens only; 0 = from all
top_p = 1.0              # ... and from the fewest whose probabilities reach top_p; 1.0 = all
seed = 1337
device = 'auto'          # 'auto': cuda, then mps, then cpu; or 'cpu', 'cuda:1', ...
dtype = 'auto'           # 'auto': bfloat16 on GPUs that have it (else float16), else float32
show_skips = False       # colour each new token by the number of layers it ran; skip histogram
plain = False            # True: model.py's plain definitions only, a full pass per new token
no_color = False         # with show_skips: tag tokens as [token|layers run] instead of colouring
# end of settings
configure(globals())
if num_samples < 1 or max_new_tokens < 1:
    sys.exit("error: --num_samples and --max_new_tokens must be at least 1")
if not 0 < top_p <= 1 or temperature < 0 or top_k < 0:
    sys.exit("error: --top_p must be in (0, 1], --temperature and --top_k must be >= 0")

# 256-colour codes for "ran this share of the layers", from few (blue) to nearly all (red)
PALETTE = [21, 27, 33, 39, 45, 50, 48, 82, 118, 154, 190, 226, 220, 214, 208]


def mark(piece, n, n_layer, color):
    """A token's text coloured (or tagged [text|n]) by the n layers it ran, if it skipped some."""
    if n == n_layer:
        return piece
    return f"\033[38;5;{PALETTE[round(n / n_layer * (len(PALETTE) - 1))]}m{piece}\033[0m" \
        if color else f"[{piece}|{n}]"


def histogram(gates, n_layer, width=40):
    """How often the new tokens skipped each layer (gate exactly 0)."""
    rates = [(gates[layer] == 0).float().mean().item() for layer in range(n_layer)]
    return "\n".join(["per-layer skip rate of the new tokens:"] + [
        f"  layer {i:2d} |{'#' * round(r * width):<{width}}| {100 * r:5.1f}%"
        for i, r in enumerate(rates)])


device, dtype = device_and_dtype(device, dtype)
torch.manual_seed(seed)
if init_from == 'resume':
    check_out_dir(out_dir)
    model, ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), device)
    meta, source = ckpt['meta'], f"{out_dir}/ckpt.pt (step {ckpt['step']})"
else:  # the released models read GPT-2 tokens
    model = load_released(init_from).to(device)
    meta, source = {'tokenizer': 'gpt2', 'vocab_size': 50257}, init_from
use_plain(model, plain).eval()  # float32 weights; bf16/fp16 via autocast, as in training
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
    out, gates = generate(model, x, max_new_tokens, temperature, top_k or None, top_p,
                          generator=torch.Generator(device=device).manual_seed(seed),
                          return_gates=True, cached=not plain, vocab_size=meta['vocab_size'])
if device.type == 'cuda':
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
T0 = out.size(1) - max_new_tokens  # the prompt's length after any cropping
new_gates = gates[:, :, T0:] if gates is not None else None
for b in range(num_samples):
    new = out[b, T0:].tolist()
    if show_skips and new_gates is not None:
        layers_run = (new_gates[:, b] > 0).sum(0).tolist()
        print(prompt + ''.join(mark(decode([t]), n, cfg.n_layer, color)
                               for t, n in zip(new, layers_run)))
    else:
        print(prompt + decode(new))
    print('-' * 40)

n_new = num_samples * max_new_tokens
layers_run = cfg.n_layer if new_gates is None else (new_gates > 0).float().sum(0).mean().item()
sparsity = 0.0 if new_gates is None else (new_gates == 0).float().mean().item()
saved = 1 - model.flops_per_token(sparsity) / model.flops_per_token(0.0)
if show_skips and new_gates is not None:  # skipped spans are symmetric: even numbers of layers
    keys = ' '.join(mark(str(n), n, cfg.n_layer, True) for n in range(0, cfg.n_layer, 2))
    print(f"legend: layers run per token: {keys} (uncoloured: all {cfg.n_layer})" if color else
          f"legend: [token|n] = the token ran n of {cfg.n_layer} layers; untagged ones ran all")
    print(histogram(new_gates, cfg.n_layer))
print(f"{n_new} tokens in {seconds:.2f}s ({n_new / seconds:.1f} tokens/s incl. prefill); "
      f"{layers_run:.2f} of {cfg.n_layer} layers run per new token; "
      f"estimated compute saved vs running every layer: {100 * saved:.1f}%")
