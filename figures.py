"""
Two figures of a run, for a slide: each layer's gate mean against its target over training (from
out_dir/log.jsonl), and the gates of a text as a token x layer map (out_dir/ckpt.pt reading it).

    python figures.py --out_dir=out          # out/gates_training.png and out/gates_text.png
    python figures.py --out_dir=out --text="ROMEO: O, she doth teach the torches to burn bright!"
    python figures.py --out_dir=out --text=FILE:speech.txt    # the text from a file

matplotlib draws them; it is optional (pip install matplotlib), and only this needs it.
"""
import json
import os
import sys

import torch

from checkpoints import check_out_dir, load_checkpoint
from configurator import configure
from data import DataError, get_tokenizer, text_or_file
from model import FIXED, gate_targets

# settings
out_dir = 'out'          # a run of train.py: its log.jsonl and ckpt.pt; the figures go there too
text = 'JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?'  # or FILE:path; up to block_size tokens
# end of settings
configure(globals())
check_out_dir(out_dir)
try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("error: figures.py draws with matplotlib, which is optional: pip install matplotlib")


def gate_means_over_training(records, targets, controller):
    """Each layer of the first half (the second mirrors it): its gate mean at every logged step,
    and its target (dashed; None for a fixed kind, which has none)."""
    steps = [r['step'] for r in records]
    means = list(zip(*(r['gate_mean'] for r in records)))  # per layer
    L = len(means)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i in range(L // 2):
        ax.plot(steps, means[i], color=f"C{i}", label=f"layers {i} and {L - 1 - i}")
        if targets is not None:
            ax.axhline(targets[i], color=f"C{i}", linestyle='--', linewidth=1)
    ax.set_xlabel('step')
    ax.set_ylabel('mean gate (dashed: target)')
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{controller} controller, {L} layers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def gates_of_a_text(gates, pieces):
    """A token x layer map of the gates (L, T) of the tokens whose text is pieces (T,)."""
    L, T = gates.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * T), 0.5 * L + 1.5))
    image = ax.imshow(gates.numpy(), cmap='viridis', vmin=0, vmax=1, aspect='auto',
                      interpolation='nearest')
    ax.set_xticks(range(T), [repr(p)[1:-1] or ' ' for p in pieces], fontsize=7)
    ax.set_yticks(range(L), [f"layer {i}" for i in range(L)], fontsize=7)
    fig.colorbar(image, ax=ax, label='gate (0: the token skips the layer)')
    fig.tight_layout()
    return fig


log_path = os.path.join(out_dir, 'log.jsonl')
if not os.path.isfile(log_path):
    sys.exit(f"error: no {log_path}: train a run first (python train.py --out_dir={out_dir})")
with open(log_path) as f:
    log = [json.loads(line) for line in f if line.endswith('}\n')]
start_record = [r for r in log if r['type'] == 'start'][-1]
records = [r for r in log if r['type'] == 'train' and 'gate_mean' in r]
if not records:
    sys.exit(f"error: {log_path} has no gate means: figures.py draws a gated run's gates")
config, L = start_record['config'], len(records[0]['gate_mean'])
targets = None if config['controller'] in FIXED else gate_targets(
    L, config['ctrl_target_start'], config['ctrl_target_end'])[0].tolist()
path = os.path.join(out_dir, 'gates_training.png')
gate_means_over_training(records, targets, config['controller']).savefig(path, dpi=150)
print(f"wrote {path}: the gate means of {len(records)} logged steps")
if targets is not None:  # how near the targets the second half of training stayed
    late = [r['gate_mean'] for r in records if r['step'] > records[-1]['step'] / 2]
    for i in range(L // 2):
        miss = sum(abs(m[i] - targets[i]) for m in late) / len(late)
        low = min(records, key=lambda r: r['gate_mean'][i])
        print(f"  layers {i} and {L - 1 - i}: target {targets[i]:.3f}; mean gate lowest "
              f"{low['gate_mean'][i]:.3f} (step {low['step']}), {late[-1][i]:.3f} at the end, "
              f"{miss:.3f} from the target on average over the second half of training")

model, ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
text = text_or_file(text, 'text')
encode, decode = get_tokenizer(ckpt['meta'])
ids = encode(text)[:model.config.block_size]
if not ids:
    raise DataError("--text is empty after tokenizing: give at least one character")
with torch.no_grad():
    _, _, gates = model.eval()(torch.tensor([ids]))
path = os.path.join(out_dir, 'gates_text.png')
gates_of_a_text(gates[:, 0], [decode([i]) for i in ids]).savefig(path, dpi=150)
print(f"wrote {path}: the gates of {len(ids)} tokens in {model.config.n_layer} layers "
      f"({(gates == 0).float().mean().item():.1%} of them 0)")
