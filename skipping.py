"""
How to compute model.py's function with less compute. Nothing here changes what a model
computes: model.py is the definition, and tests/test_skipping.py holds every path here equal
to it, also with sharp attention and in bfloat16.

1. causal_attention: model.attention with its key bias, on SDPA's fused causal kernel.
2. Packed rows: model(idx, skip=True) runs each layer only on the tokens whose gate is above
   0; skipped tokens keep their stream and are absent from the layer's attention.
3. The KV cache: a prompt (prefill) and then one token at a time (decoding), each running only
   the layers its gates leave open; and generate(), which samples with it.

model.py calls this module, which needs only torch: the model, its blocks, gates and key biases
come in as arguments, so the gate rule and the gated residual are written once, in model.py.
use_plain(model) turns the fused kernel off; skip=False and generate(cached=False) the rest.
"""
import functools
import warnings

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- 1. the fused kernel

BIAS_CHANNELS = 8  # extra channels that carry the key bias into SDPA's fused kernel


def causal_attention(q, k, v, key_bias=None):
    """model.attention, fast, for queries and keys of one length (whole sequences) or a single
    query (decoding). SDPA's fused kernels take no gradient for a float mask (one would send
    SDPA to its slow unfused path), so the bias rides in extra channels instead: q gains
    sqrt(hd), k gains the bias, so q.k / sqrt(hd) gains exactly the bias. v gains zeros (the
    kernels want one head dim; 8 channels, as CUDA's want multiples of 8)."""
    if q.size(2) == 1:  # one query sees every key: no causal mask, and no gradient is needed
        mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if key_bias is None or (not torch.compiler.is_compiling() and not bool(key_bias.ne(0).any())):
        # A bias of 0 everywhere means every gate is exactly 1: each gate head's relu sat at or
        # below 0, where relu has no gradient, so the bias has none either. (The check is a host
        # sync, which compiled graphs leave out.)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    hd = q.size(-1)
    extra_q = F.pad(q.new_full((*q.shape[:-1], 1), hd ** 0.5), (0, BIAS_CHANNELS - 1))
    extra_k = F.pad(key_bias[:, None, :, None].expand(-1, k.size(1), -1, 1), (0, BIAS_CHANNELS - 1))
    heads = F.scaled_dot_product_attention(
        torch.cat([q, extra_q], -1), torch.cat([k, extra_k.to(k.dtype)], -1),
        F.pad(v, (0, BIAS_CHANNELS)), is_causal=True, scale=hd ** -0.5, enable_gqa=True)
    return heads[..., :hd]


# ---------------------------------------------------------------- 2. packed rows

SKIP_BUCKET = 8  # packed lengths round up to a multiple of this


def active_tokens_layer(block, x, cos, sin, g, key_bias, cache=None, i=None):
    """block(x, cos, sin, g, key_bias) computed only for the tokens whose gate g (B, T, 1) is
    above 0, with one host sync. With a KV cache (prefill), also keeps layer i's keys and values
    in it. Under torch.compile this runs in Python and compiles what it calls: traced, its host
    sync and branches would make a graph per layer and branch."""
    run = _active_tokens_in_python if torch.compiler.is_compiling() else _active_tokens
    return run(block, x, cos, sin, g, key_bias, cache, i)


def _active_tokens(block, x, cos, sin, g, key_bias, cache, i):
    T = x.size(1)
    keep = None if cache is None else cache.keeper(i)
    active = g.squeeze(-1) > 0  # (B, T)
    # the layer's one host sync: its longest row of active tokens, and how many gates are below 1
    longest, n_below_one = torch.stack([active.sum(1).max(), (g < 1).sum()]).tolist()
    if n_below_one == 0:  # every gate 1: nothing to leave out, no bias (see causal_attention)
        return block(x, cos, sin, g, None, keep)
    n = -(-longest // SKIP_BUCKET) * SKIP_BUCKET  # the packed length
    if n >= T:  # packing would save nothing: every token, closed keys hidden by their bias
        return block(x, cos, sin, g, key_bias, keep)
    if n == 0 and not torch.is_grad_enabled():
        return x  # the whole batch skips this layer: nothing runs
    # in training, a layer nobody runs still runs one padding slot (g = 0): its weights get zero
    # gradients, as on the masked path, not None (which AdamW and DDP would treat differently)
    return run_packed(block, x, cos, sin, g, key_bias, active, max(n, 1), cache, i)


# torch._disable_dynamo is torch.compiler.disable without importing torch._dynamo (seconds of
# start-up) before a compiled model first calls it
_active_tokens_in_python = torch._disable_dynamo(_active_tokens, recursive=False)


def run_packed(block, x, cos, sin, g, key_bias, active, n, cache=None, i=None):
    """The block on rows of n packed tokens: each row's active tokens (B, T) in order, then
    skipped ones as padding, each with its own rotary position, gate and key bias; the results
    go back to their places in x. With a cache, the block keeps the packed tokens' keys and
    values at their own positions."""
    B, T, d = x.shape
    pos = torch.argsort(~active, dim=1, stable=True)[:, :n]  # (B, n) positions in x
    flat = (pos + T * torch.arange(B, device=x.device)[:, None]).view(-1)  # rows of x (B*T, d)
    xp = x.reshape(B * T, d)[flat].view(B, n, d)
    gp = g.view(B * T, 1)[flat].view(B, n, 1)
    keep = None if cache is None else cache.keeper(i, pos)
    out = block(xp, cos[pos][:, None], sin[pos][:, None], gp, key_bias.gather(1, pos), keep)
    return x.reshape(B * T, d).index_copy(0, flat, out.reshape(B * n, d)).view(B, T, d)


# ---------------------------------------------------------------- 3. the KV cache

class KVCache:
    """Keys and values (B, n_kv_head, size, head_dim) of every layer, stored once per K/V head,
    and each slot's key bias (B, size), for a request of `size` tokens; `length` are filled."""

    def __init__(self, model, batch, size, device):
        cfg = model.config
        hd, dtype = cfg.n_embd // cfg.n_head, model.lm_head.weight.dtype
        if torch.is_autocast_enabled(torch.device(device).type):  # K and V come in this dtype
            dtype = torch.get_autocast_dtype(torch.device(device).type)
        self.size, self.length = size, 0
        shape = (batch, cfg.n_kv_head, size, hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.bias = ([torch.zeros(batch, size, device=device) for _ in range(cfg.n_layer)]
                     if cfg.gated and cfg.hide_closed_keys else None)

    def keeper(self, i, positions=None):
        """An Attention hook for a prompt: keeps layer i's keys and values (at positions (B, n)
        of the prompt, or all of them in order) and hands them back for the prompt's attention."""
        def keep(k, v, key_bias):
            if positions is None:
                span = slice(self.length, self.length + k.size(2))
                self.k[i][:, :, span], self.v[i][:, :, span] = k, v
            else:
                slots = (self.length + positions)[:, None, :, None].expand_as(k)
                self.k[i].scatter_(2, slots, k)
                self.v[i].scatter_(2, slots, v)
            return k, v, key_bias
        return keep

    def reader(self, i, rows, pos):
        """An Attention hook for decoding: stores the new token's key and value (one per row of
        `rows`) at pos, and hands back layer i's keys, values and key biases up to it."""
        def read(k, v, key_bias):
            self.k[i][rows, :, pos], self.v[i][rows, :, pos] = k[:, :, 0], v[:, :, 0]
            bias = None if self.bias is None else self.bias[i][rows, :pos + 1]
            return self.k[i][rows, :, :pos + 1], self.v[i][rows, :, :pos + 1], bias
        return read


def cached_forward(model, idx, cache, skip=True):
    """model(idx) for the next T positions of a KV cache, from cache.length: a prompt (prefill) or
    one new token per row (decoding). Returns the logits of the last position (B, 1, V) and the
    gates (L, B, T) (None for a dense model)."""
    positions = slice(cache.length, cache.length + idx.size(1))
    x = model.norm_in(model.tok_emb(idx))
    layer = functools.partial(cached_layer, model=model, cache=cache, skip=skip,
                              cos=model.rope_cos[positions], sin=model.rope_sin[positions])
    x, gates = model.run_layers(x, layer)
    cache.length = positions.stop
    return model.lm_head(model.norm_out(x[:, -1:])), (torch.stack(gates).squeeze(-1) if gates
                                                        else None)


def cached_layer(i, block, x, g, model, cache, skip, cos, sin):
    """Layer i of a pass with a KV cache. With skip, a (token, layer) whose gate is 0 gets no Q,
    K, V, attention or FFN; its slot keeps its closed key bias, which hides it from later tokens.
    With closed keys visible (no key bias) a skipped token still gets its key and value there."""
    B, T, _ = x.shape
    pos, key_bias = cache.length, model.key_bias(g)
    if cache.bias is not None:
        cache.bias[i][:, pos:pos + T] = key_bias
    if T > 1:  # prefill: a whole-sequence pass that also fills the cache
        if skip and key_bias is not None:
            return active_tokens_layer(block, x, cos, sin, g, key_bias, cache, i)
        return block(x, cos, sin, g, key_bias, cache.keeper(i))
    rows = slice(None)  # decoding: the rows of the batch that run this layer
    if skip and torch.is_tensor(g):
        active = g.view(B) > 0
        n_active = int(active.sum())  # one host sync per layer
        if n_active < B:
            if key_bias is None:  # keys visible: a skipped token's key and value, nothing else
                idle = (~active).nonzero().squeeze(1)
                k, v = block.attn.kv(block.attn_pre(x[idle]), cos, sin)
                cache.k[i][idle, :, pos], cache.v[i][idle, :, pos] = k[:, :, 0], v[:, :, 0]
            if n_active == 0:
                return x  # the whole batch skips this layer
            rows = active.nonzero().squeeze(1)
            g = g[rows]
    x[rows] = block(x[rows], cos, sin, g, None, cache.reader(i, rows, pos))
    return x


def use_plain(model, plain=True):
    """plain: every layer runs model.attention itself rather than causal_attention. (Packing and
    the cache are the caller's: model(idx, skip=False), generate(cached=False).)"""
    for block in model.blocks:
        block.attn.fast = not plain
    return model


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next token ids (B, 1) from last-position logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix that reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             generator=None, return_gates=False, skip=True, cached=True, vocab_size=None):
    """Sample max_new_tokens after the prompt idx (B, T) with a KV cache: the prompt in one pass,
    then a token at a time, each running only the layers outside its skipped span. temperature 0
    is greedy; ids from vocab_size up (padding) are never sampled. With return_gates, also the
    gates (L, B, T_out) of every position (None for a dense model). When the context reaches
    block_size, the last block_size/2 tokens are read again and decoding goes on. skip=False
    runs every layer for every token; cached=False is the plain way, a full forward pass over
    the last block_size tokens for each new one."""
    cfg = model.config
    if idx.size(1) > cfg.block_size:
        warnings.warn(f"prompt of {idx.size(1)} tokens cropped to its last "
                      f"block_size={cfg.block_size}")
        idx = idx[:, -cfg.block_size:]
    steps = max_new_tokens + (1 if return_gates else 0)  # one more pass: the last token's gates
    cache = None
    if cached:
        cache = KVCache(model, idx.size(0), min(cfg.block_size, idx.size(1) + steps), idx.device)
        logits, gates = cached_forward(model, idx, cache, skip)
    else:
        logits, _, gates = model(idx)
    all_gates = [gates]
    for step in range(max_new_tokens):
        logits = logits[:, -1]
        if vocab_size is not None and vocab_size < logits.size(-1):
            logits[:, vocab_size:] = float("-inf")  # padding ids
        next_id = sample_next(logits, temperature, top_k, top_p, generator)
        idx = torch.cat([idx, next_id], dim=1)
        if step == max_new_tokens - 1 and not return_gates:
            break
        if cache is None:  # the whole context again
            logits, _, gates = model(idx[:, -cfg.block_size:])
            gates = None if gates is None else gates[:, :, -1:]
        elif cache.length == cache.size:  # context full: slide to the last half, read it again
            cache = KVCache(model, idx.size(0), cfg.block_size, idx.device)
            logits, gates = cached_forward(model, idx[:, -(cfg.block_size // 2):], cache, skip)
            gates = None if gates is None else gates[:, :, -1:]
        else:
            logits, gates = cached_forward(model, next_id, cache, skip)
        all_gates.append(gates)
    if not return_gates:
        return idx
    return idx, (torch.cat(all_gates, dim=2) if cfg.gated else None)
