"""
A transformer that learns to skip its middle layers: T. Lawson and L. Aitchison, "Learning to
Skip the Middle Layers of Transformers" (2025), https://arxiv.org/abs/2506.21103.

In the paper's order: config, RMSNorm, rotary, attention with a key bias, SwiGLU, the gate and
its key bias, the sandwich block, the model and its FLOPs, the regularizer, its controllers.

    layer:   0     1     2     3     4     5       L = 6 layers, one token
    gate:   g0    g1    g2    g2    g1    g0       g0 >= g1 >= g2, each in [0, 1]

Once g_i = 0 the token skips layers i .. L-1-i: they add nothing to it, and no other token may
attend to its key there. This is the plain definition; skipping.py computes it with less work.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import skipping


@dataclass
class GPTConfig:
    vocab_size: int = 50304    # rows of the embedding and the logits
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12        # grouped-query attention: n_head / n_kv_head heads share K and V
    n_embd: int = 768
    rope_theta: float = 10000.0
    rope_scaling: bool = False  # Llama 3.1's rotary frequency scaling (some released models)
    norm_eps: float = 1e-5
    gated: bool = True         # False: a dense baseline (no gate heads, every gate 1)
    gate_init: str = "normal"  # N(0, 0.02); "zero": g = 1 everywhere, and since relu'(0) = 0
                               # the heads never get a gradient
    gate_eps: float = 1e-6     # an open gate's key bias is log(max(g, gate_eps))
    hide_closed_keys: bool = True  # False: closed keys stay visible (the authors' releases)


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
    """cos and sin tables (length, head_dim) for rotate-half RoPE; scaling: Llama 3.1's."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    if scaling:
        blend = ((8192 * inv_freq / (2 * math.pi) - 1) / 3).clamp(0, 1)  # 0 at 8192, 1 at 2048
        inv_freq = (1 - blend) * inv_freq / 8 + blend * inv_freq
    angles = torch.outer(torch.arange(length).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x (B, H, T, hd); cos, sin (T, hd) for the positions of x (or (B, 1, T, hd), one row each)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


def attention(q, k, v, key_bias=None):
    """Causal attention with a key bias. q (B, H, T, hd) are the last T of the S positions of k
    and v (B, H_kv, S, hd); key_bias (B, S) or None joins every query's score on key j, so a very
    negative bias hides key j. Returns (B, H, T, hd)."""
    T, S = q.size(2), k.size(2)
    k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))  # share K, V
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~causal, float("-inf"))
    if key_bias is not None:
        scores = scores + key_bias[:, None, None, :].to(scores.dtype)  # (B, 1, 1, S): by key
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    fast = True  # skipping.causal_attention: attention() on a fused kernel, tested equal;
                 # skipping.use_plain(model) turns it off and attention() itself runs

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
    """The gate of a layer i < L/2 and the running sum behind it:
        m_i = relu(w_i . x + b_i) + m_{i-1},    g_i = 1 - clamp(m_i, 0, 1)
    head: layer i's gate head, Linear(d, 1); x (B, T, d): the stream entering layer i; m: m_{i-1}
    (B, T, 1), or 0.0 before layer 0. Returns g_i and m_i, both (B, T, 1), m in float32."""
    m = F.relu(head(x)).float() + m
    return 1.0 - m.clamp(0.0, 1.0), m


CLOSED = -1e4  # a closed gate's key bias: exp(CLOSED + any score gap under ~9,900) is exactly 0


def gate_bias(g, eps):
    """The key bias (B, T) of gates g (B, T): log(max(g, eps)) where g > 0, CLOSED where g == 0,
    with a finite gradient everywhere."""
    return torch.log(g.clamp_min(eps)).masked_fill(g == 0, CLOSED)


class Block(nn.Module):
    """The sandwich-norm ("peri-LN") block: each sublayer's input and output are normalized, and
    the gate g scales what each sublayer adds to the stream."""

    def __init__(self, cfg):
        super().__init__()
        d, eps = cfg.n_embd, cfg.norm_eps
        self.attn_pre, self.attn_post = RMSNorm(d, eps), RMSNorm(d, eps)
        self.ffn_pre, self.ffn_post = RMSNorm(d, eps), RMSNorm(d, eps)
        self.attn = Attention(cfg)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin, g=1.0, key_bias=None, cache=None):
        """x (B, T, d), g (B, T, 1) or 1.0 -> x + g * Norm(Attention(Norm(x))), attention given
        key_bias and cache, then x + g * Norm(FFN(Norm(x))), each with its own two norms."""
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

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out the token embedding (as nanoGPT does)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, skip=False, norms=None):
        """idx (B, T) token ids -> logits (B, T, V), the mean cross-entropy against targets (B, T)
        or None, and the gates (L, B, T) or None (dense). skip=True computes the same with less
        work (skipping.py); norms, a list, gets each layer's mean residual-stream norm."""
        T = idx.size(1)
        assert T <= self.config.block_size, f"{T} tokens, block_size {self.config.block_size}"
        x = self.norm_in(self.tok_emb(idx))  # (B, T, d)
        layer = functools.partial(self.layer, cos=self.rope_cos[:T], sin=self.rope_sin[:T],
                                  skip=skip, norms=norms)
        x, gates = self.run_layers(x, layer)
        logits = self.lm_head(self.norm_out(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss, (torch.stack(gates).squeeze(-1) if gates else None)

    def run_layers(self, x, layer):
        """x (B, T, d) through every layer(i, block, x, g) (block as layer i with gate g, giving
        the stream): the gate loop, or g = 1.0 if dense. Returns the last stream and the gates."""
        if self.config.gated:
            return self.gate_loop(x, layer)
        for i, block in enumerate(self.blocks):
            x = layer(i, block, x, 1.0)
        return x, []

    def gate_loop(self, x, layer):
        """The method's loop over a gated model's layers: x (B, T, d) in; out, the last stream
        and the gates, L tensors (B, T, 1). Layer i < L/2 gets its gate from next_gate, carrying
        the running sum; layer L-1-i reuses layer i's (the mirror)."""
        L = self.config.n_layer
        gates, m = [], 0.0
        for i, block in enumerate(self.blocks):
            if i < L // 2:
                g, m = next_gate(self.gate_heads[i], x, m)  # (B, T, 1)
            else:
                g = gates[L - 1 - i]  # the mirror: layer L-1-i reuses layer i's gate
            gates.append(g)
            x = layer(i, block, x, g)
        return x, gates

    def layer(self, i, block, x, g, cos, sin, skip=False, norms=None):
        """Layer i: block with gate g, closed keys hidden by their key bias; with skip, run on
        the tokens whose gate is open only. (The block comes in beside i: looked up by i, it
        would compile a graph per layer.)"""
        key_bias = self.key_bias(g)
        if skip and key_bias is not None:
            x = skipping.active_tokens_layer(block, x, cos, sin, g, key_bias)
        else:
            x = block(x, cos, sin, g, key_bias)
        if norms is not None:
            norms.append(x.detach().float().norm(dim=-1).mean())
        return x

    def key_bias(self, g):
        """gate_bias of gates g (B, T, 1); None if dense or closed keys stay visible."""
        c = self.config
        return gate_bias(g.squeeze(-1), c.gate_eps) if c.gated and c.hide_closed_keys else None

    def flops_per_token(self, sparsity=0.0, seq_len=None):
        """Estimated forward FLOPs per token with seq_len (default block_size) positions of
        context, term by term: 2 per multiply-add, and elementwise work. A skipped pair costs
        nothing but, with closed keys visible, its key and value."""
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
    """Per-layer mean and mean square (L,) of gates (L, B, T), detached, in float32, which
    train.py averages over a step's micro-steps and processes."""
    g = gates.detach().float()
    return g.mean((1, 2)), (g * g).mean((1, 2))


def pooled_variance(mean, square):
    """Per-layer variance E[g^2] - E[g]^2 of a whole step from gate_moments' averaged parts,
    never below 0 (rounding)."""
    return (square - mean * mean).clamp_min(0)


def gate_targets(n_layer, start, end, var_delta=0.0):
    """Per-layer targets (L,): gate means t linear from start (outer layers) to end (middle) over
    the first half, mirrored; gate variances t(1 - t) + var_delta, never below 0."""
    half = torch.linspace(start, end, n_layer // 2)
    t = torch.cat([half, half.flip(0)])
    return t, (t * (1 - t) + var_delta).clamp_min(0)


# A target rule moves each layer's coefficient after every step from the error d (L,) of that
# layer's gate mean (or variance) from its target: c += lr * rule(d, memory) where |d| > tol.
# memory is the rule's own dict, empty at first and saved with every checkpoint; train.py's
# other ctrl_X settings reach a rule's keyword argument X.

def adaptive(d, memory):
    return torch.sign(d)


def proportional(d, memory):
    return d


def proportional_derivative(d, memory):
    """d where d * (d - ema10(d)) > 0, else 0: it pushes only while an error still grows.
    memory["ema"] holds ema10(d): d at the first step, then 0.9 ema + 0.1 d."""
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
# the fixed kinds' coefficients (c, k) unless given: they never move
FIXED = {"sparsity": (0.01, 0.0), "sparsity_variance": (0.01, -0.01),
         "sparsity_variance_l2": (0.1, 0.1)}


def controller_kinds():
    """Every kind of controller, read when asked: a rule added to TARGET_RULES counts at once."""
    return (*FIXED, *TARGET_RULES)


class GateController:
    """The regularizer, mean_l(c_l * mu_l) + mean_l(k_l * v_l) of each layer's gate mean mu_l and
    variance v_l, and the rule that sets c and k. Fixed kinds keep c = coef, k = var_coef (None:
    FIXED's); target kinds start there (None: 0) and move from the errors from gate_targets."""

    def __init__(self, kind, n_layer, *, coef=None, var_coef=None, target_start=1.0,
                 target_end=0.5, var_target_delta=0.0, lr=1e-3, tol=0.01, coef_min=-math.inf,
                 coef_max=math.inf, device="cpu", **rule_args):
        if kind not in controller_kinds():
            raise ValueError(f"controller must be one of {', '.join(controller_kinds())}; "
                             f"got {kind!r}")
        self.kind, self.lr, self.tol, self.limits = kind, lr, tol, (coef_min, coef_max)
        self.rule, self.rule_args = TARGET_RULES.get(kind), rule_args  # rule None: a fixed kind
        targets = gate_targets(n_layer, target_start, target_end, var_target_delta)
        self.mean_targets, self.var_targets = (t.to(device) for t in targets)
        c, k = FIXED.get(kind, (0.0, 0.0))
        c, k = (c if coef is None else coef), (k if var_coef is None else var_coef)
        self.mean_coefs = torch.full((n_layer,), c, device=device)
        self.var_coefs = torch.full((n_layer,), k, device=device)
        self.memory = {"mean": {}, "var": {}}  # the rule's, for the means and the variances

    def loss(self, gates):
        """The regularizer of one micro-batch's gates (L, B, T), in float32, from each layer's
        mean and unbiased variance over the batch, weighted by mean_coefs and var_coefs.
        sparsity_variance_l2 weighs their Euclidean distances from the targets instead."""
        g = gates.float()
        means, variances = g.mean((1, 2)), g.var((1, 2))
        if self.kind == "sparsity_variance_l2":
            means = (means - self.mean_targets).norm()
            variances = (variances - self.var_targets).norm()
        return (self.mean_coefs * means).mean() + (self.var_coefs * variances).mean()

    def update(self, means, variances):
        """One step of a target kind's rule from a whole optimizer step's gate means and
        variances (L,): with d the errors from the targets, each coefficient moves by
        lr * rule(d, memory, **rule_args) where |d| > tol and is clamped to the limits. The
        means move mean_coefs and the variances var_coefs, each with its own memory."""
        d_mean = means.to(self.mean_targets) - self.mean_targets  # (L,)
        d_var = variances.to(self.var_targets) - self.var_targets
        step_mean = self.lr * self.rule(d_mean, self.memory["mean"], **self.rule_args)
        step_var = self.lr * self.rule(d_var, self.memory["var"], **self.rule_args)
        self.mean_coefs = (self.mean_coefs + step_mean * (d_mean.abs() > self.tol)).clamp(
            *self.limits)
        self.var_coefs = (self.var_coefs + step_var * (d_var.abs() > self.tol)).clamp(*self.limits)
