"""
A transformer that learns to skip its middle layers (Lawson & Aitchison, 2025).

Read top to bottom: config, RMSNorm, rotary embeddings, attention, SwiGLU, the
sandwich-norm block, the model with its gate heads, generation with a KV cache that
really skips layers, and the gate regularizer with its controllers.

The idea in one picture (L = 6 layers, one token):

    layer:   0     1     2     3     4     5
    gate:   g0    g1    g2    g2    g1    g0      g0 >= g1 >= g2, each in [0, 1]

Gate heads read the residual stream entering layers 0 .. L/2-1 and accumulate
m_i = relu(w_i . h_i + b_i) + m_{i-1};  g_i = 1 - clamp(m_i, 0, 1).  Layer L-1-i reuses
g_i, so once g_i hits 0 the token skips the whole symmetric span [i, L-1-i]: the layer
adds nothing to it and no other token may attend to its key there.
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # FlexAttention (torch >= 2.5) fuses the key-indexed gate bias into the kernel on GPUs
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    flex_attention = None


@dataclass
class GPTConfig:
    vocab_size: int = 50304
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
    attn_backend: str = "auto"  # "auto" (FlexAttention on CUDA when gated, else SDPA), "sdpa", "flex"

    def __post_init__(self):
        def need(ok, field, msg):
            if not ok:
                raise ValueError(f"GPTConfig.{field}: {msg}")
        for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            need(getattr(self, field) > 0, field, f"must be positive, got {getattr(self, field)}")
        need(self.n_embd % self.n_head == 0, "n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}")
        need(self.n_head % self.n_kv_head == 0, "n_kv_head", f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        need((self.n_embd // self.n_head) % 2 == 0, "n_head", f"head dim n_embd/n_head={self.n_embd // self.n_head} must be even for rotary embeddings")
        need(not self.gated or self.n_layer % 2 == 0, "n_layer", f"must be even for a gated model (gates are mirrored), got {self.n_layer}")
        need(self.gate_init in ("normal", "zero"), "gate_init", f"must be 'normal' or 'zero', got {self.gate_init!r}")
        need(self.attn_backend in ("auto", "sdpa", "flex"), "attn_backend", f"must be 'auto', 'sdpa' or 'flex', got {self.attn_backend!r}")
        need(self.attn_backend != "flex" or flex_attention is not None, "attn_backend", "'flex' needs torch >= 2.5 (FlexAttention)")
        need(self.gate_eps > 0, "gate_eps", f"must be positive, got {self.gate_eps}")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # fp32 even under bf16 autocast: the mean of squares needs the range
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


def rotary_tables(head_dim, length, theta):
    """cos/sin tables of shape (length, head_dim) for the rotate-half form of RoPE."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(length).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x: (B, H, T, hd); cos/sin: (T, hd) for the positions of x
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


_causal_block_masks = {}  # FlexAttention block masks, one per (length, device)


def flex_causal_with_key_bias(q, k, v, key_bias):
    """Causal attention with score[b, h, q, k] += key_bias[b, k], fused by FlexAttention."""
    T, device = q.size(2), q.device
    if (T, device) not in _causal_block_masks:
        causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
        _causal_block_masks[(T, device)] = create_block_mask(causal, None, None, T, T, device=str(device))
    score_mod = lambda score, b, h, q_idx, kv_idx: score + key_bias[b, kv_idx]
    attend = _compiled_flex() if q.is_cuda else flex_attention  # eager flex is a slow reference
    return attend(q, k, v, score_mod=score_mod, block_mask=_causal_block_masks[(T, device)], enable_gqa=True)


_flex_compiled = None


def _compiled_flex():
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


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
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, key_bias=None, backend="sdpa", kv_store=None):
        """Causal self-attention; returns the heads (B, H, T, hd) before the output projection.
        key_bias (B, T) is added to the score of every query on key position k -- indexed by
        the KEY, so a gate of 0 at k hides k from everyone. (A bias indexed by the query is
        constant along each softmax row and would change nothing.)"""
        q, k, v = self.qkv(x, cos, sin)
        if kv_store is not None:
            kv_store.append((k, v))  # generation keeps them in its cache
        if key_bias is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if backend == "flex":
            return flex_causal_with_key_bias(q, k, v, key_bias.float())
        T = x.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        mask = key_bias[:, None, None, :].masked_fill(~causal, float("-inf"))  # (B, 1, T, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), enable_gqa=True)


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
    """Sandwich-norm ("peri-LN") block; the gate g (B, T, 1) scales both residual updates."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_pre, self.attn_post = RMSNorm(cfg.n_embd, cfg.norm_eps), RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.ffn_pre, self.ffn_post = RMSNorm(cfg.n_embd, cfg.norm_eps), RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin, g=None, key_bias=None, backend="sdpa", kv_store=None):
        heads = self.attn(self.attn_pre(x), cos, sin, key_bias, backend, kv_store)
        return self.finish(x, heads, g)

    def finish(self, x, heads, g):
        """Everything after the attention scores: output projection, FFN, gated residuals."""
        B, H, T, hd = heads.shape
        a = self.attn_post(self.attn.wo(heads.transpose(1, 2).reshape(B, T, H * hd)))
        x = x + (a if g is None else (g * a).type_as(x))  # the stream keeps its dtype
        f = self.ffn_post(self.ffn(self.ffn_pre(x)))
        return x + (f if g is None else (g * f).type_as(x))


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
        self.gate_heads = nn.ModuleList(nn.Linear(cfg.n_embd, 1) for _ in range(cfg.n_layer // 2)) if cfg.gated else None
        cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
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

    def layer_gate(self, i, x, m, gates):
        """Gate (B, T, 1) of layer i and the running sum m. The first half computes it from the
        stream x entering the layer; layer L-1-i reuses gate i (the mirror)."""
        L = self.config.n_layer
        if i >= L // 2:
            return gates[L - 1 - i], m
        m = F.relu(self.gate_heads[i](x)).float() + m
        return 1.0 - m.clamp(0.0, 1.0), m

    def attn_backend(self, device):
        if self.config.attn_backend != "auto":
            return self.config.attn_backend
        return "flex" if device.type == "cuda" and self.config.gated and flex_attention is not None else "sdpa"

    def trunk(self, idx, resid_norms=None, kv_store=None):
        """Embedding and all blocks: the final residual stream (B, T, d) and the gates."""
        B, T = idx.shape
        cfg = self.config
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={cfg.block_size}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        backend = self.attn_backend(idx.device)
        x = self.norm_in(self.tok_emb(idx))
        gates, m = [], 0.0
        for i, block in enumerate(self.blocks):
            g = key_bias = None
            if cfg.gated:
                g, m = self.layer_gate(i, x, m, gates)
                gates.append(g)
                key_bias = torch.log(g.squeeze(-1).clamp_min(cfg.gate_eps))
            x = block(x, cos, sin, g, key_bias, backend, kv_store)
            if resid_norms is not None:
                resid_norms.append(x.float().norm(dim=-1).mean())
        return x, (torch.stack(gates).squeeze(-1) if cfg.gated else None)

    def forward(self, idx, targets=None, resid_norms=None):
        """idx (B, T) -> logits (B, T, V), mean cross-entropy (or None), gates (L, B, T) or None.
        The gate regularizer is not in the loss: add GateController.loss(gates). A list passed
        as resid_norms receives each layer's mean residual-stream norm (for evaluation tables)."""
        x, gates = self.trunk(idx, resid_norms)
        logits = self.lm_head(self.norm_out(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, gates

    def flops_per_token(self, sparsity=0.0, seq_len=None):
        """Estimated forward FLOPs per token (SPEC section 6): every matmul as 2 flops per
        multiply-add, plus norms and elementwise work; a skipped (token, layer) costs nothing.
        Training costs about 3x this (forward + backward)."""
        c = self.config
        T, d, V, h = seq_len or c.block_size, c.n_embd, c.vocab_size, 4 * c.n_embd
        kv_dim = c.n_kv_head * (d // c.n_head)
        norm = 4 * d  # square, mean, rsqrt-scale, weight
        block = (2 * d * (d + 2 * kv_dim)       # q, k, v projections
                 + 3 * (d + kv_dim)             # rotary on q and k
                 + 2 * T * d + 2 * T * d        # scores q.k and weighted sum of v (full T, as usually counted)
                 + 5 * c.n_head * T             # bias, max, exp, sum, divide in the softmax
                 + 2 * d * d                    # output projection
                 + 3 * 2 * d * h + 5 * h        # SwiGLU matmuls, silu and product
                 + 4 * norm + 4 * d)            # four norms, two gate products and residual adds
        gate_heads = (c.n_layer // 2) * (2 * d + 4) if c.gated else 0
        return norm + gate_heads + (1.0 - sparsity) * c.n_layer * block + norm + 2 * d * V

    def configure_optimizer(self, learning_rate, betas, weight_decay, device_type, eps=1e-8):
        """AdamW; weight decay only on matrices (not norms or biases); fused kernel on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type == "cuda")

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, return_gates=False, skip=True):
        """Sample max_new_tokens after the prompt idx (B, T) with a KV cache. The prompt is
        prefilled in one pass; then each new token runs only the layers outside its skipped
        span. temperature=0 is greedy. With return_gates, also returns the gates (L, B, T_out)
        of every output position (None for a dense model). When the context reaches
        block_size, the last block_size/2 tokens are prefilled again and decoding goes on.
        skip=False runs every layer for every token (to measure what skipping saves)."""
        cfg = self.config
        if idx.size(1) > cfg.block_size:
            warnings.warn(f"prompt of {idx.size(1)} tokens cropped to its last block_size={cfg.block_size}")
            idx = idx[:, -cfg.block_size:]
        steps = max_new_tokens + (1 if return_gates else 0)  # one more pass gives the last token's gates
        cache = KVCache(self, idx.size(0), min(cfg.block_size, idx.size(1) + steps), idx.device)
        logits, gates = self.prefill(idx, cache)
        all_gates = [gates]
        for step in range(max_new_tokens):
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_id], dim=1)
            if step == max_new_tokens - 1 and not return_gates:
                break
            if cache.length == cache.size:  # context full: slide to the last half, prefill again
                cache = KVCache(self, idx.size(0), cfg.block_size, idx.device)
                logits, gates = self.prefill(idx[:, -(cfg.block_size // 2):], cache)
                gates = None if gates is None else gates[:, :, -1:]
            else:
                logits, gates = self.decode_one(next_id, cache, skip)
            all_gates.append(gates)
        if not return_gates:
            return idx
        return idx, (torch.cat(all_gates, dim=2) if cfg.gated else None)

    def prefill(self, idx, cache):
        """The prompt through the ordinary masked forward pass, filling every layer's cache.
        Returns last-position logits (B, V) and the gates (L, B, T)."""
        kv = []
        x, gates = self.trunk(idx, kv_store=kv)
        T = idx.size(1)
        for i, (k, v) in enumerate(kv):
            cache.k[i][:, :, :T], cache.v[i][:, :, :T] = k, v
            if gates is not None:
                cache.bias[i][:, :T] = torch.log(gates[i].clamp_min(self.config.gate_eps))
        cache.length = T
        return self.lm_head(self.norm_out(x[:, -1])), gates

    def decode_one(self, token, cache, skip=True):
        """One new token (B, 1) through the layers it does not skip, reading and extending the
        cache. A row whose gate is 0 at layer i gets no Q/K/V, no attention and no FFN there,
        and its cache slot is hidden (bias -inf) from every later query in that layer.
        skip=False computes every layer anyway (the masked path, for comparison)."""
        cfg, pos = self.config, cache.length
        cos, sin = self.rope_cos[pos:pos + 1], self.rope_sin[pos:pos + 1]
        x = self.norm_in(self.tok_emb(token))
        B = x.size(0)
        gates, m = [], 0.0
        for i, block in enumerate(self.blocks):
            rows, g = slice(None), None  # rows of the batch that run this layer
            if cfg.gated:
                g, m = self.layer_gate(i, x, m, gates)
                gates.append(g)
                active = g.view(B) > 0
                n_active = int(active.sum()) if skip else B  # one host sync per layer decides what runs
                if n_active < B:  # some rows skip: hide their slot, run only the others
                    cache.bias[i][:, pos] = float("-inf")
                    if n_active == 0:
                        continue  # the whole batch skips this layer
                    rows = active.nonzero().squeeze(1)
                    g = g[rows]
            xr = x[rows]
            q, k, v = block.attn.qkv(block.attn_pre(xr), cos, sin)
            cache.k[i][rows, :, pos], cache.v[i][rows, :, pos] = k[:, :, 0], v[:, :, 0]
            mask = None
            if g is not None:
                cache.bias[i][rows, pos] = torch.log(g.view(-1).clamp_min(cfg.gate_eps))
                mask = cache.bias[i][rows, None, None, :pos + 1].to(q.dtype)
            heads = F.scaled_dot_product_attention(q, cache.k[i][rows, :, :pos + 1], cache.v[i][rows, :, :pos + 1],
                                                   attn_mask=mask, enable_gqa=True)
            x[rows] = block.finish(xr, heads, g)
        cache.length = pos + 1
        gates = torch.stack(gates).view(cfg.n_layer, B, 1) if cfg.gated else None
        return self.lm_head(self.norm_out(x[:, -1])), gates


class KVCache:
    """Per-layer keys and values (B, n_kv_head, size, head_dim) -- stored once per K/V head --
    and each position's key bias log(max(g, eps)) per layer, for a request of `size` tokens."""

    def __init__(self, model, batch, size, device):
        cfg = model.config
        hd, dtype = cfg.n_embd // cfg.n_head, model.lm_head.weight.dtype
        self.size, self.length = size, 0
        self.k = [torch.zeros(batch, cfg.n_kv_head, size, hd, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.bias = [torch.zeros(batch, size, device=device) for _ in range(cfg.n_layer)] if cfg.gated else None


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
    """Per-layer mean and variance of gates (L, B, T), detached fp32: what controllers read
    (train.py averages them across micro-steps and ranks first)."""
    g = gates.detach().float()
    return g.mean((1, 2)), g.var((1, 2))


CONTROLLERS = ("sparsity", "sparsity_variance", "adaptive", "proportional", "proportional_derivative")


class GateController:
    """The gate regularizer loss = mean_l(c_l * mu_l) + mean_l(k_l * v_l) and the rule that sets
    its coefficients c (mean) and k (variance) per layer:
      sparsity                 c = coef, k = 0 (fixed)
      sparsity_variance        c = coef, k = var_coef (fixed; negative k rewards 0/1 gates)
      adaptive                 c += lr * sign(mu - t)               where |mu - t| > tol
      proportional             c += lr * (mu - t)                   where |mu - t| > tol
      proportional_derivative  c += lr * ((mu - t) + (ema1 - ema10)) where |mu - t| > tol
    The target kinds update k the same way from v - t(1 - t) - var_target_delta. Targets t run
    linearly from target_start (outer layers) to target_end (middle) and are mirrored."""

    def __init__(self, kind, n_layer, coef=0.01, var_coef=-0.01, target_start=1.0, target_end=0.5,
                 var_target_delta=0.0, lr=1e-3, tol=0.01, coef_min=-math.inf, coef_max=math.inf, device="cpu"):
        if kind not in CONTROLLERS:
            raise ValueError(f"controller kind must be one of {', '.join(CONTROLLERS)}; got {kind!r}")
        self.kind, self.lr, self.tol, self.coef_min, self.coef_max = kind, lr, tol, coef_min, coef_max
        half = torch.linspace(target_start, target_end, n_layer // 2, device=device)
        self.mean_targets = torch.cat([half, half.flip(0)])
        self.var_targets = (self.mean_targets * (1 - self.mean_targets) + var_target_delta).clamp_min(0)
        fixed = kind in ("sparsity", "sparsity_variance")
        self.mean_coefs = torch.full((n_layer,), coef if fixed else 0.0, device=device)
        self.var_coefs = torch.full((n_layer,), var_coef if kind == "sparsity_variance" else 0.0, device=device)
        # EMAs of the errors over 1 and 10 steps, for the derivative term
        self.ema = {name: torch.zeros(n_layer, device=device) for name in ("mean_short", "mean_long", "var_short", "var_long")}
        self.steps = 0

    def loss(self, gates):
        g = gates.float()
        return (self.mean_coefs * g.mean((1, 2))).mean() + (self.var_coefs * g.var((1, 2))).mean()

    def update(self, means, variances):
        """One controller step from per-layer gate means and variances (already averaged
        across ranks, so every rank takes the same step)."""
        if self.kind in ("sparsity", "sparsity_variance"):
            return
        self.mean_coefs = self._step(self.mean_coefs, means.to(self.mean_coefs) - self.mean_targets, "mean")
        self.var_coefs = self._step(self.var_coefs, variances.to(self.var_coefs) - self.var_targets, "var")
        self.steps += 1

    def _step(self, coefs, error, name):
        big = (error.abs() > self.tol).float()
        if self.kind == "adaptive":
            change = torch.sign(error)
        elif self.kind == "proportional":
            change = error
        else:
            for key, span in ((f"{name}_short", 1), (f"{name}_long", 10)):
                beta = 0.0 if self.steps == 0 else 1 - 1 / span  # the first step seeds the EMA
                self.ema[key] = beta * self.ema[key] + (1 - beta) * error
            change = error + (self.ema[f"{name}_short"] - self.ema[f"{name}_long"])
        return (coefs + self.lr * big * change).clamp(self.coef_min, self.coef_max)

    def state_dict(self):
        return {"kind": self.kind, "steps": self.steps, "mean_coefs": self.mean_coefs.cpu(),
                "var_coefs": self.var_coefs.cpu(), "ema": {k: v.cpu() for k, v in self.ema.items()}}

    def load_state_dict(self, state):
        if state["kind"] != self.kind:
            raise ValueError(f"checkpoint controller is {state['kind']!r}, config asks for {self.kind!r}")
        device = self.mean_coefs.device
        self.steps = state["steps"]
        self.mean_coefs, self.var_coefs = state["mean_coefs"].to(device), state["var_coefs"].to(device)
        self.ema = {k: v.to(device) for k, v in state["ema"].items()}
