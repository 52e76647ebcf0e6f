"""
The data format and its readers: token shards, meta.json, the stream of training batches, the
validation tokens and the tokenizers. prepare.py writes datasets; train.py, sample.py and
bench.py read them through this file.

A dataset is a folder: {name}_train_000000.bin ..., {name}_val_000000.bin ... and meta.json. A
shard (modded-nanogpt's format) is a header of 256 int32 (magic 20240520, version 1, token
count), then the tokens as uint16. meta.json names the tokenizer ('char' or 'gpt2'), the
vocabulary size, a char vocabulary's characters in order, and the command that made it.
Every problem with a dataset is a DataError: one line that names the file and what to run.
"""
import fcntl
import glob
import json
import os

import numpy as np

HEADER_INTS, MAGIC, VERSION = 256, 20240520, 1
SOURCES = ('shakespeare_char', 'shakespeare', 'tinystories', 'fineweb10B', 'text')  # prepare.py's
LOCK = '.prepare.lock'  # in a dataset's folder: held (flock) while prepare.py writes there


class DataError(ValueError):
    """A problem with the data; the message is one line naming the file and what to run."""

def shard_header(n):
    h = np.zeros(HEADER_INTS, dtype=np.int32)
    h[0], h[1], h[2] = MAGIC, VERSION, n
    return h.tobytes()

def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{path}: token ids must fit in uint16 (0..65535), "
                        f"got {tokens.min()}..{tokens.max()}")
    # write aside and rename, so a crash never leaves half a shard
    with open(path + '.tmp', 'wb') as f:
        f.write(shard_header(len(tokens)))
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(path + '.tmp', path)

def _rerun(data_dir):
    """The command that (re)makes data_dir, for error messages."""
    try:
        with open(os.path.join(data_dir, 'meta.json')) as f:
            return json.load(f)['command']
    except Exception:
        pass
    name = os.path.basename(os.path.normpath(data_dir))
    if name not in SOURCES:
        return f"python prepare.py NAME --out_dir {data_dir}"
    same = os.path.normpath(data_dir) == os.path.join('data', name)
    return f"python prepare.py {name}" + ('' if same else f" --out_dir {data_dir}")

def read_shard(path, vocab_size=None):
    """The tokens of one shard as a read-only uint16 memmap, after checking the header and size."""
    fix = f"run `{_rerun(os.path.dirname(path) or '.')}`"
    if not os.path.isfile(path):
        raise DataError(f"{path}: shard not found; {fix}")
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise DataError(f"{path}: truncated shard ({size} bytes, shorter than its "
                        f"{HEADER_INTS * 4}-byte header); {fix}")
    try:
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}); {fix}") from None
    if header[0] != MAGIC:
        raise DataError(f"{path}: not a token shard (magic number {header[0]}, "
                        f"expected {MAGIC}); {fix}")
    if header[1] != VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} "
                        f"(expected {VERSION}); {fix}")
    n, have = int(header[2]), (size - HEADER_INTS * 4) // 2
    if n != have or size % 2:
        raise DataError(f"{path}: truncated or corrupt shard (header says {n} tokens, "
                        f"file holds {have}); {fix}")
    if n == 0:
        return np.zeros(0, dtype=np.uint16)  # numpy cannot memmap zero bytes
    tokens = np.memmap(path, dtype=np.uint16, mode='r', offset=HEADER_INTS * 4, shape=(n,))
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path}: token id {int(tokens.max())} >= vocab_size {vocab_size} "
                        f"(shard does not match meta.json); {fix}")
    return tokens

def load_meta(data_dir):
    """meta.json of a prepared folder, checked for what train.py and sample.py use. If a
    preparation is writing the folder right now, waits for it rather than failing."""
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such data directory; run `{_rerun(data_dir)}`")
    if not os.path.exists(path):
        _wait_for_preparation(data_dir)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: not found (preparation never finished?); "
                        f"run `{_rerun(data_dir)}`") from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); run `{_rerun(data_dir)}`") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}); "
                        f"run `{_rerun(data_dir)}`") from None
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"{path}: {problem}; run `{_rerun(data_dir)}` to prepare it again")
    return meta

def _meta_problem(meta):
    """What is wrong with a meta.json for the tokenizer and the model, or None."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    need = ['tokenizer', 'vocab_size'] + (['chars'] if meta.get('tokenizer') == 'char' else [])
    missing = [repr(k) for k in need if k not in meta]
    if missing:
        return f"no {' or '.join(missing)} in it"
    tok, vocab = meta['tokenizer'], meta['vocab_size']
    if tok not in ('char', 'gpt2'):
        return f"unknown tokenizer {tok!r} (expected char or gpt2)"
    if type(vocab) is not int or not 0 < vocab <= 2**16:
        return f"vocab_size {vocab!r} is not a whole number in 1..65536"
    chars = meta.get('chars')
    if tok == 'char' and not (isinstance(chars, list) and len(chars) == vocab
                              and all(isinstance(c, str) and len(c) == 1 for c in chars)
                              and chars == sorted(set(chars))):  # the encoder relies on the order
        return f"'chars' is not a sorted list of {vocab} distinct characters (vocab_size)"
    return None

def shard_paths(data_dir, split):
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such data directory; run `{_rerun(data_dir)}`")
    paths = sorted(glob.glob(os.path.join(data_dir, f'*_{split}_*.bin')))
    if not paths:
        raise DataError(f"{data_dir}: no {split} shards (*_{split}_*.bin); "
                        f"run `{_rerun(data_dir)}`")
    return paths

class TokenStream:
    """Sequential, deterministic batches from the concatenated train shards (memory-mapped).
    A global micro-step takes world*B*T + 1 consecutive tokens; rank r uses its own slice
    [r*B*T, (r+1)*B*T + 1) of them. A window that would cross a shard's end starts the next
    shard instead; after the last shard the stream starts over (epoch + 1). The position
    (shard, pos, epoch) is global, so a run resumes under any world size."""
    def __init__(self, paths, B, T, rank, world, vocab_size):
        self.paths, self.shards = paths, [read_shard(p) for p in paths]
        self.B, self.T, self.rank, self.world, self.vocab_size = B, T, rank, world, vocab_size
        need = world * B * T + 1
        for p, s in zip(paths, self.shards):
            if len(s) < need:
                raise DataError(f"{p}: {len(s)} tokens, fewer than one micro-step needs "
                                f"(world_size*batch_size*block_size+1 = {need}); "
                                f"lower batch_size or block_size")
        self.shard, self.pos, self.epoch = 0, 0, 0

    def next(self):
        """Inputs and targets (B, T) as int64 numpy arrays."""
        span = self.world * self.B * self.T
        if self.pos + span + 1 > len(self.shards[self.shard]):
            self.shard, self.pos = self.shard + 1, 0
            if self.shard == len(self.shards):
                self.shard, self.epoch = 0, self.epoch + 1
        start = self.pos + self.rank * self.B * self.T
        window = self.shards[self.shard][start:start + self.B * self.T + 1]
        if window.max() >= self.vocab_size:  # per window: a full scan of 10B tokens takes minutes
            raise DataError(f"{self.paths[self.shard]}: token id {int(window.max())} "
                            f"near offset {start} is not below the vocab_size {self.vocab_size} "
                            f"of meta.json; prepare it again")
        buf = window.astype(np.int64)
        self.pos += span
        return buf[:-1].reshape(self.B, self.T), buf[1:].reshape(self.B, self.T)

    def state_dict(self):
        return {'shard': self.shard, 'pos': self.pos, 'epoch': self.epoch,
                'shard_path': os.path.basename(self.paths[self.shard])}

    def load_state_dict(self, s):
        names = [os.path.basename(p) for p in self.paths]
        if s['shard'] >= len(names) or s['shard_path'] != names[s['shard']]:
            raise DataError(f"the checkpoint's data position is in train shard {s['shard_path']}, "
                            f"which is not shard {s['shard']} of this data "
                            f"({len(names)} train shards); the data changed")
        self.shard, self.pos, self.epoch = s['shard'], s['pos'], s['epoch']

def first_tokens(paths, n, vocab_size):
    """The first n tokens of the shards in paths (fewer if they hold fewer), as one array."""
    parts, have = [], 0
    for p in paths:
        parts.append(np.array(read_shard(p, vocab_size)[:n - have]))
        have += len(parts[-1])
        if have >= n:
            break
    return np.concatenate(parts)

def gpt2_tokenizer():
    try:
        import tiktoken
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # first use downloads the BPE files; offline that fails deep in tiktoken
        cache = os.environ.get('TIKTOKEN_CACHE_DIR', 'unset')
        raise DataError(f"could not load tiktoken's GPT-2 tokenizer ({type(e).__name__}): it "
                        f"downloads GPT-2's vocab.bpe and encoder.json on first use into "
                        f"TIKTOKEN_CACHE_DIR ({cache}); offline, copy such a folder from a machine "
                        f"with a network and set TIKTOKEN_CACHE_DIR to it (README, Data), or use "
                        f"the char tokenizer (--tokenizer char)") from None

def _char_encoder(chars, where):
    # chars are sorted by code point, so searchsorted on the code points maps text to ids in numpy
    table = np.array([ord(c) for c in chars], dtype=np.uint32)
    def encode(text):
        cps = np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)
        ids = np.searchsorted(table, cps).astype(np.uint16)
        bad = table[np.minimum(ids, len(table) - 1)] != cps
        if bad.any():
            raise DataError(f"character {chr(cps[bad.argmax()])!r} is not in the "
                            f"{len(chars)}-char vocabulary of {where}; use only characters "
                            f"from its training text, or prepare with --tokenizer gpt2")
        return ids
    return encode

def array_encoder(meta):
    if meta['tokenizer'] == 'char':
        return _char_encoder(meta['chars'], meta.get('source', 'this dataset'))
    if meta['tokenizer'] == 'gpt2':
        enc = gpt2_tokenizer()  # <|endoftext|> in text is the real separator (TinyStories has it)
        return lambda text: np.array(enc.encode(text, allowed_special={'<|endoftext|>'}),
                                     dtype=np.uint16)
    raise DataError(f"unknown tokenizer {meta['tokenizer']!r} in meta.json (expected char or gpt2)")

def eval_rows(tokens, T, seqs):
    """Inputs and targets (len(seqs), T) of validation sequences seqs: sequence j predicts
    tokens j*T+1 .. j*T+T; a last, shorter one is moved back to end at the last token, and its
    targets counted already are -1 (ignored)."""
    starts = [max(0, min(j * T, len(tokens) - 1 - T)) for j in seqs]
    rows = np.stack([tokens[a:a + T + 1] for a in starts]).astype(np.int64)
    x, y = rows[:, :-1], rows[:, 1:].copy()
    for r, (j, a) in enumerate(zip(seqs, starts)):
        y[r, :j * T - a] = -1
    return x, y

def text_tokens(path, meta):
    """The tokens of the text file at path as meta's tokenizer reads it, or a one-line DataError:
    a file that cannot be read, or characters that a char vocabulary lacks (how many; the first)."""
    try:
        with open(path, 'rb') as f:
            text = f.read().decode('utf-8')  # whole: a bad byte's offset is then the file's
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    if meta['tokenizer'] == 'char':
        missing = set(text) - set(meta['chars'])
        if missing:
            first = min(text.index(c) for c in missing)
            count = sum(text.count(c) for c in missing)
            raise DataError(f"{path}: {count:,} characters are not in the {len(meta['chars'])}-"
                            f"character vocabulary of the run's data, the first {text[first]!r} at "
                            f"character {first:,}")
    tokens = array_encoder(meta)(text)
    if len(tokens) < 2:
        raise DataError(f"{path}: {len(tokens)} token(s); an evaluation needs at least 2")
    return tokens

def same_tokens(meta, other, data_dir):
    """Raises DataError (one line) unless meta and other (two meta.json records, e.g. a
    checkpoint's and data_dir's) tokenize alike: the same tokenizer and vocabulary, so that
    every id means the same token. Re-preparing a folder from another text changes that."""
    what = [k for k in ('tokenizer', 'vocab_size', 'chars') if meta.get(k) != other.get(k)]
    if what:
        raise DataError(f"{data_dir} does not tokenize as the checkpoint's data did (its "
                        f"{' and '.join(what)} differ: it was prepared again from other text?), "
                        f"so its ids would mean other tokens; prepare the run's own data again "
                        f"(`{meta.get('command', 'python prepare.py ...')}`) or use another "
                        f"out_dir")

def get_tokenizer(meta):
    """(encode, decode) for a dataset's meta: encode(str) -> list[int], decode(list[int]) -> str."""
    encode = array_encoder(meta)
    if meta['tokenizer'] == 'char':
        chars = meta['chars']
        return (lambda s: encode(s).tolist()), (lambda ids: ''.join(chars[int(i)] for i in ids))
    enc = gpt2_tokenizer()
    return (lambda s: encode(s).tolist()), (lambda ids: enc.decode([int(i) for i in ids]))

def text_or_file(value, setting):
    """value, or the UTF-8 text of the file it names as FILE:path (a prompt, a text to map);
    one-line DataErrors naming the setting when that file cannot be read."""
    if not value.startswith('FILE:'):
        return value
    try:
        with open(value[len('FILE:'):], encoding='utf-8') as f:
            return f.read()
    except OSError as e:
        raise DataError(f"--{setting}={value}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"--{setting}={value}: not UTF-8 text (bad byte at offset {e.start}); "
                        f"convert it to UTF-8 first") from None


def _wait_for_preparation(data_dir):
    """If a prepare.py is writing data_dir, waits until it is done: a reader may start while the
    data is being made (the other ranks of a job whose first rank prepares it)."""
    try:
        fd = os.open(os.path.join(data_dir, LOCK), os.O_RDONLY)
    except OSError:
        return  # prepared by an older version, or never: nothing to wait for
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"{data_dir}: a prepare.py is writing it; waiting for it to finish", flush=True)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        pass  # no locks on this filesystem
    finally:
        os.close(fd)


def open_dataset(data_dir, B, T, rank, world, eval_tokens):
    """What a training process reads of the dataset in data_dir: its meta.json, a TokenStream of
    this process's train batches (B, T) and the first eval_tokens + 1 validation tokens (all of
    them, if fewer)."""
    meta = load_meta(data_dir)
    train = TokenStream(shard_paths(data_dir, 'train'), B, T, rank, world, meta['vocab_size'])
    val = first_tokens(shard_paths(data_dir, 'val'), eval_tokens + 1, meta['vocab_size'])
    if (len(val) - 1) // T < world:
        raise DataError(f"{data_dir}: the val split has {len(val)} tokens: too few for one "
                        f"block_size={T} sequence per process")
    return meta, train, val
