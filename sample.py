"""
Sample from a checkpoint written by train.py, with a KV cache and real layer skipping.

    python sample.py                                   # out/ckpt.pt, a newline as the prompt
    python sample.py --out_dir=out --start="ROMEO:" --num_samples=2 --max_new_tokens=300
    python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_k=50 --top_p=0.95
    python sample.py --show_skips                      # colour each token by the layers it ran

It prints the samples, then tokens/s, the mean number of layers each new token ran, and the
compute saved versus running every layer (SPEC section 6).
"""

import argparse
import os
import sys
import time

import torch

from model import GPT, GPTConfig
from prepare import DataError, get_tokenizer

# 256-colour ANSI codes for "ran this share of the layers", few layers (blue) to all (plain)
PALETTE = [21, 27, 33, 39, 45, 50, 48, 82, 118, 154, 190, 226, 220, 214, 208]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample from a train.py checkpoint.")
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt (default: out)")
    p.add_argument("--init_from", default="resume", choices=["resume"], help="only 'resume': load out_dir/ckpt.pt")
    p.add_argument("--start", default="\n", help='prompt text, or FILE:path to read it from a file')
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--show_skips", action="store_true", help="colour tokens by layers run; per-layer skip histogram")
    p.add_argument("--no_color", action="store_true", help="plain text even on a terminal")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1:
        p.error("--num_samples and --max_new_tokens must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top_p must be in (0, 1]")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    return args


def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_checkpoint(out_dir, device):
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise DataError(f"no checkpoint at {path}: train one with `python train.py --out_dir={out_dir}`")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)  # no code runs from the file
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        meta = ckpt["meta"]
    except Exception as e:  # truncated file, unpickling error, missing keys, wrong shapes
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path} is not a usable train.py checkpoint ({first_line}); train again or pick another --out_dir")
    return model, meta, ckpt.get("step")


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise DataError(f"--start=FILE:{path}: cannot read it ({e.strerror})")
    return start


def show_skips(pieces, layers_run, n_layer, color):
    """The text with each token coloured (or, plain, tagged) by how many layers it ran."""
    if not color:
        return "".join(p if n == n_layer else f"[{p}|{n}]" for p, n in zip(pieces, layers_run))
    out = []
    for piece, n in zip(pieces, layers_run):
        if n == n_layer:
            out.append(piece)
        else:
            code = PALETTE[round(n / n_layer * (len(PALETTE) - 1))]
            out.append(f"\033[38;5;{code}m{piece}\033[0m")
    return "".join(out)


def legend(n_layer, color):
    counts = range(0, n_layer + 1, 2)  # skipped spans are symmetric, so a token runs an even number
    if not color:
        return "legend: [token|n] = the token ran n of %d layers; untagged tokens ran all" % n_layer
    keys = " ".join(f"\033[38;5;{PALETTE[round(n / n_layer * (len(PALETTE) - 1))]}m{n}\033[0m"
                    if n < n_layer else f"{n}" for n in counts)
    return f"legend: layers run per token: {keys} (plain = all {n_layer})"


def histogram(gates, n_layer, width=40):
    """How often each layer was skipped (gate exactly 0) by the new tokens."""
    lines = ["per-layer skip rate of the new tokens:"]
    for layer in range(n_layer):
        rate = (gates[layer] == 0).float().mean().item()
        lines.append(f"  layer {layer:2d} |{'#' * round(rate * width):<{width}}| {100 * rate:5.1f}%")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    torch.manual_seed(args.seed)
    model, meta, step = load_checkpoint(args.out_dir, device)
    model.to(device=device, dtype=getattr(torch, dtype)).eval()
    encode, decode = get_tokenizer(meta)
    prompt = read_prompt(args.start)
    ids = encode(prompt)
    if not ids:
        raise DataError("--start is empty after tokenizing: give at least one character")
    cfg = model.config
    x = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    color = sys.stdout.isatty() and not args.no_color
    print(f"# {args.out_dir}/ckpt.pt (step {step}), {model.num_params() / 1e6:.2f}M non-embedding params, "
          f"{'gated' if cfg.gated else 'dense'} n_layer={cfg.n_layer}, {device} {dtype}", file=sys.stderr)

    t0 = time.perf_counter()
    out, gates = model.generate(x, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                generator=gen, return_gates=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    T0 = out.size(1) - args.max_new_tokens  # prompt length after any cropping
    new_gates = gates[:, :, T0:] if gates is not None else None

    for b in range(args.num_samples):
        new = out[b, T0:].tolist()
        if args.show_skips and new_gates is not None:
            run = (new_gates[:, b] > 0).sum(0).tolist()
            print(prompt + show_skips([decode([t]) for t in new], run, cfg.n_layer, color))
        else:
            print(prompt + decode(new))
        print("-" * 40)

    n_new = args.num_samples * args.max_new_tokens
    if new_gates is None:
        layers, sparsity = float(cfg.n_layer), 0.0
    else:
        layers = (new_gates > 0).float().sum(0).mean().item()
        sparsity = (new_gates == 0).float().mean().item()
    saved = 1 - model.flops_per_token(sparsity) / model.flops_per_token(0.0)
    if args.show_skips and new_gates is not None:
        print(legend(cfg.n_layer, color))
        print(histogram(new_gates, cfg.n_layer))
    print(f"{n_new} tokens in {seconds:.2f}s ({n_new / seconds:.1f} tokens/s incl. prefill); "
          f"{layers:.2f} of {cfg.n_layer} layers run per new token; "
          f"estimated compute saved vs running every layer: {100 * saved:.1f}%")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
