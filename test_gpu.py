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
from model import GPT, GateController, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
V = 64


def gated_model(device="cpu", **kw):
    """A tiny gated model whose gates spread over [0, 1], some exactly 0."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**{**dict(vocab_size=V, block_size=64, n_layer=4, n_head=4, n_kv_head=2,
                                n_embd=32), **kw}))
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
    M.load_checkpoint(str(out / 'ckpt.pt'))  # no _orig_mod. prefixes left in the way


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
    assert losses[-1] < 0.5 * losses[0]


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
