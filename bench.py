"""
Benchmarks, printed as tables you can paste into the README.

  python bench.py train    # forward+backward+step tokens/s, dense vs gated at the same size
  python bench.py decode   # decode tokens/s: KV cache vs none, and skipping vs not skipping

Options are --key=value (see the defaults below); e.g. on a GPU:
  python bench.py train --n_layer=12 --n_embd=768 --n_head=12 --block_size=1024 --batch_size=16
"""

import platform
import statistics
import sys
import time

import torch

from model import GPT, GateController, GPTConfig, KVCache
from train import peak_flops  # the same peak table as train.py's MFU

# defaults: the CPU target of the issue (n_layer=6, n_embd=384, T=256)
settings = dict(n_layer=6, n_embd=384, n_head=6, n_kv_head=6, block_size=256, batch_size=8,
                vocab_size=512, steps=5, repeats=3, device="auto", compile="auto", dtype="auto",
                context=512, new_tokens=32, skip_fraction=0.5, seed=0)


def parse(argv):
    mode = argv[0] if argv and not argv[0].startswith("--") else "train"
    for arg in argv[1:] if argv and not argv[0].startswith("--") else argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key not in settings:
            sys.exit(f"error: unknown option --{key}; options: {', '.join(settings)}")
        settings[key] = type(settings[key])(value)
    if mode not in ("train", "decode"):
        sys.exit(f"error: unknown mode {mode!r}; use 'train' or 'decode'")
    s = settings
    if s["device"] == "auto":
        s["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if s["compile"] == "auto":
        s["compile"] = "true" if s["device"] == "cuda" else "false"
    if s["dtype"] == "auto":
        s["dtype"] = "bfloat16" if s["device"] == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return mode


def device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_model(gated, **overrides):
    s = settings
    cfg = GPTConfig(vocab_size=s["vocab_size"], block_size=max(s["block_size"], s["context"] + s["new_tokens"]),
                    n_layer=s["n_layer"], n_head=s["n_head"], n_kv_head=s["n_kv_head"], n_embd=s["n_embd"], gated=gated)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(s["seed"])
    return GPT(cfg).to(s["device"])


def bench_train():
    s, device = settings, settings["device"]
    dtype = getattr(torch, s["dtype"])
    B, T = s["batch_size"], s["block_size"]
    results = {}
    runs = {}
    for gated in (False, True):
        model = make_model(gated)
        opt = model.configure_optimizer(1e-3, (0.8, 0.95), 0.0, device)
        ctrl = GateController("proportional", s["n_layer"], device=device) if gated else None
        step_model = torch.compile(model) if s["compile"] == "true" else model
        x = torch.randint(0, s["vocab_size"], (B, T), device=device)

        def step():
            with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
                _, loss, gates = step_model(x, x)
                if gates is not None:
                    loss = loss + ctrl.loss(gates)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):  # warm up (and compile)
            step()
        runs[gated] = (step, model)
        results[gated] = []
    for _ in range(s["repeats"]):  # interleave dense and gated so drifts hit both alike
        for gated, (step, _) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(s["steps"]):
                step()
            sync(device)
            results[gated].append((time.perf_counter() - t0) / s["steps"])
    print(f"# bench.py train on {device_name(device)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"# n_layer={s['n_layer']} n_embd={s['n_embd']} T={T} B={B} vocab={s['vocab_size']} "
          f"dtype={s['dtype']} compile={s['compile']} attention: {runs[True][1].attn_backend(torch.device(device))} (gated)")
    print("| model | ms/step (median) | tokens/s |" + (" MFU |" if device == "cuda" else ""))
    print("|---|---|---|" + ("---|" if device == "cuda" else ""))
    for gated in (False, True):
        t = statistics.median(results[gated])
        line = f"| {'gated' if gated else 'dense'} | {1e3 * t:.1f} | {B * T / t:,.0f} |"
        if device == "cuda":
            flops = 3 * runs[gated][1].flops_per_token(0.0, T) * B * T / t
            peak = peak_flops("cuda")
            line += f" {100 * flops / peak:.1f}% |" if peak else " n/a |"
        print(line)
    print(f"gated/dense step-time ratio: {statistics.median(results[True]) / statistics.median(results[False]):.3f}")


def half_skipping_model():
    """A gated model in which about `skip_fraction` of tokens skip every middle layer: the
    gate head of layer 1 reads one embedding feature that is large for those tokens."""
    s = settings
    model = make_model(True).eval()
    n_skip = int(s["skip_fraction"] * s["vocab_size"])
    with torch.no_grad():
        for head in model.gate_heads:
            head.weight.zero_()
            head.bias.zero_()
        model.tok_emb.weight[:, 0] = -1.0
        model.tok_emb.weight[:n_skip, 0] = 1.0
        model.gate_heads[1].weight[0, 0] = 100.0  # g = 0 on layers 1 .. L-2 for those tokens
    return model


def median_time(fn, device):
    times = []
    for _ in range(settings["repeats"]):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def decode_rate(model, prompt, tokens, cache=True, skip=True):
    """Tokens/s of decoding `tokens` (B=1, teacher-forced so every variant does the same
    work) after `prompt`; the prompt's prefill is not timed."""
    device = settings["device"]

    def run():
        if not cache:
            for t in range(tokens.size(1)):
                model(torch.cat([prompt, tokens[:, :t + 1]], dim=1))
            return
        for t in range(tokens.size(1)):
            model.decode_one(tokens[:, t:t + 1], kv, skip)

    if cache:
        kv = None

        def fresh_then_run():
            nonlocal kv
            kv = KVCache(model, 1, prompt.size(1) + tokens.size(1), prompt.device)
            model.prefill(prompt, kv)
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            return time.perf_counter() - t0

        return tokens.size(1) / statistics.median(fresh_then_run() for _ in range(settings["repeats"]))
    return tokens.size(1) / median_time(run, device)


def bench_decode():
    s, device = settings, settings["device"]
    n, ctx, L = s["new_tokens"], s["context"], s["n_layer"]
    print(f"# bench.py decode on {device_name(device)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"# n_layer={L} n_embd={s['n_embd']} vocab={s['vocab_size']} batch 1, fp32, "
          f"{n} tokens decoded after a {ctx}-token prompt (prefill not timed)")
    model = half_skipping_model()
    gen = torch.Generator(device=device).manual_seed(s["seed"])
    seq = torch.randint(0, s["vocab_size"], (1, ctx + n), device=device, generator=gen)
    prompt, tokens = seq[:, :ctx], seq[:, ctx:]
    _, _, gates = model(seq)
    decoded = gates[:, 0, ctx:]
    layers_run = (decoded > 0).float().sum(0).mean().item()
    middle_zero = (decoded[1:L - 1] == 0).float().mean().item()

    uncached = decode_rate(model, prompt, tokens, cache=False, skip=False)
    no_skip = decode_rate(model, prompt, tokens, cache=True, skip=False)
    with_skip = decode_rate(model, prompt, tokens, cache=True, skip=True)
    ideal = L / layers_run
    print(f"# gated model with {100 * middle_zero:.0f}% of (decoded token, middle layer) gates at 0: "
          f"{layers_run:.2f} of {L} layers run per token on average")
    print("| decoding | tokens/s |")
    print("|---|---|")
    print(f"| full forward per token, no cache | {uncached:,.1f} |")
    print(f"| KV cache, every layer computed (skip=False) | {no_skip:,.1f} |")
    print(f"| KV cache, skipped layers not computed (skip=True) | {with_skip:,.1f} |")
    print(f"KV cache speed-up: {no_skip / uncached:.1f}x")
    print(f"skipping speed-up: {with_skip / no_skip:.2f}x measured vs {ideal:.2f}x ideal from the layers "
          f"skipped = {100 * with_skip / no_skip / ideal:.0f}% of the ideal")


if __name__ == "__main__":
    mode = parse(sys.argv[1:])
    torch.manual_seed(settings["seed"])
    bench_train() if mode == "train" else bench_decode()
