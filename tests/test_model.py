"""Tests of model.py, the plain definition of the method: shapes, causality, the gates, the key
bias, the sandwich block, gradients, FLOPs and the controllers (CPU, tiny models)."""

import math

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import GateController, GPTConfig, attention, gate_bias, gate_moments, next_gate
from models import V, skip_tokens_model, tiny


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
    ("gate_eps", dict(gate_eps=0.0)),
])
def test_invalid_config_names_the_field(field, kw):
    args = dict(vocab_size=V, block_size=32, n_layer=4, n_head=4, n_kv_head=2, n_embd=32)
    args.update(kw)
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        GPTConfig(**args)
    if field == "n_layer":
        GPTConfig(**dict(args, gated=False))  # an odd dense model is fine


# ------------------------------------------------------------------ the plain attention

@pytest.mark.parametrize("T,S", [(12, 12), (1, 12), (4, 12)])
def test_attention_is_causal_softmax_with_a_bias_on_each_key(T, S):
    """model.attention against torch's attention with the same rule spelt as a float mask:
    query t (the last T of S positions) sees keys up to its own position, each key's bias
    added to its score, K and V heads shared by n_head / n_kv_head query heads."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, 2, S, 8), torch.randn(2, 2, S, 8)
    bias = torch.randn(2, S).masked_fill(torch.rand(2, S) < 0.3, M.CLOSED)
    positions = torch.arange(S - T, S)[:, None]  # each query's own position
    mask = torch.where(torch.arange(S) <= positions, 0.0, float("-inf")) + bias[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          attn_mask=mask)
    assert torch.allclose(attention(q, k, v, bias), want, atol=1e-5)
    plain = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                           attn_mask=mask - bias[:, None, None, :])
    assert torch.allclose(attention(q, k, v), plain, atol=1e-5)


def test_next_gate_by_hand():
    """m_i = relu(w . x + b) + m_{i-1}; g_i = 1 - clamp(m_i, 0, 1), per token."""
    head = torch.nn.Linear(3, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        head.bias.fill_(0.1)
    x = torch.tensor([[[-1.0, 5, 5], [0.2, 5, 5], [0.7, 5, 5], [2.0, 5, 5]]])  # (1, 4, 3)
    m_before = torch.tensor([0.0, 0.5, 0.5, 0.0]).view(1, 4, 1)
    g, m = next_gate(head, x, m_before)
    assert m.view(-1).tolist() == pytest.approx([0.0, 0.8, 1.3, 2.1])
    assert g.view(-1).tolist() == pytest.approx([1.0, 0.2, 0.0, 0.0]) and g.shape == (1, 4, 1)
    assert g.view(-1)[2] == 0  # exactly: the clamp, not a small number
    g0, m0 = next_gate(head, x, 0.0)  # the first layer: m_{-1} = 0
    assert m0.view(-1).tolist() == pytest.approx([0.0, 0.3, 0.8, 2.1])


def test_gate_bias_by_hand():
    g = torch.tensor([[1.0, 0.5, 1e-8, 0.0]])
    assert gate_bias(g, 1e-6)[0].tolist() == pytest.approx([0.0, math.log(0.5), math.log(1e-6), M.CLOSED])
    grad = torch.autograd.grad(gate_bias(g.requires_grad_(), 1e-6).sum(), g)[0]
    assert grad[0].tolist() == pytest.approx([1.0, 2.0, 0.0, 0.0])  # d log g / dg; none when closed


def test_block_gate_scales_both_updates():
    """x + g * PostNorm(Attention(PreNorm(x))), then x + g * PostNorm(FFN(PreNorm(x))): a gate of
    0 leaves a token's stream exactly as it was, and a gate of 0.5 halves both updates."""
    m = tiny()
    block, cos, sin = m.blocks[0], m.rope_cos[:8], m.rope_sin[:8]
    torch.manual_seed(1)
    x = torch.randn(2, 8, 32)
    g = torch.tensor([0.0, 0.5, 1.0, 0.25]).repeat(4).view(2, 8, 1)
    with torch.no_grad():
        out = block(x, cos, sin, g)
        h = x + g * block.attn_post(block.attn(block.attn_pre(x), cos, sin))
        want = h + g * block.ffn_post(block.ffn(block.ffn_pre(h)))
    assert torch.allclose(out, want, atol=1e-6)
    closed = (g == 0).squeeze(-1)
    assert torch.equal(out[closed], x[closed])
    assert torch.allclose(block(x, cos, sin), block(x, cos, sin, torch.ones(2, 8, 1)))


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

def query_indexed_attention(q, k, v, key_bias=None):
    """The reference release's defect: the gate bias indexed by the QUERY position."""
    T = q.size(2)
    k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return (scores + key_bias[:, None, :, None]).softmax(-1) @ v  # (B, 1, T, 1): along queries


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
    monkeypatch.setattr(M.Attention, "fast", False)  # the plain definition, model.attention
    assert later_logits_change(m) < 1e-4
    # the same check catches the reference's query-indexed bias
    monkeypatch.setattr(M, "attention", query_indexed_attention)
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
    c = GateController("proportional_derivative", 4, lr=1e-2)  # targets 1, 0.5, 0.5, 1
    assert GateController("proportional_derivative", 4).lr == 1e-3  # the default, for every rule
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


def test_controller_loads_the_state_older_checkpoints_saved():
    """Checkpoints written before the rules kept a memory dict saved the EMAs as 'ema'."""
    c = GateController("proportional_derivative", 4)
    c.update(torch.tensor([0.5, 0.9, 0.9, 0.5]), torch.zeros(4))
    old = {k: v for k, v in c.state_dict().items() if k != "memory"}
    old["ema"] = {n: m["ema"] for n, m in c.memory.items()}
    d = GateController("proportional_derivative", 4)
    d.load_state_dict(old)
    for ctrl in (c, d):
        ctrl.update(torch.tensor([0.4, 0.95, 0.95, 0.4]), torch.zeros(4))
    assert torch.equal(c.mean_coefs, d.mean_coefs) and c.mean_coefs.abs().sum() > 0


def test_target_controllers_start_at_coef_when_given():
    c = GateController("proportional", 4, coef=0.02, var_coef=-0.01)
    assert c.mean_coefs.tolist() == pytest.approx([0.02] * 4) and c.var_coefs.tolist() == pytest.approx([-0.01] * 4)
    c.update(c.mean_targets + 0.1, c.var_targets)
    assert c.mean_coefs.tolist() == pytest.approx([0.0201] * 4)



@pytest.mark.parametrize("kind", list(M.TARGET_RULES))  # a new rule is tested the moment it exists
def test_every_target_rule_waits_within_tol_and_resumes_exactly(kind, tmp_path):
    """Any rule: an error within tol moves no coefficient, its memory starts empty and is its
    own, and a controller saved with torch.save and loaded back (as train.py's checkpoints are)
    takes the very steps of one that never stopped."""
    c = GateController(kind, 4, lr=0.1)
    assert c.memory == {"mean": {}, "var": {}}
    errors = [[0.3, -0.2, 0.005, 0.0], [0.2, -0.4, -0.008, 0.1], [0.25, -0.1, 0.009, 0.3]]
    for e in errors[:2]:
        c.update(c.mean_targets + torch.tensor(e), c.var_targets - torch.tensor(e))
    torch.save(c.state_dict(), tmp_path / "c.pt")
    d = GateController(kind, 4, lr=0.1)
    d.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    for ctrl in (c, d):
        ctrl.update(ctrl.mean_targets + torch.tensor(errors[2]), ctrl.var_targets)
    assert torch.equal(c.mean_coefs, d.mean_coefs) and torch.equal(c.var_coefs, d.var_coefs)
    assert c.mean_coefs[2] == 0 and c.mean_coefs.abs().sum() > 0  # layer 2: always within tol


def test_a_rules_memory_may_hold_numbers_and_lists(monkeypatch, tmp_path):
    """A rule added to TARGET_RULES after import can be built by name, and its memory of plain
    numbers and lists survives a checkpoint exactly."""
    def counting(d, memory):
        memory["n"] = memory.get("n", 0) + 1
        memory["history"] = memory.get("history", []) + [float(d[0])]
        return d * memory["n"] + sum(memory["history"])
    monkeypatch.setitem(M.TARGET_RULES, "counting", counting)
    assert "counting" in M.controller_kinds()
    c = GateController("counting", 4, lr=0.01, tol=0)
    means = [c.mean_targets + 0.1 * i for i in range(1, 5)]
    for m in means[:2]:
        c.update(m, c.var_targets)
    torch.save(c.state_dict(), tmp_path / "c.pt")
    d = GateController("counting", 4, lr=0.01, tol=0)
    d.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    assert d.memory["mean"]["n"] == 2 and type(d.memory["mean"]["history"]) is list
    for m in means[2:]:
        c.update(m, c.var_targets)
        d.update(m, d.var_targets)
    assert torch.equal(c.mean_coefs, d.mean_coefs) and c.memory == d.memory


def test_proportional_integral_is_kp_times_the_error_plus_its_running_sum():
    """Written as a step, the rule makes c = lr * (kp * d + the sum of d so far), exactly so with
    tol = 0 and no clamp."""
    torch.manual_seed(0)
    kp, lr = 3.0, 0.01
    c = GateController("proportional_integral", 4, lr=lr, tol=0, kp=kp)
    total = torch.zeros(4)
    for _ in range(5):
        d = torch.randn(4) * 0.2
        total += d
        c.update(c.mean_targets + d, c.var_targets)
        assert torch.allclose(c.mean_coefs, lr * (kp * d + total), atol=1e-6)

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


def test_flops_per_token_matches_an_independent_count(monkeypatch):
    """Matmuls (attention scores and weighted sum included) counted by torch's FlopCounterMode
    on a forward pass through the plain attention, module by module; norms and elementwise work
    counted here by hand. Dense, and gated at sparsity 0.5 (skipped blocks cost nothing)."""
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(M.Attention, "fast", False)  # model.attention: matmuls the counter sees
    T, d, H, kv_dim, hidden = 16, 32, 4, 16, 128  # tiny(): n_head 4, n_kv_head 2, head dim 8
    for gated in (False, True):
        m = tiny(gated=gated, block_size=T)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(torch.randint(0, V, (1, T)))
        per_module = {k: sum(v.values()) / T for k, v in counter.get_flop_counts().items()}
        block_matmuls = per_module["GPT.blocks.0"]
        assert block_matmuls == 2 * d * (d + 2 * kv_dim) + 2 * 2 * T * d + 2 * d * d + 3 * 2 * d * hidden
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
