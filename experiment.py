"""
Does skipping pay? The paper's comparison at a scale you can afford: dense baselines at
several depths and gated models at several sparsity targets (trained with --skip=true, so
skipped layers are really not computed), on the same data with the same token budget. Then
validation cross-entropy against estimated forward FLOPs per token and against measured
training and evaluation time per token, beside decode speed with and without skipping. At CPU
scale also the ablation the paper's release did not run: a gated model whose closed gates leave
their keys visible (--hide_closed_keys=false, how the authors' released models were trained),
which cannot skip whole-sequence passes and must still compute skipped tokens' keys and values.

    python experiment.py                          # CPU scale: bundled Shakespeare, 20-40 min
    python experiment.py --scale=fineweb --nproc=8   # the paper's FineWeb setup on a GPU box
    python experiment.py --scale=fineweb --dry_run   # print the train.py commands only
    python experiment.py --report_only            # rebuild the table and plot from finished runs
    python experiment.py --max_iters=100          # any train.py setting goes to every run

Writes <results>.md and <results>.csv (and <results>.png when matplotlib is installed; it is
optional and used for the plot only). The runs themselves live in out_experiment/<results>/.
"""
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from checkpoints import load_checkpoint
from configurator import configure, joined
from skipping import generate

HERE = os.path.dirname(os.path.abspath(__file__))
# Every run of a scale shares its train.py settings; runs differ only in depth and gating.
SCALES = {
    'cpu': dict(
        common=['--dataset=shakespeare_char', '--block_size=128', '--batch_size=16', '--n_embd=128',
                '--n_head=4', '--n_kv_head=4', '--max_iters=1000', '--eval_interval=500',
                '--eval_tokens=32768', '--log_interval=100', '--learning_rate=2e-3',
                '--ctrl_lr=2e-2'],
        dense_layers=[2, 4, 6], gated_layers=6, gated_targets=[0.75, 0.5, 0.25],
        visible_targets=[0.5]),
    'fineweb': dict(
        common=['config/fineweb_gated.py'],  # the paper's setup; --gated=false for the baselines
        dense_layers=[2, 4, 6, 8, 10, 12], gated_layers=12, gated_targets=[0.5],
        visible_targets=[]),
}
# settings
scale = 'cpu'            # 'cpu' or 'fineweb' (see SCALES above)
nproc = 1                # processes per run; more than 1 launches torchrun
dry_run = False          # print the train.py commands only
report_only = False      # read finished runs, train nothing
skip_decode = False      # do not measure decode speed
results = ''             # results/<scale> by default: <results>.md, .csv and .png
# end of settings
argv = joined(sys.argv[1:], globals())
own = [a for a in argv if a in ('-h', '--help') or a[2:].partition('=')[0] in globals()]
configure(globals(), own)
train_args = [a for a in argv if a not in own]  # the rest goes to every train.py run
PER_RUN = ('out_dir', 'n_layer', 'gated', 'ctrl_target_end', 'hide_closed_keys', 'skip',
           'init_from', 'eval_only')  # what the experiment sets for each run itself
for arg in train_args:
    if arg.startswith('--') and arg[2:].partition('=')[0] in PER_RUN:
        sys.exit(f"error: {arg}: experiment.py sets --{arg[2:].partition('=')[0]} for each run "
                 f"itself; change its runs in SCALES at the top of experiment.py instead")
if scale not in SCALES:
    sys.exit(f"error: --scale must be one of {', '.join(SCALES)}, got {scale!r}")
results = results or os.path.join('results', scale)


def runs_for(scale):
    s, L = SCALES[scale], SCALES[scale]['gated_layers']
    runs = [dict(name=f'dense{n}', n_layer=n, gated=False, target='', keys='')
            for n in s['dense_layers']]
    runs += [dict(name=f"gated{L}_t{t}", n_layer=L, gated=True, target=t, keys='hidden')
             for t in s['gated_targets']]
    return runs + [dict(name=f"gated{L}_t{t}_keys_visible", n_layer=L, gated=True, target=t,
                        keys='visible') for t in s['visible_targets']]


def train_command(run, out_dir):
    launcher = (['python'] if nproc == 1 else
                ['torchrun', '--standalone', f'--nproc_per_node={nproc}'])
    args = SCALES[scale]['common'] + [f'--out_dir={out_dir}', f"--n_layer={run['n_layer']}",
                                      f"--gated={str(run['gated']).lower()}"]
    if run['keys'] == 'hidden':
        args += [f"--ctrl_target_end={run['target']}", '--skip=true']
    elif run['keys'] == 'visible':  # every key is needed: no packing, no --skip
        args += [f"--ctrl_target_end={run['target']}", '--hide_closed_keys=false']
    return launcher + ['train.py'] + args + train_args


@torch.no_grad()
def decode_speeds(model, tokens, repeats=7):
    """Sampling tokens/s from a one-token prompt as sample.py samples (temperature 0.8, a fixed
    seed), with skipped layers left out and computed, taking turns; and the layers run per new
    token. (Greedy decoding can fall into a loop of tokens that never skip.)"""
    prompt = torch.zeros(1, 1, dtype=torch.long)
    times = {True: [], False: []}
    for _ in range(repeats):
        for skip in (True, False):
            t0 = time.perf_counter()
            _, gates = generate(model, prompt, tokens, temperature=0.8, return_gates=True,
                                skip=skip, generator=torch.Generator().manual_seed(1337))
            times[skip].append(time.perf_counter() - t0)
    layers_run = (gates[:, 0, 1:] > 0).float().sum(0).mean().item()
    skipping, every_layer = (tokens / statistics.median(times[k]) for k in (True, False))
    return skipping, every_layer, layers_run


def summarize(run, out_dir):
    """One results row from a finished run's log and checkpoint."""
    path = os.path.join(out_dir, 'log.jsonl')
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f]
    evals = [r for r in records if r['type'] == 'eval']
    if not evals:
        sys.exit(f"error: {path} has no evaluation; did the run finish?")
    last = evals[-1]
    model, _ = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    model.eval()
    row = dict(run=run['name'], n_layer=run['n_layer'], gated=run['gated'], target=run['target'],
               keys=run['keys'],
               val_ce=round(last['val_loss'], 4), sparsity=round(last['sparsity'], 4),
               flops_per_token=round(last['flops_per_token']),
               flops_per_token_no_skip=round(model.flops_per_token(0.0)),
               train_s=round(last['train_time'], 1),  # training wall time, evaluations excluded
               train_us_per_token=round(1e6 * last['train_time'] / last['tokens'], 2),
               eval_us_per_token=round(1e6 * last['eval_time'] / last['eval_tokens'], 2),
               decode_tok_s_skip='', decode_tok_s_no_skip='', layers_run='')
    if run['gated'] and not skip_decode:
        tokens = min(256, model.config.block_size - 1)
        skipping, every_layer, layers_run = decode_speeds(model, tokens)
        row.update(decode_tok_s_skip=round(skipping, 1), decode_tok_s_no_skip=round(every_layer, 1),
                   layers_run=round(layers_run, 2))
    print(f"== {run['name']}: val ce {row['val_ce']}, sparsity {row['sparsity']}", flush=True)
    return row


def write_results(name, command, rows):
    device = (torch.cuda.get_device_name() if torch.cuda.is_available() else
              f"{platform.machine()} CPU, {os.cpu_count()} cores")
    stamp = f"{device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    os.makedirs(os.path.dirname(name) or '.', exist_ok=True)
    with open(f'{name}.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    head = ['run', 'layers', 'gated', 'target', 'closed keys', 'val CE', 'sparsity',
            'fwd MFLOPs/token, skips counted',
            'fwd MFLOPs/token, every layer', 'train s', 'train us/token', 'eval us/token',
            'decode tok/s, skipping', 'decode tok/s, every layer', 'layers run / decoded token']
    lines = [f"Made by `{command}` on {stamp}.", '', '| ' + ' | '.join(head) + ' |',
             '|' + '---|' * len(head)]
    for r in rows:
        cells = dict(r, gated='yes' if r['gated'] else 'no',
                     flops_per_token=f"{r['flops_per_token'] / 1e6:.2f}",
                     flops_per_token_no_skip=f"{r['flops_per_token_no_skip'] / 1e6:.2f}")
        lines.append('| ' + ' | '.join(str(v) for v in cells.values()) + ' |')
    with open(f'{name}.md', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    plot(rows, f'{command}\n{stamp}', f'{name}.png')


def plot(rows, title, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('(matplotlib is not installed: no plot; `pip install matplotlib` for one)')
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    dense = [r for r in rows if not r['gated']]
    gated = [r for r in rows if r['gated'] and r['keys'] == 'hidden']
    visible = [r for r in rows if r['keys'] == 'visible']
    for ax, x, label in ((axes[0], 'flops_per_token', 'estimated forward FLOPs per token'),
                         (axes[1], 'train_us_per_token', 'measured training time per token (us)')):
        ax.plot([r[x] for r in dense], [r['val_ce'] for r in dense], 'o-', color='k',
                label='dense, n_layer = 2, 4, ...')
        ax.scatter([r[x] for r in gated], [r['val_ce'] for r in gated], color='C3', zorder=3,
                   label='gated, skipped layers not computed')
        ax.scatter([r[x] for r in visible], [r['val_ce'] for r in visible], color='C0', zorder=3,
                   marker='s', label="gated, closed keys visible (the release's semantics)")
        for r in dense + gated + visible:
            tag = str(r['n_layer']) if not r['gated'] else f"t={r['target']}"
            ax.annotate(tag, (r[x], r['val_ce']), textcoords='offset points', xytext=(4, 4))
        ax.set_xlabel(label)
    axes[0].scatter([r['flops_per_token_no_skip'] for r in gated], [r['val_ce'] for r in gated],
                    facecolors='none', edgecolors='C3', zorder=3,
                    label='gated, counting every layer')
    axes[0].set_ylabel('validation cross-entropy')
    fig.legend(*axes[0].get_legend_handles_labels(), loc='lower center', ncol=4, fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # the legend below the plots, where it hides nothing
    fig.savefig(path, dpi=120)


rows = []
for run in runs_for(scale):
    out_dir = os.path.join('out_experiment', results, run['name'])  # an absolute results wins
    cmd = train_command(run, out_dir)
    if dry_run:
        print(' '.join(cmd))
        continue
    if not report_only:  # (train.py moves an earlier run's checkpoint and log aside)
        print(f"== {run['name']}: {' '.join(cmd)}", flush=True)
        executable = sys.executable if cmd[0] == 'python' else cmd[0]
        code = subprocess.run([executable] + cmd[1:], cwd=HERE).returncode
        if code != 0:
            sys.exit(f"error: the {run['name']} run failed (train.py exited with {code}; its "
                     f"output is above)")
    rows.append(summarize(run, os.path.join(HERE, out_dir)))
if rows:
    # how the runs were made
    shown = [a for a in sys.argv[1:] if a not in ('--report_only', '--skip_decode')]
    write_results(os.path.join(HERE, results), ' '.join(['python experiment.py'] + shown), rows)
