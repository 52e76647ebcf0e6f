"""The GPU path: torch.compile, bf16 autocast, the key bias on SDPA's fused CUDA kernels with
gradients through it, generation on CUDA, checkpoints moving from a GPU to a CPU. The CUDA tests
skip without CUDA; the CPU stand-ins run what a CPU can of the same code, so CI exercises them.
./gpu_check.sh runs this file first on a GPU machine."""

import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from checkpoints import load_checkpoint
from model import GPT, GateController, GPTConfig, attention, gate_bias
import skipping as S
from skipping import causal_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
V = 64


def gated_model(device="cpu", **kw):
    """A tiny gated model whose gates spread over [0, 1], some exactly 0; head dim 16."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**{**dict(vocab_size=V, block_size=64, n_layer=4, n_head=4, n_kv_head=2,
                                n_embd=64), **kw}))
    with torch.no_grad():
        for head in m.gate_heads:
            head.weight.normal_(0, 0.3)
    return m.to(device)


# ----------------------------------------------------------------------------- CPU stand-ins

COMPILED_TRAIN = """
import os, runpy, sys, torch
sys.path.insert(0, os.getcwd())
compile = torch.compile  # aot_eager: dynamo traces and guards as for inductor, without its codegen
torch.compile = lambda model, **kwargs: compile(model, backend='aot_eager', **kwargs)
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
"""


@pytest.mark.slow
def test_train_compiled_bf16_on_cpu(tmp_path):
    """train.py with torch.compile and bf16 autocast, the settings a GPU run takes by default,
    for a few steps of a small model: it runs, learns, and leaves a usable checkpoint."""
    from prepare import prepare
    data = prepare('shakespeare_char', out_dir=str(tmp_path / 'data'))
    out = tmp_path / 'out'
    p = subprocess.run([sys.executable, '-c', COMPILED_TRAIN, '--compile=true', '--dtype=bfloat16',
                        '--n_layer=2', '--n_head=2', '--n_kv_head=2', '--n_embd=32', '--block_size=32',
                        '--batch_size=8', '--max_iters=12', '--eval_interval=12', '--eval_tokens=1024',
                        '--log_interval=1', '--learning_rate=1e-2', f'--data_dir={data}', f'--out_dir={out}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert 'bfloat16, compile True' in p.stdout
    losses = [float(line.split('| ce ')[1].split()[0]) for line in p.stdout.splitlines()
              if line.startswith('step ')]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
    load_checkpoint(str(out / 'ckpt.pt'))  # no _orig_mod. prefixes left in the way


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
    if not hasattr(torch._dynamo.config, 'fail_on_recompile_limit_hit'):
        pytest.skip('this torch has no torch._dynamo.config.fail_on_recompile_limit_hit (2.13 has)')
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    old = torch._dynamo.config.fail_on_recompile_limit_hit
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    yield torch._dynamo.utils.counters
    torch._dynamo.config.fail_on_recompile_limit_hit = old
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_skip_training_compiles_few_graphs(fail_on_recompile_limit):
    """A compiled 12-layer gated model trains with skip=True over batches of 12 different
    packed lengths, from every token running every layer to none running the middle ones,
    and evaluates too, without reaching torch.compile's recompile limit (8 per function). The
    aot_eager backend traces and guards exactly as the GPU's inductor does, minus code
    generation."""
    m = controlled_gates_model()
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


@pytest.mark.slow
def test_compiled_gated_step_equals_the_eager_one(fail_on_recompile_limit):
    """A compiled gated model (the masked path: the key bias in the fused kernel's extra
    channels, no host syncs) gives the eager model's loss and gradients, in one graph."""
    m = gated_model()
    idx = torch.randint(0, V, (2, 65))
    results = []
    for run in (m, torch.compile(m, backend="aot_eager")):
        m.zero_grad()
        _, loss, gates = run(idx[:, :-1], idx[:, 1:])
        (loss + GateController("sparsity", 4).loss(gates)).backward()
        results.append([loss] + [p.grad.clone() for p in m.parameters()])
    assert 0 < (gates == 0).float().mean() < 1
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert fail_on_recompile_limit["stats"]["unique_graphs"] == 1


# ----------------------------------------------------------------------------- CUDA

@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_key_bias_runs_on_a_fused_cuda_kernel_and_equals_the_plain_attention(dtype):
    """The key bias in extra channels of q and k: output and gradients equal model.attention's.
    In bfloat16, as training runs on a GPU, only SDPA's flash kernel may run it (SDPA raises if
    it cannot), grouped-query heads included; float32 may take any kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 128, 64, device="cuda", dtype=dtype) for h in (8, 4, 4))
    g = torch.rand(2, 128, device="cuda").masked_fill(torch.rand(2, 128, device="cuda") < 0.3, 0)
    results = []
    fused_only = (sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if dtype == torch.bfloat16 else
                  contextlib.nullcontext())
    for fused in (False, True):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)] + [gate_bias(g, 1e-6).requires_grad_()]
        with fused_only if fused else contextlib.nullcontext():
            out = (causal_attention if fused else attention)(*inputs)
        out.float().pow(2).sum().backward()
        results.append([out.float()] + [t.grad.float() for t in inputs])
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=tol, rtol=tol)


@cuda
def test_compiled_bf16_gated_training_lowers_the_loss_on_cuda():
    m = gated_model("cuda")
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
    out, gates = S.generate(m, prompt, 24, temperature=0, return_gates=True)
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
