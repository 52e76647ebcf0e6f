"""Tests of sample.py against small checkpoints made here (CPU, no network)."""

import os
import subprocess
import sys

import runpy

import pytest
import torch

import tiktoken
from checkpoints import CheckpointError
from model import GPT, GPTConfig
from data import DataError

CHARS = sorted("\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")  # as prepare.py stores them
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def write_checkpoint(out_dir, gated=True, meta=None, vocab_size=len(CHARS)):
    cfg = GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=4, n_head=2, n_kv_head=1, n_embd=32, gated=gated)
    torch.manual_seed(0)
    m = GPT(cfg)
    if gated:
        with torch.no_grad():  # letters a-m skip the middle two layers
            m.tok_emb.weight[:, 0] = -1.0
            m.tok_emb.weight[CHARS.index("a"):CHARS.index("n"), 0] = 1.0
            m.gate_heads[1].weight.zero_()
            m.gate_heads[1].weight[0, 0] = 100.0
    with torch.no_grad():  # padding ids (the model's beyond the data's) get the largest logits
        m.lm_head.weight[len(CHARS):] = 10 * m.lm_head.weight[:vocab_size - len(CHARS)].sign()
    meta = meta or {"tokenizer": "char", "vocab_size": len(CHARS), "chars": CHARS}
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"model": m.state_dict(), "model_args": dict(vars(cfg)), "meta": meta, "step": 7},
               os.path.join(out_dir, "ckpt.pt"))


def run(out_dir, *args):
    """python sample.py --out_dir=... --max_new_tokens=40 *args, run in this process."""
    argv = sys.argv
    sys.argv = ["sample.py", f"--out_dir={out_dir}", "--max_new_tokens=40", *args]
    try:
        runpy.run_path(os.path.join(HERE, "sample.py"), run_name="__main__")
    finally:
        sys.argv = argv


def test_samples_are_reproducible_with_a_seed(tmp_path, capsys):
    write_checkpoint(tmp_path)
    def samples(seed):
        run(tmp_path, "--start=ROMEO:", f"--seed={seed}", "--num_samples=2")
        out = capsys.readouterr().out
        assert "layers run per new token" in out
        return out.rsplit("-" * 40, 1)[0]  # the texts, without the timing line

    first = samples(5)
    assert first.startswith("ROMEO:")
    assert samples(5) == first
    assert samples(6) != first


def test_padding_ids_are_never_sampled(tmp_path, capsys):
    """A model whose vocabulary is padded beyond the data's (as train.py rounds it up to 64)
    never samples a padding id, even when those have the largest logits."""
    write_checkpoint(tmp_path, vocab_size=64)
    run(tmp_path, "--start=ab", "--temperature=2.0", "--max_new_tokens=60")
    assert capsys.readouterr().out.startswith("ab")


def test_prompt_from_file(tmp_path, capsys):
    write_checkpoint(tmp_path)
    (tmp_path / "prompt.txt").write_text("JULIET:\n")
    run(tmp_path, f"--start=FILE:{tmp_path / 'prompt.txt'}")
    assert capsys.readouterr().out.startswith("JULIET:\n")
    with pytest.raises(DataError, match="--start=FILE:.*missing.txt"):
        run(tmp_path, f"--start=FILE:{tmp_path / 'missing.txt'}")


def test_show_skips_plain_tags_histogram_and_savings(tmp_path, capsys):
    write_checkpoint(tmp_path)
    run(tmp_path, "--start=abc", "--show_skips", "--no_color", "--temperature=1.0")
    out = capsys.readouterr().out
    assert "|2]" in out, "tokens that skip the middle layers are tagged with the layers they ran"
    assert "\033[" not in out
    assert "layer  1 |" in out and "legend" in out
    saved = float(out.rsplit("compute saved vs running every layer: ", 1)[1].split("%")[0])
    assert saved > 0


def test_show_skips_colours_on_a_terminal(tmp_path, capsys, monkeypatch):
    write_checkpoint(tmp_path)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    run(tmp_path, "--start=abc", "--show_skips", "--temperature=1.0")
    assert "\033[38;5;" in capsys.readouterr().out


def test_dense_checkpoint_reports_no_savings(tmp_path, capsys):
    write_checkpoint(tmp_path, gated=False)
    run(tmp_path, "--show_skips")
    out = capsys.readouterr().out
    assert "4.00 of 4 layers" in out and "saved vs running every layer: 0.0%" in out


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*ckpt.pt: train one with `python train.py"):
        run(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="ckpt.pt is not a usable train.py checkpoint"):
        run(tmp_path)
    write_checkpoint(tmp_path)
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])  # truncated by a crash
    with pytest.raises(CheckpointError, match="not a usable"):
        run(tmp_path)


def test_prompt_outside_the_char_vocabulary(tmp_path):
    write_checkpoint(tmp_path)
    with pytest.raises(DataError, match="'#'"):
        run(tmp_path, "--start=a#b")


def test_gpt2_checkpoint_offline_says_so(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, meta={"tokenizer": "gpt2", "vocab_size": 50257})

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="GPT-2"):
        run(tmp_path)


@pytest.mark.slow
def test_cli_prints_one_line_errors(tmp_path):
    def stderr_of(*args):
        result = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), *args],
                                capture_output=True, text=True, cwd=HERE)
        assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
        return result.stderr
    assert stderr_of(f"--out_dir={tmp_path}").startswith("error: no checkpoint")
    write_checkpoint(tmp_path)
    assert "'#' is not in the" in stderr_of(f"--out_dir={tmp_path}", "--start=a#b")
    assert "top_p" in stderr_of(f"--out_dir={tmp_path}", "--top_p=1.5")
    assert "neither a folder" in stderr_of("--init_from=nosuchmodel")


def test_sampling_a_released_model(monkeypatch, capsys):
    """--init_from=<folder> samples from a model in the authors' released format (the fixture
    of test_checkpoints.py) with GPT-2 tokens; tiktoken's files are not here, so a stand-in
    tokenizer maps bytes to ids."""
    pytest.importorskip("safetensors")

    class Bytes:
        def encode(self, text, allowed_special=()):
            return list(text.encode()[:4])

        def decode(self, ids):
            return bytes(i % 128 for i in ids).decode(errors="replace")
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: Bytes())
    run("unused", f"--init_from={os.path.join(HERE, 'data', 'skip_middle_tiny')}", "--start=Hi",
        "--show_skips", "--no_color", "--max_new_tokens=20")
    out = capsys.readouterr()
    assert "skip_middle_tiny, " in out.err and "gated n_layer=4" in out.err
    assert out.out.startswith("Hi") and "layers run per new token" in out.out


def test_prompt_file_that_is_not_utf8(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "p.txt").write_bytes(b"ROM\xc9O:\n")
    with pytest.raises(DataError, match=r"p.txt: not UTF-8 text \(bad byte at offset 3\)"):
        run(tmp_path, f"--start=FILE:{tmp_path / 'p.txt'}")


@pytest.mark.slow
def test_consoles_that_cannot_show_a_sample(tmp_path):
    """A console whose encoding lacks a sampled character shows '?' for it; output piped into
    a reader that stops early (`| head`) ends sample.py quietly."""
    meta = {"tokenizer": "char", "vocab_size": len(CHARS), "chars": CHARS[:-1] + ["\u00e9"]}
    write_checkpoint(tmp_path, meta=meta)
    cmd = [sys.executable, os.path.join(HERE, "sample.py"), f"--out_dir={tmp_path}", "--start=\u00e9t\u00e9"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE,
                       env=dict(os.environ, PYTHONIOENCODING="ascii"))
    assert p.returncode == 0 and p.stdout.startswith("?t?"), p.stderr[-2000:]
    head = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    p = subprocess.run(cmd + ["--num_samples=600", "--max_new_tokens=128"], stdout=head.stdin,
                       stderr=subprocess.PIPE, text=True, cwd=HERE)
    head.stdin.close()
    head.wait()
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr[-2000:]


def test_sampling_settings_do_what_they_say(tmp_path, capsys):
    """temperature 0 is greedy whatever the seed, and so are top_k=1 and a tiny top_p; other
    seeds sample other text; num_samples and max_new_tokens set how many and how long;
    --dtype=bfloat16 samples under autocast."""
    write_checkpoint(tmp_path)

    def samples(*args):
        run(tmp_path, "--start=ab", *args)
        return capsys.readouterr().out.split("-" * 40 + "\n")[:-1]

    greedy = samples("--temperature=0", "--seed=1")
    assert samples("--temperature=0", "--seed=2") == greedy
    assert samples("--top_k=1", "--seed=3") == greedy and samples("--top_p=1e-6", "--seed=4") == greedy
    assert samples("--seed=3") != greedy
    three = samples("--num_samples=3", "--max_new_tokens=7", "--temperature=1.5")
    assert len(three) == 3 and all(len(s) == len("ab") + 7 + 1 and s.startswith("ab") for s in three)
    assert len(set(three)) > 1
    assert len(samples("--dtype=bfloat16", "--temperature=0")) == 1
