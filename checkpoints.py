"""
A training run's files: train.py's checkpoints (written atomically, read back with checks, the
settings and state a resumed run takes from them) and its log (RunFiles); and the paper's
authors' released models, converted to GPTs of model.py.

Released models: T. Lawson and L. Aitchison's FineWeb models on the Hugging Face hub (MIT
licence), e.g. tim-lawson/skip-middle-fineweb-baseline-4-layers or
tim-lawson/skip-middle-fineweb-gated-target-end-0.6:

    model = load_released('tim-lawson/skip-middle-fineweb-gated-target-end-0.6')
    model = load_released('path/to/folder')    # holding config.json and model.safetensors

A release is a folder with config.json (the fields of the authors' model config) and
model.safetensors (every weight under 'model.', the token embedding in bfloat16). Loading it:
- config.json's dim, n_layers, n_heads, n_kv_heads, vocab_size, norm_eps, rope_theta,
  use_scaled_rope and max_seq_len become GPTConfig's fields. multiple_of and
  ffn_dim_multiplier are unused by the authors' code too: its SwiGLU hidden size is 4 x dim,
  as here. A model with gate heads (masks.i) is gated.
- The weights are renamed to ours, all in float32.
- Rotary embeddings: the release rotates interleaved pairs of channels (0, 1), (2, 3), ...;
  model.py rotates halves (i, i + hd/2). Reordering the rows of wq and wk within each head as
  [0, 2, ..., hd-2, 1, 3, ..., hd-1] turns one into the other and leaves every q.k unchanged.
- Semantics: the release's gated models were trained with the gate bias added at the QUERY
  position, which a softmax ignores, so a closed gate's key stayed visible to other tokens.
  They load with hide_closed_keys=False and compute what they were trained to compute.
Reading the files needs safetensors, and a hub id needs huggingface_hub; both are optional
(`pip install safetensors huggingface_hub`) and imported only here.
"""
import atexit
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal

import torch

from configurator import model_config
from data import same_tokens
from model import FIXED, GPT, GPTConfig

# -------------------------------------------------------------------- train.py's

class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or made with other settings (one line)."""


def check_out_dir(out_dir, write=False):
    """A one-line CheckpointError when out_dir is a file; with write, also when it cannot be
    written or another train.py writes there. With write it is made, and locked (flock) until
    this process ends, so that two runs never overwrite each other's files."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"--out_dir={out_dir} is a file, not a folder; pick another out_dir")
    if not write:
        return
    probe = os.path.abspath(out_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CheckpointError(f"--out_dir={out_dir}: cannot write in {probe}; make it writable "
                              f"or pick another out_dir")
    made = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ".train.lock")
    new_lock = not os.path.exists(path)
    lock = open(path, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CheckpointError(f"another train.py is running in {out_dir} (it holds {path}); "
                              f"wait for it to end or use another out_dir") from None
    _held.append(lock)
    if new_lock:  # at exit, still holding it: a run leaves no lock, nor a folder it left empty
        atexit.register(_tidy, path, out_dir if made else None)


def _tidy(lock, folder):
    with contextlib.suppress(OSError):
        os.remove(lock)
        if folder:
            os.rmdir(folder)  # only if empty


_held = []  # lock files held until the process ends


def save_checkpoint(state, path):
    """torch.save to a temp file beside path, fsync, then rename: a crash at any moment leaves
    either the old checkpoint or the new one, never half of one. A failed write (a full disk,
    a read-only folder) removes the temp file and raises CheckpointError; path is untouched."""
    try:
        with open(path + ".tmp", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch's writer reports a failed write as RuntimeError
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        while e.__context__ is not None and not isinstance(e, OSError):
            e = e.__context__  # torch's writer reports the OS error's consequence instead
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed"
        free = shutil.disk_usage(os.path.dirname(path) or ".").free / 2**20
        raise CheckpointError(f"could not write {path} ({reason}, {free:,.0f} MiB free there)"
                              ) from None


def rng_state():
    """The state of the random number generators training uses, for exact resumes."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_difference(saved_args, model_args):
    """The first model setting in which a checkpoint's model_args and this run's differ, as
    (name, saved, new), or None. A field older checkpoints lack has its default."""
    for k, new in model_args.items():
        old = saved_args.get(k, GPTConfig.__dataclass_fields__[k].default)
        if old != new:
            return k, old, new
    return None


def check_model_args(path, saved_args, model_args):
    """A one-line CheckpointError naming the first setting in which the checkpoint at path
    (saved_args) and this run (model_args) differ."""
    if difference := model_difference(saved_args, model_args):
        k, old, new = difference
        raise CheckpointError(f"{k}: checkpoint {path} has {k}={old!r} but this run has "
                              f"{k}={new!r}; pass --{k}={old} or use another out_dir")


# A resumed run (or an evaluation) takes what defines the run from its checkpoint: model, data,
# optimizer, schedule, controller, log intervals. These, where and how it runs or is watched, it
# takes from its own command.
THIS_COMMAND = ('out_dir', 'init_from', 'eval_only', 'eval_text', 'stop_iter', 'device', 'dtype',
                'compile', 'deterministic', 'backend', 'plain', 'wandb_log', 'wandb_project',
                'wandb_run_name')


def run_settings(out_dir, config, given):
    """What a resume (--init_from=resume) or an evaluation of out_dir's run changes in this run's
    settings (a dict), with notes for the user; an evaluation of nothing else is a resume."""
    check_out_dir(out_dir)
    path = os.path.join(out_dir, "ckpt.pt")
    if config["eval_only"] and config["init_from"] == "scratch":  # evaluate the run that is there
        if not os.path.isfile(path):
            raise CheckpointError(f"--eval_only evaluates a trained model, and {out_dir} holds no "
                                  f"ckpt.pt; pass the out_dir of a run, or --init_from=<a "
                                  f"released model>")
        updates, notes = resume_settings(path, config, given)
        return {**updates, "init_from": "resume"}, notes
    return resume_settings(path, config, given) if config["init_from"] == "resume" else ({}, [])


def resume_settings(path, config, given):
    """A resumed run's settings (a dict of those in config to change): the checkpoint's at path,
    but for THIS_COMMAND and those the command gives. And notes for the user: on given settings
    that keep the run from retracing its first part, and on a wandb run that this one is not."""
    saved = dict(read_checkpoint(path, mmap=True)["config"])
    if "attn_backend" in saved:  # older checkpoints, in which a coefficient of 0 meant the default
        saved.update({k: None for k in ("ctrl_coef", "ctrl_var_coef") if saved.get(k) == 0})
    updates = {k: v for k, v in saved.items()
               if k in config and k not in given and k not in THIS_COMMAND}
    harmless = ("eval_interval", "log_interval", "always_save_checkpoint", "skip", *THIS_COMMAND)
    changed = [f"{k} {saved[k]!r} -> {config[k]!r}" for k in sorted(given & saved.keys())
               if saved[k] != config[k] and k not in harmless]
    notes = []
    if changed:
        notes.append("resuming with settings that differ from the checkpoint's, so the run will "
                     "not retrace an uninterrupted one: " + ", ".join(changed))
    if saved.get("wandb_log") and not config["wandb_log"]:
        notes.append(f"the run logged to wandb (project {saved['wandb_project']!r}); this command "
                     f"does not: pass --wandb_log=true to go on")
    return updates, notes


def run_state(model, optimizer, scaler, ctrl, train_stream, **rest):
    """A training run's checkpoint: the states of its parts, the random generators' and rest."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rng_state(),
            "controller": controller_state(ctrl) if ctrl else None,
            "data_state": train_stream.state_dict(), **rest}


def restore_run(ckpt, optimizer, scaler, ctrl, train_stream):
    """Puts a checkpoint's optimizer, scaler, controller, data position and random state back;
    returns its step, best_val_loss, train_flops and train_time."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    if ctrl is not None:
        load_controller(ctrl, ckpt["controller"])
    train_stream.load_state_dict(ckpt["data_state"])
    set_rng_state(ckpt["rng"])
    return tuple(ckpt[k] for k in ("step", "best_val_loss", "train_flops", "train_time"))


def stop_signals():
    """A list that SIGTERM or Ctrl-C appends to (preemption: the run checkpoints, then exits);
    a second signal does not wait."""
    received = []

    def on_signal(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return received


def check_same_model(path, model_args):
    """A new run in a folder that holds a checkpoint at path may push aside (to ckpt.prev.pt)
    an earlier run of the same model, never a run of another model: a one-line CheckpointError
    then, saying how to keep both. (An unreadable file is pushed aside.)"""
    try:
        saved_args = read_checkpoint(path, mmap=True)["model_args"]
    except CheckpointError:
        return
    if difference := model_difference(saved_args, model_args):
        k, old, new = difference
        where = os.path.dirname(path) or "."
        raise CheckpointError(f"{where} holds a run of another model ({k}={old!r} there, "
                              f"{k}={new!r} here): pass another --out_dir to keep both (or "
                              f"move {where} elsewhere first)")


def read_checkpoint(path, device="cpu", mmap=False):
    """The dict train.py saved at path; no code from the file runs. mmap: map the tensors from
    the file, read only when used (cheap when only the settings are wanted)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: train one with "
                              f"`python train.py --out_dir={os.path.dirname(path) or '.'}`")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
        ckpt["model_args"]
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    except Exception as e:  # truncated file, unpickling error, not a dict, ...
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is not a usable train.py checkpoint ({first_line}); "
                              f"train again or pick another out_dir") from None
    return ckpt


def load_checkpoint(path, device="cpu", model_args=None):
    """(model, checkpoint dict) from a file train.py wrote. With model_args (this run's), first
    check the checkpoint was made with the same ones."""
    ckpt = read_checkpoint(path, device)
    saved_args = ckpt["model_args"]
    if model_args:
        check_model_args(path, saved_args, model_args)
    # older checkpoints kept fields since dropped (attn_backend, data_vocab_size)
    fields = GPTConfig.__dataclass_fields__
    model = GPT(GPTConfig(**{k: v for k, v in saved_args.items() if k in fields}))
    # torch.compile and DDP save parameters under _orig_mod. and module. prefixes
    state = {re.sub(r"^((_orig_mod|module)\.)+", "", k): v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit its model_args "
                              f"({str(e).strip().splitlines()[-1].strip()})") from None
    return model.to(device), ckpt


def start_model(config, meta, data_dir, writes):
    """The model a train.py run starts from by config['init_from'], its checkpoint (or None) and
    notes for the user: out_dir's run ('resume'), checked against this run's data (meta.json, of
    data_dir) and model settings; a new model of config's settings ('scratch'); or an authors'
    released model. A run that writes to out_dir never pushes aside a run of another model."""
    path, init_from = os.path.join(config["out_dir"], "ckpt.pt"), config["init_from"]
    if init_from == "resume":
        model, ckpt = load_checkpoint(path)
        same_tokens(ckpt["meta"], meta, data_dir)  # data prepared again: ids would mean others
        if ckpt["config"]["init_from"] in ("scratch", "resume"):  # else a released model set it
            check_model_args(path, ckpt["model_args"],
                             vars(model_config(config, meta["vocab_size"])))
        return model, ckpt, []
    if init_from == "scratch":
        model, notes = GPT(model_config(config, meta["vocab_size"])), []
    else:
        model = load_released(init_from, meta["tokenizer"])
        notes = [f"--init_from={init_from} sets the model (hide_closed_keys="
                 f"{model.config.hide_closed_keys}); this run's model settings are unused"
                 + ("" if writes else f"; an evaluation leaves {config['out_dir']} alone")]
    if writes and os.path.exists(path):
        check_same_model(path, vars(model.config))
    return model, None, notes


def controller_state(ctrl):
    """What a checkpoint keeps of a GateController: its coefficients and its rule's memory."""
    return {"kind": ctrl.kind, "mean_coefs": ctrl.mean_coefs.cpu(),
            "var_coefs": ctrl.var_coefs.cpu(), "memory": moved_to(ctrl.memory, "cpu")}


def load_controller(ctrl, state):
    """Restores controller_state into ctrl (a fixed kind's coefficients are settings, not state)."""
    if state["kind"] != ctrl.kind:
        raise CheckpointError(f"the checkpoint's controller is {state['kind']!r}, this run asks "
                              f"for {ctrl.kind!r}; pass --controller={state['kind']} or use "
                              f"another out_dir")
    device = ctrl.mean_coefs.device
    if ctrl.kind not in FIXED:
        ctrl.mean_coefs, ctrl.var_coefs = (state[k].to(device) for k in ("mean_coefs", "var_coefs"))
    memory = state.get("memory") or {n: {"ema": e} for n, e in state["ema"].items()}  # older
    ctrl.memory = moved_to(memory, device)


def moved_to(memory, device):
    """A rule's memory (tensors, numbers, dicts and lists of them) with its tensors on device."""
    if isinstance(memory, dict):
        return {k: moved_to(v, device) for k, v in memory.items()}
    if isinstance(memory, (list, tuple)):
        return type(memory)(moved_to(v, device) for v in memory)
    return memory.to(device) if torch.is_tensor(memory) else memory


# -------------------------------------------------------------------- a training run's files

class RunFiles:
    """A training run's files in out_dir: ckpt.pt and log.jsonl (a JSON record per line), and
    wandb when asked. A new run leaves an earlier run's files where they are until it saves its
    own first checkpoint (its records wait until then), and then moves them to ckpt.prev.pt and
    log.prev.jsonl. A resumed run first drops the records of the steps after its checkpoint,
    which it takes again. write=False (--eval_only; every process but the first) writes nothing.
    A write that fails raises a one-line CheckpointError that says what was kept."""

    def __init__(self, out_dir, resumed_step=None, write=True, wandb_settings=None):
        self.out_dir, self.write, self.saved_step = out_dir, write, resumed_step
        self.ckpt_path = os.path.join(out_dir, "ckpt.pt")
        self.log_path = os.path.join(out_dir, "log.jsonl")
        self.waiting = [] if resumed_step is None else None  # records before the first save
        self.log_file = self.wandb = None
        if write and resumed_step is not None:
            if os.path.exists(self.log_path):
                drop_records_after(self.log_path, resumed_step)
            self.log_file = open(self.log_path, "a")
        if write and wandb_settings:  # (project, run name, config): wandb is optional
            import wandb
            self.wandb = wandb
            wandb.init(project=wandb_settings[0], name=wandb_settings[1], config=wandb_settings[2])

    def kept(self):
        """What a failure leaves behind, for its message."""
        if self.saved_step is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint {self.ckpt_path} (step {self.saved_step}) is kept"

    def log(self, record):
        """A record with a 'type' and a 'step' to log.jsonl, and its numbers to wandb."""
        if self.wandb and record["type"] in ("train", "eval"):
            prefix = "train/" if record["type"] == "train" else "val/"
            self.wandb.log({prefix + k.removeprefix("val_"): v for k, v in record.items()
                            if type(v) is float}, step=record["step"])
        self._write(record)

    def _write(self, record):
        if not self.write:
            return
        if self.waiting is not None:
            self.waiting.append(record)
            return
        try:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()
        except OSError as e:
            raise CheckpointError(f"could not write {self.log_path} ({e.strerror}); "
                                  f"{self.kept()}") from None

    def save(self, state, step):
        """state (a dict) to ckpt.pt, atomically, as the checkpoint of this step."""
        if not self.write:
            return
        if self.waiting is not None:  # this run's first checkpoint: an earlier run moves aside
            for name, prev in (("ckpt.pt", "ckpt.prev.pt"), ("log.jsonl", "log.prev.jsonl")):
                if os.path.exists(os.path.join(self.out_dir, name)):
                    os.replace(os.path.join(self.out_dir, name), os.path.join(self.out_dir, prev))
                    print(f"note: moved the earlier run's {self.out_dir}/{name} to {prev} "
                          f"(--init_from=resume continues a run instead)")
            self.log_file = open(self.log_path, "w")
            records, self.waiting = self.waiting, None
            for r in records:
                self._write(r)
        try:
            save_checkpoint(state, self.ckpt_path)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; {self.kept()}") from None
        self.saved_step = step
        print(f"saved {self.ckpt_path} (step {step})")

    def close(self):
        if self.wandb:
            self.wandb.finish()


def drop_records_after(path, step):
    """Drops from the log at path the records of steps after `step`, and of earlier starts at
    it: a resumed run takes those steps again (a run stopped by a crash or a full disk logged
    steps its checkpoint lacks), so each step keeps one record of each kind."""
    def kept(r):
        return r["step"] < step or (r["step"] == step and r["type"] != "start")
    with open(path) as f:
        lines = f.readlines()  # a line cut short by a crash does not end the record: dropped
    keep = [line for line in lines if line.endswith("}\n") and kept(json.loads(line))]
    if len(keep) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
        print(f"note: dropped {len(lines) - len(keep)} records after step {step} from {path}")


# -------------------------------------------------------------------- released models

FILES = ('config.json', 'model.safetensors')


def download(repo_id):
    """The local folder of a hub repo's config.json and model.safetensors (cached by
    huggingface_hub). One-line CheckpointError when that cannot be done."""
    if repo_id.count('/') != 1:
        raise CheckpointError(f"{repo_id}: neither a folder holding {' and '.join(FILES)} nor "
                              f"a Hugging Face hub id like tim-lawson/skip-middle-fineweb-"
                              f"baseline-4-layers")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"loading {repo_id} from the Hugging Face hub needs "
                              f"huggingface_hub: pip install huggingface_hub safetensors") from None
    try:
        return snapshot_download(repo_id, allow_patterns=list(FILES))
    except Exception as e:  # offline, unknown repo, ...: many kinds, each many lines long
        raise CheckpointError(f"could not download {repo_id} from the Hugging Face hub "
                              f"({type(e).__name__}); offline? pass a local folder holding "
                              f"{' and '.join(FILES)} instead") from None


def read_config(path):
    """GPTConfig for the authors' config.json at path."""
    try:
        with open(path) as f:
            c = json.load(f)
        return dict(vocab_size=c['vocab_size'], block_size=c['max_seq_len'],
                    n_layer=c['n_layers'], n_head=c['n_heads'],
                    n_kv_head=c.get('n_kv_heads') or c['n_heads'], n_embd=c['dim'],
                    rope_theta=float(c['rope_theta']), rope_scaling=bool(c['use_scaled_rope']),
                    norm_eps=float(c['norm_eps']))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not the authors' model config ({type(e).__name__}: "
                              f"{e}); expected their config.json") from None


def ours(key):
    """Our name for one of the release's weight names (without its 'model.' prefix)."""
    parts = key.split('.')
    if parts[0] == 'layers':
        block = f"blocks.{parts[1]}."
        rest = '.'.join(parts[2:])
        for theirs, mine in (('attention.', 'attn.'), ('feed_forward.', 'ffn.'),
                             ('pre_attention_norm.', 'attn_pre.'),
                             ('post_attention_norm.', 'attn_post.'),
                             ('pre_feed_forward_norm.', 'ffn_pre.'),
                             ('post_feed_forward_norm.', 'ffn_post.')):
            if rest.startswith(theirs):
                return block + mine + rest[len(theirs):]
    if parts[0] == 'masks':  # masks.i.linear.weight: the gate head of layer i
        return f"gate_heads.{parts[1]}.{parts[3]}"
    return {'tok_embeddings.weight': 'tok_emb.weight', 'input_norm.weight': 'norm_in.weight',
            'output_norm.weight': 'norm_out.weight',
            'output.weight': 'lm_head.weight'}.get(key, key)


def rotate_half_rows(w, n_heads):
    """wq or wk (n_heads * hd, d) with each head's rows as [0, 2, ..., hd-2, 1, 3, ..., hd-1]:
    interleaved-pair rotary weights for rotate-half rotary embeddings."""
    hd = w.size(0) // n_heads
    order = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    return w.view(n_heads, hd, -1)[:, order].reshape_as(w)


def load_released(name_or_folder, tokenizer='gpt2'):
    """The authors' released model at name_or_folder (a folder, or a hub id) as a GPT in
    float32 with hide_closed_keys=False, for data of `tokenizer`. Raises CheckpointError (one
    line) if it cannot: their models read GPT-2 tokens."""
    if tokenizer != 'gpt2':
        raise CheckpointError(f"{name_or_folder} reads GPT-2 tokens, but the data holds "
                              f"{tokenizer} tokens; prepare GPT-2 data (`python prepare.py "
                              f"shakespeare`)")
    folder = name_or_folder if os.path.isdir(name_or_folder) else download(name_or_folder)
    missing = [f for f in FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise CheckpointError(f"{folder}: no {' or '.join(missing)} there; a released model is "
                              f"a folder holding {' and '.join(FILES)}")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError("reading the authors' model.safetensors needs safetensors: "
                              "pip install safetensors") from None
    weights = os.path.join(folder, 'model.safetensors')
    try:
        state = load_file(weights)
    except Exception as e:  # not a safetensors file, truncated, ...
        raise CheckpointError(f"{weights}: cannot read it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    args = read_config(os.path.join(folder, 'config.json'))
    gated = any(k.startswith('model.masks.') for k in state)
    model = GPT(GPTConfig(**args, gated=gated, hide_closed_keys=False))
    converted = {}
    for key, w in state.items():
        if not key.startswith('model.'):
            raise CheckpointError(f"{weights}: unexpected weight {key!r} (the release keeps "
                                  f"every weight under 'model.')")
        name = ours(key[len('model.'):])
        if name.endswith(('attn.wq.weight', 'attn.wk.weight')):
            heads = args['n_head'] if name.endswith('wq.weight') else args['n_kv_head']
            w = rotate_half_rows(w, heads)
        converted[name] = w.float()
    try:
        model.load_state_dict(converted)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: its weights do not fit its config.json "
                              f"({str(e).strip().splitlines()[-1].strip()})") from None
    return model
