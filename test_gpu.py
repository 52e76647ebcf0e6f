"""The GPU path: torch.compile, bf16 autocast, FlexAttention with the key bias and gradients
through it, generation on CUDA, checkpoints moving from a GPU to a CPU. The CUDA tests skip
without CUDA; the CPU stand-ins run the branches that a CPU can run, so CI exercises them.
./gpu_check.sh runs this file first on a GPU machine."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import model as M
from checkpoints import load_checkpoint
from model import GPT, GateController, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
V = 64


def gated_model(device="cpu", **kw):
    """A tiny gated model whose gates spread over [0, 1], some exactly 0. Head dim 16: the least
    FlexAttention's CUDA kernel takes."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**{**dict(vocab_size=V, block_size=64, n_layer=4, n_head=4, n_kv_head=2,
                                n_embd=64), **kw}))
    with torch.no_grad():
        for head in m.gate_heads:
            head.weight.normal_(0, 0.3)
    return m.to(device)


# ----------------------------------------------------------------------------- CPU stand-ins

@pytest.mark.skipif(M.flex_attention is None, reason="FlexAttention needs torch >= 2.6")
def test_compiled_flex_forward_matches_sdpa_on_cpu(monkeypatch):
    """The FlexAttention kernel compiled, as model.py compiles it on CUDA, with the key bias as
    its score_mod, against the SDPA path; forward only (FlexAttention has no CPU backward).
    (Inductor's CPU template refuses FlexAttention inside a whole compiled model; on CPU the
    'auto' backend is SDPA, so train.py never asks for that.)"""
    monkeypatch.setattr(M, "flex_attention", torch.compile(M.flex_attention, dynamic=False))
    idx = torch.randint(0, V, (2, 64))
    with torch.no_grad():
        want, _, gates = gated_model(attn_backend="sdpa")(idx)
        got, _, _ = gated_model(attn_backend="flex")(idx)
    assert 0 < (gates == 0).float().mean() < 1
    assert torch.allclose(want, got, atol=1e-4)


def test_train_compiled_bf16_on_cpu(tmp_path):
    """train.py with torch.compile and bf16 autocast, the settings a GPU run takes by default,
    for a few steps of a small model: it runs, learns, and leaves a usable checkpoint."""
    from prepare import prepare
    data = prepare('shakespeare_char', out_dir=str(tmp_path / 'data'))
    out = tmp_path / 'out'
    p = subprocess.run([sys.executable, 'train.py', '--compile=true', '--dtype=bfloat16', '--n_layer=2',
                        '--n_head=2', '--n_kv_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
                        '--max_iters=12', '--eval_interval=12', '--eval_tokens=1024', '--log_interval=1',
                        '--learning_rate=1e-2', f'--data_dir={data}', f'--out_dir={out}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert 'bfloat16, compile True' in p.stdout
    losses = [float(line.split('| ce ')[1].split()[0]) for line in p.stdout.splitlines()
              if line.startswith('step ')]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
    load_checkpoint(str(out / 'ckpt.pt'))  # no _orig_mod. prefixes left in the way


@pytest.mark.skipif(M.flex_attention is None, reason="FlexAttention needs torch >= 2.6")
def test_flex_kernel_is_compiled_once_outside_traced_code():
    """Eager FlexAttention calls on CUDA take one compiled kernel (FlexAttention is fused only
    when compiled). Traced code, which runs first in a compiled model, takes plain
    flex_attention (the model's graph fuses it) and does not make that kernel: made inside a
    trace, torch.compile would be a no-op and every later eager call (evaluation) would run the
    unfused reference. Only the device's type is read, so this runs on a CPU."""
    cuda_device = torch.device("cuda")
    M.compiled_flex.cache_clear()
    traced = torch.compile(lambda x: x + (M.flex_kernel(cuda_device) is M.flex_attention),
                           backend="aot_eager", fullgraph=True)
    assert traced(torch.zeros(1)).item() == 1
    kernel = M.flex_kernel(cuda_device)
    assert getattr(kernel, "_torchdynamo_orig_callable", None) is M.flex_attention
    assert M.flex_kernel(cuda_device) is kernel  # made once
    assert M.flex_kernel(torch.device("cpu")) is M.flex_attention


def test_auto_backend_avoids_flex_where_its_cuda_kernel_cannot_run():
    """FlexAttention on CUDA needs a head dim of at least 16: 'auto' picks SDPA below that, and
    an explicit 'flex' there is refused in one line. (Only the device's type is read.)"""
    cuda_device = torch.device("cuda")
    small = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=4, n_embd=32))
    assert small.attn_backend(cuda_device) == "sdpa"
    assert gated_model().attn_backend(cuda_device) == "flex"  # head dim 16
    assert gated_model().attn_backend(torch.device("cpu")) == "sdpa"
    explicit = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
                             attn_backend="flex"))
    with pytest.raises(M.ConfigError, match="head dim n_embd/n_head of 16 or more on CUDA, got 8"):
        explicit.attn_backend(cuda_device)


def controlled_gates_model(**kw):
    """12 layers. A token with id below 16 skips layers 1-10 (gate head 1 reads embedding
    feature 0); id 16-31 skips layers 3-8 (head 3, feature 1); others skip nothing. So the
    share of such ids in a batch sets every layer's packed length."""
    m = gated_model(n_layer=12, block_size=128, **kw)
    ids = torch.arange(V)
    with torch.no_grad():
        for head in m.gate_heads:
            head.weight.zero_()
            head.bias.fill_(-1.0)
        m.tok_emb.weight[:, 0] = torch.where(ids < 16, 1.0, -1.0)
        m.tok_emb.weight[:, 1] = torch.where((ids >= 16) & (ids < 32), 1.0, -1.0)
        m.gate_heads[1].weight[0, 0] = m.gate_heads[3].weight[0, 1] = 100.0
    return m


def batches_of_many_packed_lengths(n, B=2, T=128):
    """n batches whose share of skipping tokens runs from none to all."""
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        idx = torch.randint(32, V, (B, T + 1), generator=gen)
        skips = torch.rand(B, T + 1, generator=gen) < i / (n - 1)
        yield torch.where(skips, torch.randint(0, 32, (B, T + 1), generator=gen), idx)


@pytest.fixture
def fail_on_recompile_limit():
    """Turn torch.compile's silent fall-back to eager, at the recompile limit, into an error."""
    import torch._dynamo
    torch._dynamo.reset()
    old = torch._dynamo.config.fail_on_recompile_limit_hit
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    yield torch._dynamo.utils.counters
    torch._dynamo.config.fail_on_recompile_limit_hit = old
    torch._dynamo.reset()


def test_compiled_skip_training_compiles_few_graphs(fail_on_recompile_limit):
    """A compiled 12-layer gated model trains with skip=True over batches of 12 different
    packed lengths, from every token running every layer to none running the middle ones,
    and evaluates too, without reaching torch.compile's recompile limit (8 per function). The
    aot_eager backend traces and guards exactly as the GPU's inductor does, minus code
    generation."""
    m = controlled_gates_model(attn_backend="sdpa")
    step_model = torch.compile(m, backend="aot_eager")
    opt = m.configure_optimizer(1e-3, (0.9, 0.95), 0.0, "cpu")
    ctrl = GateController("proportional", 12)
    zeros = []
    for idx in batches_of_many_packed_lengths(12):
        _, loss, gates = step_model(idx[:, :-1], idx[:, 1:], skip=True)
        (loss + ctrl.loss(gates)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        zeros.append((gates[5] == 0).float().mean().item())
        assert torch.isfinite(loss)
    assert zeros[0] == 0 and zeros[-1] == 1 and len(set(zeros)) == 12
    with torch.no_grad():
        for idx in batches_of_many_packed_lengths(6):
            step_model(idx[:, :-1], skip=True)
    assert fail_on_recompile_limit["stats"]["unique_graphs"] <= 24


@pytest.mark.skipif(M.flex_attention is None, reason="FlexAttention needs torch >= 2.6")
def test_compiled_flex_skip_forward_over_many_packed_lengths(fail_on_recompile_limit):
    """The compiled model with FlexAttention (its block masks made inside the graph), forward
    with skip=True over 8 packed lengths (FlexAttention has no CPU backward), matches the eager
    masked SDPA path, without reaching the recompile limit."""
    flex = controlled_gates_model(attn_backend="flex").eval()
    sdpa = controlled_gates_model(attn_backend="sdpa").eval()
    compiled = torch.compile(flex, backend="aot_eager")
    with torch.no_grad():
        for idx in batches_of_many_packed_lengths(8):
            want, _, gates = sdpa(idx[:, :-1])
            got, _, _ = compiled(idx[:, :-1], skip=True)
            assert torch.allclose(want, got, atol=1e-4)
    assert (gates == 0).all(1).any()  # the last batch: no token runs the middle layers


# ----------------------------------------------------------------------------- CUDA

@cuda
@pytest.mark.skipif(M.flex_attention is None, reason="FlexAttention needs torch >= 2.6")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_and_sdpa_agree_forward_and_backward_on_cuda(dtype):
    """Loss and every gradient, gate heads included, agree between the two backends."""
    grads = {}
    idx = torch.randint(0, V, (2, 64), device="cuda")
    for backend in ("sdpa", "flex"):
        m = gated_model("cuda", attn_backend=backend)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            _, loss, _ = m(idx, idx)
        loss.backward()
        grads[backend] = [loss.detach().float()] + [p.grad.float() for p in m.parameters()]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(grads["sdpa"], grads["flex"]):
        assert torch.allclose(a, b, atol=tol, rtol=tol)
    assert all(p.grad.abs().sum() > 0 for p in m.gate_heads.parameters())


@cuda
def test_compiled_bf16_gated_training_lowers_the_loss_on_cuda():
    m = gated_model("cuda")  # attn_backend 'auto': FlexAttention on CUDA
    assert m.attn_backend(torch.device("cuda")) == "flex"
    opt = m.configure_optimizer(3e-3, (0.9, 0.95), 0.0, "cuda")
    ctrl = GateController("proportional", 4, device="cuda")
    step_model = torch.compile(m)
    idx = torch.randint(0, V, (8, 65), device="cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss, gates = step_model(idx[:, :-1], idx[:, 1:])
            (loss + ctrl.loss(gates)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]  # the same on a CPU: 0.51-0.55 over 8 data seeds


@cuda
def test_generate_on_cuda_matches_full_forward_passes():
    m = gated_model("cuda").eval()
    prompt = torch.randint(0, V, (3, 8), device="cuda")
    out, gates = m.generate(prompt, 24, temperature=0, return_gates=True)
    idx = prompt
    with torch.no_grad(), warnings.catch_warnings():
        for _ in range(24):
            logits, _, _ = m(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)
    assert (gates[:, :, 8:] == 0).any(), "decoded tokens must skip some layers"


@cuda
def test_checkpoint_written_on_cuda_samples_on_cpu(tmp_path):
    from prepare import prepare
    data = prepare('shakespeare_char', out_dir=str(tmp_path / 'data'))
    out = tmp_path / 'out'
    train = subprocess.run([sys.executable, 'train.py', '--device=cuda', '--n_layer=2', '--n_head=2',
                            '--n_kv_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
                            '--max_iters=4', '--eval_interval=4', '--eval_tokens=1024',
                            f'--data_dir={data}', f'--out_dir={out}'],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    sample = subprocess.run([sys.executable, 'sample.py', '--device=cpu', f'--out_dir={out}',
                             '--max_new_tokens=50', '--show_skips', '--no_color'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert 'layers run per new token' in sample.stdout
