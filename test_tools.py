"""Smoke tests of bench.py and experiment.py at toy sizes, so the README's commands keep working."""

import csv
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(*args, cwd=HERE):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_bench_train_and_decode_print_their_tables():
    out = run("bench.py", "train", "--n_layer=2", "--n_embd=32", "--n_head=2", "--n_kv_head=2",
              "--block_size=32", "--batch_size=2", "--vocab_size=64", "--steps=1", "--repeats=1")
    assert "| dense |" in out and "| gated |" in out and "gated/dense step-time ratio" in out
    out = run("bench.py", "decode", "--n_layer=4", "--n_embd=32", "--n_head=2", "--n_kv_head=2",
              "--vocab_size=64", "--context=32", "--new_tokens=8", "--repeats=1")
    layers_run = float(out.split(" of 4 layers run per token")[0].rsplit(" ", 1)[1])
    assert 0 < layers_run < 4  # about half the tokens skip the middle two layers
    assert "KV cache speed-up" in out and "% of the ideal" in out
    out = run("bench.py", "skip", "--n_layer=4", "--n_embd=32", "--n_head=2", "--n_kv_head=2",
              "--vocab_size=64", "--block_size=64", "--batch_size=2", "--steps=1", "--repeats=1")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| forward")]
    assert [(r[0], r[1]) for r in rows] == [(p, f) for f in ("0%", "25%", "50%")
                                            for p in ("| forward", "| forward + backward")]
    assert [r[5] for r in rows] == ["1.00x"] * 2 + ["1.14x"] * 2 + ["1.33x"] * 2  # ideal speed-ups


def test_bench_rejects_unknown_options():
    result = subprocess.run([sys.executable, "bench.py", "train", "--layers=2"], capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 1 and "unknown setting 'layers' (did you mean n_layer?)" in result.stderr


def test_experiment_fineweb_dry_run_lists_the_papers_runs():
    out = run("experiment.py", "--scale=fineweb", "--nproc=8", "--dry_run")
    lines = out.strip().splitlines()
    assert len(lines) == 7 and all(l.startswith("torchrun --standalone --nproc_per_node=8 train.py config/fineweb_gated.py")
                                   for l in lines)
    assert sum("--gated=false" in l for l in lines) == 6 and "--n_layer=12 --gated=true" in lines[-1]


def test_experiment_runs_end_to_end_at_toy_size(tmp_path):
    from prepare import prepare
    data = prepare("shakespeare_char", out_dir=str(tmp_path / "data"))
    name = str(tmp_path / "toy")  # runs in toy/, results in toy.csv, toy.md: all under tmp
    run("experiment.py", f"--results={name}", "--max_iters=4", "--eval_interval=4", "--eval_tokens=2048",
        "--log_interval=2", "--n_embd=32", "--block_size=32", "--batch_size=4", f"--data_dir={data}")
    with open(f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["dense2", "dense4", "dense6", "gated6_t0.75", "gated6_t0.5", "gated6_t0.25",
                                        "gated6_t0.5_keys_visible"]
    assert [r["keys"] for r in rows] == ["", "", "", "hidden", "hidden", "hidden", "visible"]
    dense, gated = rows[:3], rows[3:]
    assert [float(r["flops_per_token"]) for r in dense] == sorted(float(r["flops_per_token"]) for r in dense)
    for r in gated:
        assert float(r["decode_tok_s_skip"]) > 0 and float(r["decode_tok_s_no_skip"]) > 0
        assert float(r["flops_per_token"]) <= float(r["flops_per_token_no_skip"])
    with open(f"{name}.md") as f:
        assert f.read().startswith(f"Made by `python experiment.py --results={name} --max_iters=4")
