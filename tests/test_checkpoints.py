"""Tests of checkpoints.py: train.py's checkpoints, and the authors' released models (no network).

The fixture data/skip_middle_tiny/ was made once by the authors' own code
(github.com/tim-lawson/skip-middle at commit 9b21b2d): their gated Transformer with dim 64,
4 layers, 4 heads, 2 K/V heads, vocabulary 128, max_seq_len 32, their initialization after
torch.manual_seed(0), then norm weights 1 + 0.2 N(0, 1), wq and wk times 3 and gate heads with
weights 0.1 N(0, 1) and bias 0.4 (from a generator seeded with 2), so that 38.5% of the gates
on the fixture batch are 0. It was saved as their Hugging Face upload saves it (config.json,
model.safetensors with a bfloat16 embedding), and its logits and gates for a fixed batch come
from their causal training path in float32. data/skip_middle_tiny/README.md has the details.
"""

import builtins
import importlib.util
import os

import pytest
import torch

import checkpoints
import model as M
from checkpoints import CheckpointError, load_released
from model import GPT, GPTConfig
import skipping as S
from skipping import KVCache

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
released = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                              reason="the released format needs safetensors")
FIXTURE = os.path.join(HERE, "data", "skip_middle_tiny")


def reference():
    from safetensors.torch import load_file
    return load_file(os.path.join(FIXTURE, "reference_outputs.safetensors"))


def largest_logit_difference(m):
    ref = reference()
    with torch.no_grad():
        logits, _, _ = m(ref["idx"])
    return (logits - ref["logits"]).abs().max().item()


@released
def test_released_model_matches_the_authors_code(monkeypatch):
    m = load_released(FIXTURE)
    assert m.config.gated and not m.config.hide_closed_keys
    assert m.tok_emb.weight.dtype == torch.float32  # stored as bfloat16
    ref = reference()
    assert (ref["gates"] == 0).float().mean() > 0.3
    assert largest_logit_difference(m) < 1e-4
    assert torch.allclose(m(ref["idx"])[2], ref["gates"], atol=1e-5)
    # the same check fails without the rotary row order, or with closed keys hidden
    monkeypatch.setattr(checkpoints, "rotate_half_rows", lambda w, n_heads: w)
    assert largest_logit_difference(load_released(FIXTURE)) > 1e-2
    monkeypatch.undo()
    hidden = load_released(FIXTURE)
    hidden.config.hide_closed_keys = True
    assert largest_logit_difference(hidden) > 1e-2


@released
def test_released_model_generates_as_full_forwards_while_skipping():
    """Greedy generation with the KV cache equals greedy full forward passes. A decoded token
    whose gate is 0 computes only its key and value in those layers (its key stays visible)."""
    m = load_released(FIXTURE).eval()
    prompt = reference()["idx"][:, :8]
    out, gates = S.generate(m, prompt, 20, temperature=0, return_gates=True)
    idx = prompt
    with torch.no_grad():
        for _ in range(20):
            logits, _, _ = m(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)
    assert (gates[:, :, 8:] == 0).any()


@released
def test_keys_visible_decoding_computes_keys_but_no_queries_for_skipped_tokens():
    m = load_released(FIXTURE).eval()
    seq = reference()["idx"]
    rows = {"wq": 0, "wk": 0}
    with torch.no_grad():
        _, _, gates = m(seq)
        cache = KVCache(m, 2, 24, seq.device)
        S.cached_forward(m, seq[:, :8], cache, skip=False)
        for block in m.blocks:
            for name in rows:
                getattr(block.attn, name).register_forward_hook(
                    lambda mod, inp, out, name=name: rows.__setitem__(name, rows[name] + inp[0].size(0)))
        for t in range(8, 24):
            S.cached_forward(m, seq[:, t:t + 1], cache)
    decoded = gates[:, :, 8:]
    assert rows["wk"] == decoded.numel()  # every (token, layer) gets its key and value
    assert rows["wq"] == (decoded > 0).sum() < decoded.numel()  # only the open ones a query


@released
def test_skip_true_with_keys_visible_computes_every_token():
    """A closed key that stays visible is needed in every layer: skip=True then runs every token
    (closed ones included), and gives what the authors' code gives."""
    m = load_released(FIXTURE)
    with torch.no_grad():
        logits, _, _ = m(reference()["idx"], skip=True)
    assert (logits - reference()["logits"]).abs().max().item() < 1e-4


def test_scaled_rope_follows_llama_3_1():
    """use_scaled_rope: frequencies with wavelengths under 2048 positions stay, over 8192 are
    divided by 8, and in between blend linearly in 8192 / wavelength."""
    import math
    hd, theta = 64, 500000.0
    plain = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    want = []
    for f in plain.tolist():
        wavelen = 2 * math.pi / f
        s = (8192 / wavelen - 1) / 3
        want.append(f if wavelen < 2048 else f / 8 if wavelen > 8192 else (1 - s) * f / 8 + s * f)
    cos, sin = M.rotary_tables(hd, 2, theta, scaling=True)
    got = torch.atan2(sin[1, :hd // 2], cos[1, :hd // 2]).double()  # position 1: angle = frequency
    assert torch.allclose(got, torch.tensor(want, dtype=torch.double), rtol=1e-4, atol=1e-7)
    assert (got < plain.double() * 0.99).any() and (got > plain.double() * 0.99).any()


@released
def test_loading_errors_are_one_line(tmp_path, monkeypatch):
    def one_line(call, *needles):
        with pytest.raises(CheckpointError) as e:
            call()
        message = str(e.value)
        assert "\n" not in message and all(n in message for n in needles), message
    one_line(lambda: load_released("nosuch"), "neither a folder", "hub id")
    one_line(lambda: load_released(str(tmp_path)), "no config.json or model.safetensors")

    def offline(*args, **kwargs):
        raise OSError("no network")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    one_line(lambda: load_released("tim-lawson/skip-middle-fineweb-baseline-4-layers"),
             "could not download", "pass a local folder")
    real_import = builtins.__import__

    def without_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", without_safetensors)
    one_line(lambda: load_released(FIXTURE), "pip install safetensors")
    monkeypatch.undo()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes(open(os.path.join(FIXTURE, name), "rb").read())
    (tmp_path / "config.json").write_text('{"dim": 64}')
    one_line(lambda: load_released(str(tmp_path)), "config.json", "KeyError")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    one_line(lambda: load_released(str(tmp_path)), "model.safetensors", "cannot read it")


def test_checkpoints_are_atomic_and_load_with_their_checks(tmp_path):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=4, n_head=4, n_kv_head=2, n_embd=32))
    path = str(tmp_path / "ckpt.pt")
    # saved as DDP(torch.compile(model)) names its parameters
    state = {"model": {f"module._orig_mod.{k}": v for k, v in m.state_dict().items()},
             "model_args": dict(vars(m.config)), "step": 3}
    checkpoints.save_checkpoint({"model": {}, "model_args": {}}, path)
    checkpoints.save_checkpoint(state, path)  # replaces the first one in one step
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    loaded, ckpt = checkpoints.load_checkpoint(path, model_args=dict(vars(m.config)))
    assert ckpt["step"] == 3
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    with pytest.raises(CheckpointError, match="n_embd: checkpoint .* has n_embd=32 but this run has "
                                                "n_embd=64; pass --n_embd=32 or use another out_dir"):
        checkpoints.load_checkpoint(path, model_args=dict(vars(m.config), n_embd=64))
    # checkpoints written before FlexAttention was dropped name the kernel they used
    checkpoints.save_checkpoint(dict(state, model_args=dict(vars(m.config), attn_backend="flex")), path)
    loaded, _ = checkpoints.load_checkpoint(path, model_args=dict(vars(m.config)))
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)
    state["model_args"]["n_embd"] = 64  # weights that do not fit the model they claim
    checkpoints.save_checkpoint(state, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        checkpoints.load_checkpoint(path)
