"""Tests of train.py on CPU: exact resume, torchrun/DDP with 2 gloo processes, the default run
learning, checkpoints, and the one-line errors. Each run is a real `python train.py ...` in a
subprocess with a tiny model; the whole file takes a minute or two on a 2-core CPU."""

import json
import math
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from configurator import configure, settings_block
from model import FIXED, controller_kinds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
TINY = ['--n_layer=2', '--n_head=2', '--n_kv_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
        '--eval_tokens=1024', '--log_interval=1']
# one thread per process: the runs are tiny, and 2 processes x 2 threads on 2 cores crawl
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


@pytest.fixture(scope='module', autouse=True)
def data_dir(tmp_path_factory):
    """The bundled char dataset, prepared under tmp: runs read it through --data_dir."""
    from prepare import prepare
    global DATA
    DATA = prepare('shakespeare_char', out_dir=str(tmp_path_factory.mktemp('data')))
    return DATA


def train_command(args, out_dir=None):
    data = [] if any(a.startswith(('--dataset=', '--data_dir=')) for a in args) else [f'--data_dir={DATA}']
    return [sys.executable, 'train.py', *args, *data] + ([f'--out_dir={out_dir}'] if out_dir else [])


def run(args, out_dir=None, nproc=0, ok=True):
    cmd = train_command(args, out_dir)
    if nproc:
        cmd[1:2] = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', 'train.py']
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


MANY_RUNS = """
import contextlib, io, json, os, runpy, sys
sys.path.insert(0, os.getcwd())
import checkpoints
results = []
for argv in json.loads(sys.argv[1]):  # each as `python train.py ARGV` would end, in this process
    sys.argv, out, err, code = ['train.py'] + argv, io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            runpy.run_path('train.py', run_name='__main__')
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else print(e.code, file=sys.stderr) or 1
        except Exception as e:
            sys.excepthook(type(e), e, e.__traceback__)
            code = 1
    for lock in checkpoints._held:  # as the process would on exit
        lock.close()
    checkpoints._held.clear()
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def train_many(*jobs, ok=True, cwd=ROOT):
    """run(args, out_dir) for each (args, out_dir) in jobs, one after another in a single process:
    one start-up (importing torch takes seconds) for all, where the process is not what a test
    tests. CompletedProcess-likes, in order; with ok, each must succeed."""
    argvs = [cmd[2:] for cmd in (train_command(*job) for job in jobs)]
    p = subprocess.run([sys.executable, '-c', MANY_RUNS, json.dumps(argvs)], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = [subprocess.CompletedProcess(argv, code, out, err)
               for argv, (code, out, err) in zip(argvs, json.loads(p.stdout.splitlines()[-1]))]
    for r in results if ok else []:
        assert r.returncode == 0, (r.args, r.stdout[-2000:], r.stderr[-2000:])
    return results


def records(out_dir, kind):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['type'] == kind]


def load(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)


def files(out_dir):
    """The files of out_dir, without train.py's lock file."""
    return sorted(f for f in os.listdir(out_dir) if f != '.train.lock')


def one_line_error(p, *needles):
    """rc 1, no traceback, a single 'error: ...' line on stderr containing every needle."""
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert 'Traceback' not in p.stderr and len(lines) == 1 and lines[0].startswith('error: '), p.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
    """A finished tiny run."""
    out = str(tmp_path_factory.mktemp('tiny'))
    run(TINY + ['--max_iters=4', '--eval_interval=2'], out)
    return out


# ----------------------------------------------------------------------------- settings (in-process)

def train_settings(*argv):
    """train.py's settings after presets and overrides, as configure() makes them."""
    scope = {'__file__': os.path.join(ROOT, 'train.py')}
    exec(settings_block(scope['__file__']), scope)
    return configure(scope, list(argv))[0]


def test_overrides_are_type_checked(capsys):
    c = train_settings('--gated=false', '--learning_rate=3e-4', '--max_iters=2e3', '--compile=True',
                       '--ctrl_coef_min=-inf', '--out_dir=x', '--learning_rate=1')
    assert c['gated'] is False and c['learning_rate'] == 1.0 and c['max_iters'] == 2000
    assert c['compile'] == 'true' and c['ctrl_coef_min'] == -math.inf and c['out_dir'] == 'x'
    for bad, needle in (('--n_layer=2.5', 'n_layer must be int'), ('--gated=yes please', 'gated must be bool'),
                        ('--learning_rate=fast', "learning_rate must be float (like the default 0.001), got 'fast'"),
                        ('--n_layer', 'needs a value: --n_layer=VALUE or --n_layer VALUE'),
                        ('--nlayer=4', "unknown setting 'nlayer' (did you mean n_layer?)"),
                        ('config/nosuch.py', "preset file 'config/nosuch.py' not found")):
        with pytest.raises(SystemExit, match=re.escape(needle)):
            train_settings(bad)


def test_presets():
    assert train_settings('config/cpu_default.py') == train_settings()  # the preset spells out the defaults
    g = train_settings('config/fineweb_gated.py')
    assert (g['n_layer'], g['n_embd'], g['n_head'], g['block_size'], g['tokens_per_step']) == (12, 768, 12, 1024, 524288)
    assert g['gated'] and g['controller'] == 'proportional' and (g['ctrl_target_start'], g['ctrl_target_end']) == (1.0, 0.5)
    assert (g['learning_rate'], g['beta1'], g['beta2'], g['weight_decay']) == (1e-3, 0.8, 0.95, 0.0)
    assert g['dataset'] == 'fineweb10B' and (g['warmup_frac'], g['warmup_start']) == (0.1, 0.1)
    d = train_settings('config/fineweb_dense.py', '--n_layer=6')
    assert not d['gated'] and d['n_layer'] == 6 and d['tokens_per_step'] == 524288
    s = train_settings('config/shakespeare_char_gpu.py')
    assert s['n_layer'] == 6 and s['n_embd'] == 384 and s['block_size'] == 256


@pytest.mark.parametrize('kw,needle', [
    (dict(n_layer=3), 'n_layer must be even when gated (got 3)'),
    (dict(n_embd=30), 'n_embd must divide by n_head=4'),
    (dict(n_kv_head=3), 'n_kv_head must divide n_head=4'),
    (dict(n_embd=24, n_head=8), 'n_head must leave an even head dim'),  # head dim 3 is odd
    (dict(gate_init='ones'), "gate_init must be 'normal' or 'zero'"),
])
def test_model_sizes_that_do_not_fit_together_name_the_setting(kw, needle):
    from configurator import model_config
    settings = train_settings(*(f'--{k}={v}' for k, v in kw.items()))
    with pytest.raises(SystemExit, match=re.escape(needle)):
        model_config(settings, 65)
    if 'n_layer' in kw:
        model_config(dict(settings, gated=False), 65)  # an odd dense model is fine


def test_help_prints_every_setting_with_its_comment():
    p = subprocess.run([sys.executable, 'train.py', '--help'], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith('Train a GPT that learns to skip')
    for line in settings_block(os.path.join(ROOT, 'train.py')).splitlines():
        assert line in p.stdout
    assert "ctrl_lr = 2e-2" in p.stdout and "# end of settings" not in p.stdout


# ----------------------------------------------------------------------------- runs

def test_resume_is_exact(tmp_path):
    """N steps straight == N/2 steps, stop, resume, N/2 steps: the same float losses, gate
    statistics, controller coefficients and final weights. The derivative controller keeps
    EMA state, so a controller not restored would show."""
    args = TINY + ['--max_iters=12', '--eval_interval=4', '--controller=proportional_derivative', '--ctrl_lr=0.05']
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    *_, p = train_many((args, a), (args + ['--stop_iter=6'], b),
                       (['--init_from=resume'], b))  # the run's own settings come from its checkpoint
    assert 'resuming from' in p.stdout and 'note: resuming with settings' not in p.stdout
    ra, rb = records(a, 'train'), records(b, 'train')
    assert [r['step'] for r in rb] == list(range(1, 13))
    keys = ('loss', 'ce', 'reg', 'lr', 'sparsity', 'mean_coefs', 'var_coefs', 'train_flops')
    for x, y in zip(ra, rb):
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}, x['step']
    assert len({str(r['mean_coefs']) for r in ra}) > 2  # the controller really moved
    # the schedule: warmup over 10% of 12 steps (1 step) from 0.1x, then cosine down to 0
    want = [1e-4] + [0.5 * (1 + math.cos(math.pi * (i - 1) / 11)) * 1e-3 for i in range(1, 12)]
    assert [r['lr'] for r in ra] == pytest.approx(want)
    va = {r['step']: r['val_loss'] for r in records(a, 'eval')}
    vb = {r['step']: r['val_loss'] for r in records(b, 'eval')}
    assert va[12] == vb[12] and va[8] == vb[8]
    ca, cb = load(a), load(b)
    for k, v in ca['model'].items():
        assert torch.equal(v, cb['model'][k]), k
    assert ca['data_state'] == cb['data_state']
    for k in ('mean_coefs', 'var_coefs'):
        assert torch.equal(ca['controller'][k], cb['controller'][k])
    assert torch.equal(ca['controller']['memory']['mean']['ema'], cb['controller']['memory']['mean']['ema'])


DUMP_RANK = """
import os, runpy, sys, torch
sys.path.insert(0, os.getcwd())
sys.argv = ['train.py'] + sys.argv[1:]
g = runpy.run_path('train.py', run_name='__main__')  # train.py's globals once it has finished
from checkpoints import controller_state
torch.save({'controller': controller_state(g['ctrl']), 'data_state': g['train_stream'].state_dict(),
            'param_sum': sum(p.detach().double().sum().item() for p in g['model'].parameters())},
           os.path.join(g['out_dir'], f"rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    """torchrun with 2 gloo processes (each reading its own part of every global batch,
    2 accumulation micro-steps with no_sync) against 1 process on the same global batch.
    A wrapper runs train.py and then saves each rank's final state, to compare the ranks."""
    args = TINY + ['--max_iters=8', '--eval_interval=4', '--tokens_per_step=512', '--ctrl_lr=0.05', '--gated=true']
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    run(args + ['--batch_size=4'], one)  # 512 = 1 x 4 seqs x 32 x 4 accum
    (tmp_path / 'dump_rank.py').write_text(DUMP_RANK)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(tmp_path / 'dump_rank.py'), *args, '--batch_size=2', f'--data_dir={DATA}', f'--out_dir={two}']
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]  # 512 = 2 procs x 2 seqs x 32 x 4 accum
    assert 'ddp gloo' in p.stdout and '2 procs x 4 accum' in p.stdout
    r1, r2 = records(one, 'train'), records(two, 'train')
    assert len(r1) == len(r2) == 8
    for x, y in zip(r1, r2):
        assert y['loss'] == pytest.approx(x['loss'], rel=1e-4, abs=1e-5), x['step']
        assert y['mean_coefs'] == pytest.approx(x['mean_coefs'], rel=1e-3, abs=1e-7)
    e1, e2 = records(one, 'eval'), records(two, 'eval')
    assert e2[-1]['val_loss'] == pytest.approx(e1[-1]['val_loss'], rel=1e-4)
    # every rank took the same controller steps and holds the same weights; the data position is global
    d0, d1 = (torch.load(os.path.join(two, f'rank{r}.pt')) for r in (0, 1))
    for k in ('mean_coefs', 'var_coefs'):
        assert torch.equal(d0['controller'][k], d1['controller'][k])
    assert d0['controller']['mean_coefs'].abs().sum() > 0
    assert d0['param_sum'] == d1['param_sum'] and d0['data_state'] == d1['data_state'] == load(two)['data_state']
    m1, m2 = load(one)['model'], load(two)['model']
    for k in m1:
        assert torch.allclose(m1[k], m2[k], rtol=1e-3, atol=1e-5), k


@pytest.mark.slow
def test_default_run_learns_and_leaves_a_usable_checkpoint(tmp_path):
    """The default model (no size overrides), cut short: val loss falls, progress is printed,
    and the checkpoint rebuilds the model with no compile/DDP prefixes."""
    out = str(tmp_path / 'default')
    p = run(['--max_iters=40', '--eval_interval=20', '--eval_tokens=4096', '--log_interval=10'], out)
    assert 'step 10 |' in p.stdout and 'tok/s' in p.stdout and 'gate_mean' in p.stdout and 'resid_norm' in p.stdout
    evals = records(out, 'eval')
    assert [e['step'] for e in evals] == [0, 20, 40]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 0.5, [e['val_loss'] for e in evals]
    for e in evals:
        assert len(e['gate_mean']) == train_settings()['n_layer'] and 0 <= e['sparsity'] <= 1
        assert e['flops_per_token'] > 0
    assert evals[-1]['train_flops'] > 0
    trains = records(out, 'train')
    assert {'loss', 'ce', 'reg', 'lr', 'sparsity', 'ms', 'tok_s', 'mfu'} <= set(trains[-1]) and trains[-1]['mfu'] is None
    ckpt = load(out)
    assert {'model', 'optimizer', 'model_args', 'config', 'controller', 'step', 'rng', 'data_state', 'meta',
            'best_val_loss'} <= set(ckpt)
    assert ckpt['step'] == 40 and ckpt['meta']['tokenizer'] == 'char'
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in ckpt['model'])
    from model import GPT, GPTConfig
    GPT(GPTConfig(**ckpt['model_args'])).load_state_dict(ckpt['model'])  # strict


COUNT_PACKED = """
import os, runpy, sys, torch
sys.path.insert(0, os.getcwd())
import skipping
calls = {True: 0, False: 0}  # by torch.is_grad_enabled(): training, evaluation
active_tokens_layer = skipping.active_tokens_layer
def counted(*args, **kwargs):
    calls[torch.is_grad_enabled()] += 1
    return active_tokens_layer(*args, **kwargs)
skipping.active_tokens_layer = counted
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
print(f"skip path: {calls[True]} layer calls in training, {calls[False]} in evaluation")
"""


@pytest.mark.slow
def test_skip_true_trains_like_the_masked_path(tmp_path):
    """--skip=true runs each layer only on its active tokens, in training and in evaluation,
    with the same losses up to float error, and a checkpoint that does not depend on it."""
    args = TINY + ['--n_layer=4', '--max_iters=30', '--eval_interval=15', '--ctrl_lr=0.5',
                   f'--data_dir={DATA}']
    masked, packed = str(tmp_path / 'masked'), str(tmp_path / 'packed')
    (tmp_path / 'count_packed.py').write_text(COUNT_PACKED)
    for out, skip in ((masked, 'false'), (packed, 'true')):
        p = subprocess.run([sys.executable, str(tmp_path / 'count_packed.py'), *args, f'--skip={skip}',
                            f'--out_dir={out}'], cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        calls = p.stdout.rsplit('skip path: ', 1)[1]
        if skip == 'true':  # 30 steps x 4 layers; 3 evaluations x 8 batches x 4 layers
            assert calls.startswith('120 layer calls in training, 96 in evaluation'), calls
        else:
            assert calls.startswith('0 layer calls in training, 0 in evaluation'), calls
    a, b = records(masked, 'train'), records(packed, 'train')
    assert max(r['sparsity'] for r in a) > 0.3  # many (token, layer) pairs skipped
    assert [r['loss'] for r in b] == pytest.approx([r['loss'] for r in a], rel=1e-4)
    ea, eb = records(masked, 'eval'), records(packed, 'eval')
    assert [r['val_loss'] for r in eb] == pytest.approx([r['val_loss'] for r in ea], rel=1e-4)
    ca, cb = load(masked), load(packed)
    assert ca['model_args'] == cb['model_args'] and ca['model'].keys() == cb['model'].keys()
    for k, v in ca['model'].items():
        assert torch.allclose(v, cb['model'][k], atol=1e-4), k


@pytest.mark.slow
def test_a_new_run_never_pushes_aside_a_run_of_another_model(tmp_path):
    """The README's gated run and then its dense baseline, into one out_dir: the second stops
    with one line before training and the gated run stays, for sample.py. A new run of the same
    model keeps the earlier one a generation back, in ckpt.prev.pt."""
    out, dense = str(tmp_path / 'run'), str(tmp_path / 'dense')  # the dense baseline's own out_dir
    train_many((TINY + ['--max_iters=3', '--eval_interval=3'], out),
               (TINY + ['--gated=false', '--max_iters=3', '--eval_interval=3'], dense))
    before = {f: open(os.path.join(out, f), 'rb').read() for f in files(out)}
    refused = train_many(*[(TINY + ['--max_iters=3', '--eval_interval=3'] + other, out)
                           for other in (['--gated=false'], ['--n_embd=64'], ['--n_layer=4'])], ok=False)
    line = one_line_error(refused[0], f'{out} holds a run of another model', 'gated=True there, gated=False here',
                          '--out_dir', f'move {out} elsewhere')
    assert 'delete' not in line and 'remove' not in line
    assert 'step 1 |' not in refused[0].stdout
    for p in refused[1:]:  # other sizes are other models too
        one_line_error(p, 'another model')
    assert {f: open(os.path.join(out, f), 'rb').read() for f in files(out)} == before
    p = subprocess.run([sys.executable, 'sample.py', f'--out_dir={out}', '--max_new_tokens=5'],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and 'gated n_layer=2' in p.stderr, p.stderr
    assert load(dense)['controller'] is None
    assert all(r['reg'] == 0 and r['sparsity'] == 0 for r in records(dense, 'train'))
    p = run(TINY + ['--gated=false', '--max_iters=2', '--eval_interval=2'], dense)  # again there
    assert 'ckpt.prev.pt' in p.stdout and torch.load(os.path.join(dense, 'ckpt.prev.pt'))['step'] == 3
    assert load(dense)['step'] == 2 and len(records(dense, 'start')) == 1


@pytest.mark.slow
def test_failed_starts_in_a_used_out_dir_lose_nothing(tmp_path):
    """Two scratch runs that fail before their first checkpoint leave the earlier run's
    checkpoint and log in place; the next run that checkpoints moves them to .prev."""
    out = str(tmp_path / 'used')
    run(TINY + ['--max_iters=4', '--eval_interval=4'], out)
    first_log = open(os.path.join(out, 'log.jsonl')).read()
    diverging = (TINY + ['--max_iters=400', '--learning_rate=1e6'], out)  # fails before step 200's checkpoint
    *failed, p = train_many(diverging, diverging, (TINY + ['--max_iters=2', '--eval_interval=2'], out), ok=False)
    for f in failed:
        one_line_error(f, 'non-finite loss', 'no checkpoint had been written yet')
    assert files(out) == ['ckpt.prev.pt', 'ckpt.pt', 'log.jsonl', 'log.prev.jsonl']  # the failures left nothing
    assert p.returncode == 0 and 'ckpt.prev.pt' in p.stdout and load(out)['step'] == 2
    assert torch.load(os.path.join(out, 'ckpt.prev.pt'))['step'] == 4
    assert open(os.path.join(out, 'log.prev.jsonl')).read() == first_log
    assert [r['type'] for r in records(out, 'start')] == ['start']  # the new log: this run only


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    """A run checkpointed at step 5 resumes with a learning rate that makes it diverge: it
    stops with one line and leaves the step-5 checkpoint as it was."""
    out = str(tmp_path / 'nan')
    run(TINY + ['--max_iters=20', '--eval_interval=5', '--stop_iter=5'], out)
    saved = load(out)
    p = run(TINY + ['--max_iters=20', '--eval_interval=5', '--init_from=resume', '--learning_rate=1e6'], out, ok=False)
    one_line_error(p, 'non-finite loss at step', 'the last good checkpoint', '(step 5) is kept')
    assert files(out) == ['ckpt.pt', 'log.jsonl'] and load(out)['step'] == 5
    for k, v in saved['model'].items():
        assert torch.equal(v, load(out)['model'][k])


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits(tmp_path):
    out = str(tmp_path / 'term')
    cmd = [sys.executable, 'train.py', *TINY, '--max_iters=100000', '--eval_interval=100000', f'--out_dir={out}',
           f'--data_dir={DATA}']
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith('step 3 |'):
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    step = load(out)['step']
    assert step >= 3 and f'saved {out}/ckpt.pt (step {step})' in rest


@pytest.mark.slow
def test_sampling_an_undertrained_checkpoint_prints_text(tiny_ckpt):
    """After 4 steps the 48 padding ids (80 chars -> 128 logits) still carry real probability;
    sampling must skip them rather than crash in the char decoder."""
    p = subprocess.run([sys.executable, 'sample.py', f'--out_dir={tiny_ckpt}', '--max_new_tokens=300',
                        '--num_samples=2', '--show_skips', '--no_color', '--temperature=2.0'],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert 'layers run per new token' in p.stdout and len(p.stdout) > 600


def test_bad_inputs_give_one_line_errors(tiny_ckpt, tmp_path):
    out, data = f'--out_dir={tmp_path / "out"}', f'--data_dir={DATA}'
    cases = [
        (['--n_layr=4'], "unknown setting 'n_layr'", 'n_layer'),
        (['--n_layer=four'], 'n_layer must be int', "'four'"),
        (['--dataset=nosuchdata', out], 'data/nosuchdata: no such data directory', 'python prepare.py'),
        (TINY + ['--vocab_size=50', out, data], "vocab_size must hold the data's 80 tokens", '50'),
        (TINY + ['--tokens_per_step=100', out, data], 'tokens_per_step=100'),
        (TINY + ['--init_from=resume', out, data], 'no checkpoint'),
        # this run against the checkpoint's: the setting is named
        (['--init_from=resume', '--vocab_size=256', f'--out_dir={tiny_ckpt}'], 'vocab_size', 'checkpoint',
         '128', '256'),
        (['--init_from=resume', '--n_embd=64', f'--out_dir={tiny_ckpt}'], 'n_embd', 'checkpoint', '--n_embd=32'),
        (['--init_from=resume', '--gated=false', f'--out_dir={tiny_ckpt}'], 'gated'),
        (['--init_from=resume', '--controller=adaptive', f'--out_dir={tiny_ckpt}'],
         "controller is 'proportional'", '--controller=proportional'),
        # settings that cannot work
        (TINY + ['--controller=pid', out, data], 'controller must be one of', "'pid'"),
        (TINY + ['--dtype=fp8', out, data], "dtype must be", "'fp8'"),
        (TINY + ['--warmup_frac=1.5', out, data], 'warmup_frac must be in [0, 1)', '1.5'),
        (TINY + ['--batch_size=0', out, data], 'batch_size must be positive', '0'),
        (TINY + ['--gate_eps=0', out, data], 'gate_eps must be positive'),
        (TINY + ['--n_layer=3', out, data], 'n_layer must be even when gated', '3'),
        (TINY + ['--ctrl_coef=much', out, data], 'ctrl_coef must be a number, or None'),
        (TINY + ['--ctrl_target_end=1.5', out, data], 'ctrl_target_end must be in [0, 1]', '1.5'),
        (TINY + ['--skip=true', '--plain=true', out, data], 'skip cannot be true with --plain=true'),
    ]
    for p, (argv, *needles) in zip(train_many(*[(c[0],) for c in cases], ok=False), cases):
        one_line_error(p, *needles)
    assert os.listdir(tmp_path) == []  # nothing written anywhere, not even the out_dir


# ----------------------------------------------------------------------------- edges

@pytest.mark.slow
def test_gate_variance_is_pooled_over_the_whole_step(tmp_path):
    """The controller reads the variance of the whole optimizer step, E[g^2] - E[g]^2 over all
    its micro-steps: 4 micro-steps of 2 sequences move the coefficients exactly as one of 8
    does (the mean of the micro-steps' variances would not: their means differ)."""
    args = TINY + ['--max_iters=1', '--eval_interval=1', '--ctrl_lr=1.0', '--ctrl_tol=0']
    one, four = str(tmp_path / 'one'), str(tmp_path / 'four')
    train_many((args + ['--batch_size=8'], one), (args + ['--batch_size=2', '--tokens_per_step=256'], four))
    a, b = records(one, 'train')[0], records(four, 'train')[0]
    assert any(abs(c) > 1e-3 for c in a['var_coefs'])
    assert b['var_coefs'] == pytest.approx(a['var_coefs'], abs=1e-6)
    assert b['mean_coefs'] == pytest.approx(a['mean_coefs'], abs=1e-6)


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_loses_nothing(tmp_path):
    """A resumed run whose next checkpoint cannot be written (a file-size limit stands in for a
    full disk) stops with one line that keeps the last good checkpoint, leaves no temp file,
    and the next resume logs each step once."""
    import resource
    out = str(tmp_path / 'full')
    args = TINY + ['--max_iters=12', '--eval_interval=4']
    run(args + ['--stop_iter=8'], out)
    limit = os.path.getsize(os.path.join(out, 'ckpt.pt')) // 2
    cmd = [sys.executable, 'train.py', *args, '--init_from=resume', f'--data_dir={DATA}', f'--out_dir={out}']
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    one_line_error(p, 'could not write', 'ckpt.pt', 'File too large', '(step 8) is kept')
    assert files(out) == ['ckpt.pt', 'log.jsonl'] and load(out)['step'] == 8
    assert max(r['step'] for r in records(out, 'train')) == 12  # logged, but never saved
    run(args + ['--init_from=resume'], out)
    kinds = [(r['type'], r['step']) for r in map(json.loads, open(os.path.join(out, 'log.jsonl')))]
    assert len(kinds) == len(set(kinds)) and ('train', 12) in kinds and load(out)['step'] == 12


@pytest.mark.slow
def test_eval_only_evaluates_the_checkpoint_and_writes_nothing(tiny_ckpt, tmp_path):
    log_before = open(os.path.join(tiny_ckpt, 'log.jsonl')).read()
    empty = tmp_path / 'empty'
    p, refused = train_many((TINY + ['--eval_only', '--max_iters=77', '--wandb_log=true'], tiny_ckpt),  # no wandb
                            (TINY + ['--eval_only'], str(empty)), ok=False)
    assert 'eval step 4 |' in p.stdout and 'note: resuming with settings' not in p.stdout
    assert open(os.path.join(tiny_ckpt, 'log.jsonl')).read() == log_before
    one_line_error(refused, '--eval_only', 'no ckpt.pt')
    assert not empty.exists()


@pytest.mark.slow
def test_a_second_run_in_the_same_out_dir_is_refused(tmp_path):
    out = str(tmp_path / 'busy')
    cmd = [sys.executable, 'train.py', *TINY, '--max_iters=100000', '--eval_interval=100000',
           f'--out_dir={out}', f'--data_dir={DATA}']
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith('step 1 |'):
                break
        one_line_error(run(TINY + ['--max_iters=2'], out, ok=False), 'another train.py is running in', out)
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and load(out)['step'] >= 1  # the first run was not disturbed


@pytest.mark.slow
def test_resume_refuses_data_prepared_again_from_other_text(tmp_path):
    """Re-preparing the run's data folder from another text with as many characters changes
    what every id means; a resume must refuse it, naming what differs."""
    from prepare import prepare
    data, out = str(tmp_path / 'data'), str(tmp_path / 'out')
    for name, text in (('a.txt', 'abcdefgh\n' * 4000), ('b.txt', 'stuvwxyz\n' * 4000)):
        (tmp_path / name).write_text(text)
    prepare('text', out_dir=data, input=str(tmp_path / 'a.txt'))
    run(TINY + ['--max_iters=8', '--stop_iter=4', '--eval_interval=4', f'--data_dir={data}'], out)
    prepare('text', out_dir=data, input=str(tmp_path / 'b.txt'))
    one_line_error(run(TINY + ['--max_iters=8', '--init_from=resume', f'--data_dir={data}'], out, ok=False),
                   data, 'chars differ')
    # data that is gone: the line says the setting came from the checkpoint, and how to override it
    import shutil
    shutil.rmtree(data)
    p = subprocess.run([sys.executable, 'train.py', '--init_from=resume', f'--out_dir={out}'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    one_line_error(p, data, 'no such data directory', 'came from', 'ckpt.pt', '--data_dir=')


@pytest.mark.slow
def test_out_dir_and_device_mistakes_stop_before_any_work(tmp_path):
    (tmp_path / 'f').write_text('hi')
    p = one_line_error(run(TINY, str(tmp_path / 'f'), ok=False), 'is a file, not a folder')
    assert 'is a file' in p
    for script in ('train.py', 'sample.py', 'bench.py'):
        out = [f'--out_dir={tmp_path / "o"}'] if script != 'bench.py' else []
        p = subprocess.run([sys.executable, script, '--device=mps', *out], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=120)
        one_line_error(p, "device='mps' is not available here", '--device=cpu')
        assert not (tmp_path / 'o').exists()  # a failed run leaves no folder, and no lock
    p = run(TINY + [f'--data_dir={tmp_path / "nodata"}'], str(tmp_path / 'new' / 'o'), ok=False)
    one_line_error(p, 'no such data directory')
    assert not (tmp_path / 'new' / 'o').exists()
    (tmp_path / 'used').mkdir()
    (tmp_path / 'used' / 'notes.txt').write_text('mine')
    run(TINY + [f'--data_dir={tmp_path / "nodata"}'], str(tmp_path / 'used'), ok=False)
    assert os.listdir(tmp_path / 'used') == ['notes.txt']  # the folder and what it held stay


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def two_nodes(folder, name):
    """The README's two-node command on this machine, in folder, out_dir name: the two torchrun
    processes' exit codes and their stdout and stderr (files, which never block a node as an
    unread pipe can). A node still running after 120 s (an attempt takes seconds), or after
    its peer failed, is killed."""
    port = free_port()
    logs = [folder / f'{name}-node{r}.{kind}' for r in (0, 1) for kind in ('out', 'err')]
    files = [open(log, 'w') for log in logs]
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2',
                               f'--node_rank={r}', '--nproc_per_node=1', '--master_addr=127.0.0.1',
                               f'--master_port={port}', os.path.join(ROOT, 'train.py'), *TINY,
                               '--max_iters=6', '--eval_interval=6', f'--out_dir={name}'],
                              cwd=folder, env=ENV, stdout=files[2 * r], stderr=files[2 * r + 1],
                              start_new_session=True) for r in (0, 1)]
    deadline = time.time() + 120
    while (time.time() < deadline and any(n.poll() is None for n in nodes)
           and not any(n.returncode for n in nodes)):
        time.sleep(0.2)
    for n in nodes:
        if n.poll() is None:
            os.killpg(n.pid, signal.SIGKILL)
    for n in nodes:
        n.wait()
    for f in files:
        f.close()
    return [n.returncode for n in nodes], [log.read_text() for log in logs]


@pytest.mark.slow
def test_two_nodes_prepare_train_and_exit_cleanly(tmp_path):
    """The README's two-node command, both nodes on this machine sharing a filesystem with no
    prepared data: each node prepares the bundled dataset into the same folder at once, both
    train, and every process exits 0 (three times; the data is removed before each). An
    attempt in which a worker aborts in torch's gloo teardown after the run is complete (SIGABRT,
    "terminate called without an active exception": seen once in about five full runs here,
    never alone) is run once more; anything else fails at once."""
    import shutil
    for attempt in range(3):
        for tries in range(2):
            shutil.rmtree(tmp_path / 'data', ignore_errors=True)
            name = f'out{attempt}-{tries}'
            codes, texts = two_nodes(tmp_path, name)
            teardown = (codes != [0, 0] and any('SIGABRT' in t for t in texts)
                        and os.path.exists(tmp_path / name / 'ckpt.pt') and load(tmp_path / name)['step'] == 6)
            if not teardown:
                break
        assert codes == [0, 0], (attempt, codes, [text[-1500:] for text in texts])
        assert 'ddp gloo' in texts[0] and load(tmp_path / name)['step'] == 6


@pytest.mark.slow
def test_a_released_model_evaluates_and_fine_tunes(tmp_path):
    """--init_from=<a folder in the authors' released format> with GPT-2-tokenized data (here
    made up: ids below the fixture's 128): --eval_only evaluates it and writes nothing; a short
    fine-tune keeps the release's sizes and semantics in its checkpoint, and resumes from it with
    this run's default model settings; char data is refused in one line."""
    pytest.importorskip('safetensors')
    import numpy as np
    from data import write_shard
    release = os.path.join(ROOT, 'data', 'skip_middle_tiny')
    data = tmp_path / 'gpt2data'
    data.mkdir()
    tokens = np.random.default_rng(0).integers(0, 128, 20000)
    write_shard(str(data / 'toy_train_000000.bin'), tokens[:18000])
    write_shard(str(data / 'toy_val_000000.bin'), tokens[18000:])
    (data / 'meta.json').write_text(json.dumps({'tokenizer': 'gpt2', 'vocab_size': 128,
                                                'command': 'made by the test'}))
    args = ['--block_size=32', '--batch_size=4', '--eval_tokens=512', '--log_interval=1',
            f'--data_dir={data}', f'--init_from={release}']
    out = tmp_path / 'tuned'
    evaluated = tmp_path / 'evaluated'
    p, refused, tuned, resumed = train_many(
        (args + ['--eval_only'], str(evaluated)), (TINY + [f'--init_from={release}'], str(tmp_path / 'char')),
        (args + ['--max_iters=6', '--stop_iter=3', '--eval_interval=3'], str(out)),
        (['--block_size=32', '--batch_size=4', '--eval_tokens=512', '--max_iters=6', '--eval_interval=3',
          f'--data_dir={data}', '--init_from=resume'], str(out)), ok=False)
    assert p.returncode == 0 and 'eval step 0 | val ce' in p.stdout and 'hide_closed_keys=False' in p.stdout
    assert not evaluated.exists()
    one_line_error(refused, 'reads GPT-2 tokens', 'char tokens')
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    saved = load(out)['model_args']
    assert (saved['n_embd'], saved['n_layer'], saved['hide_closed_keys']) == (64, 4, False)
    assert resumed.returncode == 0 and 'resuming from' in resumed.stdout and load(out)['step'] == 6


# ----------------------------------------------------------------------------- the seams: settings
# through the scripts that read them

@pytest.fixture(scope='module')
def controller_runs(tmp_path_factory):
    """A 6-step run of each kind of controller, two at a time: their out_dirs by kind."""
    outs = {kind: str(tmp_path_factory.mktemp('ctrl') / kind) for kind in ('off', *controller_kinds())}
    train_many(*[(TINY + ['--n_layer=4', '--max_iters=6', '--eval_interval=6', f'--controller={kind}'], out)
                 for kind, out in outs.items()])
    return outs


@pytest.mark.parametrize('kind', ('off', *controller_kinds()))  # a new rule: tested at once
@pytest.mark.slow
def test_each_controller_regularizes_through_train_py(controller_runs, kind):
    """Each kind, run by train.py: the logged regularizer of every step is what the README's
    table says, from that step's gates (logged per layer) and the coefficients in force. Fixed
    kinds: their c and k (FIXED, whose values test_model.py holds to the README), all
    along. Target kinds: c and k start at 0 and move. The loss uses each micro-batch's unbiased
    variance; the log pools the step's (biased) one. 'off': no regularizer at all."""
    steps = records(controller_runs[kind], 'train')
    if kind == 'off':  # no regularizer, no coefficients; the gates are still logged
        assert all(r['reg'] == 0 and 'mean_coefs' not in r and len(r['gate_mean']) == 4 for r in steps)
        assert 0 < steps[-1]['gate_mean'][1] < 1
        return
    n = 4 * 32  # gates per layer in a step: batch 4 x block 32
    t = torch.tensor([1.0, 0.5, 0.5, 1.0], dtype=torch.float64)  # mean targets: 1.0 -> 0.5, mirrored
    coefs = (torch.zeros(4, dtype=torch.float64),) * 2
    for r in steps:
        mu = torch.tensor(r['gate_mean'], dtype=torch.float64)
        var = torch.tensor(r['gate_var'], dtype=torch.float64) * n / (n - 1)
        if kind in FIXED:
            c, k = FIXED[kind]
            assert r['mean_coefs'] == pytest.approx([c] * 4) and r['var_coefs'] == pytest.approx([k] * 4)
            if kind == 'sparsity_variance_l2':
                want = c * (mu - t).norm() + k * (var - t * (1 - t)).norm()
            else:
                want = (c * mu).mean() + (k * var).mean()
        else:
            want = (coefs[0] * mu).mean() + (coefs[1] * var).mean()
            coefs = tuple(torch.tensor(r[key], dtype=torch.float64) for key in ('mean_coefs', 'var_coefs'))
        assert r['reg'] == pytest.approx(want.item(), rel=1e-5, abs=1e-9), (r['step'], r['reg'], want)
    if kind in FIXED:
        assert all(abs(r['reg']) > 1e-4 for r in steps)
    else:
        assert steps[0]['reg'] == 0 and abs(steps[-1]['reg']) > 1e-6
        assert any(c != 0 for c in steps[-1]['mean_coefs'])


def readme_train_commands():
    """The train.py commands of the README's code blocks, in order, as argument lists."""
    with open(os.path.join(ROOT, 'README.md')) as f:
        text = f.read().replace('\\\n', ' ')
    blocks = re.findall(r'```bash\n(.*?)```', text, re.S)
    commands = []
    for line in '\n'.join(blocks).splitlines():
        words = line.split('#')[0].split()
        if 'train.py' in words:
            commands.append(words[words.index('train.py') + 1:])
    return commands


MODEL_SETTINGS = ('dataset', 'data_dir', 'vocab_size', 'block_size', 'n_layer', 'n_head', 'n_kv_head',
                  'n_embd', 'rope_theta', 'norm_eps', 'gated', 'gate_init', 'gate_eps', 'hide_closed_keys')


def test_readme_commands_are_safe_in_the_order_shown():
    """No train.py command of the README starts a model in an out_dir where an earlier command
    trained another one (the run there would be lost, or the command refused)."""
    commands = readme_train_commands()
    assert len(commands) >= 8 and ['config/shakespeare_char_gpu.py'] in commands
    trained = {}  # out_dir -> the model trained there
    for args in commands:
        if '--help' in args:
            continue
        c = train_settings(*args)
        if c['init_from'] == 'resume' or c['eval_only']:
            continue  # continues or reads the run that is there
        model = (('released', c['init_from']) if c['init_from'] != 'scratch' else
                 tuple(c[k] for k in MODEL_SETTINGS))
        assert trained.setdefault(c['out_dir'], model) == model, (args, c['out_dir'])
    assert len(trained) >= 4


@pytest.mark.slow
def test_explicit_fixed_coefficients_including_zero(tmp_path):
    """--ctrl_coef and --ctrl_var_coef replace a fixed kind's defaults, 0 like any other value."""
    cases = (((0.0, 0.0), 'sparsity'), ((0.05, 0.02), 'sparsity_variance'))
    target = str(tmp_path / 'proportional')
    train_many(*[(TINY + ['--max_iters=2', '--eval_interval=2', f'--controller={kind}', f'--ctrl_coef={coefs[0]}',
                          f'--ctrl_var_coef={coefs[1]}'], str(tmp_path / kind)) for coefs, kind in cases],
               (TINY + ['--max_iters=1', '--eval_interval=1', '--ctrl_coef=0.02', '--ctrl_var_coef=-0.01'], target),
               (['--init_from=resume', '--max_iters=4', '--ctrl_coef=0.03'], str(tmp_path / 'sparsity')))
    for coefs, kind in cases:
        for r in records(str(tmp_path / kind), 'train')[:2]:  # before the resume below
            mu, var = torch.tensor(r['gate_mean']), torch.tensor(r['gate_var']) * 128 / 127
            assert r['mean_coefs'] == pytest.approx([coefs[0]] * 2)
            assert r['reg'] == pytest.approx((coefs[0] * mu + coefs[1] * var).mean().item(), rel=1e-5, abs=0)
    # a fixed kind's coefficients are settings: a resume that changes one uses the new value
    assert [r['mean_coefs'] for r in records(str(tmp_path / 'sparsity'), 'train')][-1] == pytest.approx([0.03] * 2)
    # a target kind starts from them (and then moves them)
    r = records(target, 'train')[0]
    mu, var = torch.tensor(r['gate_mean']), torch.tensor(r['gate_var']) * 128 / 127
    assert r['reg'] == pytest.approx((0.02 * mu - 0.01 * var).mean().item(), rel=1e-5, abs=0)


@pytest.mark.slow
def test_controller_settings_set_its_targets_steps_and_limits(tmp_path):
    """The proportional rule through train.py with every ctrl_ setting changed: each step's
    coefficients are recomputed from the logged gate statistics, c += lr * d where |d| > tol,
    clamped to [ctrl_coef_min, ctrl_coef_max], with the targets the settings give."""
    out = str(tmp_path / 'ctrl')
    lr, tol, lo, hi, delta = 0.3, 0.1, -0.004, 0.02, 0.01
    run(TINY + ['--n_layer=4', '--max_iters=5', '--eval_interval=5', '--ctrl_target_start=0.9',
                '--ctrl_target_end=0.6', f'--ctrl_lr={lr}', f'--ctrl_tol={tol}', f'--ctrl_coef_min={lo}',
                f'--ctrl_coef_max={hi}', f'--ctrl_var_target_delta={delta}'], out)
    t = torch.tensor([0.9, 0.6, 0.6, 0.9], dtype=torch.float64)
    c = k = torch.zeros(4, dtype=torch.float64)
    held = 0  # coefficients tol kept still
    for r in records(out, 'train'):
        for coefs, error, key in ((c, torch.tensor(r['gate_mean'], dtype=torch.float64) - t, 'mean_coefs'),
                                  (k, torch.tensor(r['gate_var'], dtype=torch.float64) - (t * (1 - t) + delta),
                                   'var_coefs')):
            want = (coefs + lr * error * (error.abs() > tol)).clamp(lo, hi)
            assert r[key] == pytest.approx(want.tolist(), abs=1e-6), (r['step'], key)
            held += int((error.abs() <= tol).sum())
        c, k = (torch.tensor(r[key], dtype=torch.float64) for key in ('mean_coefs', 'var_coefs'))
    assert hi in [pytest.approx(x) for x in c.tolist()]  # the clamp acted
    assert lo in [pytest.approx(x) for x in k.tolist()] and held > 0


@pytest.mark.slow
def test_gradient_accumulation_averages_the_micro_steps(tmp_path):
    """4 micro-steps of 2 sequences take the steps one batch of 8 takes, with clipping on and an
    AdamW eps large enough that the gradient's scale matters (AdamW alone would hide a sum): a
    gradient norm of about 1 is not clipped at 2, but 4 summed micro-steps would be. Clipping
    at 0.05 changes the steps."""
    args = TINY + ['--max_iters=5', '--eval_interval=5', '--adam_eps=0.01']
    one, four, clipped = str(tmp_path / 'one'), str(tmp_path / 'four'), str(tmp_path / 'clipped')
    _, p, _ = train_many((args + ['--batch_size=8', '--grad_clip=2.0'], one),
                           (args + ['--batch_size=2', '--tokens_per_step=256', '--grad_clip=2.0'], four),
                           (args + ['--batch_size=8', '--grad_clip=0.05'], clipped))
    assert '1 procs x 4 accum x 2 x 32' in p.stdout
    assert [r['loss'] for r in records(four, 'train')] == pytest.approx(
        [r['loss'] for r in records(one, 'train')], rel=1e-5)
    a, b = load(one)['model'], load(four)['model']
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name
    assert not torch.allclose(a['lm_head.weight'], load(clipped)['model']['lm_head.weight'], atol=1e-4)


@pytest.mark.slow
def test_model_optimizer_and_evaluation_settings_reach_what_they_set(tmp_path):
    """Every model setting lands in the checkpoint's model_args and in the model it rebuilds
    (rotary tables, norm eps), the optimizer settings in AdamW's groups (no weight decay on
    norms and biases), decay_lr=false keeps the learning rate, and the log and evaluation
    follow log_interval and eval_tokens."""
    from checkpoints import load_checkpoint
    from model import rotary_tables
    out = str(tmp_path / 'set')
    run(['--n_layer=4', '--n_head=4', '--n_kv_head=2', '--n_embd=64', '--block_size=16', '--batch_size=4',
         '--vocab_size=192', '--rope_theta=500', '--norm_eps=1e-6', '--gate_eps=1e-4', '--weight_decay=0.1',
         '--beta1=0.7', '--beta2=0.9', '--adam_eps=1e-7', '--learning_rate=3e-3', '--decay_lr=false',
         '--max_iters=4', '--eval_interval=4', '--log_interval=2', '--eval_tokens=320'], out)
    ckpt = load(out)
    args = ckpt['model_args']
    assert {k: args[k] for k in ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'block_size', 'vocab_size',
                                 'rope_theta', 'norm_eps', 'gate_eps')} == dict(
        n_layer=4, n_head=4, n_kv_head=2, n_embd=64, block_size=16, vocab_size=192, rope_theta=500.0,
        norm_eps=1e-6, gate_eps=1e-4)
    model, _ = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    assert torch.allclose(model.rope_cos, rotary_tables(16, 16, 500.0)[0])
    assert model.blocks[0].attn_pre.eps == 1e-6 and model.blocks[0].attn.wk.weight.shape == (32, 64)
    groups = ckpt['optimizer']['param_groups']
    assert [g['weight_decay'] for g in groups] == [0.1, 0.0]
    assert all(g['betas'] == (0.7, 0.9) and g['eps'] == 1e-7 for g in groups)
    assert [(r['step'], r['lr']) for r in records(out, 'train')] == [(1, 3e-3), (2, 3e-3), (4, 3e-3)]
    assert [r['eval_tokens'] for r in records(out, 'eval')] == [320, 320]  # 20 sequences of 16


@pytest.mark.slow
def test_schedule_settings_shape_the_learning_rate(tmp_path):
    """Linear warmup over warmup_frac of the steps from warmup_start x learning_rate, then
    cosine down to min_lr_frac x learning_rate; max_iters=0 is one pass over the train data."""
    from prepare import prepare
    (tmp_path / 'small.txt').write_text('to be or not to be\n' * 200)  # 3,420 train tokens
    data = prepare('text', out_dir=str(tmp_path / 'data'), input=str(tmp_path / 'small.txt'))
    out = str(tmp_path / 'lr')
    p = run(TINY + ['--max_iters=0', '--eval_interval=100', '--learning_rate=2e-3', '--warmup_frac=0.25',
                    '--warmup_start=0.5', '--min_lr_frac=0.1', f'--data_dir={data}'], out)
    n = 3420 // 128
    assert f'; {n} steps\n' in p.stdout
    warm = int(0.25 * n)
    want = [2e-3 * (0.5 + 0.5 * i / warm) for i in range(warm)]
    want += [2e-4 + 0.5 * (1 + math.cos(math.pi * (i - warm) / (n - warm))) * 1.8e-3 for i in range(warm, n)]
    assert [r['lr'] for r in records(out, 'train')] == pytest.approx(want)


@pytest.mark.slow
def test_checkpoints_only_at_improvements_when_asked(tmp_path):
    """always_save_checkpoint=false: a checkpoint at the evaluations that improve on the best
    validation loss so far, not at the others (a learning rate this high makes some worse)."""
    out = str(tmp_path / 'best')
    p = run(TINY + ['--max_iters=8', '--eval_interval=2', '--learning_rate=0.3', '--decay_lr=false',
                    '--always_save_checkpoint=false'], out)
    saved = [int(s) for s in re.findall(r'ckpt\.pt \(step (\d+)\)', p.stdout)]
    evals, best, improved = records(out, 'eval'), math.inf, []
    for e in evals:
        if e['val_loss'] < best and e['step'] > 0:
            improved.append(e['step'])
        best = min(best, e['val_loss'])
    assert saved == improved and 0 < len(saved) < len(evals) - 1, (saved, evals)


WANDB = """
import json, os
calls = []
def init(project, name, config):
    calls.append(['init', project, name, sorted(config)])
def log(values, step):
    calls.append(['log', sorted(values), step])
def finish():
    calls.append(['finish'])
    with open(os.environ['WANDB_CALLS'], 'w') as f:
        json.dump(calls, f)
"""


@pytest.mark.slow
def test_wandb_gets_the_run_when_asked(tmp_path):
    """--wandb_log=true with a stand-in wandb module: init with the project, name and settings,
    a log call per log line and evaluation, finish. Without wandb installed: one line."""
    (tmp_path / 'wandb.py').write_text(WANDB)
    env = dict(ENV, PYTHONPATH=str(tmp_path), WANDB_CALLS=str(tmp_path / 'calls.json'))
    cmd = [sys.executable, 'train.py', *TINY, '--max_iters=2', '--eval_interval=2', '--wandb_log=true',
           '--wandb_project=proj', '--wandb_run_name=name', f'--data_dir={DATA}', f'--out_dir={tmp_path / "o"}']
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    calls = json.load(open(tmp_path / 'calls.json'))
    assert calls[0][:3] == ['init', 'proj', 'name'] and 'ctrl_lr' in calls[0][3] and calls[-1] == ['finish']
    logged = [(c[2], 'val/loss' in c[1] or 'train/loss' in c[1]) for c in calls[1:-1]]
    assert logged == [(0, True), (1, True), (2, True), (2, True)]
    one_line_error(run(TINY + ['--wandb_log=true'], str(tmp_path / 'none'), ok=False), 'pip install wandb')


@pytest.mark.slow
def test_seed_sets_the_initial_weights(tmp_path, tiny_ckpt):
    out = str(tmp_path / 'seed')
    run(TINY + ['--max_iters=4', '--eval_interval=2', '--seed=7'], out)
    assert records(out, 'eval')[0]['val_loss'] != records(tiny_ckpt, 'eval')[0]['val_loss']


@pytest.mark.slow
def test_a_dense_start_and_visible_keys(tmp_path):
    """gate_init=zero: every gate is exactly 1 and stays so (no gradient reaches the heads);
    hide_closed_keys=false trains on the masked path and is saved with the model."""
    out = str(tmp_path / 'zero')
    p, refused = train_many((TINY + ['--max_iters=3', '--eval_interval=3', '--gate_init=zero',
                                     '--hide_closed_keys=false'], out),
                            (TINY + ['--skip=true', '--hide_closed_keys=false'], str(tmp_path / 'x')), ok=False)
    assert p.returncode == 0 and 'gated, skip off (masked)' in p.stdout
    assert all(r['gate_mean'] == [1.0, 1.0] and r['sparsity'] == 0 for r in records(out, 'train'))
    ckpt = load(out)
    assert ckpt['model_args']['gate_init'] == 'zero' and ckpt['model_args']['hide_closed_keys'] is False
    assert not ckpt['model']['gate_heads.0.weight'].any() and not ckpt['model']['gate_heads.0.bias'].any()
    one_line_error(refused, 'skip cannot be true with --hide_closed_keys=false')


def test_ctrl_settings_reach_the_controller_or_else_its_rule():
    """Each ctrl_X setting is GateController's argument X, or else the rule's keyword argument X;
    a rule without X does not get it (so a setting added for one rule breaks no other kind)."""
    from configurator import gate_controller
    s = train_settings('--controller=proportional_integral', '--ctrl_lr=0.5', '--ctrl_tol=0')
    s['ctrl_kp'] = 2.5  # as a student adds `ctrl_kp = 2.5` to train.py's settings
    c = gate_controller(s, 4)
    assert (c.kind, c.lr, c.tol, c.rule_args) == ('proportional_integral', 0.5, 0, {'kp': 2.5})
    for kind in controller_kinds():
        assert gate_controller(dict(s, controller=kind), 4).rule_args == (
            {'kp': 2.5} if kind == 'proportional_integral' else {})


RULE_OF_ONES_OWN = '''

def counting(d, memory):  # a student's rule: memory holds a number and a list
    memory["n"] = memory.get("n", 0) + 1
    memory["seen"] = memory.get("seen", []) + [round(float(d.abs().max()), 6)]
    return d * memory["n"] / len(memory["seen"]) + 0.1 * memory["seen"][-1]


TARGET_RULES["counting"] = counting
'''


@pytest.mark.slow
def test_a_rule_appended_to_model_py_trains_and_resumes_exactly(tmp_path):
    """A rule added as the README says, at the end of model.py in a copy of the scripts, trains
    with --controller=NAME; its memory of numbers and lists goes through a checkpoint, and the
    resumed run takes the coefficients of the run that never stopped."""
    import shutil
    code = tmp_path / 'code'
    code.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith('.py'):
            shutil.copy(os.path.join(ROOT, name), code / name)
    with open(code / 'model.py', 'a') as f:
        f.write(RULE_OF_ONES_OWN)
    args = [sys.executable, 'train.py', *TINY, '--max_iters=6', '--eval_interval=3', '--controller=counting',
            f'--data_dir={DATA}']
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    for extra in ([f'--out_dir={a}'], [f'--out_dir={b}', '--stop_iter=3'], [f'--out_dir={b}', '--init_from=resume']):
        p = subprocess.run(args + extra, cwd=code, env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    ra, rb = records(a, 'train'), records(b, 'train')
    assert [r['step'] for r in rb] == list(range(1, 7))
    assert [r['mean_coefs'] for r in ra] == [r['mean_coefs'] for r in rb]
    assert len({str(r['mean_coefs']) for r in ra}) == 6  # it moved every step
    memory = load(b)['controller']['memory']['mean']
    assert memory['n'] == 6 and len(memory['seen']) == 6 and type(memory['seen'][0]) is float


RECORD_MODELS = """
import json, os, runpy, sys
sys.path.insert(0, os.environ['ROOT'])
import configurator, model
extra = os.environ.get('TRAIN_SETTINGS', '')  # lines appended to train.py's settings block
block = configurator.settings_block
configurator.settings_block = lambda path: block(path) + (extra if path.endswith('train.py') else '')
built, init = [], model.GPT.__init__
def recording(self, config):
    built.append(dict(vars(config)))
    init(self, config)
model.GPT.__init__ = recording
sys.argv = sys.argv[1:]
try:
    runpy.run_path(os.path.join(os.environ['ROOT'], sys.argv[0]), run_name='__main__')
finally:
    print('built: ' + json.dumps(built))
"""

# a value other than train.py's default for every GPTConfig field that is a train.py setting
FIELD_VALUES = dict(vocab_size=192, block_size=16, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                    rope_theta=500.0, norm_eps=1e-6, gated=False, gate_init='zero', gate_eps=1e-4,
                    hide_closed_keys=False)


@pytest.mark.slow
def test_every_model_field_reaches_every_script_that_builds_a_model(tmp_path):
    """train.py (a new run and a resume), sample.py and bench.py run build the model that the
    settings describe, field by field: a model setting a script dropped would show here. The
    list of fields comes from GPTConfig, so a new field fails here until it has a value."""
    from model import GPTConfig
    fields = [f for f in GPTConfig.__dataclass_fields__ if f in train_settings()]
    assert sorted(fields) == sorted(FIELD_VALUES), 'give every model field a value in FIELD_VALUES'
    (tmp_path / 'record.py').write_text(RECORD_MODELS)

    def built(*argv, settings=''):
        env = dict(ENV, ROOT=ROOT, TRAIN_SETTINGS=settings)
        p = subprocess.run([sys.executable, str(tmp_path / 'record.py'), *argv], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.rsplit('built: ', 1)[1])

    def assert_fields(config, values):
        assert {k: config[k] for k in values} == values
    out = str(tmp_path / 'out')
    train = ['train.py', *(f'--{k}={v}' for k, v in FIELD_VALUES.items()), '--max_iters=2', '--stop_iter=1',
             '--eval_interval=1', '--batch_size=2', '--eval_tokens=64', f'--data_dir={DATA}', f'--out_dir={out}']
    for config in built(*train):
        assert_fields(config, FIELD_VALUES)
    assert_fields(load(out)['model_args'], FIELD_VALUES)
    for config in built('train.py', '--init_from=resume', f'--out_dir={out}'):
        assert_fields(config, FIELD_VALUES)
    for config in built('sample.py', f'--out_dir={out}', '--max_new_tokens=2'):
        assert_fields(config, FIELD_VALUES)
    # bench.py run reads train.py's settings block: the values go there; it sets gated per run
    gated_runs = dict(FIELD_VALUES, gated=True, hide_closed_keys=True)  # one of its runs skips
    settings = ''.join(f'\n{k} = {v!r}' for k, v in gated_runs.items())
    configs = built('bench.py', 'run', '--run_steps=1', settings=settings)
    assert [c['gated'] for c in configs] == [False, True, True]
    for config in configs:
        assert_fields(config, {k: v for k, v in gated_runs.items() if k != 'gated'})


@pytest.mark.slow
def test_the_evaluation_table_keeps_its_columns_apart(tiny_ckpt, tmp_path):
    """Residual-stream norms of hundreds and thousands (post-norm weights scaled up in a copy of a
    checkpoint) still print as one column per layer, each value apart from the next."""
    import shutil
    out = tmp_path / 'big'
    shutil.copytree(tiny_ckpt, out)
    ckpt = load(out)
    for k in ckpt['model']:
        if k.endswith(('attn_post.weight', 'ffn_post.weight')):
            ckpt['model'][k] *= 50.0 if k.startswith('blocks.0.') else 500.0
    torch.save(ckpt, out / 'ckpt.pt')
    p = run(['--eval_only'], str(out))
    rows = {line.split()[0]: line.split()[1:] for line in p.stdout.splitlines() if line.startswith('  ')}
    assert rows['layer'] == ['0', '1'] and all(len(v) == 2 for v in rows.values()), rows
    norms = [float(v) for v in rows['resid_norm']]
    assert 100 <= norms[0] < 1000 <= norms[1], norms


@pytest.mark.slow
def test_plain_definitions_train_and_sample_like_the_fast_paths(tmp_path):
    """--plain=true runs model.py's own definitions (plain attention, every token through every
    layer, generation without a cache): the same losses as the default run, which skips and uses
    the fused kernel, and the same greedy sample."""
    args = TINY + ['--n_layer=4', '--max_iters=20', '--eval_interval=20', '--ctrl_lr=0.5']
    fast, plain = str(tmp_path / 'fast'), str(tmp_path / 'plain')
    p_fast, p_plain = train_many((args, fast), (args + ['--plain=true'], plain))
    assert 'gated, skip on;' in p_fast.stdout
    assert 'gated, skip off (masked), plain definitions;' in p_plain.stdout
    a, b = records(fast, 'train'), records(plain, 'train')
    assert max(r['sparsity'] for r in a) > 0.2
    assert [r['loss'] for r in b] == pytest.approx([r['loss'] for r in a], rel=1e-4)
    samples = []
    for out, extra in ((fast, []), (plain, ['--plain=true'])):
        p = subprocess.run([sys.executable, 'sample.py', f'--out_dir={out}', '--temperature=0', '--max_new_tokens=60',
                            '--start=ROMEO:', '--show_skips', '--no_color', *extra],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        samples.append(p.stdout.split('tokens in')[0].rsplit('\n', 1)[0])  # all but the timing line
    assert samples[0] == samples[1] and '|' in samples[0]  # the same text, the same layers run


@pytest.mark.slow
def test_proportional_integral_through_train_py_and_a_resume(tmp_path):
    """The PI rule as train.py runs it: c = lr * (kp * d + the sum of d) at every step, from the
    logged gate means (tol 0, no clamp), and a run stopped and resumed takes the same steps."""
    args = TINY + ['--n_layer=4', '--max_iters=8', '--eval_interval=4', '--controller=proportional_integral',
                   '--ctrl_lr=0.05', '--ctrl_tol=0']
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    train_many((args, a), (args + ['--stop_iter=4'], b), (['--init_from=resume'], b))
    ra, rb = records(a, 'train'), records(b, 'train')
    assert [r['mean_coefs'] for r in ra] == [r['mean_coefs'] for r in rb] and len(ra) == 8
    t = torch.tensor([1.0, 0.5, 0.5, 1.0], dtype=torch.float64)
    total = torch.zeros(4, dtype=torch.float64)
    for r in ra:
        d = torch.tensor(r['gate_mean'], dtype=torch.float64) - t
        total += d
        assert r['mean_coefs'] == pytest.approx((0.05 * (10.0 * d + total)).tolist(), abs=1e-6), r['step']
    assert load(b)['controller']['memory']['mean']['previous'].shape == (4,)


@pytest.mark.slow
def test_every_script_takes_key_value_and_key_space_value(tmp_path):
    """`--key=value` and `--key value` mix in train.py, sample.py and course.py (prepare.py's
    argparse takes both); a setting with no value says both forms."""
    out = str(tmp_path / 'o')
    spaced = [a for t in TINY for a in t.split('=')]  # --n_layer 2 --n_head 2 ...
    p = subprocess.run([sys.executable, 'train.py', *spaced, '--max_iters', '2', '--eval_interval=2',
                        '--out_dir', out, '--compile', 'false', '--data_dir', DATA], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and 'eval step 2 |' in p.stdout and load(out)['config']['n_embd'] == 32, p.stderr
    p = subprocess.run([sys.executable, 'sample.py', '--out_dir', out, '--max_new_tokens', '3', '--seed=7'],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, 'course.py', 'key', '--solved', '1', '3'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith('# exercise 3.'), p.stderr
    p = subprocess.run([sys.executable, 'train.py', '--max_iters'], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and p.stderr == 'error: --max_iters needs a value: --max_iters=VALUE or --max_iters VALUE\n'


@pytest.mark.slow
def test_the_training_line_averages_its_interval_and_gives_an_eta(tmp_path):
    """The ms of a training line (and its tok/s) is the mean step time since the previous line,
    so the lines' ms, each times its steps, add up to the run's training time; each line ends
    with an ETA (h:mm:ss) of the steps left."""
    out = str(tmp_path / 'o')
    p, = train_many((TINY + ['--max_iters=7', '--eval_interval=7', '--log_interval=3'], out))
    lines = [l for l in p.stdout.splitlines() if l.startswith('step ')]
    assert [l.split()[1] for l in lines] == ['1', '3', '6', '7']
    assert all(re.search(r'\| eta \d+:\d\d:\d\d$', l) for l in lines), lines
    steps = [r['step'] for r in records(out, 'train')]
    total = sum(r['ms'] / 1000 * (s - prev) for r, s, prev in zip(records(out, 'train'), steps, [0] + steps))
    assert total == pytest.approx(records(out, 'eval')[-1]['train_time'], rel=1e-6)
    assert all(r['tok_s'] == pytest.approx(4 * 32 * 1000 / r['ms']) for r in records(out, 'train'))


@pytest.mark.slow
def test_a_resume_that_moves_the_schedules_end_says_what_the_learning_rate_does(tmp_path):
    """Resuming a finished 8-step run with --max_iters=12 stretches the cosine: one line gives
    the learning rate at step 8 before and after, and the next step uses the new one.
    --lr_decay_iters=8 keeps the end where it was: the run goes on at the final rate, no note."""
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    short = TINY + ['--max_iters=8', '--eval_interval=8']
    more = ['--init_from=resume', '--max_iters=12', '--eval_interval=12']
    _, _, stretched, held = train_many((short, a), (short, b), (more, a), (more + ['--lr_decay_iters=8'], b))
    note = next(l for l in stretched.stdout.splitlines() if 'learning rate schedule' in l)
    before, after = map(float, re.search(r'at step 8 it is (\S+), not (\S+);', note).groups())
    assert 'ends at step 12, not 8' in note and '--lr_decay_iters=8 keeps the end' in note
    assert after == 0.0 and before > 1e-4  # min_lr_frac 0: the old end; the new cosine's value
    assert records(a, 'train')[-4]['lr'] == pytest.approx(before, rel=1e-2)  # step 9
    assert 'learning rate schedule' not in held.stdout
    assert all(r['lr'] == 0.0 for r in records(b, 'train') if r['step'] > 8)


@pytest.mark.slow
def test_eval_text_reports_every_token_of_a_file(tmp_path):
    """--eval_only --eval_text=FILE: loss, perplexity and sparsity over all of the file's tokens
    with their count. A file shorter than a sequence gives what one forward pass over it gives;
    a longer one, what its sequences of block_size give, the last moved back to end at the last
    token and counting only targets not counted yet. A character the run's data lacks stops it
    with one line that counts such characters and shows the first; so does a missing
    --eval_only."""
    from checkpoints import load_checkpoint
    from data import load_meta, get_tokenizer
    out = str(tmp_path / 'o')
    text = open(os.path.join(ROOT, 'data', 'shakespeare.txt')).read()
    short, long = tmp_path / 'short.txt', tmp_path / 'long.txt'
    short.write_text(text[:25])
    long.write_text(text[1000:1070])
    (tmp_path / 'odd.txt').write_text('caf\u00e9 \u00e9t\u00e9 \u2014 ok')
    _, a, b, odd, alone = train_many(
        (TINY + ['--max_iters=6', '--eval_interval=6'], out),
        (['--eval_only', f'--eval_text={short}'], out), (['--eval_only', f'--eval_text={long}'], out),
        (['--eval_only', f'--eval_text={tmp_path / "odd.txt"}'], out), ([f'--eval_text={short}'], out), ok=False)
    model, _ = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    encode, _ = get_tokenizer(load_meta(DATA))

    def reported(p):
        line = next(l for l in p.stdout.splitlines() if l.startswith(str(tmp_path)))
        return [float(v.replace(',', '')) for v in re.findall(r'([\d,.]+) tokens \(([\d,]+) predicted\) \| loss (\S+) '
                                                              r'\| perplexity (\S+) \| sparsity (\S+)$', line)[0]]
    ids = torch.tensor(encode(text[:25]))
    with torch.no_grad():
        _, ce, gates = model(ids[None, :-1], ids[None, 1:])
    n, predicted, loss, ppl, sparsity = reported(a)
    assert (n, predicted) == (25, 24) and loss == pytest.approx(ce.item(), abs=1e-4)
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3) and sparsity == pytest.approx((gates == 0).float().mean().item(), abs=1e-3)
    ids = torch.tensor(encode(text[1000:1070]))  # 69 targets at T = 32: 1-32, 33-64, then 65-69 of 38-69
    total = 0.0
    with torch.no_grad():
        for start, skip in ((0, 0), (32, 0), (37, 27)):
            logits, _, _ = model(ids[None, start:start + 32])
            losses = torch.nn.functional.cross_entropy(logits[0], ids[start + 1:start + 33], reduction='none')
            total += losses[skip:].sum().item()
    n, predicted, loss, _, _ = reported(b)
    assert (n, predicted) == (70, 69) and loss == pytest.approx(total / 69, abs=1e-4)
    one_line_error(odd, 'odd.txt: 4 characters are not in the', "the first '\u00e9' at character 3")
    one_line_error(alone, 'eval_text needs --eval_only')
