"""Small models with gates set by hand, for the tests of skipping.py and the scripts (those of
test_model.py, the model's tests, come from there)."""

import torch

from model import GPT, GPTConfig, RMSNorm
from test_model import V, skip_tokens_model, tiny  # noqa: F401 (for the other tests)


def random_gates_model(**kw):
    """Gates spread over [0, 1], some exactly 0."""
    m = tiny(**kw)
    with torch.no_grad():
        for head in m.gate_heads:
            head.weight.normal_(0, 0.3)
    return m


def mixed_gates_model(**kw):
    """Six layers. Ids 0 mod 4 skip every layer, 1 mod 4 layers 1-4, 2 mod 4 layers 2-3, and
    3 mod 4 none; every gate that is not 0 lies strictly between 0 and 1 (gate head biases)."""
    m = tiny(n_layer=6, **kw)
    ids = torch.arange(V)
    with torch.no_grad():
        for i, head in enumerate(m.gate_heads):
            m.tok_emb.weight[:, i] = torch.where(ids % 4 == i, 1.0, -1.0)
            head.weight.normal_(0, 0.05)
            head.weight[0, i] = 0.2
            head.bias.fill_(0.8)
    return m


def mixed_batches():
    """A random batch whose last row skips every layer, and a batch that runs the outer layers
    with every token and in which every token skips the middle two."""
    torch.manual_seed(3)
    mixed = torch.randint(0, V, (4, 32))
    mixed[3] = mixed[3] // 4 * 4
    return {"mixed": mixed, "middle skipped": torch.randint(0, V // 4, (3, 32)) * 4 + 2}


def peaked_model(n_layer, block_size=64):
    """A gated model with sharp attention, as trained models have: linear weights of std
    1/sqrt(fan_in), wq and wk doubled, norm weights 1 +- 0.3, and gate heads (weight std 0.08,
    bias 0.15) that close about 40% of the (token, layer) pairs. Its score gaps exceed 14, so
    a closed key biased by log(1e-6) alone would still be seen."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, block_size=block_size, n_layer=n_layer, n_head=4,
                      n_kv_head=2, n_embd=128)).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, mod.in_features ** -0.5)
            if isinstance(mod, RMSNorm):
                mod.weight.uniform_(0.7, 1.3)
        for block in m.blocks:
            block.attn.wq.weight.mul_(2)
            block.attn.wk.weight.mul_(2)
        for head in m.gate_heads:
            head.weight.normal_(0, 0.08)
            head.bias.fill_(0.15)
    return m


def decode_without_cache(m, idx, n, temperature, generator):
    """n tokens sampled one full forward pass at a time, as generate() samples them."""
    from skipping import sample_next
    for _ in range(n):
        logits, _, _ = m(idx[:, -m.config.block_size:])
        idx = torch.cat([idx, sample_next(logits[:, -1], temperature, generator=generator)], dim=1)
    return idx
