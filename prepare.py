"""
Turn a text source into token shards, with one command:

    python prepare.py shakespeare_char                 # bundled corpus, char-level, offline
    python prepare.py shakespeare_char --source download   # tiny-shakespeare from the web
    python prepare.py shakespeare                      # same text, GPT-2 tokens (tiktoken)
    python prepare.py tinystories --max_tokens 20000000
    python prepare.py fineweb10B --shards 1            # modded-nanogpt's pre-tokenized shards
    python prepare.py text --input FILE [--tokenizer char|gpt2]   # any UTF-8 file, offline
    python prepare.py text --input DOCS/ more.txt --val_input held_out.txt   # files and folders

Output (default data/NAME/): {name}_train_000000.bin ..., {name}_val_000000.bin ..., meta.json.
Shard format (modded-nanogpt's): 256 x int32 header (magic 20240520, version 1, token count),
then the tokens as uint16. The split is deterministic: val is the last --val_fraction of the
file's bytes, starting at the first line break at or after that point, or, with no line break
near it (text8 is one line), at the first character boundary there (TinyStories and FineWeb
ship their own val files and use those). `text` reads the files given and the text files of
the folders given (sorted), with a blank line (GPT-2: <|endoftext|>) between documents; with
--val_input, val is exactly those files, and they are left out of training even where an
--input folder holds them. data.py holds the format and the readers.

Preparations of one folder may run at once (every node of a multi-node job): one holds the lock
file OUT_DIR/.prepare.lock, the others wait and then reuse its result. Shards and meta.json are
written in a private folder inside OUT_DIR and moved into place when complete, so a failure
(a full disk, a bad byte) leaves the data that was there before.
"""
import argparse, codecs, contextlib, fcntl, glob, json, os, shutil, sys, tempfile, time
import numpy as np
import requests

from data import (LOCK, SOURCES, DataError, array_encoder, gpt2_tokenizer, read_shard, shard_header,
                  shard_paths)

BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'shakespeare.txt')
TINY_SHAKESPEARE_URL = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
                        'tinyshakespeare/input.txt')
TINYSTORIES_URL = ('https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/'
                   'TinyStoriesV2-GPT4-{}.txt')
FINEWEB_URL = 'https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/{}'
OFFLINE_HINT = '`python prepare.py text --input FILE` works offline'
TMP_PREFIX = '.prepare-tmp-'  # private folders and files inside the output folder, while writing

# -----------------------------------------------------------------------------
# shards, written one after another

class _ShardWriter:
    """Appends tokens to {name}_{split}_000000.bin, _000001.bin, ... each at most shard_tokens long.
    Each shard is written as .tmp and renamed once complete
    (the header count is patched in then)."""
    def __init__(self, out_dir, name, split, shard_tokens):
        self.base, self.shard_tokens = os.path.join(out_dir, f'{name}_{split}_'), shard_tokens
        self.f, self.count, self.total, self.paths = None, 0, 0, []

    def write(self, tokens):
        tokens = np.asarray(tokens, dtype=np.uint16)
        while len(tokens):
            if self.f is None:
                self.path = f'{self.base}{len(self.paths):06d}.bin'
                self.f, self.count = open(self.path + '.tmp', 'wb'), 0
                self.f.write(shard_header(0))
            n = min(len(tokens), self.shard_tokens - self.count)
            self.f.write(tokens[:n].tobytes())
            self.count, self.total, tokens = self.count + n, self.total + n, tokens[n:]
            if self.count == self.shard_tokens:
                self._finish()

    def _finish(self):
        self.f.seek(0)
        self.f.write(shard_header(self.count))
        self.f.close()
        os.replace(self.path + '.tmp', self.path)
        self.paths.append(self.path)
        self.f = None

    def close(self):
        if self.f is not None:
            self._finish()
        return self.total

# -----------------------------------------------------------------------------
# streaming text: bytes -> UTF-8 chunks cut at line breaks -> tokens -> shards

class _Bar:
    """A one-line progress bar on stderr, shown only once a job has run for more than a second."""
    def __init__(self, label, total=None):
        self.label, self.total, self.done, self.t0, self.shown = label, total, 0, time.time(), 0.0

    def update(self, n):
        self.done += n
        now = time.time()
        if now - self.t0 > 1 and now - self.shown > 0.5:
            self.shown = now
            mb = f"{self.done / 1e6:.1f}" + (f"/{self.total / 1e6:.1f}" if self.total else '')
            frac = min(self.done / self.total, 1) if self.total else 0
            bar = ('#' * int(30 * frac)).ljust(30) if self.total else ''
            sys.stderr.write(f"\r{self.label}: [{bar}] {mb} MB ")
            sys.stderr.flush()

    def close(self):
        if self.shown:
            sys.stderr.write('\n')

def _file_blocks(path, start, end, chunk_bytes, label):
    bar = _Bar(label, end - start)
    try:
        with open(path, 'rb') as f:
            f.seek(start)
            while f.tell() < end:
                block = f.read(min(chunk_bytes, end - f.tell()))
                if not block:
                    break
                bar.update(len(block))
                yield block
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    finally:
        bar.close()

def _decode(b, where, offset):
    try:
        return b.decode('utf-8')
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (bad byte at offset {offset + e.start}); "
                        f"convert it to UTF-8 first") from None

def _text_chunks(blocks, where, chunk_bytes, offset=0):
    """Re-cut byte blocks after their last line break, so no character, word or <|endoftext|>
    is split (GPT-2 never merges a newline into the next word). Memory stays ~chunk_bytes
    whatever the file size. offset: where the blocks start in the file, for error messages."""
    buf = b''
    for block in blocks:
        buf += block
        cut = buf.rfind(b'\n') + 1
        # a very long line (text8 is one): cut before its last space, so a word and GPT-2's
        # ' word' token stay whole; with no space, before a UTF-8 lead byte
        if cut == 0 and len(buf) > 4 * chunk_bytes:
            cut = buf.rfind(b' ')
            if cut <= 0:
                cut = len(buf) - 1
                while cut > 0 and buf[cut] & 0xC0 == 0x80:
                    cut -= 1
                cut = cut or len(buf)  # no lead byte at all: not UTF-8, let _decode say so
        if cut:
            yield _decode(buf[:cut], where, offset)
            buf, offset = buf[cut:], offset + cut
    if buf:
        yield _decode(buf, where, offset)

def _split_point(path, val_fraction):
    """(split, size, how): val is bytes split..size. split is the first line start at or after
    (1 - val_fraction) of the file when one is near (within 64 KiB or 1% of the file, so val
    stays about val_fraction), else the first character start there (text8 is one line)."""
    size = os.path.getsize(path)
    target = int(size * (1 - val_fraction))
    near = max(1 << 16, size // 100)
    split = None
    try:
        with open(path, 'rb') as f:
            f.seek(max(target - 1, 0))  # a line break just before target starts val at target
            while f.tell() <= target + near:
                block = f.read(1 << 16)
                if b'\n' in block:
                    split = f.tell() - len(block) + block.index(b'\n') + 1
                    break
                if not block:
                    break
            how = "moved forward to the next line start"
            if split is None or split - target > near or split == size:
                f.seek(target)
                tail = f.read(4)  # a UTF-8 character has at most 3 continuation bytes
                split = target + next((i for i, b in enumerate(tail) if b & 0xC0 != 0x80),
                                      len(tail))
                how = f"cut at a character boundary: no line break within {near} bytes after it"
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    if split >= size or split <= 0:
        part = 'val' if split >= size else 'train'
        raise DataError(f"{path}: too small to split ({size} bytes): the {part} part would be "
                        f"empty; use a longer text or "
                        f"{'a larger' if part == 'val' else 'a smaller'} --val_fraction")
    return split, size, how

def _write_split(chunks, encode, out_dir, name, split, shard_tokens, max_tokens):
    w = _ShardWriter(out_dir, name, split, shard_tokens)
    for text in chunks:
        ids = encode(text)
        if max_tokens is not None and w.total + len(ids) >= max_tokens:
            w.write(ids[:max_tokens - w.total])
            break
        w.write(ids)
    return w.close()

# -----------------------------------------------------------------------------
# downloads

def _offline(url, e):
    reason = (str(e) if isinstance(e, requests.HTTPError)
              else type(e).__name__)  # others are many lines long
    return f"could not download {url} ({reason}); offline? {OFFLINE_HINT}"

def download(url, path, check=None, chunk_bytes=1 << 20):
    """Stream url to path + '.part' (resuming a previous .part), rename when complete.
    Skipped when path is already there (and passes check, for files that can be checked)."""
    if os.path.exists(path):
        try:
            if check:
                check(path)
            return path
        except DataError:
            os.remove(path)  # a broken file from elsewhere: fetch it again
    tmp = path + '.part'
    have = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    try:
        with requests.get(url, stream=True, timeout=30,
                          headers={'Range': f'bytes={have}-'} if have else {}) as r:
            if r.status_code == 416:  # the .part does not fit the file on the server: start over
                os.remove(tmp)
                return download(url, path, check, chunk_bytes)
            r.raise_for_status()
            if r.status_code != 206:
                have = 0  # the server ignored the Range header
            total = int(r.headers.get('content-length', 0)) + have
            bar = _Bar(f"downloading {os.path.basename(path)}", total)
            bar.update(have)
            try:
                with open(tmp, 'ab' if have else 'wb') as f:
                    for block in r.iter_content(chunk_bytes):
                        f.write(block)
                        bar.update(len(block))
            finally:
                bar.close()
    except requests.RequestException as e:
        raise DataError(_offline(url, e)) from None
    except OSError as e:  # a full disk: the .part stays, so the next run resumes
        raise DataError(f"{tmp}: could not save the download ({e.strerror}); "
                        f"make room and run the same command again to resume") from None
    if total > have and os.path.getsize(tmp) != total:
        raise DataError(f"download of {url} stopped at {os.path.getsize(tmp)} of {total} bytes; "
                        f"run the same command again to resume")
    os.replace(tmp, path)
    if check:
        check(path)
    return path

def _http_blocks(url, chunk_bytes):
    """The bytes of url as they arrive, for taking the first part of a big file
    without saving it."""
    try:
        with requests.get(url, stream=True, timeout=30) as r:
            r.raise_for_status()
            bar = _Bar(f"streaming {url.rsplit('/', 1)[-1]}",
                       int(r.headers.get('content-length', 0)))
            try:
                for block in r.iter_content(chunk_bytes):
                    bar.update(len(block))
                    yield block
            finally:
                bar.close()
    except requests.RequestException as e:
        raise DataError(_offline(url, e)) from None

# -----------------------------------------------------------------------------
# the output folder: one preparation at a time, and only ever a complete dataset in it

def _out_dir_ready(out_dir):
    """Creates out_dir and its parents, or says in one line why it cannot be used."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"{out_dir}: is a file, not a folder (given as --out_dir); "
                        f"pick another --out_dir")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create it ({e.strerror}) (given as --out_dir); "
                        f"pick another --out_dir") from None

@contextlib.contextmanager
def _made_here(out_dir):
    """Makes out_dir if need be (_out_dir_ready); a failed preparation removes it again, and its
    lock, if it was new and holds nothing else."""
    made = not os.path.isdir(out_dir)
    _out_dir_ready(out_dir)
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            if made and set(os.listdir(out_dir)) <= {LOCK}:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out_dir, LOCK))
                os.rmdir(out_dir)
        raise

@contextlib.contextmanager
def _locked(out_dir):
    """Holds out_dir/.prepare.lock while this preparation writes there; yields True when another
    one held it first and this one waited. With flock the OS drops the lock when its holder dies,
    so a killed preparation leaves no stale lock (on NFS: when that client's lease ends)."""
    path = os.path.join(out_dir, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write there ({e.strerror}); "
                        f"make it writable or pick another --out_dir") from None
    try:
        locked, waited = True, False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{out_dir}: another prepare.py is writing it (it holds {path}); "
                  f"waiting for it to finish", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        except OSError as e:  # a filesystem without locks (NFS without lockd, Lustre without flock)
            locked = False
            print(f"note: {path}: cannot lock it ({e.strerror}); preparing without a lock, "
                  f"so do not run two preparations of {out_dir} at once", flush=True)
        if locked:
            _remove_leftovers(out_dir)
        yield waited
    finally:
        os.close(fd)  # releases the lock

def _remove_leftovers(out_dir):
    """With the lock held no one else writes here: private folders and .tmp files here are
    left over from a killed preparation (older versions wrote shards as .tmp beside the others)."""
    for p in glob.glob(os.path.join(out_dir, TMP_PREFIX + '*')):
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(p)
    for p in (glob.glob(os.path.join(out_dir, '*_*_*.bin.tmp'))
              + glob.glob(os.path.join(out_dir, 'meta.json.tmp'))):
        with contextlib.suppress(OSError):
            os.remove(p)

def _made_by(out_dir, cmd, source):
    """Whether out_dir holds a complete dataset made by this command (and from this source)."""
    try:
        with open(os.path.join(out_dir, 'meta.json')) as f:
            meta = json.load(f)
        return meta['command'] == cmd and (source is None or meta['source'] == source)
    except Exception:
        return False

def _foreign_shards(out_dir, prefix):
    for split in ('train', 'val'):
        for p in glob.glob(os.path.join(out_dir, f'*_{split}_*.bin')):
            if not os.path.basename(p).startswith(f'{prefix}_{split}_'):
                raise DataError(f"{out_dir}: already holds another dataset's shards "
                                f"({os.path.basename(p)}); pick another --out_dir")

def _install(tmp, out_dir):
    """Moves the complete dataset in tmp into out_dir, leaving no stale shards of an earlier run.
    meta.json goes first and comes back last: while shards are swapped the folder reads as
    unprepared, and load_meta waits for the lock."""
    new = sorted(f for f in os.listdir(tmp) if f != 'meta.json')
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, 'meta.json'))
    for p in (glob.glob(os.path.join(out_dir, '*_train_*.bin'))
              + glob.glob(os.path.join(out_dir, '*_val_*.bin'))):
        if os.path.basename(p) not in new:
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
    for f in new:
        os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
    os.replace(os.path.join(tmp, 'meta.json'), os.path.join(out_dir, 'meta.json'))

def _write_dataset(out_dir, name, meta, train_chunks, val_chunks, encode, shard_tokens,
                   max_tokens, val_cap):
    """Writes shards and meta.json into a private folder inside out_dir, then moves them in:
    a failure (a full disk, a bad byte) leaves out_dir as it was."""
    tmp = None
    try:
        try:
            tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out_dir)
            meta['train_tokens'] = _write_split(train_chunks, encode, tmp, name, 'train',
                                                shard_tokens, max_tokens)
            meta['val_tokens'] = _write_split(val_chunks, encode, tmp, name, 'val',
                                              shard_tokens, val_cap)
            if not meta['train_tokens'] or not meta['val_tokens']:
                raise DataError(f"{meta['source']}: the train or val split came out empty; "
                                f"use a longer text or another --val_fraction")
            meta.update(vocab_size=len(meta['chars']) if meta['tokenizer'] == 'char' else 50257,
                        shard_tokens=shard_tokens)
            with open(os.path.join(tmp, 'meta.json'), 'w') as f:
                json.dump(meta, f, indent=1)
        except OSError as e:
            raise DataError(f"{out_dir}: could not write the prepared data ({e.strerror}); "
                            f"make room there and run the same command again "
                            f"(the data already there is unchanged)") from None
        try:
            _install(tmp, out_dir)
        except OSError as e:
            raise DataError(f"{out_dir}: could not move the prepared data into place "
                            f"({e.strerror}); run the same command again") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return _summary(out_dir, meta)

def _save_meta(out_dir, meta):
    """Writes meta.json (aside first, then renamed: it marks the folder done)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=out_dir)
        with os.fdopen(fd, 'w') as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(out_dir, 'meta.json'))
    except OSError as e:
        raise DataError(f"{out_dir}: could not write meta.json ({e.strerror}); "
                        f"make room there and run the same command again") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
    return _summary(out_dir, meta)

def _summary(out_dir, meta):
    print(f"{out_dir}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
          f"{meta['tokenizer']} tokenizer, vocab_size {meta['vocab_size']}")
    return out_dir

# -----------------------------------------------------------------------------
# the sources

def _check_file(path, flag):
    """One-line errors for a file given as --input or --val_input that cannot be read as text."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder (given as {flag})")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file (given as {flag}); give a text file")
    try:
        with open(path, 'rb') as f:
            head = f.read(1 << 13)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}) (given as {flag})") from None
    if not head:
        raise DataError(f"{path}: the file is empty (given as {flag})")
    if b'\0' in head:
        raise DataError(f"{path}: not a text file (it holds NUL bytes) (given as {flag}); "
                        f"give UTF-8 text")

def _text_files(paths, flag):
    """The files that paths name, in order: a file itself; a folder, its text files in sorted
    order (hidden ones and files that are empty or hold NUL bytes left out, with a note)."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            _check_file(path, flag)
            files.append(path)
            continue
        found = []
        for d, dirs, fs in os.walk(path):
            dirs[:] = [x for x in dirs if not x.startswith('.')]  # .git and the like
            found += [os.path.join(d, f) for f in fs if not f.startswith('.')]
        found.sort()
        text = []
        for f in found:
            with contextlib.suppress(DataError):
                _check_file(f, flag)
                text.append(f)
        if not text:
            raise DataError(f"{path}: holds no text files (given as {flag}); give a folder of "
                            f"UTF-8 text files, or the files themselves")
        if len(text) < len(found):
            skipped = sorted(set(found) - set(text))
            print(f"note: {path}: left out {len(skipped)} file(s) that are not text or are "
                  f"empty, such as {skipped[0]}")
        files += text
    return files

def _documents(inputs, val_inputs):
    """(train files, val files) of `prepare.py text`: a file named in both is refused; a val
    file inside an --input folder is left out of training."""
    if not inputs:
        raise DataError("`python prepare.py text` needs --input FILE or FOLDER ... "
                        "(UTF-8 text files)")
    train, val = _text_files(inputs, '--input'), _text_files(val_inputs, '--val_input')
    named = {os.path.realpath(p) for p in inputs if not os.path.isdir(p)}
    for f in val:
        if os.path.realpath(f) in named:
            raise DataError(f"{f}: given in both --input and --val_input; a held-out file "
                            f"must stay out of training: drop it from --input")
    held = {os.path.realpath(f) for f in val}
    kept = [f for f in train if os.path.realpath(f) not in held]
    if len(kept) < len(train):
        print(f"note: {len(train) - len(kept)} --val_input file(s) found in an --input folder "
              f"are left out of training")
    for files, flag in ((kept, '--input'), (val, '--val_input')):
        seen = set()
        for f in files:
            if os.path.realpath(f) in seen:
                raise DataError(f"{f}: given twice (in {flag}); give each file once")
            seen.add(os.path.realpath(f))
    if not kept:
        raise DataError("--input: no file is left to train on once the --val_input files are "
                        "held out")
    return kept, val

def _join(files, path, separator):
    """Writes files to path one after another, separator between them (each document then
    ends with a line break and the separator), checking that each is UTF-8."""
    with open(path, 'wb') as out:
        for i, name in enumerate(files):
            decoder, offset, last = codecs.getincrementaldecoder('utf-8')(), 0, b''
            try:
                with open(name, 'rb') as f:
                    while True:
                        block = f.read(1 << 20)
                        pending = len(decoder.getstate()[0])  # bytes of a character cut in two
                        decoder.decode(block, final=not block)
                        if not block:
                            break
                        out.write(block)
                        offset, last = offset + len(block), block[-1:]
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                raise DataError(f"{name}: not UTF-8 text (bad byte at offset {at}); convert it to "
                                f"UTF-8 first") from None
            except OSError as e:
                raise DataError(f"{name}: cannot read it ({e.strerror})") from None
            if i < len(files) - 1:
                out.write((b'' if last == b'\n' else b'\n') + separator)

def _check_args(name, source, input, tokenizer, max_tokens, shards, val_fraction,
                shard_tokens, chunk_bytes):
    """One-line errors for bad arguments, before anything is written; returns the tokenizer."""
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    if not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if shard_tokens < 1 or chunk_bytes < 1:
        raise DataError(f"--shard_tokens and --chunk_bytes must be positive, "
                        f"got {shard_tokens} and {chunk_bytes}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"--max_tokens must be positive, got {max_tokens}")
    if shards < 1:
        raise DataError(f"--shards must be at least 1, got {shards}")
    if name == 'fineweb10B':
        return 'gpt2'
    if name.startswith('shakespeare') and source not in ('bundled', 'download'):
        raise DataError(f"unknown --source {source!r} for {name} (expected bundled or download)")
    tokenizer = tokenizer or ('char' if name in ('shakespeare_char', 'text') else 'gpt2')
    if tokenizer not in ('char', 'gpt2'):
        raise DataError(f"unknown --tokenizer {tokenizer!r} (expected char or gpt2)")
    if name == 'tinystories' and tokenizer != 'gpt2':
        raise DataError("tinystories is prepared with the gpt2 tokenizer only "
                        "(drop --tokenizer char)")
    if tokenizer == 'gpt2':
        gpt2_tokenizer()  # fail before downloading anything
    return tokenizer

def _command(name, out_dir, source, inputs, val_inputs, tokenizer, max_tokens, shards,
             val_fraction, shard_tokens, chunk_bytes):
    """The command line that makes this dataset again, with every option that changes it."""
    text = name != 'fineweb10B'
    return ' '.join(['python prepare.py', name]
                    + (['--source', source] if source != 'bundled' else [])
                    + (['--input', *inputs] if inputs else [])
                    + (['--val_input', *val_inputs] if val_inputs else [])
                    + (['--tokenizer', tokenizer] if tokenizer else [])
                    + (['--max_tokens', str(max_tokens)] if max_tokens else [])
                    + (['--shards', str(shards)] if name == 'fineweb10B' else [])
                    + (['--val_fraction', str(val_fraction)]
                       if text and val_fraction != 0.1 and not val_inputs else [])
                    + (['--shard_tokens', str(shard_tokens)]
                       if text and shard_tokens != 100_000_000 else [])
                    + (['--chunk_bytes', str(chunk_bytes)] if text and chunk_bytes != 1 << 20
                       else [])
                    + ([] if out_dir == os.path.join('data', name) else ['--out_dir', out_dir]))

def _fineweb(out_dir, shards, meta):
    """modded-nanogpt's shards are already in our format: fetch and check them."""
    files = (['fineweb_val_000000.bin']
             + [f'fineweb_train_{i:06d}.bin' for i in range(1, shards + 1)])
    for f in files:
        download(FINEWEB_URL.format(f), os.path.join(out_dir, f), check=read_shard)
    train, val = shard_paths(out_dir, 'train'), shard_paths(out_dir, 'val')
    if len(train) > shards:
        print(f"note: {out_dir} holds {len(train)} train shards "
              f"(more than --shards {shards}); all are used")
    meta.update(tokenizer='gpt2', vocab_size=50257, source=FINEWEB_URL.format(''),
                train_tokens=sum(len(read_shard(p)) for p in train),
                val_tokens=sum(len(read_shard(p)) for p in val),
                split="FineWeb's own val shard (fineweb_val_000000.bin); train shards 000001..")
    return _save_meta(out_dir, meta)

def _tinystories(out_dir, max_tokens, chunk_bytes, meta):
    """TinyStories has its own validation file; its train file is ~2 GB."""
    val_path = download(TINYSTORIES_URL.format('valid'),
                        os.path.join(out_dir, 'TinyStoriesV2-GPT4-valid.txt'))
    train_path = os.path.join(out_dir, 'TinyStoriesV2-GPT4-train.txt')
    if max_tokens is None or os.path.exists(train_path):
        download(TINYSTORIES_URL.format('train'), train_path)
        train_blocks = _file_blocks(train_path, 0, os.path.getsize(train_path),
                                    chunk_bytes, 'train')
    else:  # only the first part is wanted: tokenize it as it arrives and stop early
        train_blocks = _http_blocks(TINYSTORIES_URL.format('train'), chunk_bytes)
    meta['source'], meta['split'] = (TINYSTORIES_URL.format('{train,valid}'),
                                     "TinyStories' own train and valid files")
    return train_blocks, _file_blocks(val_path, 0, os.path.getsize(val_path), chunk_bytes, 'val'), 0

def _text_file(name, source, path, out_dir, val_fraction, chunk_bytes, meta, val_path=None):
    """shakespeare*, text: one file split by bytes, or (val_path) train and val files. Fills
    meta's split and chars, and for shakespeare* its source (text's: _text_input)."""
    if name != 'text':
        path = BUNDLED if source == 'bundled' else download(TINY_SHAKESPEARE_URL,
                                                            os.path.join(out_dir, 'input.txt'))
        meta['source'] = ('data/shakespeare.txt (bundled)' if path == BUNDLED else
                          TINY_SHAKESPEARE_URL)
    if val_path:
        train_part = (path, 0, os.path.getsize(path))
        val_part = (val_path, 0, os.path.getsize(val_path))
    else:
        split, size, how = _split_point(path, val_fraction)
        train_part, val_part = (path, 0, split), (path, split, size)
        meta['split'] = (f"val = bytes {split}..{size} of the source "
                         f"(the last {val_fraction:.0%}, {how}), train = bytes 0..{split}")
    if meta['tokenizer'] == 'char':  # a first streamed pass to find the characters
        chars = set()
        for where in dict.fromkeys((train_part[0], val_part[0])):  # each file once, whole
            for text in _text_chunks(_file_blocks(where, 0, os.path.getsize(where), chunk_bytes,
                                                  'chars'), where, chunk_bytes):
                chars.update(text)
        if len(chars) > 2**16:
            raise DataError(f"{meta['source']}: {len(chars)} distinct characters do not fit "
                            f"uint16 tokens; use --tokenizer gpt2")
        meta['chars'] = sorted(chars)
    return (_file_blocks(*train_part, chunk_bytes, 'train'),
            _file_blocks(*val_part, chunk_bytes, 'val'), val_part[1])

def prepare(name, out_dir=None, source='bundled', input=None, tokenizer=None,
            max_tokens=None, shards=1, val_fraction=0.1, shard_tokens=100_000_000,
            chunk_bytes=1 << 20, val_input=None):
    """Does what `python prepare.py NAME ...` does; returns out_dir. input and val_input: a
    path, or a list of files and folders."""
    tok = _check_args(name, source, input, tokenizer, max_tokens, shards, val_fraction,
                      shard_tokens, chunk_bytes)
    inputs, val_inputs = ([p] if isinstance(p, str) else list(p or []) for p in (input, val_input))
    train_files, val_files = _documents(inputs, val_inputs) if name == 'text' else ([], [])
    out_dir = out_dir or os.path.join('data', name)
    cmd = _command(name, out_dir, source, inputs, val_inputs, tokenizer, max_tokens, shards,
                   val_fraction, shard_tokens, chunk_bytes)
    sources = ' + '.join(os.path.abspath(f) for f in train_files + val_files) or None
    with _made_here(out_dir), _locked(out_dir) as waited:
        # another process just made this same dataset here (every node of a job calls prepare)
        if waited and _made_by(out_dir, cmd, sources):
            print(f"{out_dir}: another process prepared it with the same command; using that")
            return out_dir
        _foreign_shards(out_dir, 'fineweb' if name == 'fineweb10B' else name)
        meta = {'name': name, 'command': cmd}
        if name == 'fineweb10B':
            return _fineweb(out_dir, shards, meta)
        meta['tokenizer'] = tok
        with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=out_dir) as joined:
            if name == 'tinystories':
                train, val, val_start = _tinystories(out_dir, max_tokens, chunk_bytes, meta)
            elif name == 'text':
                train, val, val_start = _text_input(train_files, val_files, joined, val_fraction,
                                                    chunk_bytes, meta, sources)
            else:
                train, val, val_start = _text_file(name, source, None, out_dir, val_fraction,
                                                   chunk_bytes, meta)
            val_cap = None if max_tokens is None else max(1, int(max_tokens * val_fraction))
            if max_tokens is not None:
                meta['split'] += f"; only the first {max_tokens} train and {val_cap} val tokens"
            encode = array_encoder({'tokenizer': tok, 'chars': meta.get('chars'),
                                    'source': meta['source']})
            where, cb = meta['source'], chunk_bytes
            return _write_dataset(out_dir, name, meta, _text_chunks(train, where, cb),
                                  _text_chunks(val, where, cb, val_start), encode,
                                  shard_tokens, max_tokens, val_cap)

def _text_input(train_files, val_files, joined, val_fraction, chunk_bytes, meta, sources):
    """text: one file as it is, split by bytes; several (or a folder), joined with a separator
    between documents (a blank line; GPT-2's <|endoftext|>) in the private folder joined; with
    val files, those are the val split. meta records which files went where."""
    meta.update(source=sources, train_files=[os.path.abspath(f) for f in train_files],
                val_files=[os.path.abspath(f) for f in val_files])
    if len(train_files) == 1 and not val_files:
        return _text_file('text', None, train_files[0], None, val_fraction, chunk_bytes, meta)
    separator = b'\n' if meta['tokenizer'] == 'char' else b'<|endoftext|>\n'
    train_path, val_path = os.path.join(joined, 'train.txt'), os.path.join(joined, 'val.txt')
    _join(train_files, train_path, separator)
    if not val_files:
        return _text_file('text', None, train_path, None, val_fraction, chunk_bytes, meta)
    _join(val_files, val_path, separator)
    meta['split'] = (f"val = the {len(val_files)} file(s) of --val_input, train = the "
                     f"{len(train_files)} other file(s), documents joined by "
                     f"{separator.decode()!r} after a line break")
    return _text_file('text', None, train_path, None, val_fraction, chunk_bytes, meta, val_path)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('name', choices=SOURCES)
    p.add_argument('--out_dir', help='default: data/NAME')
    p.add_argument('--source', default='bundled', choices=['bundled', 'download'],
                   help='shakespeare*: bundled corpus or tiny-shakespeare download')
    p.add_argument('--input', nargs='+', metavar='FILE_OR_FOLDER',
                   help='text: UTF-8 files and folders of them (sorted), in this order')
    p.add_argument('--val_input', nargs='+', metavar='FILE_OR_FOLDER',
                   help='text: the files to hold out as the val split (not --val_fraction)')
    p.add_argument('--tokenizer', choices=['char', 'gpt2'], help='text: char (default) or gpt2')
    p.add_argument('--max_tokens', type=int,
                   help='stop after this many train tokens (val: this x val_fraction)')
    p.add_argument('--shards', type=int, default=1,
                   help='fineweb10B: number of 100M-token train shards')
    p.add_argument('--val_fraction', type=float, default=0.1)
    p.add_argument('--shard_tokens', type=int, default=100_000_000,
                   help='at most this many tokens per shard file')
    p.add_argument('--chunk_bytes', type=int, default=1 << 20,
                   help='text read per step; memory use is a few times this')
    args = vars(p.parse_args(argv))
    try:
        prepare(args.pop('name'), **args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

if __name__ == '__main__':
    main()
