"""
A transformer that learns to skip its middle layers: T. Lawson and L. Aitchison, "Learning to
Skip the Middle Layers of Transformers" (2025), https://arxiv.org/abs/2506.21103.

The method, read top to bottom in the paper's order: config, RMSNorm, rotary embeddings,
attention with a key bias, SwiGLU, the gate and its key bias, the sandwich block, the model,
its FLOPs, and the regularizer with its controllers.

    layer:   0     1     2     3     4     5       L = 6 layers, one token
    gate:   g0    g1    g2    g2    g1    g0       g0 >= g1 >= g2, each in [0, 1]

Once g_i = 0 the token skips layers i .. L-1-i: they add nothing to it, and no other token
may attend to its key there. Everything here is the plain definition. skipping.py computes the
same function with less compute (a fused attention kernel, packed rows that leave skipped
tokens out, a KV cache that skips), and tests/test_skipping.py holds the two equal.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import skipping


class ConfigError(ValueError):
    """A GPTConfig or GateController setting that cannot work; the message names it."""


@dataclass
class GPTConfig:
    vocab_size: int = 50304    # rows of the embedding and the logits, padding ids included
    data_vocab_size: int = 0   # the tokenizer's ids; those from here up are padding (0: none)
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12        # grouped-query attention: n_head / n_kv_head heads share K and V
    n_embd: int = 768
    rope_theta: float = 10000.0
    rope_scaling: bool = False  # Llama 3.1's rotary frequency scaling (some released models)
    norm_eps: float = 1e-5
    gated: bool = True         # False: a dense baseline (no gate heads, every gate 1)
    # "normal": N(0, 0.02) gate heads, as the paper's gated runs. "zero": w = b = 0, so g = 1
    # everywhere, a dense start -- but relu'(0) = 0, so such heads get no gradient, ever.
    gate_init: str = "normal"
    gate_eps: float = 1e-6     # an open gate's key bias is log(max(g, gate_eps))
    # False: closed gates' keys stay visible to other tokens and only the updates are gated,
    # which is how the authors' released models were trained (see checkpoints.py)
    hide_closed_keys: bool = True

    def __post_init__(self):
        rules = [(name, getattr(self, name) > 0, "must be positive") for name in (
            "vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "gate_eps")]
        rules += [
            ("data_vocab_size", 0 <= self.data_vocab_size <= self.vocab_size,
             f"must be in [0, vocab_size={self.vocab_size}]"),
            ("n_embd", self.n_embd % self.n_head == 0, f"must divide by n_head={self.n_head}"),
            ("n_kv_head", self.n_head % self.n_kv_head == 0, f"must divide n_head={self.n_head}"),
            ("n_head", self.n_embd // self.n_head % 2 == 0,
             f"must leave an even head dim n_embd/n_head for rotary (n_embd={self.n_embd})"),
            ("n_layer", not self.gated or self.n_layer % 2 == 0, "must be even when gated"),
            ("gate_init", self.gate_init in ("normal", "zero"), "must be 'normal' or 'zero'")]
        for name, ok, rule in rules:
            if not ok:
                raise ConfigError(f"GPTConfig.{name} {rule}, got {getattr(self, name)!r}")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # fp32 even under bf16 autocast: the mean of squares needs the range
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


def rotary_tables(head_dim, length, theta, scaling=False):
    """cos and sin tables (length, head_dim) for the rotate-half form of RoPE. scaling: Llama
    3.1's frequency scaling (factor 8 for wavelengths over 8192 positions, none under 2048, a
    smooth blend between), as some of the authors' released models use."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    if scaling:
        wavelen = 2 * math.pi / inv_freq
        blend = ((8192 / wavelen - 1) / 3).clamp(0, 1)  # 0 at 8192 positions, 1 at 2048
        inv_freq = (1 - blend) * inv_freq / 8 + blend * inv_freq
    angles = torch.outer(torch.arange(length).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x (B, H, T, hd); cos, sin (T, hd) for the positions of x (or (B, 1, T, hd), one row each)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


def attention(q, k, v, key_bias=None):
    """Causal attention with a key bias, the plain definition. q (B, H, T, hd) are the last T of
    the S positions of k and v (B, H_kv, S, hd); key_bias (B, S) or None. Returns (B, H, T, hd).
    The bias is indexed by the KEY: key_bias[b, j] joins every query's score on key j, so a very
    negative bias hides key j from everyone. (Indexed by the query it would add one constant to a
    whole softmax row, which a softmax ignores: it would change nothing.)"""
    T, S = q.size(2), k.size(2)
    k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))  # share K, V
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~causal, float("-inf"))
    if key_bias is not None:
        scores = scores + key_bias[:, None, None, :].to(scores.dtype)  # (B, 1, 1, S): by key
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    fast = True  # skipping.causal_attention: attention() on SDPA's fused kernel (tested equal);
                 # GPT.use_plain(True) turns it off, and attention() itself runs

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def kv(self, x, cos, sin):
        B, T, _ = x.shape
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, key_bias=None, cache=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        q, (k, v) = apply_rotary(q, cos, sin), self.kv(x, cos, sin)
        if cache is not None:  # a KV cache (skipping.py) keeps k and v, and returns all it holds
            k, v, key_bias = cache(k, v, key_bias)
        heads = (skipping.causal_attention if self.fast else attention)(q, k, v, key_bias)
        return self.wo(heads.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = 4 * cfg.n_embd
        self.w1 = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.n_embd, bias=False)
        self.w3 = nn.Linear(cfg.n_embd, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def next_gate(head, x, m):
    """The gate of a layer i < L/2, and the running sum behind it:
        m_i = relu(w_i . x + b_i) + m_{i-1},    g_i = 1 - clamp(m_i, 0, 1)
    head is layer i's gate head, Linear(d, 1); x (B, T, d) the stream entering layer i; m the
    sum m_{i-1} (B, T, 1), or 0 before layer 0. Returns g_i and m_i, both (B, T, 1). m never
    shrinks, so the gates fall toward the middle, and g_i is exactly 0 once m_i reaches 1."""
    m = F.relu(head(x)).float() + m
    return 1.0 - m.clamp(0.0, 1.0), m


CLOSED = -1e4  # the key bias of a closed gate (g = 0)


def gate_bias(g, eps):
    """The key bias (B, T) of gates g (B, T): what attention adds to every query's score on that
    key. log(max(g, eps)) for an open gate: differentiable, so the gate heads learn from what
    dimming a key does to the other tokens. CLOSED for a closed one: exp(-1e4 + a score gap) is
    exactly 0 in fp32, bf16 and fp16 (gaps under ~9,900), so the key is as absent as if its layer
    had never run -- log(eps) = -13.8 alone would show through a sharp head. A finite bias
    rather than -inf leaves no softmax row empty."""
    return torch.log(g.clamp_min(eps)).masked_fill(g == 0, CLOSED)


class Block(nn.Module):
    """Sandwich-norm ("peri-LN") block: each sublayer's input and output are normalized, and the
    gate g (B, T, 1) scales what each sublayer adds to the stream x (B, T, d)."""

    def __init__(self, cfg):
        super().__init__()
        d, eps = cfg.n_embd, cfg.norm_eps
        self.attn_pre, self.attn_post = RMSNorm(d, eps), RMSNorm(d, eps)
        self.ffn_pre, self.ffn_post = RMSNorm(d, eps), RMSNorm(d, eps)
        self.attn = Attention(cfg)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin, g=1.0, key_bias=None, cache=None):
        """x (B, T, d) -> x (B, T, d): first x + g * Norm(Attention(Norm(x))), the attention given
        the key bias and the cache, then x + g * Norm(FFN(Norm(x))). Each sublayer has its own
        two norms: attn_pre, attn_post; ffn_pre, ffn_post."""
        x = x + g * self.attn_post(self.attn(self.attn_pre(x), cos, sin, key_bias, cache))
        x = x + g * self.ffn_post(self.ffn(self.ffn_pre(x)))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.norm_in = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_out = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied
        # a gate head for each layer of the first half; the second half mirrors them
        self.gate_heads = (nn.ModuleList(nn.Linear(cfg.n_embd, 1) for _ in range(cfg.n_layer // 2))
                           if cfg.gated else None)
        cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta,
                                 cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for module in self.modules():  # N(0, 0.02) weights, zero biases, norm weights 1
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if cfg.gated and cfg.gate_init == "zero":
            for head in self.gate_heads:
                nn.init.zeros_(head.weight)
        self.plain = False  # use_plain

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out the token embedding (as nanoGPT does)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def use_plain(self, plain=True):
        """plain: compute with this file's definitions only (attention() itself, every token
        through every layer, no KV cache), the code a student reads and changes; slower. Off
        (the default): skipping.py computes the same function with less work."""
        self.plain = plain
        for block in self.blocks:
            block.attn.fast = not plain
        return self

    def forward(self, idx, targets=None, skip=False, cache=None, norms=None):
        """idx (B, T) token ids -> logits (B, T, V), the mean cross-entropy against targets (B, T)
        (or None), and the gates (L, B, T) (or None: a dense model). The regularizer is not in the
        loss: add GateController.loss(gates). skip and cache compute the same function with less
        work (skipping.py): skip=True runs each layer only on the tokens whose gate is above 0,
        and a KVCache decodes (logits of the last position only). norms, a list, gets each
        layer's mean residual-stream norm."""
        cfg, T = self.config, idx.size(1)
        start = cache.length if cache is not None else 0
        if start + T > cfg.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size={cfg.block_size}")
        if skip and cache is None and cfg.gated and not cfg.hide_closed_keys:
            raise ConfigError("skip=True needs hide_closed_keys=True: with closed keys visible, "
                              "every token's key is needed in every layer; use skip=False")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.norm_in(self.tok_emb(idx))  # (B, T, d)
        layer = functools.partial(self.layer, cos=cos, sin=sin, skip=skip and not self.plain,
                                  cache=cache, norms=norms)
        x, gates = self.gate_loop(x, layer)
        if cache is not None:
            cache.length, x = start + T, x[:, -1:]
        logits = self.lm_head(self.norm_out(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss, (torch.stack(gates).squeeze(-1) if cfg.gated else None)

    def gate_loop(self, x, layer):
        """The method's loop over the L layers: the stream x (B, T, d) in, and out with the gates
        (a list of L tensors (B, T, 1); empty for a dense model). Before layer i < L/2, next_gate
        makes its gate from the stream entering it, carrying the running sum m from layer to
        layer; layer L-1-i reuses the gate of layer i (the mirror). layer(i, block, x, g) runs
        block as layer i with gate g (1.0 in a dense model) and returns the stream after it."""
        cfg, L = self.config, self.config.n_layer
        gates, m = [], 0.0
        for i, block in enumerate(self.blocks):
            g = 1.0  # a dense model: every token runs every layer
            if cfg.gated:
                if i < L // 2:
                    g, m = next_gate(self.gate_heads[i], x, m)  # (B, T, 1)
                else:
                    g = gates[L - 1 - i]  # the mirror: layer L-1-i reuses layer i's gate
                gates.append(g)
            x = layer(i, block, x, g)
        return x, gates

    def layer(self, i, block, x, g, cos, sin, skip=False, cache=None, norms=None):
        """Layer i, block, with gate g: the sandwich block, closed keys hidden by their key bias.
        With skip or a cache, skipping.py runs it leaving skipped (token, layer) pairs out. (The
        block comes in beside i: looked up by i, it would compile a graph per layer.)"""
        cfg, key_bias = self.config, None
        if cfg.gated and cfg.hide_closed_keys:
            key_bias = gate_bias(g.squeeze(-1), cfg.gate_eps)  # (B, T)
        if cache is not None:
            x = skipping.cached_layer(block, x, cos, sin, g, key_bias, cache, i, skip)
        elif skip and cfg.gated:
            x = skipping.active_tokens_layer(block, x, cos, sin, g, key_bias)
        else:
            x = block(x, cos, sin, g, key_bias)
        if norms is not None:
            norms.append(x.detach().float().norm(dim=-1).mean())
        return x

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, return_gates=False, skip=True):
        """max_new_tokens sampled after the prompt idx (B, T) with a KV cache that skips, or with
        use_plain a full forward pass per new token: see skipping.generate."""
        return skipping.generate(self, idx, max_new_tokens, temperature, top_k, top_p, generator,
                                 return_gates, skip, cached=not self.plain)

    def flops_per_token(self, sparsity=0.0, seq_len=None):
        """Estimated forward FLOPs per token, with T = seq_len (or block_size) positions of
        context, d the width, h = 4d the SwiGLU's hidden width and kv_dim the width of K and V.
        A matmul costs 2 flops per multiply-add, and attention reads all T keys (as usually
        counted). An RMSNorm costs 4d (square, mean, rsqrt-scale, weight). A block costs its
        q, k and v projections; rotary on q and k, 3 flops per channel; the scores and the
        weighted sum of v; the softmax, 5 per head and key (bias, max, exp, sum, divide); the
        output projection; the three SwiGLU matmuls, and 5 per hidden unit for silu and the
        product; four norms; and 4d for the two gate products and residual adds. A gate head
        costs 2d + 4 (its dot product, bias, relu, sum, clamp). The input and output norms and
        the head's 2dV are paid by every token. A skipped (token, layer) pair costs nothing, so
        the blocks count (1 - sparsity) times, but with hide_closed_keys=False a skipped pair
        still pays its key and value: a norm, the k and v projections, and rotary on k.
        Training costs about 3x this (forward and backward)."""
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

    def configure_optimizer(self, learning_rate, betas, weight_decay, device_type, eps=1e-8):
        """AdamW; weight decay only on matrices (not norms or biases); fused kernel on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps,
                                 fused=device_type == "cuda")


# ------------------------------------------------------------------------- the regularizer

def gate_moments(gates):
    """Per-layer mean and mean square (L,) of gates (L, B, T), detached, in fp32. A controller
    reads the mean and the variance E[g^2] - E[g]^2 of a whole optimizer step: train.py averages
    these two over the step's micro-steps and processes first (as the paper's code does)."""
    g = gates.detach().float()
    return g.mean((1, 2)), (g * g).mean((1, 2))


def pooled_variance(mean, square):
    """Per-layer variance E[g^2] - E[g]^2 from gate_moments' two parts, each averaged over a
    whole step (rounding can leave it a hair below 0, hence the clamp)."""
    return (square - mean * mean).clamp_min(0)


def gate_targets(n_layer, start, end, var_delta=0.0):
    """The controllers' targets per layer (L,): for the gate means t, running linearly from start
    at the outer layers to end in the middle over the first half, mirrored over the second; for
    the gate variances t(1 - t) + var_delta, never below 0 (t(1 - t) is the variance of gates
    that are all 0 or 1 with mean t)."""
    half = torch.linspace(start, end, n_layer // 2)
    t = torch.cat([half, half.flip(0)])
    return t, (t * (1 - t) + var_delta).clamp_min(0)


# A target rule moves each layer's coefficient after every step, from the error d (L,) of that
# layer's gate mean (or variance) from its target: c += lr * rule(d, memory) where |d| > tol.
# A step is the general form: a rule that sets c = f(errors so far) steps by f's change (see
# proportional_integral). memory is the rule's own dict, empty at first, set up by the rule and
# saved with every checkpoint (tensors, numbers, lists). train.py's other ctrl_X settings reach
# a rule's keyword argument X.

def adaptive(d, memory):
    return torch.sign(d)


def proportional(d, memory):
    return d


def proportional_derivative(d, memory):
    """The derivative rule: memory["ema"] holds ema10(d), the moving average of d over about 10
    steps (d itself at the first step, then 0.9 ema + 0.1 d each step); the step is d where
    d * (d - ema) > 0 and 0 elsewhere, so it pushes only while an error still grows."""
    ema = memory["ema"] = 0.9 * memory["ema"] + 0.1 * d if "ema" in memory else d  # ema10(d)
    return d * (d * (d - ema) > 0)  # only while the error still grows away from 0


def proportional_integral(d, memory, kp=10.0):
    # c = lr * (kp * d + the running sum of d), as a step: the sum's step is d, kp * d's is
    # kp * (d - the previous d). (Exact with tol = 0; tol skips some of the kp steps.)
    step = kp * (d - memory.get("previous", 0.0)) + d
    memory["previous"] = d
    return step


TARGET_RULES = {"adaptive": adaptive, "proportional": proportional,
                "proportional_derivative": proportional_derivative,
                "proportional_integral": proportional_integral}
# the fixed kinds' default coefficients (c, k): they never move
FIXED = {"sparsity": (0.01, 0.0), "sparsity_variance": (0.01, -0.01),
         "sparsity_variance_l2": (0.1, 0.1)}


def controller_kinds():
    """Every kind of controller, read when asked: a rule added to TARGET_RULES counts at once."""
    return (*FIXED, *TARGET_RULES)


class GateController:
    """The gate regularizer, loss = mean_l(c_l * mu_l) + mean_l(k_l * v_l) from each layer's gate
    mean mu_l and variance v_l, and the rule that sets its coefficients c and k. The fixed kinds
    keep c = coef and k = var_coef (None: their defaults, FIXED); the target kinds start there
    (None: 0) and move c by the errors of the means from their targets, k by those of the
    variances (gate_targets). lr is the rule's step (the paper's 1e-3; 1e-2 in its
    proportional_derivative runs); coef_min, coef_max clamp; rule_args go to the rule.
    (configurator.gate_controller builds one from train.py's settings.)"""

    def __init__(self, kind, n_layer, *, coef=None, var_coef=None, target_start=1.0,
                 target_end=0.5, var_target_delta=0.0, lr=1e-3, tol=0.01, coef_min=-math.inf,
                 coef_max=math.inf, device="cpu", **rule_args):
        if kind not in controller_kinds():
            raise ConfigError(f"controller must be one of {', '.join(controller_kinds())}; "
                              f"got {kind!r}")
        if not (0 <= target_start <= 1 and 0 <= target_end <= 1 and lr >= 0 and tol >= 0):
            raise ConfigError(f"controller targets must be in [0, 1] and lr, tol >= 0; got "
                              f"{target_start}, {target_end}, lr={lr}, tol={tol}")
        self.kind, self.lr, self.tol, self.limits = kind, lr, tol, (coef_min, coef_max)
        self.rule_args = rule_args
        targets = gate_targets(n_layer, target_start, target_end, var_target_delta)
        self.mean_targets, self.var_targets = (t.to(device) for t in targets)
        c, k = FIXED.get(kind, (0.0, 0.0))  # the target kinds start at 0 by default
        c, k = (c if coef is None else coef), (k if var_coef is None else var_coef)
        self.mean_coefs = torch.full((n_layer,), c, device=device)
        self.var_coefs = torch.full((n_layer,), k, device=device)
        self.memory = {"mean": {}, "var": {}}  # the rule's, for the means and the variances
        self.steps = 0

    def loss(self, gates):
        """The regularizer from one micro-batch's gates (L, B, T), in fp32: each layer's mean
        mu_l and (unbiased) variance v_l over the batch's tokens, weighted by that layer's
        coefficients c_l and k_l, mean_l(c_l * mu_l) + mean_l(k_l * v_l). The kind
        sparsity_variance_l2 puts the Euclidean distances, over the layers, of the means from
        their targets and of the variances from theirs in place of mu_l and v_l."""
        g = gates.float()
        means, variances = g.mean((1, 2)), g.var((1, 2))
        if self.kind == "sparsity_variance_l2":
            means = (means - self.mean_targets).norm()
            variances = (variances - self.var_targets).norm()
        return (self.mean_coefs * means).mean() + (self.var_coefs * variances).mean()

    def update(self, means, variances):
        """One step of the rule from per-layer gate means and variances (L,) of a whole optimizer
        step (pooled over micro-steps and processes, so every process takes the same step): with
        d the errors from the targets, each coefficient moves by lr * rule(d, memory) where
        |d| > tol, and is clamped. The means move c, the variances k; each has its own memory."""
        if self.kind in FIXED:
            return
        rule = TARGET_RULES[self.kind]
        d_mean = means.to(self.mean_targets) - self.mean_targets  # (L,)
        d_var = variances.to(self.var_targets) - self.var_targets
        step_mean = self.lr * rule(d_mean, self.memory["mean"], **self.rule_args)
        step_var = self.lr * rule(d_var, self.memory["var"], **self.rule_args)
        self.mean_coefs = (self.mean_coefs + step_mean * (d_mean.abs() > self.tol)).clamp(
            *self.limits)
        self.var_coefs = (self.var_coefs + step_var * (d_var.abs() > self.tol)).clamp(*self.limits)
        self.steps += 1

    def state_dict(self):
        return {"kind": self.kind, "steps": self.steps, "mean_coefs": self.mean_coefs.cpu(),
                "var_coefs": self.var_coefs.cpu(), "memory": moved_to(self.memory, "cpu")}

    def load_state_dict(self, state):
        if state["kind"] != self.kind:
            raise ConfigError(f"the checkpoint's controller is {state['kind']!r}, this run asks "
                              f"for {self.kind!r}; pass --controller={state['kind']} or use "
                              f"another out_dir")
        device = self.mean_coefs.device
        self.steps = state["steps"]
        if self.kind not in FIXED:  # a fixed kind's coefficients are settings, not state
            self.mean_coefs = state["mean_coefs"].to(device)
            self.var_coefs = state["var_coefs"].to(device)
        memory = state.get("memory") or {n: {"ema": e} for n, e in state["ema"].items()}  # older
        self.memory = moved_to(memory, device)


def moved_to(memory, device):
    """A rule's memory (tensors, numbers, dicts and lists of them) with its tensors on device."""
    if isinstance(memory, dict):
        return {k: moved_to(v, device) for k, v in memory.items()}
    if isinstance(memory, (list, tuple)):
        return type(memory)(moved_to(v, device) for v in memory)
    return memory.to(device) if torch.is_tensor(memory) else memory
