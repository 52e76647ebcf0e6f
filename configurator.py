"""
Settings the nanoGPT way. A script keeps its settings as plain lower-case names with comments
between a line '# settings' and a line '# end of settings', then calls
`config, given = configure(globals())`.
That applies each preset file named on the command line (executed as Python) and each
--key=value, in order. A value is read as a Python literal (strings need no quotes; true and
false are booleans; a bare --key sets a boolean) and must have the type of the default it
replaces (an int may stand for a float). A setting whose default is None is an optional number:
None (the default of whatever it feeds) or an int or float. --help prints the docstring and the
settings block. model_config and gate_controller build what train.py's settings describe.
Mistakes stop the script with one line, and so do the errors that model.py, data.py and
checkpoints.py raise on purpose (ConfigError, DataError, CheckpointError): "error: ..." instead
of a traceback.
"""
import ast
import contextlib
import difflib
import fcntl
import importlib.util
import os
import sys


def settings_block(path):
    with open(path) as f:
        src = f.read()
    start = src.index('\n# settings\n') + 1
    return src[start:src.index('\n# end of settings', start)]


def _typed(key, value, default, source):
    """value (text after --key=, or a preset's object) as the type of default, or exit."""
    if default is None:  # an optional number
        if isinstance(value, str) and value.lower() == 'none':
            return None
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if value is not None and type(value) not in (int, float):
            sys.exit(f"error: {source}: {key} must be a number, or None for its default; "
                     f"got {value!r}")
        return None if value is None else float(value)
    if isinstance(value, str) and value.lower() in ('true', 'false'):
        value = value.lower() == 'true'
    elif isinstance(value, str) and not isinstance(default, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = float(value) if value.lower() in ('inf', '-inf', 'nan') else value
    if isinstance(default, str) and isinstance(value, bool):
        value = str(value).lower()  # the 'auto'/'true'/'false' settings take booleans too
    elif type(default) is float and type(value) is int:
        value = float(value)
    elif type(default) is int and type(value) is float and value.is_integer():
        value = int(value)  # 2e3 is fine for an int
    if type(value) is not type(default):
        sys.exit(f"error: {source}: {key} must be {type(default).__name__} "
                 f"(like the default {default!r}), got {value!r}")
    return value


def configure(scope, argv=None):
    """Applies presets and --key=value from argv (default: the command line) to the settings in
    scope. Returns the settings as a dict, and the set of names that argv set."""
    keys = [k for k, v in scope.items()  # lower-case names of plain values; not CONSTANTS
            if k[0].islower() and type(v) in (bool, int, float, str, type(None))]
    argv = sys.argv[1:] if argv is None else argv
    given = set()  # the settings a preset or --key=value set
    if '-h' in argv or '--help' in argv:
        print(scope['__doc__'].strip(), 'Settings (--key=value):',
              settings_block(scope['__file__']), sep='\n\n')
        sys.exit(0)
    for arg in argv:
        if arg.startswith('--'):
            key, has_value, text = arg[2:].partition('=')
            if not has_value and type(scope.get(key)) is not bool:
                sys.exit(f"error: expected --key=value, got {arg!r}")
            updates = {key: text if has_value else True}
        else:
            if not os.path.isfile(arg):
                sys.exit(f"error: preset file {arg!r} not found (presets live in config/)")
            preset = {'__file__': arg, **{k: scope[k] for k in keys}}
            with open(arg) as f:
                exec(compile(f.read(), arg, 'exec'), preset)
            updates = {k: v for k, v in preset.items() if not k.startswith('_')
                       and not callable(v) and type(v).__name__ != 'module'}  # not imports, helpers
        for key, value in updates.items():
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                sys.exit(f"error: {arg}: unknown setting {key!r}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
            scope[key] = _typed(key, value, scope[key], arg)
            given.add(key)
    sys.excepthook = _one_line_errors
    return {k: scope[k] for k in keys}, given


def _one_line_errors(kind, error, tb):
    if issubclass(kind, ValueError) and kind.__module__ in ('model', 'data', 'checkpoints'):
        print(f"error: {error}", file=sys.stderr)
    elif issubclass(kind, BrokenPipeError):  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    else:
        sys.__excepthook__(kind, error, tb)


def check_out_dir(out_dir, write=False):
    """Exits with one line when out_dir is a file; with write, also when it cannot be written or
    another train.py is writing there (two runs would overwrite each other's files). With write
    it is created, and its lock file is held until this process ends."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        sys.exit(f"error: --out_dir={out_dir} is a file, not a folder; pick another out_dir")
    if not write:
        return
    probe = os.path.abspath(out_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        sys.exit(f"error: --out_dir={out_dir}: cannot write in {probe}; make it writable or pick "
                 f"another out_dir")
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, '.train.lock'), 'w')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"error: another train.py is running in {out_dir} (it holds {lock.name}); wait "
                 f"for it to end or use another out_dir")
    _held.append(lock)


_held = []  # lock files held until the process ends


def check_train_settings(c, controllers):
    """Exits with one line for a train.py setting (c, a dict) that no other code checks; GPTConfig
    and GateController check their own."""
    for name, allowed in (('backend', 'auto nccl gloo'), ('compile', 'auto true false'),
                          ('deterministic', 'auto true false'), ('skip', 'auto true false'),
                          ('controller', ' '.join(controllers))):
        if c[name] not in allowed.split():
            sys.exit(f"error: {name} must be one of {allowed}; got {c[name]!r}")
    for name in ('batch_size', 'eval_interval', 'log_interval', 'eval_tokens', 'learning_rate'):
        if not c[name] > 0:
            sys.exit(f"error: {name} must be positive, got {c[name]}")
    for name in ('tokens_per_step', 'vocab_size', 'max_iters', 'stop_iter', 'weight_decay',
                 'grad_clip'):
        if not c[name] >= 0:
            sys.exit(f"error: {name} must be >= 0, got {c[name]}")
    if not 0 <= c['warmup_frac'] < 1:
        sys.exit(f"error: warmup_frac must be in [0, 1), got {c['warmup_frac']}")
    if not (0 <= c['warmup_start'] <= 1 and 0 <= c['min_lr_frac'] <= 1):
        sys.exit("error: warmup_start, min_lr_frac: in [0, 1]")
    if c['skip'] == 'true' and c['plain']:
        sys.exit("error: --skip=true and --plain=true: packing rows is not the plain definition")
    if c['wandb_log'] and not c['eval_only'] and importlib.util.find_spec('wandb') is None:
        sys.exit("error: --wandb_log=true needs wandb, which is optional: pip install wandb")


# ------------------------------------------------------------ what train.py's settings build

def model_config(settings, data_vocab_size):
    """The GPTConfig that train.py's settings describe: a setting named like one of its fields
    sets it, so a new field reaches every script that builds a model. vocab_size 0 follows the
    data: its data_vocab_size ids, rounded up to a multiple of 64 (faster matmuls)."""
    from model import GPTConfig
    args = {k: v for k, v in settings.items() if k in GPTConfig.__dataclass_fields__}
    args['vocab_size'] = settings['vocab_size'] or -(-data_vocab_size // 64) * 64
    return GPTConfig(**args, data_vocab_size=data_vocab_size)


def gate_controller(settings, n_layer, device='cpu'):
    """The GateController that train.py's settings describe: `controller` is its kind and each
    ctrl_X its argument X, or else the rule's keyword argument X (a rule that has no X does not
    get it), so every script that trains builds the same one."""
    import inspect
    from model import TARGET_RULES, GateController
    rule = TARGET_RULES.get(settings['controller'])
    takes = set(inspect.signature(GateController).parameters)
    if rule is not None:
        takes |= set(inspect.signature(rule).parameters) - {'d', 'memory'}
    args = {k[len('ctrl_'):]: v for k, v in settings.items()
            if k.startswith('ctrl_') and k[len('ctrl_'):] in takes}
    return GateController(settings['controller'], n_layer, device=device, **args)


def device_and_dtype(device='auto', dtype='auto', local_rank=None, deterministic=None):
    """The torch.device to run on and the name of the compute dtype: 'auto' picks CUDA, then
    MPS, then the CPU; and bfloat16 on GPUs that have it (float16 on older ones), else float32.
    For training: local_rank, this process's GPU under torchrun; deterministic ('auto': on for
    CPUs) makes torch pick deterministic kernels, so that a resumed run retraces its first."""
    import torch
    if device == 'auto':
        device = ('cuda' if torch.cuda.is_available() else
                  'mps' if torch.backends.mps.is_available() else 'cpu')
    try:
        device = torch.device(device)
    except RuntimeError:
        sys.exit(f"error: device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}")
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit(f"error: device={str(device)!r} but CUDA is not available here; use --device=cpu")
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        sys.exit(f"error: device={str(device)!r} but this machine has {torch.cuda.device_count()} "
                 f"CUDA device(s), cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type == 'mps' and not torch.backends.mps.is_available():
        sys.exit("error: device='mps' but MPS is not available here (it needs Apple silicon and "
                 "a torch built with it); use --device=cpu")
    if device.type not in ('cpu', 'cuda', 'mps'):
        sys.exit(f"error: device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; "
                 f"got {str(device)!r}")
    if dtype == 'auto':
        dtype = 'float32'
        if device.type == 'cuda':
            dtype = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        sys.exit(f"error: dtype must be 'auto', 'float32', 'bfloat16' or 'float16'; got {dtype!r}")
    if device.type == 'cuda' and local_rank is not None:
        device = torch.device('cuda', local_rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        # TF32 for the few float32 matmuls outside autocast. (Not the allow_tf32 flags,
        # deprecated since torch 2.9; nor the new fp32_precision flags: once set, inductor's own
        # reads of the old setting raise in the torch versions this supports.)
        torch.set_float32_matmul_precision('high')
    if deterministic == 'true' or (deterministic == 'auto' and device.type == 'cpu'):
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device, dtype


# Dense bf16 tensor-core peak FLOP/s by a substring of the GPU's name, most specific first
# (fp16 peak for cards without bf16), for the MFU that train.py and bench.py print.
PEAK_FLOPS = [
    ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
    ("H100", 989e12), ("H800", 989e12), ("H20", 148e12), ("B200", 2250e12), ("B100", 1750e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX A6000", 155e12), ("RTX 6000 Ada", 364e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]


def peak_flops(device):
    """The device's peak dense bf16 FLOP/s, or None where it is not known (CPUs, MPS)."""
    import torch
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else ''
    return next((flops for key, flops in PEAK_FLOPS if name and key in name), None)


def sum_over_processes(stats):
    """The named tensors in stats summed over all processes (under torchrun) with one all_reduce
    (gloo has no average) and read back with one host sync, as floats and lists of floats."""
    import torch
    flat = torch.cat([v.reshape(-1) for v in stats.values()])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flat)
    values, out = flat.tolist(), {}
    for k, v in stats.items():
        out[k], values = (values[:v.numel()] if v.dim() else values[0]), values[v.numel():]
    return out
