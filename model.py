"""
A transformer that learns to skip its middle layers: T. Lawson and L. Aitchison, "Learning
to Skip the Middle Layers of Transformers" (2025), https://arxiv.org/abs/2506.21103.

Read top to bottom: config, RMSNorm, rotary embeddings, attention, SwiGLU, the
sandwich-norm block, a block run on only the tokens that do not skip it, the model with its
gate heads, generation with a KV cache that really skips layers, and the gate regularizer with its
controllers. (Checkpoints, ours and the authors' released models, are in checkpoints.py.)

The idea in one picture (L = 6 layers, one token):

    layer:   0     1     2     3     4     5
    gate:   g0    g1    g2    g2    g1    g0      g0 >= g1 >= g2, each in [0, 1]

Gate heads read the residual stream entering layers 0 .. L/2-1 and accumulate
m_i = relu(w_i . h_i + b_i) + m_{i-1};  g_i = 1 - clamp(m_i, 0, 1).  Layer L-1-i reuses
g_i, so once g_i hits 0 the token skips the whole symmetric span [i, L-1-i]: the layer
adds nothing to it and no other token may attend to its key there.
"""

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # FlexAttention fuses the key-indexed gate bias into the attention kernel on GPUs
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    flex_attention = None


class ConfigError(ValueError):
    """A GPTConfig or GateController setting that cannot work; the message names it."""


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # rows of the embedding and the logits, padding ids included
    data_vocab_size: int = 0  # the tokenizer's vocabulary: ids from here up are padding and
    #                           are never sampled (0: no padding)
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12
    n_embd: int = 768
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    gated: bool = True
    # "normal": N(0, 0.02) gate heads (the paper's gated runs). "zero": w = b = 0 gives g = 1
    # everywhere, a dense start -- but relu'(0) = 0, so zero-init heads get no gradient and
    # stay dense forever. Offered for experiments on a dense starting point, not for training.
    gate_init: str = "normal"
    gate_eps: float = 1e-6  # attention key bias is log(max(g, gate_eps))
    # True: a closed gate also hides its token's key from the other tokens (the method as the
    # paper states it). False: keys stay visible and only the updates are gated, which is how
    # the authors' released models were trained (their bias, added at the query, changed nothing)
    hide_closed_keys: bool = True
    rope_scaling: bool = False  # Llama 3.1's rotary frequency scaling, if a released model has it
    attn_backend: str = "auto"  # "auto" (FlexAttention on CUDA when gated), "sdpa", "flex"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            self._need(name, getattr(self, name) > 0, "must be positive")
        self._need("data_vocab_size", 0 <= self.data_vocab_size <= self.vocab_size,
                   f"must be in [0, vocab_size={self.vocab_size}]")
        self._need("n_embd", self.n_embd % self.n_head == 0, f"must divide by n_head={self.n_head}")
        self._need("n_kv_head", self.n_head % self.n_kv_head == 0, f"must divide n_head={self.n_head}")
        self._need("n_head", self.n_embd // self.n_head % 2 == 0,
                   f"must leave an even head dim n_embd/n_head for rotary (n_embd={self.n_embd})")
        self._need("n_layer", not self.gated or self.n_layer % 2 == 0, "must be even when gated")
        self._need("gate_init", self.gate_init in ("normal", "zero"), "must be 'normal' or 'zero'")
        self._need("attn_backend", self.attn_backend in ("auto", "sdpa", "flex") and (
            self.attn_backend != "flex" or flex_attention), "must be auto, sdpa or flex (torch >= 2.6)")
        self._need("gate_eps", self.gate_eps > 0, "must be positive")

    def _need(self, field, ok, rule):
        if not ok:
            raise ConfigError(f"GPTConfig.{field} {rule}, got {getattr(self, field)!r}")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, scale=None):
        """x (..., d) normalized and weighted, in x's dtype. scale (..., 1), if given, multiplies
        each row too: a gate, folded into the per-row factor the norm computes anyway, which
        costs a (B, T, 1) multiply where a gate times the output would cost a (B, T, d) one."""
        x32 = x.float()  # fp32 even under bf16 autocast: the mean of squares needs the range
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        y = x32 * (r if scale is None else r * scale)
        return (y * self.weight.float()).type_as(x)


def rotary_tables(head_dim, length, theta, scaling=False):
    """cos/sin tables of shape (length, head_dim) for the rotate-half form of RoPE. scaling:
    Llama 3.1's frequency scaling (factor 8 for wavelengths over 8192 positions, none under
    2048, a smooth blend between), as the authors' code offers it."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    if scaling:
        wavelen = 2 * math.pi / inv_freq
        blend = ((8192 / wavelen - 1) / 3).clamp(0, 1)  # 0 at 8192 positions, 1 at 2048
        inv_freq = (1 - blend) * inv_freq / 8 + blend * inv_freq
    angles = torch.outer(torch.arange(length).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x: (B, H, T, hd); cos/sin: (T, hd) for the positions of x, or (B, 1, T, hd) when packed
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


CLOSED = -1e4  # the attention bias of a closed gate's key (see gate_bias)


def gate_bias(g, eps):
    """The attention bias of a key whose gate is g, added to every query's score on it:
    log(max(g, eps)) for an open gate (differentiable: the gate heads learn from what hiding a
    key does to other tokens), CLOSED for a closed one (g = 0). Its softmax weight exp(-1e4 +
    a score gap) is then 0 exactly (fp32, bf16, fp16; gaps under ~9,900): the key is as absent
    as real skipping makes it, where log(1e-6) = -14 alone would leak through sharp heads. A
    finite bias rather than -inf leaves no softmax row empty."""
    return torch.log(g.clamp_min(eps)).masked_fill(g == 0, CLOSED)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


_causal_block_masks = {}  # eager code's FlexAttention block masks, one per (length, device)


def causal_block_mask(T, device):
    """FlexAttention's causal block mask for length T: made inside the graph in traced code
    (a compiled model keeps no state for guards to watch), kept per length in eager code."""
    if torch.compiler.is_compiling():
        return create_block_mask(causal, None, None, T, T, device=device)
    if (T, str(device)) not in _causal_block_masks:
        _causal_block_masks[(T, str(device))] = create_block_mask(causal, None, None, T, T,
                                                                  device=device)
    return _causal_block_masks[(T, str(device))]


@functools.cache
def compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_kernel(device):
    """The FlexAttention to call: in traced code plain flex_attention, which the graph fuses; in
    eager code on CUDA the compiled kernel (FlexAttention is fused only when compiled), made once
    and never inside a trace, where torch.compile would be a no-op; on CPUs the eager reference."""
    if torch.compiler.is_compiling() or device.type != "cuda":
        return flex_attention
    return compiled_flex()


def flex_causal_with_key_bias(q, k, v, key_bias):
    """Causal attention with score[b, h, q, k] += key_bias[b, k], fused by FlexAttention."""
    score_mod = lambda score, b, h, q_idx, kv_idx: score + key_bias[b, kv_idx]
    return flex_kernel(q.device)(q, k, v, score_mod=score_mod, enable_gqa=True,
                                 block_mask=causal_block_mask(q.size(2), q.device))


BIAS_CHANNELS = 8  # extra channels that carry the key bias into SDPA's fused kernel


def sdpa_causal_with_key_bias(q, k, v, key_bias):
    """Causal attention (B, H, T, hd) with score[b, h, q, k] += key_bias[b, k] on SDPA's fused
    causal kernel (a float mask that needs a gradient would send SDPA to its unfused path): q
    gains a channel sqrt(hd) and k one with the bias, so q.k / sqrt(hd) gains the bias. v gains
    zeros, as the kernels want one head dim; 8 channels, as CUDA's want multiples of 8."""
    hd, extra = q.size(-1), BIAS_CHANNELS
    extra_q = F.pad(q.new_full((*q.shape[:-1], 1), hd ** 0.5), (0, extra - 1))
    extra_k = F.pad(key_bias[:, None, :, None].expand(-1, k.size(1), -1, 1), (0, extra - 1))
    heads = F.scaled_dot_product_attention(
        torch.cat([q, extra_q], -1), torch.cat([k, extra_k.to(k.dtype)], -1),
        F.pad(v, (0, extra)), is_causal=True, scale=hd ** -0.5, enable_gqa=True)
    return heads[..., :hd]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def qkv(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        return (apply_rotary(q, cos, sin), *self.kv(x, cos, sin))

    def kv(self, x, cos, sin):
        B, T, _ = x.shape
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, key_bias=None, backend="sdpa"):
        """Causal self-attention. Returns the heads (B, H, T, hd) before the output projection
        and the keys and values (for a cache). key_bias (B, T) (see gate_bias) is added to the
        score of every query on key position k -- indexed by the KEY, so a gate of 0 at k hides k
        from everyone. (Indexed by the query it would be constant along each softmax row, which
        softmax ignores: it would change nothing.) key_bias None: plain causal attention."""
        q, k, v = self.qkv(x, cos, sin)
        if key_bias is None:
            heads = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif backend == "flex":
            heads = flex_causal_with_key_bias(q, k, v, key_bias.float())
        else:
            heads = sdpa_causal_with_key_bias(q, k, v, key_bias)
        return heads, k, v


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = 4 * cfg.n_embd
        self.w1 = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.n_embd, bias=False)
        self.w3 = nn.Linear(cfg.n_embd, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Sandwich-norm ("peri-LN") block: each sublayer's input AND output are normalized
    before the output joins the residual stream; the gate g (B, T, 1) scales both updates."""

    def __init__(self, cfg):
        super().__init__()
        d, eps = cfg.n_embd, cfg.norm_eps
        self.attn_pre, self.attn_post = RMSNorm(d, eps), RMSNorm(d, eps)
        self.ffn_pre, self.ffn_post = RMSNorm(d, eps), RMSNorm(d, eps)
        self.attn = Attention(cfg)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin, g=None, key_bias=None, backend="sdpa"):
        """The new stream, and this layer's keys and values."""
        heads, k, v = self.attn(self.attn_pre(x), cos, sin, key_bias, backend)
        return self.finish(x, heads, g), (k, v)

    def finish(self, x, heads, g):
        """Everything after the attention scores: output projection, FFN, gated residuals."""
        B, H, T, hd = heads.shape
        x = x + self.attn_post(self.attn.wo(heads.transpose(1, 2).reshape(B, T, H * hd)), g)
        return x + self.ffn_post(self.ffn(self.ffn_pre(x)), g)  # g scales each update


def layer_key_bias(g, eps):
    """The key bias (B, T) of a layer with gates g (B, T, 1), or None (plain causal attention,
    faster) when every gate is exactly 1: then the bias is 0 and so is its gradient, since g = 1
    means every gate head's relu sat at or below 0, where relu has no gradient. (The check is a
    host sync, so compiled graphs skip it.)"""
    if not torch.compiler.is_compiling() and not bool((g < 1).any()):
        return None
    return gate_bias(g.squeeze(-1), eps)


SKIP_BUCKET = 8  # packed lengths round up to a multiple of this


def run_active_tokens(block, x, cos, sin, g, eps, backend, keep_kv=False):
    """The block on only the tokens whose gate g (B, T, 1) is > 0, with one host sync. Skipped
    tokens keep their stream and are absent from this layer's attention, exactly as in
    decoding. Returns the new stream and, if keep_kv, the keys and values at their original
    positions (None if the whole batch skips)."""
    T = x.size(1)
    active = g.squeeze(-1) > 0
    # the layer's one host sync: its longest row of active tokens, and how many gates are below 1
    longest, n_below_one = torch.stack([active.sum(1).max(), (g < 1).sum()]).tolist()
    if n_below_one == 0:  # every gate 1: no bias, the fused causal kernel (see layer_key_bias)
        return block(x, cos, sin, g, None, backend)
    n = -(-longest // SKIP_BUCKET) * SKIP_BUCKET  # the packed length
    if n >= T:  # packing would save nothing: the ordinary path, closed keys hidden by their bias
        return block(x, cos, sin, g, gate_bias(g.squeeze(-1), eps), backend)
    if n == 0 and not torch.is_grad_enabled():
        return x, None  # the whole batch skips this layer: nothing runs
    # in training, a layer nobody runs still runs one padding slot (g = 0): its weights get zero
    # gradients, as in the masked path, not None (which AdamW and DDP would treat differently)
    return run_packed(block, x, cos, sin, g, active, max(n, 1), eps, keep_kv)


# For compiled models: torch.compile leaves this to Python and compiles what it calls. Traced,
# its host sync and branches would be compiled anew per layer and branch; left to Python, the
# compiled pieces see few shapes (run_packed's length becomes dynamic after its first change).
# torch._disable_dynamo is torch.compiler.disable without importing it, seconds of start-up,
# before first use.
run_active_tokens_uncompiled = torch._disable_dynamo(run_active_tokens, recursive=False)


def run_packed(block, x, cos, sin, g, active, n, eps, keep_kv):
    """The block on rows of n packed tokens: each row's active tokens (B, T) in order, each
    keeping its own rotary position, then its skipped ones as padding. Padding comes after every
    real token, so the causal mask hides it from them (and a padding query sees itself, so no
    softmax row is empty). Packed rows take SDPA, whatever the backend: FlexAttention would need
    a block mask, and a compiled kernel, for every packed length."""
    B, T, d = x.shape
    pos = torch.argsort(~active, dim=1, stable=True)[:, :n]  # (B, n)
    flat = (pos + T * torch.arange(B, device=x.device)[:, None]).view(-1)  # rows of x (B*T, d)
    gp = g.view(B * T, 1)[flat].view(B, n, 1)  # padding slots hold skipped tokens: g = 0
    out, (k, v) = block(x.reshape(B * T, d)[flat].view(B, n, d), cos[pos][:, None],
                        sin[pos][:, None], gp, gate_bias(gp.squeeze(-1), eps), "sdpa")
    # back in place; padding slots hold skipped tokens, which their gate of 0 left as they were
    x = x.reshape(B * T, d).index_copy(0, flat, out.reshape(B * n, d)).view(B, T, d)
    if keep_kv:  # back to their positions; skipped slots get padding keys, which the cache hides
        slots = pos[:, None, :, None].expand_as(k)
        k, v = (t.new_zeros(B, t.size(1), T, t.size(3)).scatter(2, slots, t) for t in (k, v))
    return x, (k, v)


def next_gate(head, x, m):
    """Gate (B, T, 1) of a layer i < L/2 from its head and the stream x entering it, and the sum
    m = relu(w_i . x + b_i) + m_{i-1}. (Callers reuse it for layer L-1-i, the mirror, inline: a
    method taking i would be compiled once per layer when the layer loop runs in Python.)"""
    m = F.relu(head(x)).float() + m
    return 1.0 - m.clamp(0.0, 1.0), m


# Dense bf16 tensor-core peak FLOP/s by a substring of the GPU's name, most specific first
# (fp16 peak for cards without bf16), for GPT.mfu.
PEAK_FLOPS = [
    ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
    ("H100", 989e12), ("H800", 989e12), ("H20", 148e12), ("B200", 2250e12), ("B100", 1750e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX A6000", 155e12), ("RTX 6000 Ada", 364e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.norm_in = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_out = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied
        # one gate head per layer of the first half; the second half mirrors them
        self.gate_heads = (nn.ModuleList(nn.Linear(cfg.n_embd, 1) for _ in range(cfg.n_layer // 2))
                           if cfg.gated else None)
        cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta,
                                 cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        if cfg.gated and cfg.gate_init == "zero":
            for head in self.gate_heads:
                nn.init.zeros_(head.weight)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out the token embedding (as nanoGPT does)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def attn_backend(self, device):
        """'flex' or 'sdpa' on this device: 'auto' takes FlexAttention on CUDA for a gated model
        where FlexAttention can run (torch >= 2.6; inductor's CUDA kernel needs a head dim of
        16 or more), else SDPA. Raises ConfigError for an explicit 'flex' that cannot run."""
        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        if device.type == "cuda" and head_dim < 16:
            if cfg.attn_backend == "flex":
                raise ConfigError(f"attn_backend='flex' needs a head dim n_embd/n_head of 16 or "
                                  f"more on CUDA, got {head_dim}; use attn_backend='sdpa' or "
                                  f"'auto'")
            return "sdpa"
        if cfg.attn_backend != "auto":
            return cfg.attn_backend
        return "flex" if device.type == "cuda" and cfg.gated and flex_attention else "sdpa"

    def trunk(self, idx, keep_kv=False, resid_norms=False, skip=False, compiled=False):
        """Embedding and all blocks. Returns the final residual stream (B, T, d), the gates
        (L, B, T) or None, each layer's (keys, values) if keep_kv (None for a layer the whole
        batch skipped), and each layer's mean residual-stream norm (L,) if resid_norms (None
        where not asked for). skip=True runs each layer only on the tokens whose gate is > 0.
        compiled: called from a model under torch.compile (see forward)."""
        B, T = idx.shape
        cfg, L = self.config, self.config.n_layer
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={cfg.block_size}")
        if skip and cfg.gated and not cfg.hide_closed_keys:
            raise ConfigError("skip=True needs hide_closed_keys=True: with closed keys visible, "
                              "every token's key and value are needed in every layer; use "
                              "skip=False")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        backend = self.attn_backend(idx.device)
        x = self.norm_in(self.tok_emb(idx))
        gates, kv, norms, m = [], [], [], 0.0
        for i, block in enumerate(self.blocks):
            g = None
            if cfg.gated:
                g, m = next_gate(self.gate_heads[i], x, m) if i < L // 2 else (gates[L - 1 - i], m)
                gates.append(g)
            if skip and cfg.gated:
                run = run_active_tokens_uncompiled if compiled else run_active_tokens
                x, layer_kv = run(block, x, cos, sin, g, cfg.gate_eps, backend, keep_kv)
            else:
                hide = g is not None and cfg.hide_closed_keys
                key_bias = layer_key_bias(g, cfg.gate_eps) if hide else None
                x, layer_kv = block(x, cos, sin, g, key_bias, backend)
            if keep_kv:
                kv.append(layer_kv)
            if resid_norms:
                norms.append(x.float().norm(dim=-1).mean())
        gates = torch.stack(gates).squeeze(-1) if cfg.gated else None
        return x, gates, (kv if keep_kv else None), (torch.stack(norms) if resid_norms else None)

    def forward(self, idx, targets=None, resid_norms=False, skip=False):
        """idx (B, T) -> logits (B, T, V), mean cross-entropy (or None), gates (L, B, T) or None;
        with resid_norms=True also each layer's mean residual-stream norm (L,), for evaluation
        tables. The gate regularizer is not in the loss: add GateController.loss(gates).
        skip=True computes only the (token, layer) pairs whose gate is > 0: the same function
        (a closed gate's key is absent there, and hidden exactly by its bias here), up to float
        rounding, for less compute."""
        # torch.compile traces forward, where is_compiling() is True, but runs the skip path's
        # layer loop in Python (its host syncs break the graph), where it is False: say so
        x, gates, _, norms = self.trunk(idx, resid_norms=resid_norms, skip=skip,
                                        compiled=torch.compiler.is_compiling())
        logits = self.lm_head(self.norm_out(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return (logits, loss, gates, norms) if resid_norms else (logits, loss, gates)

    def flops_per_token(self, sparsity=0.0, seq_len=None):
        """Estimated forward FLOPs per token: every matmul as 2 flops per multiply-add (the
        attention scores and weighted sum over the full seq_len, as usually counted), plus
        norms and elementwise work. A skipped (token, layer) pair costs nothing, so the blocks
        count (1 - sparsity) times; with hide_closed_keys=False it still costs its key and value
        (norm, projections, rotary). Training costs about 3x this (forward + backward)."""
        c = self.config
        T, d, V, h = seq_len or c.block_size, c.n_embd, c.vocab_size, 4 * c.n_embd
        kv_dim = c.n_kv_head * (d // c.n_head)
        norm = 4 * d  # square, mean, rsqrt-scale, weight
        block = (2 * d * (d + 2 * kv_dim)   # q, k, v projections
                 + 3 * (d + kv_dim)         # rotary on q and k
                 + 2 * T * d + 2 * T * d    # scores q.k and the weighted sum of v
                 + 5 * c.n_head * T         # bias, max, exp, sum, divide in the softmax
                 + 2 * d * d                # output projection
                 + 3 * 2 * d * h + 5 * h    # SwiGLU matmuls, silu and product
                 + 4 * norm + 4 * d)        # four norms, two gate products and residual adds
        gate_heads = (c.n_layer // 2) * (2 * d + 4) if c.gated else 0  # dot, bias, relu, sum, clamp
        key_only = 0 if c.hide_closed_keys else norm + 2 * d * 2 * kv_dim + 3 * kv_dim
        skipped = sparsity * c.n_layer * key_only
        return norm + gate_heads + (1.0 - sparsity) * c.n_layer * block + skipped + norm + 2 * d * V

    def mfu(self, tokens_per_sec, device, sparsity=0.0, seq_len=None):
        """Model FLOPs utilization of training at tokens_per_sec: 3x the forward FLOPs (forward
        + backward) over the GPU's peak dense bf16 FLOP/s. None where the peak is not known."""
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        peak = next((flops for key, flops in PEAK_FLOPS if name and key in name), None)
        return 3 * self.flops_per_token(sparsity, seq_len) * tokens_per_sec / peak if peak else None

    @classmethod
    def from_pretrained(cls, name_or_folder):
        """One of the authors' released models: a Hugging Face hub id (e.g. tim-lawson/
        skip-middle-fineweb-gated-target-end-0.6) or a local folder holding its config.json and
        model.safetensors. A GPT in float32 on the CPU, with the semantics it was trained with
        (hide_closed_keys=False). Raises CheckpointError (one line) if it cannot load. The
        conversion lives in checkpoints.py, beside this file."""
        from checkpoints import load_released
        return load_released(name_or_folder)

    def configure_optimizer(self, learning_rate, betas, weight_decay, device_type, eps=1e-8):
        """AdamW; weight decay only on matrices (not norms or biases); fused kernel on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps,
                                 fused=device_type == "cuda")

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, return_gates=False, skip=True):
        """Sample max_new_tokens after the prompt idx (B, T) with a KV cache. The prompt is
        prefilled in one pass; there, and for each new token, a token runs only the layers
        outside its skipped span. temperature=0 is greedy. With return_gates, also returns the
        gates (L, B, T_out) of every output position (None for a dense model). When the context
        reaches block_size, the last block_size/2 tokens are prefilled again and decoding goes
        on. skip=False runs every layer for every token (to measure what skipping saves)."""
        cfg = self.config
        if idx.size(1) > cfg.block_size:
            warnings.warn(f"prompt of {idx.size(1)} tokens cropped to its last "
                          f"block_size={cfg.block_size}")
            idx = idx[:, -cfg.block_size:]
        steps = max_new_tokens + (1 if return_gates else 0)  # one more pass: the last token's gates
        cache = KVCache(self, idx.size(0), min(cfg.block_size, idx.size(1) + steps), idx.device)
        logits, gates = self.prefill(idx, cache, skip)
        all_gates = [gates]
        for step in range(max_new_tokens):
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_id], dim=1)
            if step == max_new_tokens - 1 and not return_gates:
                break
            if cache.length == cache.size:  # context full: slide to the last half, prefill again
                cache = KVCache(self, idx.size(0), cfg.block_size, idx.device)
                logits, gates = self.prefill(idx[:, -(cfg.block_size // 2):], cache, skip)
                gates = None if gates is None else gates[:, :, -1:]
            else:
                logits, gates = self.decode_one(next_id, cache, skip)
            all_gates.append(gates)
        if not return_gates:
            return idx
        return idx, (torch.cat(all_gates, dim=2) if cfg.gated else None)

    def next_logits(self, x_last):
        """Next-token logits (B, V) from the last position's stream. Padding ids (from
        data_vocab_size up) get -inf, so no sampling rule can ever pick one."""
        logits = self.lm_head(self.norm_out(x_last))
        if 0 < self.config.data_vocab_size < logits.size(-1):
            logits[:, self.config.data_vocab_size:] = float("-inf")
        return logits

    def prefill(self, idx, cache, skip=True):
        """The prompt through one forward pass, filling every layer's cache. With skip, as in
        decode_one, a (token, layer) whose gate is 0 is not computed; either way its slot gets
        the closed bias, which hides it. (With hide_closed_keys=False every pair is computed:
        every key is needed.) Returns last-position logits (B, V) and the gates (L, B, T)."""
        cfg = self.config
        x, gates, kv, _ = self.trunk(idx, keep_kv=True, skip=skip and cfg.hide_closed_keys)
        T = idx.size(1)
        for i, layer_kv in enumerate(kv):
            if layer_kv is not None:  # None: the whole batch skipped this layer
                cache.k[i][:, :, :T], cache.v[i][:, :, :T] = layer_kv
            if gates is not None and cfg.hide_closed_keys:
                cache.bias[i][:, :T] = gate_bias(gates[i], cfg.gate_eps)
        cache.length = T
        return self.next_logits(x[:, -1]), gates

    def decode_one(self, token, cache, skip=True):
        """One new token (B, 1) through the layers it does not skip, reading and extending the
        cache. A row whose gate is 0 at layer i gets no Q/K/V, no attention and no FFN there,
        and its cache slot is hidden (the closed bias) from every later query in that layer.
        With hide_closed_keys=False its key stays visible: it gets its K and V there (from its
        unchanged stream) and nothing else. skip=False computes every layer anyway (the masked
        path, for comparison)."""
        cfg, L, pos = self.config, self.config.n_layer, cache.length
        cos, sin = self.rope_cos[pos:pos + 1], self.rope_sin[pos:pos + 1]
        x = self.norm_in(self.tok_emb(token))
        B = x.size(0)
        gates, m = [], 0.0
        for i, block in enumerate(self.blocks):
            rows, g = slice(None), None  # rows of the batch that run this layer
            if cfg.gated:
                g, m = next_gate(self.gate_heads[i], x, m) if i < L // 2 else (gates[L - 1 - i], m)
                gates.append(g)
                active = g.view(B) > 0
                n_active = int(active.sum()) if skip else B  # one host sync per layer
                if n_active < B:  # some rows skip: hide their slot, run only the others
                    if cfg.hide_closed_keys:
                        cache.bias[i][:, pos] = CLOSED
                    else:  # their key stays visible: their K and V, nothing else
                        idle = (~active).nonzero().squeeze(1)
                        k, v = block.attn.kv(block.attn_pre(x[idle]), cos, sin)
                        cache.k[i][idle, :, pos], cache.v[i][idle, :, pos] = k[:, :, 0], v[:, :, 0]
                    if n_active == 0:
                        continue  # the whole batch skips this layer
                    rows = active.nonzero().squeeze(1)
                    g = g[rows]
            xr = x[rows]
            q, k, v = block.attn.qkv(block.attn_pre(xr), cos, sin)
            cache.k[i][rows, :, pos], cache.v[i][rows, :, pos] = k[:, :, 0], v[:, :, 0]
            mask = None
            if g is not None and cfg.hide_closed_keys:
                cache.bias[i][rows, pos] = gate_bias(g.view(-1), cfg.gate_eps)
                mask = cache.bias[i][rows, None, None, :pos + 1].to(q.dtype)
            heads = F.scaled_dot_product_attention(q, cache.k[i][rows, :, :pos + 1],
                                                   cache.v[i][rows, :, :pos + 1],
                                                   attn_mask=mask, enable_gqa=True)
            x[rows] = block.finish(xr, heads, g)
        cache.length = pos + 1
        gates = torch.stack(gates).view(cfg.n_layer, B, 1) if cfg.gated else None
        return self.next_logits(x[:, -1]), gates


class KVCache:
    """Per-layer keys and values (B, n_kv_head, size, head_dim) -- stored once per K/V head --
    and each position's key bias log(max(g, eps)) per layer, for a request of `size` tokens."""

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
                     if cfg.gated else None)


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


# -------------------------------------------------------------------- regularizer

def gate_moments(gates):
    """Per-layer mean and mean square of gates (L, B, T), detached fp32. Controllers read the
    mean and the variance E[g^2] - E[g]^2 of a whole optimizer step: train.py averages these two
    over micro-steps and processes first, then takes the variance (as the paper's code does)."""
    g = gates.detach().float()
    return g.mean((1, 2)), (g * g).mean((1, 2))


def pooled_variance(mean, square):
    """Per-layer variance E[g^2] - E[g]^2 from gate_moments' two parts, each averaged over a
    whole step (rounding can leave it a hair below 0, hence the clamp)."""
    return (square - mean * mean).clamp_min(0)


CONTROLLERS = ("sparsity", "sparsity_variance", "sparsity_variance_l2", "adaptive",
               "proportional", "proportional_derivative")
FIXED_COEFS = {"sparsity": (0.01, 0.0), "sparsity_variance": (0.01, -0.01),
               "sparsity_variance_l2": (0.1, 0.1)}  # the fixed kinds' default (coef, var_coef)


class GateController:
    """The gate regularizer loss = mean_l(c_l * mu_l) + mean_l(k_l * v_l), from each layer's
    gate mean mu_l and variance v_l, and the rule that sets its coefficients c and k. With
    d = mu - t, the error from the layer's mean target t, after each step:
      sparsity                 c = coef (0.01), k = 0            (fixed)
      sparsity_variance        c = coef (0.01), k = var_coef (-0.01): k < 0 rewards 0/1 gates
      sparsity_variance_l2     fixed c = coef (0.1), k = var_coef (0.1), on distances: the loss
                               is mean(c) |mu - t| + mean(k) |v - t(1 - t)|, with |.| the
                               Euclidean norm over the layers (as the paper's code has it)
      adaptive                 c += lr * sign(d)  where |d| > tol
      proportional             c += lr * d        where |d| > tol
      proportional_derivative  c += lr * d        where |d| > tol and d * (d - ema10(d)) > 0
    ema10 is the exponential moving average of d over 10 steps (weight 0.1 for the newest,
    seeded by the first update, updated before the rule reads it). d - ema10 is the trend,
    so the last rule pushes only while the error still grows away from its target. The
    target kinds move k the same way, from the variance error v - (t(1 - t) + var_target_delta).
    Targets run linearly from target_start (outer layers) to target_end (middle), mirrored.
    coef, var_coef or lr None takes the kind's own default (lr: 1e-2 for proportional_derivative,
    else 1e-3); 0 is a coefficient like any other. coef_min and coef_max clamp the target kinds'
    coefficients. (train.py's settings controller and ctrl_X are kind and X here.)"""

    def __init__(self, kind, n_layer, *, coef=None, var_coef=None, target_start=1.0,
                 target_end=0.5, var_target_delta=0.0, lr=None, tol=0.01, coef_min=-math.inf,
                 coef_max=math.inf, device="cpu"):
        lr = (1e-2 if kind == "proportional_derivative" else 1e-3) if lr is None else lr
        if kind not in CONTROLLERS:
            raise ConfigError(f"controller must be one of {', '.join(CONTROLLERS)}; got {kind!r}")
        fixed = FIXED_COEFS.get(kind, (0.0, 0.0))  # the target kinds start at 0
        coef, var_coef = (fixed[0] if coef is None else coef), (fixed[1] if var_coef is None
                                                                 else var_coef)
        if not (0 <= target_start <= 1 and 0 <= target_end <= 1 and lr >= 0 and tol >= 0):
            raise ConfigError(f"controller targets must be in [0, 1] and lr, tol >= 0; got "
                              f"{target_start}, {target_end}, lr={lr}, tol={tol}")
        self.kind, self.lr, self.tol = kind, lr, tol
        self.coef_min, self.coef_max = coef_min, coef_max
        half = torch.linspace(target_start, target_end, n_layer // 2, device=device)
        self.mean_targets = torch.cat([half, half.flip(0)])
        t = self.mean_targets
        self.var_targets = (t * (1 - t) + var_target_delta).clamp_min(0)
        starts = (coef, var_coef) if kind in FIXED_COEFS else (0.0, 0.0)
        self.mean_coefs = torch.full((n_layer,), starts[0], device=device)
        self.var_coefs = torch.full((n_layer,), starts[1], device=device)
        self.ema = {name: torch.zeros(n_layer, device=device) for name in ("mean", "var")}
        self.steps = 0

    def loss(self, gates):
        """The regularizer from this micro-batch's gates (L, B, T)."""
        g = gates.float()
        means, variances = g.mean((1, 2)), g.var((1, 2))
        if self.kind == "sparsity_variance_l2":
            means = (means - self.mean_targets).norm()
            variances = (variances - self.var_targets).norm()
        return (self.mean_coefs * means).mean() + (self.var_coefs * variances).mean()

    def update(self, means, variances):
        """One controller step from per-layer gate means and variances of a whole optimizer
        step (pooled over micro-steps and processes, so every process takes the same step)."""
        if self.kind in FIXED_COEFS:
            return
        mean_error = means.to(self.mean_coefs) - self.mean_targets
        var_error = variances.to(self.var_coefs) - self.var_targets
        self.mean_coefs = self._step(self.mean_coefs, mean_error, "mean")
        self.var_coefs = self._step(self.var_coefs, var_error, "var")
        self.steps += 1

    def _step(self, coefs, error, name):
        move = error.abs() > self.tol
        change = torch.sign(error) if self.kind == "adaptive" else error
        if self.kind == "proportional_derivative":
            ema = error if self.steps == 0 else 0.9 * self.ema[name] + 0.1 * error
            self.ema[name] = ema
            move &= error * (error - ema) > 0  # the error is still growing away from the target
        return (coefs + self.lr * move.float() * change).clamp(self.coef_min, self.coef_max)

    def state_dict(self):
        return {"kind": self.kind, "steps": self.steps, "mean_coefs": self.mean_coefs.cpu(),
                "var_coefs": self.var_coefs.cpu(), "ema": {k: v.cpu() for k, v in self.ema.items()}}

    def load_state_dict(self, state):
        if state["kind"] != self.kind:
            raise ConfigError(f"the checkpoint's controller is {state['kind']!r}, this run asks "
                              f"for {self.kind!r}; pass --controller={state['kind']} or use another "
                              f"out_dir")
        device = self.mean_coefs.device
        self.steps = state["steps"]
        if self.kind not in FIXED_COEFS:  # a fixed kind's coefficients are settings, not state
            self.mean_coefs = state["mean_coefs"].to(device)
            self.var_coefs = state["var_coefs"].to(device)
        self.ema = {k: v.to(device) for k, v in state["ema"].items()}


def controller_from_settings(settings, n_layer, device="cpu"):
    """The GateController that train.py's settings describe: `controller` is its kind and each
    ctrl_X its argument X, so every script that trains builds the same one."""
    args = {k[len("ctrl_"):]: v for k, v in settings.items() if k.startswith("ctrl_")}
    return GateController(settings["controller"], n_layer, device=device, **args)
