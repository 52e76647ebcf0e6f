"""Smoke tests of bench.py and experiment.py at toy sizes, so the README's commands keep working."""

import csv
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(*args, cwd=HERE):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
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


@pytest.mark.slow
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
    # --report_only rebuilds the tables from the finished runs, training nothing
    out = run("experiment.py", f"--results={name}", "--report_only", "--skip_decode")
    assert "== dense2: val ce" in out and "train.py" not in out
    with open(f"{name}.csv") as f:
        again = list(csv.DictReader(f))
    assert [r["val_ce"] for r in again] == [r["val_ce"] for r in rows]
    assert all(r["decode_tok_s_skip"] == "" for r in again)


@pytest.mark.slow
def test_bench_run_takes_train_py_steps(tmp_path):
    """bench.py run trains what train.py trains (its settings, model, data, schedule and
    controller): after 6 steps each variant's loss is train.py's with --max_iters=6. Run in
    tmp_path, so both prepare the bundled data there."""
    bench = run(os.path.join(HERE, "bench.py"), "run", "--run_steps=6", cwd=tmp_path)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in bench.splitlines()
            if line.startswith(("| dense", "| gated"))]
    losses = {row[0]: float(row[-1]) for row in rows}
    for name, args in (("dense (--gated=false)", ["--gated=false"]),
                       ("gated, masked (--skip=false)", ["--skip=false"]),
                       ("gated, skipping (the default)", [])):
        out = tmp_path / name.split()[0]
        run(os.path.join(HERE, "train.py"), "--max_iters=6", "--eval_interval=6", "--log_interval=6",
            "--eval_tokens=128", f"--out_dir={out}", *args, cwd=tmp_path)
        with open(out / "log.jsonl") as f:
            last = [json.loads(line) for line in f if '"train"' in line][-1]
        assert last["step"] == 6 and last["loss"] == pytest.approx(losses[name], rel=1e-6), name


def test_bench_refuses_settings_its_mode_does_not_read():
    for mode, arg in (("decode", "--dtype=bfloat16"), ("run", "--n_layer=6"), ("skip", "--context=4")):
        result = subprocess.run([sys.executable, "bench.py", mode, arg], capture_output=True, text=True,
                                cwd=HERE, env=ENV)
        assert result.returncode == 1 and result.stderr.startswith(
            f"error: bench.py {mode} does not use --{arg[2:].split('=')[0]}"), result.stderr


def test_experiment_refuses_train_settings_it_sets_per_run():
    for arg in ("--n_layer=4", "--out_dir=x", "--gated=true", "--ctrl_target_end=0.3"):
        result = subprocess.run([sys.executable, "experiment.py", "--dry_run", arg], capture_output=True,
                                text=True, cwd=HERE, env=ENV)
        assert result.returncode == 1 and "experiment.py sets" in result.stderr and arg in result.stderr
    out = run("experiment.py", "--dry_run", "--seed=7", "--max_iters=10")  # the others reach every run
    assert all(line.endswith("--seed=7 --max_iters=10") for line in out.strip().splitlines())


DRAWN = """
import json, os, runpy, sys
sys.path.insert(0, os.environ['ROOT'])
import matplotlib.figure
drawn = []
def record(fig, path, **kwargs):  # what each figure shows, instead of a picture
    ax = fig.axes[0]
    drawn.append({'path': os.path.basename(path),
                  'lines': [[list(map(float, l.get_xdata())), list(map(float, l.get_ydata())),
                             l.get_linestyle()] for l in ax.lines],
                  'images': [im.get_array().tolist() for im in ax.images],
                  'xticks': [t.get_text() for t in ax.get_xticklabels()]})
matplotlib.figure.Figure.savefig = record
sys.argv = ['figures.py'] + sys.argv[1:]
runpy.run_path(os.path.join(os.environ['ROOT'], 'figures.py'), run_name='__main__')
print('drawn: ' + json.dumps(drawn))
"""


@pytest.mark.slow
def test_figures_are_drawn_from_the_runs_numbers(tmp_path):
    """figures.py draws each first-half layer's logged gate means at their steps, with its target
    dashed, and the text's gates as the model computes them, one column per token."""
    pytest.importorskip('matplotlib')
    import torch
    from checkpoints import load_checkpoint
    from model import gate_targets
    from prepare import prepare
    data = prepare('shakespeare_char', out_dir=str(tmp_path / 'data'))
    out = tmp_path / 'run'
    run(os.path.join(HERE, 'train.py'), '--n_layer=6', '--n_head=2', '--n_kv_head=2', '--n_embd=32',
        '--block_size=32', '--batch_size=4', '--max_iters=8', '--eval_interval=8', '--log_interval=2',
        '--eval_tokens=512', '--ctrl_lr=0.5', '--ctrl_target_end=0.3', f'--data_dir={data}', f'--out_dir={out}')
    (tmp_path / 'drawn.py').write_text(DRAWN)
    p = subprocess.run([sys.executable, str(tmp_path / 'drawn.py'), f'--out_dir={out}', '--text=ROMEO: hi'],
                       capture_output=True, text=True, cwd=HERE, env=dict(ENV, ROOT=HERE))
    assert p.returncode == 0, p.stderr[-2000:]
    training, text = json.loads(p.stdout.rsplit('drawn: ', 1)[1])
    assert training['path'] == 'gates_training.png' and text['path'] == 'gates_text.png'
    with open(out / 'log.jsonl') as f:
        logged = [r for r in map(json.loads, f) if r['type'] == 'train']
    targets = gate_targets(6, 1.0, 0.3)[0].tolist()
    solid = [line for line in training['lines'] if line[2] == '-']
    dashed = [line for line in training['lines'] if line[2] == '--']
    assert len(solid) == len(dashed) == 3
    for i, (xs, ys, _) in enumerate(solid):
        assert xs == [r['step'] for r in logged] == [1, 2, 4, 6, 8]
        assert ys == pytest.approx([r['gate_mean'][i] for r in logged])
    assert [line[1][0] for line in dashed] == pytest.approx(targets[:3])
    model, _ = load_checkpoint(str(out / 'ckpt.pt'))
    ids = [json.load(open(f'{data}/meta.json'))['chars'].index(c) for c in 'ROMEO: hi']
    with torch.no_grad():
        gates = model.eval()(torch.tensor([ids]))[2][:, 0]
    assert torch.allclose(torch.tensor(text['images'][0]), gates, atol=1e-6)
    assert text['xticks'] == list('ROMEO: hi') and gates.shape == (6, 9) and (gates < 1).any()
