"""The sweep: every mode of train.py and sample.py against everything an out_dir can hold. Each
cell runs the command as a user types it and checks that it does what the README says or stops
with one line, and that nothing in the folder is lost.

    modes:  a new run, --init_from=resume, --eval_only, --init_from=<release>,
            --init_from=<release> --eval_only, sample.py
    out_dir holds: nothing (missing), an empty folder, a run of the same model, a run of
            another model, a run that logged to wandb (wandb not installed here), a run
            stopped by a signal, a checkpoint from an older version (it names attn_backend)
"""

import concurrent.futures
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, 'data', 'skip_middle_tiny')
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
TINY = ['--n_layer=2', '--n_head=2', '--n_kv_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
        '--eval_tokens=512', '--log_interval=1']
FROM_RELEASE = ['--block_size=32', '--batch_size=4', '--eval_tokens=512', '--log_interval=1']

MODES = ['new run', 'resume', 'eval_only', 'release', 'release eval_only', 'sample.py']
HOLDS = ['missing', 'empty', 'same model', 'another model', 'wandb run', 'stopped by a signal', 'older version']
# what each cell must do: 'trains' (a new run; an earlier run moves to .prev), 'resumes',
# 'evaluates' or 'samples' (writing nothing), or the words of its one-line error
EXPECT = {
    'new run': dict(missing='trains', empty='trains', **{
        'same model': 'trains', 'another model': 'holds a run of another model', 'wandb run': 'trains',
        'stopped by a signal': 'trains', 'older version': 'trains'}),
    'resume': dict(missing='no checkpoint at', empty='no checkpoint at', **{
        'same model': 'resumes', 'another model': 'resumes', 'wandb run': 'resumes',
        'stopped by a signal': 'resumes', 'older version': 'resumes'}),
    'eval_only': dict(missing='holds no ckpt.pt', empty='holds no ckpt.pt', **{
        h: 'evaluates' for h in HOLDS[2:]}),
    'release': dict(missing='trains', empty='trains', **{
        'same model': 'trains', **{h: 'holds a run of another model' for h in HOLDS[3:]}}),
    'release eval_only': {h: 'evaluates' for h in HOLDS},
    'sample.py': dict(missing='no checkpoint at', empty='no checkpoint at', **{h: 'samples' for h in HOLDS[2:]}),
}

WANDB = """
def init(**kwargs): pass
def log(*args, **kwargs): pass
def finish(): pass
"""


def train(args, out, env=ENV, ok=True):
    p = subprocess.run([sys.executable, 'train.py', *args, f'--out_dir={out}'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert not ok or p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """Each thing an out_dir can hold, made once (cells work on copies), and the two datasets."""
    from data import write_shard
    from prepare import prepare
    base = tmp_path_factory.mktemp('holds')
    char = prepare('shakespeare_char', out_dir=str(base / 'char'))
    gpt2 = base / 'gpt2'  # made-up GPT-2 ids below the release's 128
    gpt2.mkdir()
    tokens = np.random.default_rng(0).integers(0, 128, 20000)
    write_shard(str(gpt2 / 'toy_train_000000.bin'), tokens[:18000])
    write_shard(str(gpt2 / 'toy_val_000000.bin'), tokens[18000:])
    (gpt2 / 'meta.json').write_text(json.dumps({'tokenizer': 'gpt2', 'vocab_size': 128, 'command': 'test'}))
    made = {'empty': base / 'empty'}
    made['empty'].mkdir()
    char_run = TINY + [f'--data_dir={char}', '--eval_interval=2']
    (base / 'wandb.py').write_text(WANDB)  # a stand-in: the run logs to "wandb", which then is gone
    release_run = FROM_RELEASE + [f'--data_dir={gpt2}', f'--init_from={RELEASE}', '--max_iters=2',
                                  '--eval_interval=2']
    runs = {'same model': (char_run + ['--max_iters=2'], ENV),
            'another model': (char_run + ['--max_iters=4', '--stop_iter=2', '--n_layer=4', '--gated=false'], ENV),
            'wandb run': (char_run + ['--max_iters=4', '--stop_iter=2', '--wandb_log=true'],
                          dict(ENV, PYTHONPATH=str(base))),
            'older version': (char_run + ['--max_iters=4', '--stop_iter=2', '--controller=sparsity'], ENV),
            **({'same release': (release_run, ENV)} if importlib.util.find_spec('safetensors') else {})}
    for name in runs:
        made[name] = base / name.replace(' ', '_')
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # one thread each, two cores
        list(pool.map(lambda name: train(runs[name][0], made[name], env=runs[name][1]), runs))
    assert torch.load(base / 'wandb_run' / 'ckpt.pt')['config']['wandb_log'] is True
    signalled = made.setdefault('stopped by a signal', base / 'signalled')
    proc = subprocess.Popen([sys.executable, 'train.py', *char_run, '--max_iters=1000', '--eval_interval=1000',
                             f'--out_dir={signalled}'], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith('step 2 |'):
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 0 and torch.load(signalled / 'ckpt.pt')['step'] >= 2
    older = made['older version']
    ckpt = torch.load(older / 'ckpt.pt', weights_only=True)  # as the code before 2026-12-02 wrote it
    ckpt['model_args']['attn_backend'] = ckpt['config']['attn_backend'] = 'auto'
    ckpt['config'].update(ctrl_coef=0.0, ctrl_var_coef=0.0)  # 0 then meant "the kind's default"
    state = ckpt['controller']
    state['ema'] = {name: torch.zeros(2) for name in ('mean', 'var')}
    del state['memory']
    torch.save(ckpt, older / 'ckpt.pt')
    return made, char, gpt2


def contents(folder):
    """Each file of a folder (but train.py's lock file) and its bytes."""
    if not os.path.isdir(folder):
        return {}
    return {f: open(os.path.join(folder, f), 'rb').read() for f in os.listdir(folder) if f != '.train.lock'}


def command(mode, out, char, gpt2, stop):
    if mode == 'new run':
        return ['train.py', *TINY, f'--data_dir={char}', '--max_iters=2', '--eval_interval=2', f'--out_dir={out}']
    if mode == 'resume':  # nothing but the mode: the run's settings come from its checkpoint
        return ['train.py', '--init_from=resume', f'--out_dir={out}', f'--stop_iter={stop}']
    if mode == 'eval_only':
        return ['train.py', '--eval_only', f'--out_dir={out}']
    if mode.startswith('release'):
        return ['train.py', *FROM_RELEASE, f'--data_dir={gpt2}', f'--init_from={RELEASE}', '--max_iters=2',
                '--eval_interval=2', f'--out_dir={out}', *(['--eval_only'] if 'eval_only' in mode else [])]
    return ['sample.py', f'--out_dir={out}', '--max_new_tokens=5', '--no_color']


def run_cell(mode, holds, folders, out):
    """Puts in out what the cell's out_dir holds, runs its command: (before, process, step, stop)."""
    made, char, gpt2 = folders
    source = made.get('same release' if mode.startswith('release') and holds == 'same model' else holds)
    if source is not None:
        shutil.copytree(source, out)
    before = contents(out)
    saved = torch.load(out / 'ckpt.pt') if 'ckpt.pt' in before else {'step': 0, 'config': {'max_iters': 0}}
    step, stop = saved['step'], min(saved['step'] + 2, saved['config']['max_iters'])  # 2 more steps at most
    p = subprocess.run([sys.executable, *command(mode, out, char, gpt2, stop)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    return before, p, step, stop, source is not None


@pytest.fixture(scope='module')
def cells(folders, tmp_path_factory):
    """Every cell's command, two at a time (each with one thread): the sweep is a few hundred
    processes' start-up, which two cores share."""
    names = [(mode, holds) for mode in MODES for holds in HOLDS
             if not mode.startswith('release') or importlib.util.find_spec('safetensors')]
    outs = {cell: tmp_path_factory.mktemp('cell') / 'out' for cell in names}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda cell: run_cell(*cell, folders, outs[cell]), names)
        return {cell: (outs[cell], *result) for cell, result in zip(names, results)}


@pytest.mark.slow
@pytest.mark.parametrize('holds', HOLDS)
@pytest.mark.parametrize('mode', MODES)
def test_mode_with_what_out_dir_holds(cells, mode, holds):
    pytest.importorskip('safetensors') if mode.startswith('release') else None
    out, before, p, step, stop, existed = cells[mode, holds]
    after, expect = contents(out), EXPECT[mode][holds]
    said = p.stdout + p.stderr
    assert 'delete' not in said and 'Traceback' not in said, said[-2000:]
    if expect in ('evaluates', 'samples'):
        assert p.returncode == 0, said[-2000:]
        assert ('eval step' if expect == 'evaluates' else 'layers run per new token') in p.stdout
        assert after == before and out.exists() == existed  # nothing written, nothing made
    elif expect == 'trains':
        assert p.returncode == 0, said[-2000:]
        assert torch.load(out / 'ckpt.pt')['step'] == 2
        for name, data in before.items():  # the earlier run is kept a generation back
            assert after[name.replace('ckpt.pt', 'ckpt.prev.pt').replace('log.jsonl', 'log.prev.jsonl')] == data
    elif expect == 'resumes':
        assert p.returncode == 0, said[-2000:]
        finished = stop == step
        assert torch.load(out / 'ckpt.pt')['step'] == stop
        assert ('the run is complete' in p.stdout) == finished
        assert ('the run logged to wandb' in p.stdout) == (holds == 'wandb run')
        old, new = before['log.jsonl'].decode().splitlines(), after['log.jsonl'].decode().splitlines()
        kept = [line for line, r in zip(old, map(json.loads, old))
                if r['step'] < step or (r['step'] == step and r['type'] != 'start')]
        assert new[:len(kept)] == kept  # the log of the steps before the checkpoint is kept
        if holds == 'older version':  # a fixed kind whose saved coefficient 0 meant its default
            last = [r for r in map(json.loads, new) if r['type'] == 'train'][-1]
            assert last['step'] == stop and last['mean_coefs'] == pytest.approx([0.01] * 2) and last['reg'] > 0
    else:  # a one-line error, and nothing changed or made
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and expect in lines[0], said[-2000:]
        assert after == before and out.exists() == existed
