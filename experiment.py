"""
Does skipping pay? The paper's comparison (SPEC section 5) at a scale you can afford: dense
baselines at several depths and gated models at several sparsity targets, trained on the
same data with the same token budget, then validation cross-entropy against estimated
forward FLOPs per token, and measured decode speed with and without skipping.

    python experiment.py                         # CPU scale: bundled Shakespeare, < 30 min on 2 cores
    python experiment.py --scale=fineweb --nproc=8    # the paper's FineWeb setup on a GPU box
    python experiment.py --scale=fineweb --dry_run    # print the train.py commands only
    python experiment.py --report_only           # rebuild the table and plot from finished runs
    python experiment.py --max_iters=100 ...     # any other --key=value goes to every train.py run

Writes results_<scale>.md and results_<scale>.csv (and results_<scale>.png when matplotlib is
installed; it is optional and used for the plot only). Runs live in out_experiment/results_<scale>/.
"""

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time

import torch

from bench import decode_rate, settings
from prepare import read_shard, shard_paths
from sample import load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))

# Every run of a scale shares these train.py settings; runs differ only in depth and gating.
SCALES = {
    "cpu": dict(
        common=["--dataset=shakespeare_char", "--block_size=128", "--batch_size=16", "--n_embd=128",
                "--n_head=4", "--n_kv_head=4", "--max_iters=1000", "--eval_interval=500",
                "--eval_tokens=32768", "--log_interval=100", "--learning_rate=2e-3",
                # the paper's controller moves coefficients by 1e-3 x error per step over ~19k
                # steps; a 1000-step run needs a faster controller to reach its targets at all
                "--ctrl_lr=2e-2"],
        dense_layers=[2, 4, 6],
        gated_layers=6,
        gated_targets=[0.75, 0.5, 0.25],
        decode_context=256,
    ),
    "fineweb": dict(
        common=["config/fineweb_gated.py"],  # the paper's setup; --gated=false for the baselines
        dense_layers=[2, 4, 6, 8, 10, 12],
        gated_layers=12,
        gated_targets=[0.5],
        decode_context=1024,
    ),
}


def runs_for(scale):
    s = SCALES[scale]
    runs = [dict(name=f"dense{L}", n_layer=L, gated=False, target=None) for L in s["dense_layers"]]
    runs += [dict(name=f"gated{s['gated_layers']}_t{t}", n_layer=s["gated_layers"], gated=True, target=t)
             for t in s["gated_targets"]]
    return runs


def train_command(scale, run, out_dir, nproc, extra):
    launcher = ["python", "train.py"] if nproc == 1 else \
        ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    args = SCALES[scale]["common"] + [f"--out_dir={out_dir}", f"--n_layer={run['n_layer']}",
                                      f"--gated={str(run['gated']).lower()}"]
    if run["gated"]:
        args.append(f"--ctrl_target_end={run['target']}")
    return launcher + args + extra


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if r["type"] == "eval"]
    trains = [r for r in records if r["type"] == "train"]
    if not evals:
        raise SystemExit(f"error: {out_dir}/log.jsonl has no evaluation; did the run finish?")
    return evals[-1], trains


@torch.no_grad()
def decode_speeds(out_dir, context, tokens=96, repeats=5):
    """Decode tokens/s of a trained checkpoint on validation text, skipping vs every layer."""
    model, meta, _ = load_checkpoint(out_dir, "cpu")
    model.eval()
    settings.update(device="cpu", repeats=repeats)
    tokens = min(tokens, model.config.block_size // 2)  # both must fit in the context window
    context = min(context, model.config.block_size - tokens)
    config = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["config"]
    data_dir = config["data_dir"] or os.path.join(HERE, "data", config["dataset"])
    val = read_shard(shard_paths(data_dir, "val")[0])
    seq = torch.from_numpy(val[: context + tokens].astype("int64"))[None]
    _, _, gates = model(seq)
    layers_run = model.config.n_layer if gates is None else (gates[:, 0, context:] > 0).sum(0).float().mean().item()
    skip = decode_rate(model, seq[:, :context], seq[:, context:], cache=True, skip=True)
    no_skip = decode_rate(model, seq[:, :context], seq[:, context:], cache=True, skip=False)
    return skip, no_skip, layers_run


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other --key=value options go to train.py.")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("--dry_run", action="store_true", help="print the train.py commands only")
    p.add_argument("--report_only", action="store_true", help="read finished runs, train nothing")
    p.add_argument("--skip_decode", action="store_true", help="do not measure decode speed")
    p.add_argument("--results", default="", help="name of this experiment's runs and result files "
                   "(default results_<scale>); e.g. --seed=1338 --results=results_cpu_seed1338 for a second seed")
    opts, extra = p.parse_known_args(argv)  # the rest is checked by train.py
    name = opts.results or f"results_{opts.scale}"
    rows = []
    for run in runs_for(opts.scale):
        out_dir = os.path.join("out_experiment", name, run["name"])  # relative to this folder
        cmd = train_command(opts.scale, run, out_dir, opts.nproc, extra)
        if opts.dry_run:
            print(" ".join(cmd))
            continue
        if not opts.report_only:  # (train.py moves an earlier run's log and checkpoint aside)
            print(f"== {run['name']}: {' '.join(cmd)}", flush=True)
            subprocess.run([sys.executable if cmd[0] == "python" else cmd[0]] + cmd[1:], check=True, cwd=HERE)
        rows.append(summarize(run, os.path.join(HERE, out_dir), SCALES[opts.scale]["decode_context"], not opts.skip_decode))
    if rows:
        shown = [a for a in argv if a not in ("--report_only", "--skip_decode")]  # how the runs were made
        write_results(name, " ".join(["python experiment.py"] + shown), rows)


def summarize(run, out_dir, decode_context, measure_decode):
    """One results row from a finished run's log and checkpoint."""
    last, trains = read_log(out_dir)
    speeds = sorted(r["tok_s"] for r in trains if r["step"] > 1)  # step 1 pays for warm-up and compilation
    model, _, _ = load_checkpoint(out_dir, "cpu")
    row = dict(run=run["name"], n_layer=run["n_layer"], gated=run["gated"],
               target="" if run["target"] is None else run["target"], val_ce=round(last["val_loss"], 4),
               sparsity=round(last["sparsity"], 4), flops_per_token=round(last["flops_per_token"]),
               flops_per_token_no_skip=round(model.flops_per_token(0.0)),
               train_s=round(last["train_time"], 1),  # training wall time, evaluations excluded
               train_tok_s=round(speeds[len(speeds) // 2]) if speeds else "",
               decode_tok_s_skip="", decode_tok_s_no_skip="", layers_run="")
    if run["gated"] and measure_decode:
        skip, no_skip, layers_run = decode_speeds(out_dir, decode_context)
        row.update(decode_tok_s_skip=round(skip, 1), decode_tok_s_no_skip=round(no_skip, 1),
                   layers_run=round(layers_run, 2))
    print(f"== {run['name']}: val ce {row['val_ce']}, sparsity {row['sparsity']}", flush=True)
    return row


def write_results(name, command, rows):
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    stamp = f"{device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    with open(os.path.join(HERE, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    head = ["run", "layers", "gated", "target", "val CE", "sparsity", "fwd MFLOPs/token, skips counted",
            "fwd MFLOPs/token, every layer", "train s", "train tok/s", "decode tok/s, skipping",
            "decode tok/s, every layer", "layers run / decoded token"]
    lines = [f"Made by `{command}` on {stamp}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = dict(r, gated="yes" if r["gated"] else "no", flops_per_token=f"{r['flops_per_token'] / 1e6:.2f}",
                     flops_per_token_no_skip=f"{r['flops_per_token_no_skip'] / 1e6:.2f}")
        lines.append("| " + " | ".join(str(v) for v in cells.values()) + " |")
    with open(os.path.join(HERE, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; `pip install matplotlib` for one)")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    dense = [r for r in rows if not r["gated"]]
    gated = [r for r in rows if r["gated"]]
    ax.plot([r["flops_per_token"] for r in dense], [r["val_ce"] for r in dense], "o-", color="k", label="dense, n_layer = 2, 4, ...")
    for r in dense:
        ax.annotate(str(r["n_layer"]), (r["flops_per_token"], r["val_ce"]), textcoords="offset points", xytext=(4, 4))
    ax.scatter([r["flops_per_token"] for r in gated], [r["val_ce"] for r in gated], color="C3", zorder=3,
               label="gated, skipped layers counted as free")
    ax.scatter([r["flops_per_token_no_skip"] for r in gated], [r["val_ce"] for r in gated], facecolors="none",
               edgecolors="C3", zorder=3, label="gated, every layer computed")
    for r in gated:
        ax.annotate(f"t={r['target']}", (r["flops_per_token"], r["val_ce"]), textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("estimated forward FLOPs per token")
    ax.set_ylabel("validation cross-entropy")
    ax.set_title(f"{command}\n{stamp}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, f"{name}.png"), dpi=120)


if __name__ == "__main__":
    main(sys.argv[1:])
