"""
Settings the nanoGPT way: a script's settings are plain names between '# settings' and '# end of
settings', and `config, given = configure(globals())` applies each preset file and --key=value of
the command line, checked against the default's type. Also: what train.py's settings build.
"""
import ast
import difflib
import importlib.util
import os
import sys


def settings_block(path):
    with open(path) as f:
        src = f.read()
    start = src.index('\n# settings\n') + 1
    return src[start:src.index('\n# end of settings', start)]


def _typed(key, value, default, source):
    """value (text after --key=, or a preset's) as the type of default: text is read as a Python
    literal (strings need no quotes), and None is an optional number. Or exit with one line."""
    if isinstance(value, str) and value.lower() in ('true', 'false'):
        value = value.lower() == 'true'
    elif isinstance(value, str) and not isinstance(default, str):
        special = {'none': None, 'inf': float('inf'), '-inf': float('-inf'), 'nan': float('nan')}
        try:
            value = special[value.lower()] if value.lower() in special else ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # still text: the type check below says so
    if isinstance(default, str) and isinstance(value, bool):
        value = str(value).lower()  # the 'auto'/'true'/'false' settings take booleans too
    elif type(value) is int and (type(default) is float or default is None):
        value = float(value)
    elif type(default) is int and type(value) is float and value.is_integer():
        value = int(value)  # 2e3 is fine for an int
    if default is None and (value is None or type(value) is float):
        return value  # an optional number: None means the default of whatever it feeds
    if type(value) is not type(default):
        want = ('a number, or None for its default' if default is None else
                f'{type(default).__name__} (like the default {default!r})')
        sys.exit(f"error: {source}: {key} must be {want}, got {value!r}")
    return value


def joined(argv, scope):
    """argv with `--key value` as `--key=value` (a bool setting takes only true or false so)."""
    out = []
    for arg in argv:
        last = out[-1] if out else ''
        if last[:2] == '--' and '=' not in last and arg[:2] != '--' and (
                type(scope.get(last[2:])) is not bool or arg.lower() in ('true', 'false')):
            out[-1] += '=' + arg
        else:
            out.append(arg)
    return out


def configure(scope, argv=None):
    """Applies presets and --key=value (or --key value) from argv (default: the command line) to
    the settings in scope; --help prints them. Returns them, and the names argv set."""
    keys = [k for k, v in scope.items()  # lower-case names of plain values; not CONSTANTS
            if k[0].islower() and type(v) in (bool, int, float, str, type(None))]
    argv = joined(sys.argv[1:] if argv is None else argv, scope)
    given = set()
    if '-h' in argv or '--help' in argv:
        print(scope['__doc__'].strip(), 'Settings (--key=value):',
              settings_block(scope['__file__']), sep='\n\n')
        sys.exit(0)
    for arg in argv:
        if arg.startswith('--'):
            key, has_value, text = arg[2:].partition('=')
            if not has_value and type(scope.get(key)) is not bool:
                sys.exit(f"error: {arg} needs a value: {arg}=VALUE or {arg} VALUE")
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
    if (issubclass(kind, ValueError) and kind.__module__ in ('data', 'checkpoints')
            or issubclass(kind, NotImplementedError) and 'not written yet' in str(error)):
        print(f"error: {error}", file=sys.stderr)  # DataError, CheckpointError, an exercise
    elif issubclass(kind, BrokenPipeError):  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    else:
        sys.__excepthook__(kind, error, tb)


def check_train_settings(c, controllers):
    """Exits with one line for a train.py setting (c, a dict) that cannot work."""
    rules = [(k, c[k] in v.split(), f"must be one of {v}") for k, v in (
        ('backend', 'auto nccl gloo'), ('compile', 'auto true false'), ('skip', 'auto true false'),
        ('deterministic', 'auto true false'), ('controller', ' '.join(controllers)))]
    rules += [(k, c[k] > 0, "must be positive") for k in (
        'batch_size', 'block_size', 'eval_interval', 'log_interval', 'eval_tokens',
        'learning_rate', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'gate_eps')]
    rules += [(k, c[k] >= 0, "must be >= 0") for k in (
        'tokens_per_step', 'vocab_size', 'max_iters', 'stop_iter', 'weight_decay', 'grad_clip',
        'ctrl_lr', 'ctrl_tol')]
    rules += [(k, 0 <= c[k] <= 1, "must be in [0, 1]") for k in (
        'warmup_start', 'min_lr_frac', 'ctrl_target_start', 'ctrl_target_end')]
    rules += [('warmup_frac', 0 <= c['warmup_frac'] < 1, "must be in [0, 1)"),
              ('skip', not (c['skip'] == 'true' and c['plain']),
               "cannot be true with --plain=true: packing rows is not the plain definition"),
              ('skip', not (c['skip'] == 'true' and not c['hide_closed_keys']),
               "cannot be true with --hide_closed_keys=false: visible keys are needed"),
              ('eval_text', not c['eval_text'] or c['eval_only'], "needs --eval_only"),
              ('wandb_log', not c['wandb_log'] or c['eval_only'] or
               importlib.util.find_spec('wandb') is not None,
               "needs wandb, which is optional: pip install wandb")]
    for name, ok, rule in rules:
        if not ok:
            sys.exit(f"error: {name} {rule} (got {c[name]!r})")


# ------------------------------------------------------------ what train.py's settings build

def model_config(settings, data_vocab_size):
    """The GPTConfig of train.py's settings (each named like a field sets it), or exit with one
    line; vocab_size 0 follows the data, rounded up to a multiple of 64 (faster matmuls)."""
    from model import GPTConfig
    args = {k: v for k, v in settings.items() if k in GPTConfig.__dataclass_fields__}
    args['vocab_size'] = settings['vocab_size'] or -(-data_vocab_size // 64) * 64
    c = GPTConfig(**args)
    for name, ok, rule in (
            ('vocab_size', c.vocab_size >= data_vocab_size, f"must hold the data's "
             f"{data_vocab_size} tokens (0 follows the data)"),
            ('n_embd', c.n_embd % c.n_head == 0, f"must divide by n_head={c.n_head}"),
            ('n_kv_head', c.n_head % c.n_kv_head == 0, f"must divide n_head={c.n_head}"),
            ('n_head', c.n_embd // c.n_head % 2 == 0, "must leave an even head dim for rotary"),
            ('n_layer', not c.gated or c.n_layer % 2 == 0, "must be even when gated"),
            ('gate_init', c.gate_init in ('normal', 'zero'), "must be 'normal' or 'zero'")):
        if not ok:
            sys.exit(f"error: {name} {rule} (got {getattr(c, name)!r})")
    return c


def gate_controller(settings, n_layer, device='cpu'):
    """The GateController of train.py's settings: `controller` is its kind, each ctrl_X its
    argument X or else the rule's (a rule without one ignores it)."""
    import inspect
    from model import TARGET_RULES, GateController
    takes = set(inspect.signature(GateController).parameters)
    if settings['controller'] in TARGET_RULES:
        takes |= set(inspect.signature(TARGET_RULES[settings['controller']]).parameters)
    args = {k[5:]: v for k, v in settings.items() if k.startswith('ctrl_') and k[5:] in takes}
    return GateController(settings['controller'], n_layer, device=device, **args)
