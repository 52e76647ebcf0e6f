"""Tests of model.py: the gated middle-skip transformer, its controllers and generation (CPU)."""

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import GPT, GateController, GPTConfig, gate_moments, sample_next

V = 64


def tiny(gated=True, **kw):
    args = dict(vocab_size=V, block_size=32, n_layer=4, n_head=4, n_kv_head=2, n_embd=32, gated=gated)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args)).eval()


def skip_tokens_model(skip_ids, n_layer=4):
    """A gated model whose tokens in skip_ids have gate 0 in every layer and all other tokens
    gate 1: embedding feature 0 is +1 for skip tokens, -1 otherwise; gate head 0 reads it."""
    m = tiny(n_layer=n_layer)
    with torch.no_grad():
        m.tok_emb.weight[:, 0] = -1.0
        m.tok_emb.weight[skip_ids, 0] = 1.0
        for head in m.gate_heads:
            head.weight.zero_()
            head.bias.zero_()
        m.gate_heads[0].weight[0, 0] = 100.0
    return m


# ------------------------------------------------------------------ 1. basics

def test_shapes_and_initial_loss():
    m = tiny()
    idx = torch.randint(0, V, (3, 16))
    logits, loss, gates = m(idx, idx)
    assert logits.shape == (3, 16, V) and gates.shape == (4, 3, 16)
    assert abs(loss.item() - math.log(V)) < 0.1
    logits, loss, gates = tiny(gated=False)(idx)
    assert logits.shape == (3, 16, V) and loss is None and gates is None


def test_ignore_index_in_loss():
    m = tiny()
    idx = torch.randint(0, V, (2, 8))
    targets = idx.clone()
    targets[:, 4:] = -1
    logits, loss, _ = m(idx, targets)
    expected = F.cross_entropy(logits[:, :4].reshape(-1, V), idx[:, :4].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("gated", [True, False])
def test_causality(gated):
    m = tiny(gated)
    idx = torch.randint(0, V, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        a, _, _ = m(idx)
        b, _, _ = m(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("field,kw", [
    ("n_layer", dict(n_layer=3)),
    ("n_embd", dict(n_embd=30)),
    ("n_kv_head", dict(n_kv_head=3)),
    ("n_head", dict(n_embd=24, n_head=8)),  # head dim 3 is odd
    ("gate_init", dict(gate_init="ones")),
    ("attn_backend", dict(attn_backend="magic")),
])
def test_invalid_config_names_the_field(field, kw):
    args = dict(vocab_size=V, block_size=32, n_layer=4, n_head=4, n_kv_head=2, n_embd=32)
    args.update(kw)
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        GPTConfig(**args)
    if field == "n_layer":
        GPTConfig(**dict(args, gated=False))  # an odd dense model is fine


# ------------------------------------------------------------------ 2. gates

def test_gate_shape_properties():
    m = tiny(n_layer=8)
    with torch.no_grad():
        for head in m.gate_heads:
            head.weight.normal_(0, 0.3)  # large enough that many gates reach 0
        _, _, g = m(torch.randint(0, V, (4, 32)))
    assert g.min() >= 0 and g.max() <= 1
    assert torch.equal(g, g.flip(0)), "gates must mirror across layers"
    half = g[:4]
    assert (half[1:] <= half[:-1]).all(), "gates must not increase toward the middle"
    assert (g == 0).any() and (g == 1).any()


def test_zero_init_gives_dense_start():
    m = tiny(gate_init="zero")
    _, _, g = m(torch.randint(0, V, (2, 8)))
    assert torch.equal(g, torch.ones_like(g))


# ------------------------------------------------------------------ 3. gates of 1 == dense

def test_gates_all_one_equal_dense():
    dense, gated = tiny(gated=False), tiny(gated=True)
    missing = gated.load_state_dict(dense.state_dict(), strict=False)
    assert all(k.startswith("gate_heads") for k in missing.missing_keys)
    with torch.no_grad():
        for head in gated.gate_heads:
            head.weight.zero_()
            head.bias.fill_(-1.0)  # relu(-1) = 0, so m = 0 and g = 1
    idx = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        a, _, _ = dense(idx)
        b, _, g = gated(idx)
    assert torch.equal(g, torch.ones_like(g))
    assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------ 4. key-indexed bias

def query_indexed_attention(self, x, cos, sin, key_bias=None, backend="sdpa"):
    """The reference release's defect: the gate bias indexed by the QUERY position."""
    q, k, v = self.qkv(x, cos, sin)
    T = x.size(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = key_bias[:, None, :, None].expand(-1, 1, T, T).masked_fill(~causal, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), k, v


def later_logits_change(m, p=5):
    """Largest change of the logits after position p when the token at p (whose gate is 0
    everywhere) is swapped for another skip token."""
    torch.manual_seed(1)
    idx = torch.randint(10, V, (2, 16))
    a_idx, b_idx = idx.clone(), idx.clone()
    a_idx[:, p], b_idx[:, p] = 3, 7
    with torch.no_grad():
        a, _, ga = m(a_idx)
        b, _, gb = m(b_idx)
    assert (ga[:, :, p] == 0).all() and (gb[:, :, p] == 0).all()
    assert (ga[:, :, p + 1:] == 1).all()
    return (a[:, p + 1:] - b[:, p + 1:]).abs().max().item()


def test_gate_zero_hides_key_from_later_positions(monkeypatch):
    m = skip_tokens_model(skip_ids=list(range(10)))
    assert later_logits_change(m) < 1e-4
    # the same check catches the reference's query-indexed bias
    monkeypatch.setattr(M.Attention, "forward", query_indexed_attention)
    assert later_logits_change(m) > 1e-3


# ------------------------------------------------------------------ 5. skipped keys, gradients

def test_skipped_keys_are_invisible_to_a_real_attention():
    """Tokens 0-9 skip every layer. Swapping every skipped token for another skipped one
    leaves all other positions' logits unchanged, while swapping one ordinary token does
    change the later logits (so attention really mixes positions here)."""
    m = skip_tokens_model(skip_ids=list(range(10)))
    torch.manual_seed(2)
    idx = torch.randint(10, V, (2, 24))
    skipped = torch.rand(2, 24) < 0.4
    skipped[:, 0] = False
    a_idx = torch.where(skipped, torch.randint(0, 10, (2, 24)), idx)
    b_idx = torch.where(skipped, torch.randint(0, 10, (2, 24)), idx)
    c_idx = a_idx.clone()
    c_idx[:, 0] = 10 + (a_idx[:, 0] - 10 + 1) % (V - 10)  # another ordinary token
    assert (a_idx != b_idx).any()
    with torch.no_grad():
        a, _, g = m(a_idx)
        b, _, _ = m(b_idx)
        c, _, _ = m(c_idx)
    assert torch.equal(g == 0, skipped[None].expand_as(g))
    kept = ~skipped
    assert torch.allclose(a[kept], b[kept], atol=1e-5)
    later = kept.clone()
    later[:, 0] = False
    assert (a[later] - c[later]).abs().max() > 1e-3


def test_gate_heads_learn_through_the_key_bias():
    """The gradient reaching the gate heads equals a finite-difference derivative of the loss.
    Most of it flows through the attention key bias log(g): with that bias detached from the
    graph, the heads would see only what g * update contributes, and this check fails."""
    torch.manual_seed(0)
    m = tiny()
    with torch.no_grad():
        for head in m.gate_heads:
            head.weight.normal_(0, 0.5)
            head.bias.fill_(0.1)
    idx = torch.randint(0, V, (4, 32))
    loss_of = lambda: m(idx, idx.roll(-1, 1))[1]
    params = [p for head in m.gate_heads for p in head.parameters()]
    direction = [torch.randn_like(p) for p in params]
    loss_of().backward()
    autograd = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    h, losses = 1e-3, []
    with torch.no_grad():
        _, _, g = m(idx)
        assert ((g > 0) & (g < 1)).float().mean() > 0.2  # many gates strictly between 0 and 1
        for sign in (1, -2, 1):  # +h, then -h, then back
            for p, d in zip(params, direction):
                p.add_(sign * h * d)
            losses.append(loss_of().item())
    finite_difference = (losses[0] - losses[1]) / (2 * h)
    assert autograd == pytest.approx(finite_difference, rel=0.05)


def test_zero_init_gate_heads_get_exactly_zero_gradient():
    """gate_init='zero': m = relu(0) = 0, and relu's gradient at exactly 0 is 0, so the heads
    get no gradient at all -- from the loss or the regularizer -- and stay dense."""
    m = tiny(gate_init="zero")
    idx = torch.randint(0, V, (2, 16))
    _, loss, gates = m(idx, idx)
    (loss + GateController("sparsity", 4, coef=1.0).loss(gates)).backward()
    for head in m.gate_heads:
        assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))
        assert torch.equal(head.bias.grad, torch.zeros_like(head.bias))
    assert m.blocks[0].attn.wq.weight.grad.abs().sum() > 0  # the rest of the model does learn


# ------------------------------------------------------------------ 6. controllers

def test_target_controllers_move_coefficients_the_right_way():
    for kind in ("proportional", "adaptive"):
        c = GateController(kind, 6, target_start=1.0, target_end=0.5)
        assert torch.allclose(c.mean_targets, torch.tensor([1.0, 0.75, 0.5, 0.5, 0.75, 1.0]))
        means = c.mean_targets.clone()
        means[2] = means[3] = 0.9  # middle layers too open: push them shut
        means[0] = means[5] = 0.5  # outer layers too shut: let them open
        means[1] += 0.005  # an error within tol must not move the coefficient
        c.update(means, c.var_targets.clone())
        assert c.mean_coefs[2] > 0 and c.mean_coefs[0] < 0 and c.mean_coefs[1] == 0, kind
        assert torch.equal(c.var_coefs, torch.zeros(6))
    p = GateController("proportional", 6)
    p.update(torch.tensor([1.0, 0.75, 0.9, 0.9, 0.75, 1.0]), p.var_targets)
    assert torch.allclose(p.mean_coefs[2], torch.tensor(1e-3 * 0.4))
    a = GateController("adaptive", 6)
    a.update(torch.tensor([1.0, 0.75, 0.9, 0.9, 0.75, 1.0]), a.var_targets)
    assert torch.allclose(a.mean_coefs[2], torch.tensor(1e-3))


def test_proportional_derivative_follows_the_reference_rule():
    """Four updates worked out by hand: d = mean - target; ema = d on the first update, then
    0.9 ema + 0.1 d; c += 0.01 d only where |d| > 0.01 and d * (d - ema) > 0."""
    c = GateController("proportional_derivative", 4)  # targets 1, 0.5, 0.5, 1; lr 1e-2
    assert c.lr == 1e-2 and GateController("proportional", 4).lr == 1e-3
    means = [[0.90, 0.70, 0.505, 1.0],    # d = -.10 .20 .005 0: seeds the EMA, trend 0, no move
             [0.85, 0.75, 0.60, 0.995],   # d = -.15 .25 .10 -.005: errors grow; layer 3 under tol
             [0.95, 0.65, 0.58, 1.0],     # d = -.05 .15 .08 0: layers 0, 1 shrink, layer 2 grows
             [0.70, 0.75, 0.40, 0.98]]    # d = -.30 .25 -.10 -.02: all four grow away
    var_errors = [[0.05, -0.05, 0, 0], [0.10, -0.02, 0, 0], [0.10, -0.02, 0, 0], [0.0, -0.02, 0, 0]]
    expected_mean = [[0, 0, 0, 0], [-0.0015, 0.0025, 0.001, 0], [-0.0015, 0.0025, 0.0018, 0],
                     [-0.0045, 0.005, 0.0008, -0.0002]]
    expected_var = [[0, 0, 0, 0], [0.001, 0, 0, 0], [0.002, 0, 0, 0], [0.002, 0, 0, 0]]
    for m, e, want_mean, want_var in zip(means, var_errors, expected_mean, expected_var):
        c.update(torch.tensor(m), c.var_targets + torch.tensor(e))
        assert c.mean_coefs.tolist() == pytest.approx(want_mean, abs=1e-7)
        assert c.var_coefs.tolist() == pytest.approx(want_var, abs=1e-7)


def test_fixed_controllers_and_loss():
    s = GateController("sparsity", 4)
    sv = GateController("sparsity_variance", 4)
    gates = torch.rand(4, 2, 8)
    means, squares = gate_moments(gates)
    assert torch.allclose(squares, (gates * gates).mean((1, 2)))
    variances = gates.var((1, 2))  # the regularizer: this micro-batch's (unbiased) variance
    assert torch.allclose(s.loss(gates), 0.01 * means.mean())
    assert torch.allclose(sv.loss(gates), 0.01 * means.mean() - 0.01 * variances.mean())
    s.update(means, variances)
    assert torch.equal(s.mean_coefs, torch.full((4,), 0.01))


def test_sparsity_variance_l2_by_hand():
    """Fixed coefficients 0.1 on the Euclidean distances, over the layers, of the gate means
    and variances from their targets (1, 0.5, 0.5, 1 and t(1 - t) = 0, .25, .25, 0)."""
    c = GateController("sparsity_variance_l2", 4)
    gates = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]).view(4, 1, 2)
    # means 1, .5, .5, .5: distance |(0, 0, 0, -.5)| = .5; unbiased variances 0, .5, .5, .5:
    # distance |(0, .25, .25, .5)| = sqrt(.375)
    assert c.loss(gates).item() == pytest.approx(0.1 * 0.5 + 0.1 * 0.375 ** 0.5)
    c.update(torch.tensor([0.2, 0.2, 0.2, 0.2]), torch.zeros(4))
    assert torch.equal(c.mean_coefs, torch.full((4,), 0.1))  # fixed: no update moves them
    assert torch.equal(c.var_coefs, torch.full((4,), 0.1))


def test_controller_clamp_and_state_dict_round_trip():
    c = GateController("proportional_derivative", 4, lr=1.0, coef_max=0.05)
    for i in range(3):  # errors growing away from the targets 1, 0.5, 0.5, 1
        c.update(torch.tensor([0.3 - 0.1 * i, 0.8 + 0.05 * i, 0.8 + 0.05 * i, 0.3 - 0.1 * i]),
                 torch.zeros(4))
    assert c.mean_coefs[1] == 0.05 and c.mean_coefs[0] < -1  # clamped above, free below
    d = GateController("proportional_derivative", 4, lr=1.0, coef_max=0.05)
    d.load_state_dict(c.state_dict())
    for ctrl in (c, d):
        ctrl.update(torch.tensor([0.3, 0.8, 0.8, 0.3]), torch.zeros(4))
    assert torch.equal(c.mean_coefs, d.mean_coefs) and torch.equal(c.var_coefs, d.var_coefs)
    with pytest.raises(ValueError, match="controller"):
        GateController("adaptive", 4).load_state_dict(c.state_dict())
    with pytest.raises(ValueError, match="controller must be one of"):
        GateController("pid", 4)


# ------------------------------------------------------------------ 7-8. learning

def test_gate_heads_get_gradients_and_regularizer_lowers_gates():
    torch.manual_seed(0)
    m = tiny()
    m.train()
    idx = torch.randint(0, V, (4, 32))
    ctrl = GateController("sparsity", 4, coef=1.0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _, loss, gates = m(idx, idx)
    (loss + ctrl.loss(gates)).backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in m.gate_heads)
    start = gates.mean().item()
    for _ in range(15):
        opt.zero_grad()
        _, loss, gates = m(idx, idx)
        (loss + ctrl.loss(gates)).backward()
        opt.step()
    assert gates.mean().item() < start - 0.1


@pytest.mark.parametrize("gated", [True, False])
def test_tiny_model_overfits_a_batch(gated):
    m = tiny(gated)
    m.train()
    idx = torch.randint(0, V, (4, 32))
    opt = m.configure_optimizer(3e-3, (0.9, 0.95), 0.0, "cpu")
    first = None
    for _ in range(60):
        opt.zero_grad()
        _, loss, _ = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.3 * first


def test_param_count():
    m = tiny()
    assert m.num_params(non_embedding=False) - m.num_params() == V * 32


def test_flops_per_token_matches_an_independent_count():
    """Matmuls (attention scores and weighted sum included) counted by torch's FlopCounterMode
    on a real forward pass, module by module; norms and elementwise work counted here by hand.
    Dense, and gated at sparsity 0.5 (skipped blocks cost nothing)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    T, d, H, kv_dim, hidden = 16, 32, 4, 16, 128  # tiny(): n_head 4, n_kv_head 2, head dim 8
    for gated in (False, True):
        m = tiny(gated=gated, attn_backend="sdpa", block_size=T)
        # the math kernel spells attention out as matmuls, which the counter sees
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            m(torch.randint(0, V, (1, T)))
        per_module = {k: sum(v.values()) / T for k, v in counter.get_flop_counts().items()}
        block_matmuls = per_module["GPT.blocks.0"]
        # a gated block's key bias rides in extra channels of q, k and v (model.py,
        # sdpa_causal_with_key_bias), 2 + 2 flops per score each, which the estimate counts as
        # the one add per score they stand for
        channel = 4 * M.BIAS_CHANNELS * H * T if gated else 0
        assert block_matmuls - channel == 2 * d * (d + 2 * kv_dim) + 2 * 2 * T * d + 2 * d * d + 3 * 2 * d * hidden
        block_matmuls -= channel
        norm = 4 * d
        block = (block_matmuls + 3 * (d + kv_dim)  # rotary on q and k
                 + 5 * H * T                       # softmax: bias, max, exp, sum, divide
                 + 5 * hidden                      # silu and the gating product
                 + 4 * norm + 4 * d)               # four norms; two gate products and adds
        head = per_module["GPT.lm_head"]
        assert head == 2 * d * V
        gate_heads = 2 * (per_module["GPT.gate_heads.0"] + 4) if gated else 0  # + bias, relu, sum, clamp
        assert gate_heads == (2 * (2 * d + 4) if gated else 0)
        for sparsity in (0.0, 0.5):
            expected = norm + gate_heads + (1 - sparsity) * 4 * block + norm + head
            assert m.flops_per_token(sparsity, seq_len=T) == expected, (gated, sparsity)


# ------------------------------------------------------------------ 9. backends

def random_gates_model(**kw):
    m = tiny(**kw)
    with torch.no_grad():
        for head in m.gate_heads:
            head.weight.normal_(0, 0.3)  # gates spread over [0, 1], some exactly 0
    return m


@pytest.mark.skipif(M.flex_attention is None, reason="FlexAttention needs torch >= 2.6")
def test_flex_and_sdpa_backends_agree():
    m = random_gates_model(n_layer=4)
    idx = torch.randint(0, V, (2, 32))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        m.config.attn_backend = "sdpa"
        a, _, g = m(idx)
        m.config.attn_backend = "flex"
        b, _, _ = m(idx)
    assert 0 < (g == 0).float().mean() < 1
    assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------ generation

def decode_without_cache(m, idx, n, temperature, generator):
    for _ in range(n):
        logits, _, _ = m(idx[:, -m.config.block_size:])
        idx = torch.cat([idx, sample_next(logits[:, -1], temperature, generator=generator)], dim=1)
    return idx


def many_zero_gates_model():
    """Even tokens skip every layer, tokens divisible by 3 skip the middle two of four."""
    m = skip_tokens_model(list(range(0, V, 2)))
    with torch.no_grad():
        m.tok_emb.weight[:, 1] = torch.where(torch.arange(V) % 3 == 0, 1.0, -1.0)
        m.gate_heads[1].weight[0, 1] = 100.0
    return m


@pytest.mark.parametrize("gated,temperature", [(True, 0.0), (False, 0.0), (True, 1.0)])
def test_cached_decoding_matches_full_forward(gated, temperature):
    m = many_zero_gates_model() if gated else tiny(gated=False)
    prompt = torch.randint(0, V, (4, 6))
    out, gates = m.generate(prompt, 26, temperature=temperature, return_gates=True,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, decode_without_cache(m, prompt, 26, temperature, torch.Generator().manual_seed(0)))
    if gated:
        assert (gates[:, :, 6:] == 0).any(), "decoded tokens must skip some layers"
        _, _, full_gates = m(out)
        assert torch.equal(gates, full_gates)
    if temperature > 0:  # sampling visits skip tokens often
        assert 0.2 < (gates[:, :, 6:] == 0).float().mean() < 0.8


def test_skip_path_logits_match_masked_path_and_skip_work():
    m = many_zero_gates_model()
    seq = torch.randint(0, V, (3, 32))
    with torch.no_grad():
        full_logits, _, full_gates = m(seq)
        cache = M.KVCache(m, 3, 32, seq.device)
        m.prefill(seq[:, :8], cache)
        calls = []
        for block in m.blocks:  # count rows that reach each layer's Q/K/V projection
            block.attn.wq.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].size(0)))
        step_logits = []
        for t in range(8, 32):
            logits, _ = m.decode_one(seq[:, t:t + 1], cache)
            step_logits.append(logits)
    assert torch.allclose(torch.stack(step_logits, 1), full_logits[:, 8:], atol=1e-4)
    assert 0.2 < (full_gates[:, :, 8:] == 0).float().mean() < 0.8
    ran = (full_gates[:, :, 8:] > 0).sum().item()
    assert sum(calls) == ran < full_gates[:, :, 8:].numel(), "skipped (token, layer) pairs must not be computed"


def test_sampling_is_seeded_and_respects_top_k_top_p():
    m = tiny()
    prompt = torch.randint(0, V, (2, 4))
    a = m.generate(prompt, 10, generator=torch.Generator().manual_seed(3))
    b = m.generate(prompt, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).flatten().tolist()) == {0, 1}
    # probabilities 0.64, 0.24, 0.09, ...: top_p=0.8 keeps the first two only
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=gen).flatten().tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=gen).flatten().tolist()) == {0}


def test_long_prompt_is_cropped_and_context_slides():
    """A full context slides to its last block_size/2 tokens; from there generation goes on
    exactly as a fresh generate() from those kept tokens would."""
    m = random_gates_model()  # block_size 32
    with torch.no_grad():
        for block in m.blocks:  # sharper attention: the next token depends on the context
            block.attn.wq.weight.mul_(20)
            block.attn.wk.weight.mul_(20)
        m.lm_head.weight.mul_(20)
    prompt = torch.randint(0, V, (2, 40))
    with pytest.warns(UserWarning, match="cropped"):
        out = m.generate(prompt, 30, temperature=0)
    assert out.shape == (2, 32 + 30) and torch.equal(out[:, :32], prompt[:, -32:])
    kept = out[:, 33 - 16:33]  # the first new token filled the context; the last 16 are kept
    assert torch.equal(out[:, 17:], m.generate(kept, 30 - 1, temperature=0))


def test_padding_ids_are_never_sampled():
    """vocab_size 64 with a 50-token vocabulary: ids 50-63 are padding. Even when their logits
    are the largest by far, neither greedy nor sampled decoding ever emits one."""
    m = tiny(data_vocab_size=50)
    with torch.no_grad():
        m.lm_head.weight[50:] = 10 * m.lm_head.weight[:14].sign()
        logits, _, _ = m(torch.randint(0, 50, (2, 8)))
    assert (logits.argmax(-1) >= 50).all()  # the padding logits do dominate
    prompt = torch.randint(0, 50, (3, 4))
    for kw in (dict(temperature=0), dict(temperature=1.0), dict(temperature=2.0, top_k=60),
               dict(temperature=1.0, top_p=0.99)):
        out = m.generate(prompt, 40, generator=torch.Generator().manual_seed(0), **kw)
        assert out.max() < 50, kw
    with pytest.raises(ValueError, match="data_vocab_size"):
        GPTConfig(vocab_size=64, data_vocab_size=65)


# ------------------------------------------------------------------ a closed gate, exactly

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
            if isinstance(mod, M.RMSNorm):
                mod.weight.uniform_(0.7, 1.3)
        for block in m.blocks:
            block.attn.wq.weight.mul_(2)
            block.attn.wk.weight.mul_(2)
        for head in m.gate_heads:
            head.weight.normal_(0, 0.08)
            head.bias.fill_(0.15)
    return m


def masked_vs_skip(m, idx):
    """Largest logit difference between the masked path and skip=True, and the gates."""
    with torch.no_grad():
        a, _, gates = m(idx)
        b, _, _ = m(idx, skip=True)
    return (a - b).abs().max().item(), gates


@pytest.mark.parametrize("n_layer", [4, 6])
def test_masked_path_equals_real_skipping_with_sharp_attention(monkeypatch, n_layer):
    """The masked path (every pair computed, closed keys biased), skip=True (closed pairs not
    computed, their keys absent) and prefill + decoding give the same logits."""
    m = peaked_model(n_layer)
    torch.manual_seed(1)
    idx = torch.randint(0, V, (3, 64))
    diff, gates = masked_vs_skip(m, idx)
    assert 0.25 < (gates == 0).float().mean() < 0.6 and ((gates > 0) & (gates < 1)).any()
    assert diff < 1e-4
    with torch.no_grad():
        full, _, _ = m(idx)
        cache = M.KVCache(m, 3, 64, idx.device)
        steps = [m.prefill(idx[:, :16], cache)[0]]
        steps += [m.decode_one(idx[:, t:t + 1], cache)[0] for t in range(16, 64)]
    assert (torch.stack(steps, 1) - full[:, 15:]).abs().max() < 1e-4
    # the same check fails when a closed key is only biased by log(gate_eps), as it once was
    monkeypatch.setattr(M, "CLOSED", math.log(1e-6))
    assert masked_vs_skip(m, idx)[0] > 1e-2


@pytest.mark.parametrize("n_layer", [4, 6])
def test_greedy_generate_equals_greedy_full_forwards_with_sharp_attention(monkeypatch, n_layer):
    m = peaked_model(n_layer)
    prompt = torch.cat([torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(s))
                        for s in (2, 4)])
    out, gates = m.generate(prompt, 40, temperature=0, return_gates=True)
    assert (gates[:, :, 8:] == 0).float().mean() > 0.2  # the new tokens do skip
    assert torch.equal(out, decode_without_cache(m, prompt, 40, 0.0, None))
    # the same check fails when a closed key is only biased by log(gate_eps), as it once was
    monkeypatch.setattr(M, "CLOSED", math.log(1e-6))
    assert not torch.equal(m.generate(prompt, 40, temperature=0),
                           decode_without_cache(m, prompt, 40, 0.0, None))


def test_closed_keys_are_exactly_invisible_in_bfloat16():
    """Under bf16 autocast on the CPU, on the masked path and with skip=True: changing the
    tokens whose gates are all 0 leaves every other position's logits bit for bit the same."""
    m = skip_tokens_model(skip_ids=list(range(10)))
    with torch.no_grad():
        for block in m.blocks:  # sharp attention: scores far apart
            block.attn.wq.weight.mul_(30)
            block.attn.wk.weight.mul_(30)
    torch.manual_seed(6)
    idx = torch.randint(10, V, (2, 24))
    skipped = torch.rand(2, 24) < 0.4
    skipped[:, 0] = False
    a_idx = torch.where(skipped, torch.randint(0, 10, (2, 24)), idx)
    b_idx = torch.where(skipped, (a_idx + 1) % 10, idx)
    for skip in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            a, _, g = m(a_idx, skip=skip)
            b, _, _ = m(b_idx, skip=skip)
        assert a.dtype == torch.bfloat16 and torch.equal(g[0] == 0, skipped)
        assert torch.equal(a[~skipped], b[~skipped]), skip


# ------------------------------------------------------------------ real skipping (skip=True)

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


@pytest.mark.parametrize("bucket", [1, M.SKIP_BUCKET])
@pytest.mark.parametrize("batch", ["mixed", "middle skipped"])
def test_skip_path_equals_masked_path_with_gradients(monkeypatch, bucket, batch):
    monkeypatch.setattr(M, "SKIP_BUCKET", bucket)
    sdpa = F.scaled_dot_product_attention

    def sdpa_no_empty_rows(q, k, v, attn_mask=None, **kw):
        """Every query must see some key: a softmax over only -inf is NaN in many kernels
        (torch's own SDPA now returns 0 there, which would hide the bug on this machine)."""
        assert attn_mask is None or (attn_mask > float("-inf")).any(-1).all()
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa_no_empty_rows)
    idx = mixed_batches()[batch]
    results = {}
    for skip in (False, True):
        m = mixed_gates_model()
        logits, loss, gates = m(idx, idx.roll(-1, 1), skip=skip)
        loss.backward()
        results[skip] = [logits, loss, gates] + [p.grad for p in m.parameters()]
    gates = results[False][2]
    runs = (gates > 0).flatten(1)  # (L, B * T)
    if batch == "mixed":
        assert ((gates > 0) & (gates < 1)).any() and 0.2 < (gates == 0).float().mean() < 0.8
        assert not runs[:, -32:].any(), "the last row runs no layer at all"
    else:
        assert runs[[0, 1, 4, 5]].all() and not runs[[2, 3]].any()
    for a, b in zip(results[False], results[True]):
        assert b is not None and torch.isfinite(b).all()  # every weight gets a gradient
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert m.gate_heads[0].bias.grad.abs() > 0  # the gate heads learn through the skip path


def test_skip_path_computes_only_active_tokens_plus_padding(monkeypatch):
    """Rows reaching each layer's Q projection and FFN: per row, the batch's longest count of
    active tokens at that layer (the packed length, bucket 1), every token where the whole
    batch runs the layer, none where it skips it; and fewer pairs than the masked path."""
    monkeypatch.setattr(M, "SKIP_BUCKET", 1)
    m = mixed_gates_model()
    for name, idx in mixed_batches().items():
        B, T = idx.shape
        with torch.no_grad():
            _, _, gates = m(idx)
        rows = {"wq": [], "ffn": []}
        hooks = [mod.register_forward_hook(lambda mod, inp, out, key=key: rows[key].append(
                     inp[0].shape[:2].numel()))
                 for block in m.blocks for key, mod in (("wq", block.attn.wq), ("ffn", block.ffn))]
        with torch.no_grad():
            m(idx, skip=True)
        for h in hooks:
            h.remove()
        longest = (gates > 0).sum(2).max(1).values  # (L,) the longest active row per layer
        expected = [B * n for n in longest.tolist() if n > 0]
        assert rows["wq"] == rows["ffn"] == expected, name
        assert sum(expected) < gates.numel()
        assert sum(expected) >= (gates > 0).sum()


def test_skip_on_a_dense_model_is_the_dense_path():
    m = tiny(gated=False)
    idx = torch.randint(0, V, (2, 16))
    a, loss_a, _ = m(idx, idx)
    b, loss_b, gates = m(idx, idx, skip=True)
    assert gates is None and torch.equal(a, b) and torch.equal(loss_a, loss_b)


def test_prefill_skips_exactly_as_decoding_does():
    """Prefill with skip fills the cache as decode_one would: a (token, layer) whose gate is 0
    gets the closed bias, every other slot holds the token's own keys and values at its position
    (as the masked prefill computes them). Decoding on from there gives the full forward
    pass's logits and gates. The prompt takes each way through a layer: every token of a row
    (the ordinary path), some (packed), none (layers 2-3, which the decoded tokens do run)."""
    m = mixed_gates_model()
    seq, P = mixed_batches()["mixed"], 24
    seq[:, :P] = seq[:, :P] // 4 * 4 + seq[:, :P] % 3  # ids 0-2 mod 4: nobody runs layers 2-3
    seq[0, :P] = seq[0, :P] // 4 * 4 + 1 + seq[0, :P] % 2  # row 0 runs all of layer 0
    seq[3] = seq[3] // 4 * 4  # row 3 runs nothing at all
    caches = {}
    with torch.no_grad():
        full_logits, _, full_gates = m(seq)
        for skip in (False, True):
            caches[skip] = M.KVCache(m, 4, 32, seq.device)
            _, gates = m.prefill(seq[:, :P], caches[skip], skip=skip)
            assert torch.allclose(gates, full_gates[:, :, :P], atol=1e-5)
        step_logits = []
        for t in range(P, 32):
            logits, gates = m.decode_one(seq[:, t:t + 1], caches[True])
            assert torch.allclose(gates.squeeze(-1), full_gates[:, :, t], atol=1e-5)
            step_logits.append(logits)
    assert torch.allclose(torch.stack(step_logits, 1), full_logits[:, P:], atol=1e-4)
    runs = full_gates[:, :, :P] > 0
    longest = runs.sum(2).max(1).values.tolist()
    assert longest[0] == P and 0 < longest[1] <= P - M.SKIP_BUCKET and longest[2] == 0
    assert not runs[:, 3].any() and (full_gates[2:4, :, P:] > 0).any()
    masked, skipped = caches[False], caches[True]
    for i in range(6):
        run = runs[i]
        assert torch.equal(skipped.bias[i][:, :P] == M.CLOSED, ~run)
        assert torch.allclose(skipped.bias[i][:, :P], masked.bias[i][:, :P], atol=1e-5)
        for a, b in ((masked.k[i], skipped.k[i]), (masked.v[i], skipped.v[i])):
            assert torch.allclose(a.transpose(1, 2)[:, :P][run], b.transpose(1, 2)[:, :P][run],
                                  atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_with_skipping_prefill_matches_full_forward(temperature):
    """A long prompt full of skipped tokens: prefill and decoding with skip produce the tokens
    and gates of full forward passes, and the same as generate(skip=False)."""
    m = mixed_gates_model()
    prompt = mixed_batches()["mixed"][:, :20]
    out, gates = m.generate(prompt, 12, temperature=temperature, return_gates=True,
                            generator=torch.Generator().manual_seed(0))
    assert (gates[:, :, :20] == 0).any() and (gates[:, :, :20] > 0).any()
    expected = decode_without_cache(m, prompt, 12, temperature, torch.Generator().manual_seed(0))
    assert torch.equal(out, expected)
    assert torch.allclose(gates, m(out)[2], atol=1e-5)
    again = m.generate(prompt, 12, temperature=temperature, skip=False,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


@pytest.mark.parametrize("n_skipped", [3, 12])  # of 24: the ordinary path, and packed rows
def test_skipped_tokens_are_exactly_invisible_with_skip(n_skipped):
    """With skip=True a skipped key is absent, not merely biased by log(gate_eps): swapping
    skipped tokens for other skipped tokens leaves every other position's logits bit for bit
    the same, whether the layer packs its tokens or (nearly all active) takes the full path."""
    m = skip_tokens_model(skip_ids=list(range(10)))
    torch.manual_seed(4)
    idx = torch.randint(10, V, (2, 24))
    skipped = torch.zeros(2, 24, dtype=torch.bool)
    skipped[:, torch.randperm(23)[:n_skipped] + 1] = True
    a_idx = torch.where(skipped, torch.randint(0, 10, (2, 24)), idx)
    b_idx = torch.where(skipped, (a_idx + 1) % 10, idx)
    with torch.no_grad():
        a, _, g = m(a_idx, skip=True)
        b, _, _ = m(b_idx, skip=True)
    assert torch.equal(g[0] == 0, skipped)
    assert ((24 - n_skipped) > 24 - M.SKIP_BUCKET) == (n_skipped == 3)  # which path each takes
    assert torch.equal(a[~skipped], b[~skipped])


@pytest.mark.skipif(M.flex_attention is None, reason="FlexAttention needs torch >= 2.6")
def test_skip_path_with_flex_attention():
    """Packed rows through FlexAttention (lengths in buckets of 128, so 256 tokens here) give
    the masked SDPA path's logits, with sharp attention."""
    m = mixed_gates_model(block_size=256)
    with torch.no_grad():
        for block in m.blocks:  # sharper attention, so that positions matter
            block.attn.wq.weight.mul_(20)
            block.attn.wk.weight.mul_(20)
    torch.manual_seed(5)
    idx = torch.randint(0, V // 4, (2, 256)) * 4 + (torch.rand(2, 256) < 0.2) * 2
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        a, _, g = m(idx)
        m.config.attn_backend = "flex"
        b, _, _ = m(idx, skip=True)
    assert 0 < (g[1] > 0).sum(1).max() <= 128  # layer 1 runs packed rows of 128
    assert torch.allclose(a, b, atol=1e-5)
