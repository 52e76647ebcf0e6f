"""Tests of skipping.py: every way it computes a model's function with less compute gives what
model.py's plain definition gives -- the fused attention kernel, packed rows (skip=True), the
KV cache with prefill and decoding that skip -- with gradients, sharp attention and bfloat16;
and the skipped (token, layer) pairs are really not computed. Also generation (CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

import model as M
import skipping as S
from model import attention
from models import (V, decode_without_cache, mixed_batches, mixed_gates_model, peaked_model,
                    random_gates_model, skip_tokens_model, tiny)
from skipping import KVCache, causal_attention, sample_next


# ------------------------------------------------------------------ 1. the fused kernel

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_attention_equals_the_plain_one_with_gradients(dtype):
    """causal_attention against model.attention: outputs and the gradients of q, k, v and the
    key bias, with closed keys and open ones; and with a bias of 0 everywhere, which takes the
    plain causal kernel and passes no gradient to the bias (in a model, gates of exactly 1
    have none: relu's gradient is 0 where it is 0)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 24, 16), torch.randn(2, 2, 24, 16), torch.randn(2, 2, 24, 16)
    g = torch.rand(2, 24).masked_fill(torch.rand(2, 24) < 0.3, 0.0)
    for bias in (M.gate_bias(g, 1e-6), torch.zeros(2, 24)):
        results = []
        for fn in (attention, causal_attention):
            inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)] + [bias.clone().requires_grad_()]
            out = fn(*inputs)
            out.float().pow(2).sum().backward()
            grads = inputs if bias.any() else inputs[:3]
            results.append([out.float()] + [t.grad.float() for t in grads])
        tol = 1e-4 if dtype == torch.float32 else 6e-2
        for a, b in zip(*results):
            assert torch.allclose(a, b, atol=tol, rtol=tol)
    one = causal_attention(q[:, :, -1:], k, v, M.gate_bias(g, 1e-6))  # decoding: a single query
    assert torch.allclose(one, attention(q[:, :, -1:], k, v, M.gate_bias(g, 1e-6)), atol=1e-5)


def test_plain_definitions_compute_what_the_fast_paths_compute(monkeypatch):
    """use_plain(model): model.attention itself runs (a spy counts its calls), no packing, no
    KV cache; its logits, gates and gradients equal those of the fused kernel, of packed rows
    (skip=True) and of the masked path, and greedy generation gives the same tokens and gates."""
    calls = []
    monkeypatch.setattr(M, "attention", lambda *a: calls.append(1) or attention(*a))
    monkeypatch.setattr(S, "KVCache", lambda *a, **k: calls.append("cache") or KVCache(*a, **k))
    m = random_gates_model()
    idx = torch.randint(0, V, (3, 32))
    results = []
    for plain, skip in ((True, False), (True, True), (False, False), (False, True)):
        S.use_plain(m, plain).zero_grad()
        calls.clear()
        logits, loss, gates = m(idx, idx.roll(-1, 1), skip=skip)
        loss.backward()
        assert len(calls) == (4 if plain else 0)  # one plain attention per layer, or none
        results.append([logits, gates] + [p.grad for p in m.parameters()])
    assert 0 < (results[0][1] == 0).float().mean() < 1
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    outputs = []
    for plain in (True, False):
        calls.clear()
        out, gates = S.generate(S.use_plain(m, plain), idx[:, :8], 12, temperature=0, return_gates=True,
                                cached=not plain)
        assert ("cache" in calls) != plain and (1 in calls) == plain
        outputs.append((out, gates))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.allclose(outputs[0][1], outputs[1][1], atol=1e-5)


# ------------------------------------------------------------------ 2. packed rows

def one_block_with_gates(B=3, T=24):
    """Block 0 of tiny(), a stream x (B, T, d), and gates g (B, T, 1): in row 0 every third token
    closed, in row 1 every other one, in row 2 all but the first; and their key bias."""
    m = random_gates_model()
    torch.manual_seed(5)
    x = torch.randn(B, T, 32)
    g = torch.rand(B, T, 1) * 0.9 + 0.1
    g[0, 1::3] = 0.0
    g[1, 1::2] = 0.0
    g[2, 1:] = 0.0
    return m, x, g, M.gate_bias(g.squeeze(-1), 1e-6)


@pytest.mark.packed_rows
@pytest.mark.parametrize("bucket", [1, S.SKIP_BUCKET])
def test_packed_rows_compute_the_masked_block_with_gradients(monkeypatch, bucket):
    """The layer on packed rows equals the block on every token (closed ones hidden by their key
    bias): outputs, and gradients of the stream, the open gates and the weights (a closed gate
    has none on packed rows: in a model the clamp that closed it has none either); a closed
    token keeps its stream exactly; and the block really ran on fewer than T tokens per row."""
    monkeypatch.setattr(S, "SKIP_BUCKET", bucket)
    m, x, g, bias = one_block_with_gates()
    block, cos, sin = m.blocks[0], m.rope_cos[:24], m.rope_sin[:24]
    lengths = []
    hook = block.ffn.register_forward_hook(lambda mod, inp, out: lengths.append(inp[0].size(1)))
    results = []
    for packed in (False, True):
        block.zero_grad()
        xs, gs = x.clone().requires_grad_(), g.clone().requires_grad_()
        run = S.active_tokens_layer if packed else block
        out = run(block, xs, cos, sin, gs, bias) if packed else run(xs, cos, sin, gs, bias)
        out.pow(2).sum().backward()
        results.append([out, xs.grad, gs.grad[g > 0]] + [p.grad for p in block.parameters()])
    hook.remove()
    assert lengths[0] == 24 and lengths[1] == -(-int((g > 0).sum(1).max()) // bucket) * bucket < 24
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    closed = (g == 0).squeeze(-1)
    assert torch.equal(results[1][0][closed], x[closed])


@pytest.mark.packed_rows
def test_packed_rows_keep_each_tokens_key_and_value_at_its_position():
    """Prefill with a KV cache: the packed layer stores the keys and values of the open tokens
    in their own slots, as the block on every token does."""
    m, x, g, bias = one_block_with_gates()
    block, cos, sin = m.blocks[0], m.rope_cos[:24], m.rope_sin[:24]
    caches = [KVCache(m, 3, 24, "cpu") for _ in range(2)]
    with torch.no_grad():
        block(x, cos, sin, g, bias, caches[0].keeper(0))
        S.active_tokens_layer(block, x, cos, sin, g, bias, caches[1], 0)
    open_ = (g > 0).view(3, 24)
    for kv in ("k", "v"):
        full, packed = (getattr(c, kv)[0].transpose(1, 2)[open_] for c in caches)  # (open, H_kv, hd)
        assert torch.allclose(full, packed, atol=1e-5) and packed.abs().sum() > 0


@pytest.mark.parametrize("bucket", [1, S.SKIP_BUCKET])
@pytest.mark.parametrize("batch", ["mixed", "middle skipped"])
def test_skip_path_equals_masked_path_with_gradients(monkeypatch, bucket, batch):
    monkeypatch.setattr(S, "SKIP_BUCKET", bucket)
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
    monkeypatch.setattr(S, "SKIP_BUCKET", 1)
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


def masked_vs_skip(m, idx):
    """Largest logit difference between the masked path and skip=True, and the gates."""
    with torch.no_grad():
        a, _, gates = m(idx)
        b, _, _ = m(idx, skip=True)
    return (a - b).abs().max().item(), gates


def cached_logits(m, idx, prompt):
    """Last-position logits of the prompt's prefill and of each token decoded after it (B, n, V)."""
    cache = KVCache(m, idx.size(0), idx.size(1), idx.device)
    with torch.no_grad():
        steps = [S.cached_forward(m, idx[:, :prompt], cache)[0]]
        steps += [S.cached_forward(m, idx[:, t:t + 1], cache)[0] for t in range(prompt, idx.size(1))]
    return torch.cat(steps, 1)


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
    assert (cached_logits(m, idx, 16) - full[:, 15:]).abs().max() < 1e-4
    # the same check fails when a closed key is only biased by log(gate_eps), as it once was
    monkeypatch.setattr(M, "CLOSED", math.log(1e-6))
    assert masked_vs_skip(m, idx)[0] > 1e-2


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
    assert ((24 - n_skipped) > 24 - S.SKIP_BUCKET) == (n_skipped == 3)  # which path each takes
    assert torch.equal(a[~skipped], b[~skipped])


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


# ------------------------------------------------------------------ 3. the KV cache

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
    out, gates = S.generate(m, prompt, 26, temperature=temperature, return_gates=True,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, decode_without_cache(m, prompt, 26, temperature, torch.Generator().manual_seed(0)))
    if gated:
        assert (gates[:, :, 6:] == 0).any(), "decoded tokens must skip some layers"
        _, _, full_gates = m(out)
        assert torch.equal(gates, full_gates)
    if temperature > 0:  # sampling visits skip tokens often
        assert 0.2 < (gates[:, :, 6:] == 0).float().mean() < 0.8


def test_decoding_computes_only_the_pairs_that_run():
    m = many_zero_gates_model()
    seq = torch.randint(0, V, (3, 32))
    with torch.no_grad():
        full_logits, _, full_gates = m(seq)
        cache = KVCache(m, 3, 32, seq.device)
        S.cached_forward(m, seq[:, :8], cache, skip=False)
        calls = []
        for block in m.blocks:  # count rows that reach each layer's Q/K/V projection
            block.attn.wq.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].size(0)))
        step_logits = [S.cached_forward(m, seq[:, t:t + 1], cache)[0] for t in range(8, 32)]
    assert torch.allclose(torch.cat(step_logits, 1), full_logits[:, 8:], atol=1e-4)
    assert 0.2 < (full_gates[:, :, 8:] == 0).float().mean() < 0.8
    ran = (full_gates[:, :, 8:] > 0).sum().item()
    assert sum(calls) == ran < full_gates[:, :, 8:].numel(), "skipped (token, layer) pairs must not be computed"


def test_prefill_skips_exactly_as_decoding_does():
    """Prefill with skip fills the cache as decoding would: a (token, layer) whose gate is 0
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
            caches[skip] = KVCache(m, 4, 32, seq.device)
            _, gates = S.cached_forward(m, seq[:, :P], caches[skip], skip)
            assert torch.allclose(gates, full_gates[:, :, :P], atol=1e-5)
        step_logits = []
        for t in range(P, 32):
            logits, gates = S.cached_forward(m, seq[:, t:t + 1], caches[True])
            assert torch.allclose(gates.squeeze(-1), full_gates[:, :, t], atol=1e-5)
            step_logits.append(logits)
    assert torch.allclose(torch.cat(step_logits, 1), full_logits[:, P:], atol=1e-4)
    runs = full_gates[:, :, :P] > 0
    longest = runs.sum(2).max(1).values.tolist()
    assert longest[0] == P and 0 < longest[1] <= P - S.SKIP_BUCKET and longest[2] == 0
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
    out, gates = S.generate(m, prompt, 12, temperature=temperature, return_gates=True,
                            generator=torch.Generator().manual_seed(0))
    assert (gates[:, :, :20] == 0).any() and (gates[:, :, :20] > 0).any()
    expected = decode_without_cache(m, prompt, 12, temperature, torch.Generator().manual_seed(0))
    assert torch.equal(out, expected)
    assert torch.allclose(gates, m(out)[2], atol=1e-5)
    again = S.generate(m, prompt, 12, temperature=temperature, skip=False,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


@pytest.mark.parametrize("n_layer", [4, 6])
def test_greedy_generate_equals_greedy_full_forwards_with_sharp_attention(monkeypatch, n_layer):
    m = peaked_model(n_layer)
    prompt = torch.cat([torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(s))
                        for s in (2, 4)])
    out, gates = S.generate(m, prompt, 40, temperature=0, return_gates=True)
    assert (gates[:, :, 8:] == 0).float().mean() > 0.2  # the new tokens do skip
    assert torch.equal(out, decode_without_cache(m, prompt, 40, 0.0, None))
    # the same check fails when a closed key is only biased by log(gate_eps), as it once was
    monkeypatch.setattr(M, "CLOSED", math.log(1e-6))
    assert not torch.equal(S.generate(m, prompt, 40, temperature=0),
                           decode_without_cache(m, prompt, 40, 0.0, None))


def test_sampling_is_seeded_and_respects_top_k_top_p():
    m = tiny()
    prompt = torch.randint(0, V, (2, 4))
    a = S.generate(m, prompt, 10, generator=torch.Generator().manual_seed(3))
    b = S.generate(m, prompt, 10, generator=torch.Generator().manual_seed(3))
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
        out = S.generate(m, prompt, 30, temperature=0)
    assert out.shape == (2, 32 + 30) and torch.equal(out[:, :32], prompt[:, -32:])
    kept = out[:, 33 - 16:33]  # the first new token filled the context; the last 16 are kept
    assert torch.equal(out[:, 17:], S.generate(m, kept, 30 - 1, temperature=0))


def test_padding_ids_are_never_sampled():
    """vocab_size 64 with a 50-token vocabulary: ids 50-63 are padding. Even when their logits
    are the largest by far, neither greedy nor sampled decoding ever emits one."""
    m = tiny()
    with torch.no_grad():
        m.lm_head.weight[50:] = 10 * m.lm_head.weight[:14].sign()
        logits, _, _ = m(torch.randint(0, 50, (2, 8)))
    assert (logits.argmax(-1) >= 50).all()  # the padding logits do dominate
    prompt = torch.randint(0, 50, (3, 4))
    for kw in (dict(temperature=0), dict(temperature=1.0), dict(temperature=2.0, top_k=60),
               dict(temperature=1.0, top_p=0.99)):
        out = S.generate(m, prompt, 40, generator=torch.Generator().manual_seed(0), vocab_size=50,
                         **kw)
        assert out.max() < 50, kw
