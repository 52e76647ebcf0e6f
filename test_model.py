"""The tests of model.py, the method: run them after every change (`python -m pytest -q
test_model.py`, a few seconds). The tests of an exercise of EXERCISES.md carry its marker, so
that `python -m pytest -q test_model.py -m gate` checks exercise 2 alone. They hold each function
to numbers worked out by hand, to values saved from a run of the reference code (inputs made by
formulas, not random numbers, so that they are the same on every machine), and to properties;
none of them computes a function's answer the way the function does. The tests of skipping.py,
train.py and the other scripts are in tests/."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import model as M
import skipping
from checkpoints import controller_state, load_controller
from model import (GPT, Block, GateController, GPTConfig, attention, gate_bias, gate_moments,
                   gate_targets, next_gate, pooled_variance, rotary_tables)

V = 64  # vocabulary of the small models


def tiny(gated=True, **kw):
    """4 layers, d 32, 4 heads sharing 2 K/V heads, block 32; N(0, 0.02) weights, seed 0."""
    args = dict(vocab_size=V, block_size=32, n_layer=4, n_head=4, n_kv_head=2, n_embd=32,
                gated=gated)
    torch.manual_seed(0)
    return GPT(GPTConfig(**dict(args, **kw))).eval()


def skip_tokens_model(skip_ids, n_layer=4):
    """Tokens in skip_ids have gate 0 in every layer and all other tokens gate 1: embedding
    feature 0 is +1 for them and -1 for the others, and gate head 0 reads it with weight 100."""
    m = tiny(n_layer=n_layer)
    with torch.no_grad():
        m.tok_emb.weight[:, 0] = -1.0
        m.tok_emb.weight[skip_ids, 0] = 1.0
        for head in m.gate_heads:
            head.weight.zero_()
            head.bias.zero_()
        m.gate_heads[0].weight[0, 0] = 100.0
    return m


def wave(n, f, shape):
    """n numbers sin(0), sin(f), sin(2f), ... in a shape: inputs that every machine makes alike."""
    return torch.arange(n).float().mul(f).sin().view(shape)


def filled(module, f=0.1):
    """module with every parameter set by wave() instead of random numbers."""
    with torch.no_grad():
        for j, p in enumerate(module.parameters()):
            p.copy_(wave(p.numel(), f + 0.07 * j, p.shape) * 0.5)
    return module


# ------------------------------------------------------------------ a standard language model

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


def test_param_count():
    m = tiny()
    assert m.num_params(non_embedding=False) - m.num_params() == V * 32


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


# ------------------------------------------------------------------ 1. the gate

@pytest.mark.gate
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
    assert g0.view(-1).tolist() == pytest.approx([1.0, 0.7, 0.2, 0.0])


@pytest.mark.gate
def test_next_gate_learns_only_where_its_relu_is_open():
    """The gate head gets a gradient from the tokens whose relu is above 0 and whose gate is not
    clamped, and none at all from the others (relu and clamp have no slope there)."""
    head = torch.nn.Linear(2, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.bias.zero_()
    x = torch.tensor([[[-0.5, 1.0], [0.3, 1.0], [3.0, 1.0]]])  # relu shut, open, open but g = 0
    g, _ = next_gate(head, x, 0.0)
    g.sum().backward()
    assert head.weight.grad.view(-1).tolist() == pytest.approx([-0.3, -1.0])  # token 1 alone
    assert head.bias.grad.tolist() == pytest.approx([-1.0])


@pytest.mark.gate
def test_next_gate_keeps_the_running_sum_in_float32_under_bfloat16():
    """Under bfloat16 autocast the head's output is bfloat16, but m is float32 from the first
    layer on: in bfloat16, 0.3 + 0.004 is 0.3 again, and m runs over half the layers."""
    head = torch.nn.Linear(2, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.bias.zero_()
    x = torch.tensor([[[0.3, 0.0]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g, m = next_gate(head, x, 0.0)
        assert m.dtype == torch.float32
        g, m = next_gate(head, x * 0.0 + 0.004, m)
    assert m.dtype == torch.float32 and m.item() == pytest.approx(0.304, abs=1e-3)


# ------------------------------------------------------------------ 2. the gate loop and the mirror

def stream_reading_model(n_layer, gated=True):
    """A gated model whose gate head i reads feature 0 of the stream with weight 1 (bias 0), so
    that layer i's relu(w . x + b) is that feature's value as it enters layer i."""
    m = tiny(gated=gated, n_layer=n_layer)
    with torch.no_grad():
        for head in m.gate_heads or []:
            head.weight.zero_()
            head.bias.zero_()
            head.weight[0, 0] = 1.0
    return m


def adding_layer(calls, step=0.1):
    """A stand-in for a layer: records (i, block, g) and adds step to feature 0 of every token."""
    def layer(i, block, x, g):
        calls.append((i, block, g))
        return x + step * F.one_hot(torch.tensor(0), x.size(-1))
    return layer


@pytest.mark.gate
def test_gate_loop_carries_the_sum_and_mirrors_the_gates():
    """Six layers; feature 0 enters at 0.2 and 0.05 for two tokens and every layer adds 0.1 to
    it. So m = 0.2, 0.5, 0.9 (and 0.05, 0.2, 0.45) before layers 0, 1, 2: gates 0.8, 0.5, 0.1
    (0.95, 0.8, 0.55), which layers 5, 4, 3 reuse. Each layer gets the stream the one before
    it made, and gate_loop returns the stream after the last layer."""
    m = stream_reading_model(6)
    x = torch.zeros(1, 2, 32)
    x[0, :, 0] = torch.tensor([0.2, 0.05])
    calls = []
    out, gates = m.gate_loop(x, adding_layer(calls))
    assert [(i, block) for i, block, _ in calls] == list(enumerate(m.blocks))
    want = [[0.8, 0.95], [0.5, 0.8], [0.1, 0.55], [0.1, 0.55], [0.5, 0.8], [0.8, 0.95]]
    assert [g.view(-1).tolist() for _, _, g in calls] == [pytest.approx(w) for w in want]
    assert len(gates) == 6 and all(g.shape == (1, 2, 1) for g in gates)
    assert all(a is b for a, (_, _, b) in zip(gates, calls))  # the gates each layer ran with
    assert out[0, :, 0].tolist() == pytest.approx([0.8, 0.65])


@pytest.mark.gate
def test_gate_loop_closes_the_middle_from_the_inside_out():
    """Once a token's sum reaches 1 its gate is exactly 0 there and in every layer nearer the
    middle (m never shrinks), on both sides of the mirror."""
    m = stream_reading_model(8)
    x = torch.zeros(1, 3, 32)
    x[0, :, 0] = torch.tensor([0.6, 0.3, 0.0])  # sums reach 1 at layers 1, 3 and never
    _, gates = m.gate_loop(x, adding_layer([], step=0.0))
    g = torch.stack(gates).view(8, 3)
    assert (g[:, 0] == 0).tolist() == [False, True, True, True, True, True, True, False]
    assert (g[:, 1] == 0).tolist() == [False, False, False, True, True, False, False, False]
    assert g[:, 2].tolist() == [1.0] * 8
    assert torch.equal(g, g.flip(0)) and (g[1:4] <= g[:3]).all()


def test_a_dense_model_runs_every_layer_with_gate_one():
    m = stream_reading_model(3, gated=False)
    calls = []
    out, gates = m.run_layers(torch.zeros(1, 2, 32), adding_layer(calls))
    assert calls == [(i, block, 1.0) for i, block in enumerate(m.blocks)] and gates == []
    assert out[0, :, 0].tolist() == pytest.approx([0.3, 0.3])


# ------------------------------------------------------------------ 3. the key bias

@pytest.mark.key_bias
def test_gate_bias_by_hand():
    g = torch.tensor([[1.0, 0.5, 1e-8, 0.0]])
    assert gate_bias(g, 1e-6)[0].tolist() == pytest.approx([0.0, math.log(0.5), math.log(1e-6),
                                                            M.CLOSED])
    grad = torch.autograd.grad(gate_bias(g.requires_grad_(), 1e-6).sum(), g)[0]
    assert grad[0].tolist() == pytest.approx([1.0, 2.0, 0.0, 0.0])  # d log g / dg; none when closed


@pytest.mark.key_bias
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_closed_key_gets_no_weight_even_from_a_sharp_head(dtype):
    """Scores 9,000 apart: the closed key's softmax weight is exactly 0, while log(1e-6) alone
    would leave it a weight near 1 in such a head; an open key dimmed to g = 0.5 keeps its share
    of the weight halved (against an equal key)."""
    scores = torch.tensor([[9000.0, 0.0, 0.0, 0.0]])
    bias = gate_bias(torch.tensor([[0.0, 1.0, 0.5, 1.0]]), 1e-6)
    weights = (scores + bias).to(dtype).float().softmax(-1)
    assert weights[0, 0] == 0 and weights[0, 1:].sum().item() == pytest.approx(1.0, abs=1e-2)
    assert (weights[0, 2] / weights[0, 3]).item() == pytest.approx(0.5, rel=1e-2)
    assert (scores + math.log(1e-6)).softmax(-1)[0, 0] > 0.99


# ------------------------------------------------------------------ 4. attention with the key bias

ATTENTION_Q = wave(24, 0.37, (1, 2, 3, 4))  # 2 query heads, 3 positions, head dim 4
ATTENTION_K = wave(12, 0.61, (1, 1, 3, 4)) * 2  # 1 K/V head, shared by both query heads
ATTENTION_V = wave(12, 0.29, (1, 1, 3, 4))
ATTENTION_BIAS = torch.tensor([[0.0, -0.7, M.CLOSED]])  # key 2 is closed
# saved from model.attention as shipped
ATTENTION_OUT = [
    0.00000, 0.28595, 0.54802, 0.76433, 0.06090, 0.33290, 0.57710, 0.77310, 0.78272, 0.88935,
    0.92171, 0.87709, 0.00000, 0.28595, 0.54802, 0.76433, 0.05608, 0.32919, 0.57480, 0.77241,
    0.02799, 0.30753, 0.56139, 0.76836]
ATTENTION_OUT_NO_BIAS = [
    0.00000, 0.28595, 0.54802, 0.76433, 0.11491, 0.37453, 0.60288, 0.78088, 0.82346, 0.85531,
    0.81574, 0.70804, 0.00000, 0.28595, 0.54802, 0.76433, 0.10634, 0.36793, 0.59879, 0.77965,
    0.07036, 0.33224, 0.56637, 0.75320]


def refuse_fused_attention(func):
    name = str(getattr(func, "__name__", func))
    if "scaled_dot_product" in name or "_attention" in name:
        raise AssertionError(f"model.attention must not use torch's fused attention ({name})")


class NoFusedFunction(TorchFunctionMode):  # sees F.scaled_dot_product_attention by any name
    def __torch_function__(self, func, types, args=(), kwargs=None):
        refuse_fused_attention(func)
        return func(*args, **(kwargs or {}))


class NoFusedKernel(TorchDispatchMode):  # sees the aten kernels, however they were reached
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        refuse_fused_attention(func)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_fused_kernel():
    """Exercise 4 is attention in plain tensor operations: torch's fused attention is refused
    wherever it is called from (F, torch._C._nn, torch.ops, an alias saved at import)."""
    with NoFusedFunction(), NoFusedKernel():
        yield


@pytest.mark.attention
def test_attention_gives_the_saved_values(no_fused_kernel):
    q, k, v = ATTENTION_Q, ATTENTION_K, ATTENTION_V
    out = attention(q, k, v, ATTENTION_BIAS)
    assert out.shape == (1, 2, 3, 4)
    assert out.view(-1).tolist() == pytest.approx(ATTENTION_OUT, abs=1e-5)
    assert attention(q, k, v).view(-1).tolist() == pytest.approx(ATTENTION_OUT_NO_BIAS, abs=1e-5)
    # the last 2 queries of 3 positions (a prompt after a cached one), and a single query
    later = attention(q[:, :, 1:], k, v, ATTENTION_BIAS)
    assert torch.allclose(later, out[:, :, 1:], atol=1e-6)
    assert torch.allclose(attention(q[:, :, 2:], k, v, ATTENTION_BIAS), out[:, :, 2:], atol=1e-6)


@pytest.mark.attention
def test_attention_is_causal_and_hides_a_closed_key(no_fused_kernel):
    """Query t reads keys 0..t only; a closed key is read by nobody, whatever it holds."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    bias = torch.zeros(2, 6)
    bias[:, 2] = M.CLOSED
    out = attention(q, k, v, bias)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 4:], v2[:, :, 4:] = torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8)  # the future
    assert torch.allclose(attention(q, k2, v2, bias)[:, :, :4], out[:, :, :4], atol=1e-6)
    k3, v3 = k.clone(), v.clone()
    k3[:, :, 2], v3[:, :, 2] = torch.randn(2, 2, 8) * 10, torch.randn(2, 2, 8) * 10  # closed
    changed = attention(q, k3, v3, bias)
    assert torch.allclose(changed[:, :, 3:], out[:, :, 3:], atol=1e-6)


@pytest.mark.attention
def test_attention_indexes_the_bias_by_key_and_shares_kv_heads(no_fused_kernel):
    """A bias that is one number for every key changes nothing (a softmax ignores a constant);
    a bias that differs between keys does. Query heads 0, 1 read K/V head 0 and heads 2, 3 read
    head 1: equal queries in heads 0 and 1 give equal outputs, in heads 1 and 2 different ones."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    plain = attention(q, k, v)
    assert torch.allclose(attention(q, k, v, torch.full((1, 5), -3.0)), plain, atol=1e-6)
    assert not torch.allclose(attention(q, k, v, torch.tensor([[0.0, -3, 0, -3, 0]])), plain,
                              atol=1e-3)
    q[:, 1], q[:, 2] = q[:, 0], q[:, 0]
    out = attention(q, k, v)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6)
    assert not torch.allclose(out[:, 1], out[:, 2], atol=1e-3)


# ------------------------------------------------------------------ 5. the sandwich block

BLOCK_X = wave(32, 0.23, (1, 4, 8)) * 2  # 4 tokens of width 8
BLOCK_G = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 4, 1)
# saved from Block.forward as shipped, without and with the key bias of BLOCK_G
BLOCK_OUT = [
    0.00000, 0.45596, 0.88790, 1.27307, 1.59120, 1.82553, 1.96371, 1.99846, 1.92797, 1.73354,
    1.57284, 1.10413, 0.69066, 0.45533, -0.26712, -0.76300, -1.02554, -1.44639, -2.25499,
    -1.51976, -1.11188, -2.68352, -2.70372, -0.92187, -1.38245, -0.98273, -0.65672, -0.21557,
    0.48375, 0.77756, 0.91130, 1.57319]
BLOCK_OUT_KEY_BIAS = [
    0.00000, 0.45596, 0.88790, 1.27307, 1.59120, 1.82553, 1.96371, 1.99846, 1.92797, 1.79022,
    1.63006, 0.93458, 0.56236, 0.73689, -0.08340, -1.13729, -1.02554, -1.34519, -1.87196,
    -1.82369, -1.86902, -2.17896, -1.66879, -1.58533, -1.38245, -0.93848, -0.58755, -0.33779,
    0.34727, 0.96020, 1.10610, 1.34933]


def small_block():
    """A Block of width 8 (2 query heads sharing 1 K/V head) with wave() weights, and its
    rotary tables for 4 positions."""
    cfg = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_kv_head=1, n_embd=8)
    return filled(Block(cfg)), *rotary_tables(4, 4, 10000.0)


@pytest.mark.block
def test_block_gives_the_saved_values():
    block, cos, sin = small_block()
    with torch.no_grad():
        out = block(BLOCK_X, cos, sin, BLOCK_G)
        assert out.view(-1).tolist() == pytest.approx(BLOCK_OUT, abs=1e-4)
        key_bias = torch.tensor([[M.CLOSED, math.log(0.5), 0.0, math.log(0.25)]])  # of BLOCK_G
        out = block(BLOCK_X, cos, sin, BLOCK_G, key_bias)
        assert out.view(-1).tolist() == pytest.approx(BLOCK_OUT_KEY_BIAS, abs=1e-4)


@pytest.mark.block
def test_block_with_gate_zero_adds_nothing_and_with_gate_one_is_dense():
    block, cos, sin = small_block()
    with torch.no_grad():
        out = block(BLOCK_X, cos, sin, BLOCK_G)
        assert torch.equal(out[0, 0], BLOCK_X[0, 0])  # gate 0: the stream exactly as it was
        assert torch.equal(block(BLOCK_X, cos, sin), block(BLOCK_X, cos, sin, torch.ones(1, 4, 1)))
        assert not torch.allclose(out[0, 2], BLOCK_X[0, 2], atol=1e-2)


@pytest.mark.block
def test_block_hands_the_key_bias_and_the_cache_to_attention():
    """The block passes key_bias and cache to its attention: a hook given as the cache sees the
    bias, and a closed token's key changes nothing for the tokens after it."""
    block, cos, sin = small_block()
    seen = []

    def hook(k, v, key_bias):
        seen.append(key_bias)
        return k, v, key_bias
    bias = torch.tensor([[0.0, M.CLOSED, 0.0, 0.0]])
    with torch.no_grad():
        out = block(BLOCK_X, cos, sin, 1.0, bias, hook)
        assert len(seen) == 1 and torch.equal(seen[0], bias)
        x2 = BLOCK_X.clone()
        x2[0, 1] = wave(8, 1.7, (8,)) * 3  # another token at the closed position
        out2 = block(x2, cos, sin, 1.0, bias)
    assert torch.allclose(out[0, 2:], out2[0, 2:], atol=1e-5)
    assert not torch.allclose(out[0, 1], out2[0, 1], atol=1e-3)


# ------------------------------------------------------------------ the whole model

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
    """A token whose gate is 0 in every layer is invisible to the tokens after it, on the fused
    kernel and with model.attention itself. The authors' release added the bias at the QUERY
    position: one constant for a whole softmax row, which changes nothing -- the same as no
    bias at all, and then the closed token shows."""
    m = skip_tokens_model(skip_ids=list(range(10)))
    assert later_logits_change(m) < 1e-4
    skipping.use_plain(m)
    assert later_logits_change(m) < 1e-4
    monkeypatch.setattr(M, "attention", lambda q, k, v, key_bias=None: attention(q, k, v))
    assert later_logits_change(m) > 1e-3


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


# ------------------------------------------------------------------ 6. the targets

@pytest.mark.regularizer
def test_targets_by_hand():
    """Means linear from start to end over the first half, mirrored; variances t(1 - t) + delta,
    not below 0."""
    means, variances = gate_targets(6, 1.0, 0.5)
    assert means.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.5, 0.75, 1.0])
    assert variances.tolist() == pytest.approx([0.0, 0.1875, 0.25, 0.25, 0.1875, 0.0])
    means, variances = gate_targets(4, 0.8, 0.2, -0.1)
    assert means.tolist() == pytest.approx([0.8, 0.2, 0.2, 0.8])
    assert variances.tolist() == pytest.approx([0.06, 0.06, 0.06, 0.06])
    means, variances = gate_targets(8, 0.9, 0.0, -0.2)
    assert means.tolist() == pytest.approx([0.9, 0.6, 0.3, 0.0, 0.0, 0.3, 0.6, 0.9])
    assert variances.tolist() == pytest.approx([0.0, 0.04, 0.01, 0.0, 0.0, 0.01, 0.04, 0.0])
    assert gate_targets(2, 0.7, 0.1)[0].tolist() == pytest.approx([0.7, 0.7])


@pytest.mark.regularizer
def test_controller_takes_its_targets_from_the_settings():
    c = GateController("proportional", 6, target_start=0.9, target_end=0.3, var_target_delta=0.01)
    assert c.mean_targets.tolist() == pytest.approx([0.9, 0.6, 0.3, 0.3, 0.6, 0.9])
    assert c.var_targets.tolist() == pytest.approx([0.1, 0.25, 0.22, 0.22, 0.25, 0.1])


# ------------------------------------------------------------------ 7. the regularizer

# gates of 4 layers for one row of 2 tokens: means 1, .5, .5, .5; unbiased variances 0, .5, .5, .5
GATES = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]).view(4, 1, 2)


@pytest.mark.regularizer
def test_fixed_regularizers_by_hand():
    """sparsity: mean_l(0.01 mu_l) = 0.01 * 0.625; sparsity_variance adds mean_l(-0.01 v_l) =
    -0.01 * 0.375; sparsity_variance_l2: 0.1 |mu - t| + 0.1 |v - t(1 - t)| with the targets
    1, .5, .5, 1 and 0, .25, .25, 0: distances |(0, 0, 0, -.5)| and |(0, .25, .25, .5)|."""
    assert GateController("sparsity", 4).loss(GATES).item() == pytest.approx(0.00625)
    assert GateController("sparsity_variance", 4).loss(GATES).item() == pytest.approx(0.0025)
    l2 = GateController("sparsity_variance_l2", 4).loss(GATES).item()
    assert l2 == pytest.approx(0.1 * 0.5 + 0.1 * 0.375 ** 0.5)


@pytest.mark.regularizer
def test_regularizer_uses_each_layers_coefficients():
    """c = 1, 2, 3, 4 and k = 0, 0, 0, 1: (1 + 1 + 1.5 + 2) / 4 + 0.5 / 4 = 1.5; and the loss
    sends a gradient to every gate."""
    c = GateController("proportional", 4)
    c.mean_coefs, c.var_coefs = torch.tensor([1.0, 2, 3, 4]), torch.tensor([0.0, 0, 0, 1])
    gates = GATES.clone().requires_grad_()
    loss = c.loss(gates)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert gates.grad.abs().min() > 0
    assert c.loss(GATES.to(torch.bfloat16)).dtype == torch.float32  # computed in fp32


# ------------------------------------------------------------------ 8. a rule and the update

@pytest.mark.update
def test_target_controllers_move_coefficients_the_right_way():
    for kind in ("proportional", "adaptive"):
        c = GateController(kind, 6, target_start=1.0, target_end=0.5)
        means = c.mean_targets.clone()
        means[2] = means[3] = 0.9  # middle layers too open: push them shut
        means[0] = means[5] = 0.5  # outer layers too shut: let them open
        means[1] += 0.005  # an error within tol must not move the coefficient
        c.update(means, c.var_targets.clone())
        assert c.mean_coefs[2] > 0 and c.mean_coefs[0] < 0 and c.mean_coefs[1] == 0, kind
        assert torch.equal(c.var_coefs, torch.zeros(6))
    p = GateController("proportional", 6)
    p.update(torch.tensor([1.0, 0.75, 0.9, 0.9, 0.75, 1.0]), p.var_targets)
    assert p.mean_coefs[2].item() == pytest.approx(1e-3 * 0.4)
    a = GateController("adaptive", 6)
    a.update(torch.tensor([1.0, 0.75, 0.9, 0.9, 0.75, 1.0]), a.var_targets + 0.1)
    assert a.mean_coefs[2].item() == pytest.approx(1e-3)
    assert a.var_coefs.tolist() == pytest.approx([1e-3] * 6)


@pytest.mark.rule
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
    ema = 0.9 * (0.9 * (0.9 * -0.10 + 0.1 * -0.15) + 0.1 * -0.05) + 0.1 * -0.30  # layer 0
    assert c.memory["mean"]["ema"][0].item() == pytest.approx(ema)


@pytest.mark.update
def test_update_hands_the_rule_every_error_and_masks_only_its_step(monkeypatch):
    """The rule sees the errors d of every layer, those within tol too (its memory is of the
    errors, not of the steps taken), and the mask applies to the step it returns."""
    seen = []

    def recording(d, memory):
        seen.append(d.clone())
        memory["calls"] = memory.get("calls", 0) + 1
        return torch.ones_like(d)
    monkeypatch.setitem(M.TARGET_RULES, "recording", recording)
    c = GateController("recording", 4, lr=0.1, tol=0.01)
    d = torch.tensor([0.2, 0.005, -0.005, -0.3])
    c.update(c.mean_targets + d, c.var_targets)
    assert seen[0].tolist() == pytest.approx(d.tolist(), abs=1e-6)  # unmasked
    assert seen[1].tolist() == pytest.approx([0.0] * 4, abs=1e-6)  # the variances' own errors
    assert c.memory == {"mean": {"calls": 1}, "var": {"calls": 1}}
    assert c.mean_coefs.tolist() == pytest.approx([0.1, 0.0, 0.0, 0.1])
    assert c.var_coefs.tolist() == pytest.approx([0.0] * 4)


def test_fixed_kinds_keep_their_coefficients_and_have_no_rule():
    """train.py steps a controller only where it has a rule; the fixed kinds have none."""
    for kind, (c, k) in {"sparsity": (0.01, 0.0), "sparsity_variance": (0.01, -0.01),
                         "sparsity_variance_l2": (0.1, 0.1)}.items():
        ctrl = GateController(kind, 4)
        assert ctrl.rule is None, kind
        assert ctrl.mean_coefs.tolist() == pytest.approx([c] * 4), kind
        assert ctrl.var_coefs.tolist() == pytest.approx([k] * 4), kind
    assert all(GateController(kind, 4).rule is M.TARGET_RULES[kind] for kind in M.TARGET_RULES)


@pytest.mark.update
def test_controller_clamp_and_state_dict_round_trip():
    c = GateController("proportional", 4, lr=1.0, coef_max=0.05)
    for i in range(3):  # errors growing away from the targets 1, 0.5, 0.5, 1
        c.update(torch.tensor([0.3 - 0.1 * i, 0.8 + 0.05 * i, 0.8 + 0.05 * i, 0.3 - 0.1 * i]),
                 torch.zeros(4))
    assert c.mean_coefs[1] == 0.05 and c.mean_coefs[0] < -1  # clamped above, free below
    d = GateController("proportional", 4, lr=1.0, coef_max=0.05)
    load_controller(d, controller_state(c))
    for ctrl in (c, d):
        ctrl.update(torch.tensor([0.3, 0.8, 0.8, 0.3]), torch.zeros(4))
    assert torch.equal(c.mean_coefs, d.mean_coefs) and torch.equal(c.var_coefs, d.var_coefs)
    with pytest.raises(ValueError, match="controller"):
        load_controller(GateController("adaptive", 4), controller_state(c))
    with pytest.raises(ValueError, match="controller must be one of"):
        GateController("pid", 4)


def test_controller_loads_the_state_older_checkpoints_saved():
    """Checkpoints written before the rules kept a memory dict saved the EMAs as 'ema'."""
    c = GateController("proportional_derivative", 4)
    c.update(torch.tensor([0.5, 0.9, 0.9, 0.5]), torch.zeros(4))
    old = {k: v for k, v in controller_state(c).items() if k != "memory"}
    old["ema"] = {n: m["ema"] for n, m in c.memory.items()}
    d = GateController("proportional_derivative", 4)
    load_controller(d, old)
    for ctrl in (c, d):
        ctrl.update(torch.tensor([0.4, 0.95, 0.95, 0.4]), torch.zeros(4))
    assert torch.equal(c.mean_coefs, d.mean_coefs) and c.mean_coefs.abs().sum() > 0


@pytest.mark.update
def test_target_controllers_start_at_coef_when_given():
    c = GateController("proportional", 4, coef=0.02, var_coef=-0.01)
    assert c.mean_coefs.tolist() == pytest.approx([0.02] * 4)
    assert c.var_coefs.tolist() == pytest.approx([-0.01] * 4)
    c.update(c.mean_targets + 0.1, c.var_targets)
    assert c.mean_coefs.tolist() == pytest.approx([0.0201] * 4)


@pytest.mark.parametrize("kind", [  # a new rule is tested the moment it exists
    pytest.param(k, marks=pytest.mark.rule if k == "proportional_derivative" else pytest.mark.update)
    for k in M.TARGET_RULES])
def test_every_target_rule_waits_within_tol_and_resumes_exactly(kind, tmp_path):
    """Any rule: an error within tol moves no coefficient, its memory starts empty and is its
    own, and a controller saved with torch.save and loaded back (as train.py's checkpoints are)
    takes the very steps of one that never stopped."""
    c = GateController(kind, 4, lr=0.1)
    assert c.memory == {"mean": {}, "var": {}}
    errors = [[0.3, -0.2, 0.005, 0.0], [0.2, -0.4, -0.008, 0.1], [0.25, -0.1, 0.009, 0.3]]
    for e in errors[:2]:
        c.update(c.mean_targets + torch.tensor(e), c.var_targets - torch.tensor(e))
    torch.save(controller_state(c), tmp_path / "c.pt")
    d = GateController(kind, 4, lr=0.1)
    load_controller(d, torch.load(tmp_path / "c.pt", weights_only=True))
    for ctrl in (c, d):
        ctrl.update(ctrl.mean_targets + torch.tensor(errors[2]), ctrl.var_targets)
    assert torch.equal(c.mean_coefs, d.mean_coefs) and torch.equal(c.var_coefs, d.var_coefs)
    assert c.mean_coefs[2] == 0 and c.mean_coefs.abs().sum() > 0  # layer 2: always within tol


@pytest.mark.update
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
    torch.save(controller_state(c), tmp_path / "c.pt")
    d = GateController("counting", 4, lr=0.01, tol=0)
    load_controller(d, torch.load(tmp_path / "c.pt", weights_only=True))
    assert d.memory["mean"]["n"] == 2 and type(d.memory["mean"]["history"]) is list
    for m in means[2:]:
        c.update(m, c.var_targets)
        d.update(m, d.var_targets)
    assert torch.equal(c.mean_coefs, d.mean_coefs) and c.memory == d.memory


@pytest.mark.update
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
        assert c.mean_coefs.tolist() == pytest.approx((lr * (kp * d + total)).tolist(), abs=1e-6)


# ------------------------------------------------------------------ 9. the pooled variance

def test_gate_moments_by_hand():
    means, squares = gate_moments(GATES.clone().requires_grad_())
    assert means.tolist() == pytest.approx([1.0, 0.5, 0.5, 0.5])
    assert squares.tolist() == pytest.approx([1.0, 0.5, 0.5, 0.5])
    assert not means.requires_grad and means.dtype == torch.float32  # statistics, not a loss
    means, squares = gate_moments(torch.tensor([0.2, 0.4, 0.6, 1.0]).view(1, 2, 2))
    assert means.tolist() == pytest.approx([0.55]) and squares.tolist() == pytest.approx([0.39])


def test_pooled_variance_is_the_variance_of_the_whole_step():
    """Two micro-batches with different means: averaging their E[g] and E[g^2] and then taking
    E[g^2] - E[g]^2 gives the variance of all their gates together (0.1325 for layer 0 here),
    which the mean of the two micro-batches' variances (0.01 here) is not."""
    first = torch.tensor([0.1, 0.3, 0.9, 1.0]).view(2, 1, 2)  # layer 0: 0.1, 0.3; layer 1: 0.9, 1
    second = torch.tensor([0.8, 1.0, 0.0, 0.2]).view(2, 1, 2)
    (m1, s1), (m2, s2) = gate_moments(first), gate_moments(second)
    pooled = pooled_variance((m1 + m2) / 2, (s1 + s2) / 2)
    assert pooled.tolist() == pytest.approx([0.1325, 0.186875])
    assert pooled_variance(torch.tensor([0.3]), torch.tensor([0.09 - 1e-9])).tolist() == [0.0]


# ------------------------------------------------------------------ 10. FLOPs per token

def flops(sparsity=0.0, seq_len=None, **kw):
    return tiny(**kw).flops_per_token(sparsity, seq_len)


@pytest.mark.block
def test_flops_per_token_term_by_term():
    """Each part of the count, found as a difference of two models, against the reference
    code's numbers; then the totals. tiny(): d 32, 4 layers, 4 heads sharing 2 K/V heads,
    vocabulary 64, context 32."""
    def per_block(seq_len=None, **kw):
        return (flops(0.0, seq_len, gated=False, **kw) - flops(1.0, seq_len, gated=False, **kw)) / 4
    parts = {
        "the output head": (flops(gated=False, vocab_size=128) - flops(gated=False), 4096),
        "what every token pays outside the blocks (two norms, the head)":
            (flops(1.0, gated=False), 4352),
        "one block at a context of 32": (per_block(), 36880),
        "a block's terms that grow with the context (scores, softmax, weighted sum)":
            (per_block() - per_block(16), 2368),
        "a block's K and V (their projections and rotary), as K/V heads go from 2 to 4":
            (per_block(n_kv_head=4) - per_block(), 2096),
        "the gate heads": (flops() - flops(gated=False), 136),
        "the keys and values of skipped pairs when closed keys stay visible":
            (flops(0.5, hide_closed_keys=False) - flops(0.5), 4448),
    }
    for term, (got, want) in parts.items():
        assert got == want, f"{term}: counted {got:g}, the reference counts {want:g}"
    assert flops() == flops(seq_len=32) == 152008  # the context is block_size unless given
    assert flops(0.5) == 78248 and flops(0.25, seq_len=16) == 108024
    assert flops(gated=False) == 151872 and flops(0.5, gated=False) == 78112


@pytest.mark.block
def test_flops_per_token_properties():
    """Linear in the sparsity: everything but the blocks' share is paid by every token; the gate
    heads cost the gated model its only extra work at sparsity 0; attention grows with the
    context."""
    head_and_norms, blocks = flops(1.0), flops(0.0) - flops(1.0)
    for s in (0.1, 0.3, 0.9):
        assert flops(s) == pytest.approx(head_and_norms + (1 - s) * blocks)
    assert 0 < flops() - flops(gated=False) < 0.01 * flops()
    assert flops(seq_len=32) > flops(seq_len=16)
    assert head_and_norms > 2 * 32 * 64  # the output head alone: 2 flops per multiply-add


def test_flops_per_token_counts_the_matmuls_torch_counts():
    """torch's FlopCounterMode counts the matmuls of a forward pass through the plain attention,
    module by module. On top of those, flops_per_token adds elementwise work (norms, rotary,
    softmax, silu, gate products; saved here from the reference code): 1,744 per block at a
    context of 16, 256 for the input and output norms, and 4 per gate head's output."""
    from torch.utils.flop_counter import FlopCounterMode
    T = 16
    for gated in (False, True):
        m = skipping.use_plain(tiny(gated=gated, block_size=T))  # attention(): matmuls to see
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(torch.randint(0, V, (1, T)))
        matmuls = {k: sum(v.values()) / T for k, v in counter.get_flop_counts().items()}
        blocks = m.flops_per_token(0.0, seq_len=T) - m.flops_per_token(1.0, seq_len=T)
        assert blocks == 4 * (matmuls["GPT.blocks.0"] + 1744)
        heads = 2 * (matmuls["GPT.gate_heads.0"] + 4) if gated else 0
        assert m.flops_per_token(1.0, seq_len=T) == matmuls["GPT.lm_head"] + 256 + heads
        assert m.flops_per_token(0.5, seq_len=T) == m.flops_per_token(1.0, seq_len=T) + blocks / 2
