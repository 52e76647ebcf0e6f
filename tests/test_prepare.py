"""Tests for prepare.py. CPU only, no network: every download is faked with monkeypatch."""
import errno, io, json, os, re, shutil, subprocess, sys, time, tracemalloc
import numpy as np
import pytest
import requests
import data as D
import prepare as P

REPO = os.path.dirname(os.path.abspath(P.__file__))

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" \
       "Caf\u00e9 na\u00efve \u2014 \u00fcber\n" * 3 + "Last line without a newline"

def write(path, text):
    with open(path, 'w', encoding='utf-8', newline='') as f:
        f.write(text)
    return str(path)

def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert '\n' not in msg and msg
    return msg

# ---------------------------------------------------------------- shard format

def test_shard_round_trip(tmp_path):
    path = str(tmp_path / 'x_train_000000.bin')
    tokens = np.random.default_rng(0).integers(0, 2**16, size=1000)
    D.write_shard(path, tokens)
    header = np.fromfile(path, dtype=np.int32, count=D.HEADER_INTS)
    assert header[0] == 20240520 and header[1] == 1 and header[2] == 1000 and not header[3:].any()
    assert os.path.getsize(path) == 256 * 4 + 1000 * 2
    got = D.read_shard(path, vocab_size=2**16)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    assert np.array_equal(got, tokens)
    assert not os.path.exists(path + '.tmp')
    D.write_shard(path, [])
    assert len(D.read_shard(path)) == 0
    with pytest.raises(D.DataError):
        D.write_shard(path, [70000])

def test_truncated_shard(tmp_path):
    d = tmp_path / 'shakespeare_char'; d.mkdir()
    path = str(d / 'shakespeare_char_train_000000.bin')
    D.write_shard(path, np.arange(100))
    with open(path, 'r+b') as f:
        f.truncate(256 * 4 + 150)
    with pytest.raises(D.DataError) as e:
        D.read_shard(path)
    msg = one_line_error(e)
    assert path in msg and 'truncated' in msg and 'python prepare.py shakespeare_char' in msg
    with open(path, 'r+b') as f:
        f.truncate(100)  # not even a whole header
    with pytest.raises(D.DataError, match='truncated'):
        D.read_shard(path)

def test_wrong_magic(tmp_path):
    path = str(tmp_path / 'a_val_000000.bin')
    D.write_shard(path, np.arange(10))
    with open(path, 'r+b') as f:
        f.write(np.int32(12345).tobytes())
    with pytest.raises(D.DataError) as e:
        D.read_shard(path)
    msg = one_line_error(e)
    assert path in msg and '12345' in msg and 'python prepare.py' in msg

def test_token_id_beyond_vocab(tmp_path):
    path = str(tmp_path / 'a_train_000000.bin')
    D.write_shard(path, [1, 2, 70, 3])
    assert len(D.read_shard(path, vocab_size=71)) == 4
    with pytest.raises(D.DataError) as e:
        D.read_shard(path, vocab_size=65)
    msg = one_line_error(e)
    assert path in msg and '70' in msg and 'vocab_size 65' in msg

def test_missing_dir_and_files(tmp_path):
    missing = str(tmp_path / 'shakespeare_char')
    for fn in (lambda: D.load_meta(missing), lambda: D.shard_paths(missing, 'train')):
        with pytest.raises(D.DataError) as e:
            fn()
        msg = one_line_error(e)
        assert missing in msg and 'python prepare.py shakespeare_char' in msg
    os.makedirs(missing)
    with pytest.raises(D.DataError, match='meta.json'):
        D.load_meta(missing)
    with pytest.raises(D.DataError, match=r'no val shards'):
        D.shard_paths(missing, 'val')
    with pytest.raises(D.DataError, match='not found'):
        D.read_shard(os.path.join(missing, 'nope_train_000000.bin'))

def test_shard_paths_glob_finds_fineweb_names(tmp_path):
    for f in ('fineweb_train_000002.bin', 'fineweb_train_000001.bin', 'fineweb_val_000000.bin', 'fineweb_train_000003.bin.part'):
        (tmp_path / f).write_bytes(b'')
    names = [os.path.basename(p) for p in D.shard_paths(str(tmp_path), 'train')]
    assert names == ['fineweb_train_000001.bin', 'fineweb_train_000002.bin']

# ---------------------------------------------------------------- text preparation

def test_text_char_end_to_end(tmp_path):
    src = write(tmp_path / 'in.txt', TEXT)
    out = P.prepare('text', out_dir=str(tmp_path / 'out'), input=src, val_fraction=0.25)
    meta = D.load_meta(out)
    assert meta['tokenizer'] == 'char' and meta['chars'] == sorted(set(TEXT))
    assert meta['vocab_size'] == len(set(TEXT)) and meta['source'] == os.path.abspath(src)
    encode, decode = D.get_tokenizer(meta)
    assert decode(encode(TEXT)) == TEXT
    train = np.concatenate([D.read_shard(p, meta['vocab_size']) for p in D.shard_paths(out, 'train')])
    val = np.concatenate([D.read_shard(p, meta['vocab_size']) for p in D.shard_paths(out, 'val')])
    assert (meta['train_tokens'], meta['val_tokens']) == (len(train), len(val))
    # val is the tail of the text from the first line start at/after 75% of the bytes
    data = TEXT.encode()
    cut = data.index(b'\n', int(len(data) * 0.75) - 1) + 1
    assert decode(train) == data[:cut].decode() and decode(val) == data[cut:].decode()
    assert decode(train).endswith('\n') and len(train) + len(val) == len(TEXT)
    # deterministic: the same input gives the same bytes
    first = open(D.shard_paths(out, 'val')[0], 'rb').read()
    P.prepare('text', out_dir=str(tmp_path / 'out2'), input=src, val_fraction=0.25)
    assert open(D.shard_paths(str(tmp_path / 'out2'), 'val')[0], 'rb').read() == first

def test_many_shards_and_no_stale_ones(tmp_path):
    src = write(tmp_path / 'in.txt', TEXT * 20)
    out = str(tmp_path / 'out')
    P.prepare('text', out_dir=out, input=src, shard_tokens=500, chunk_bytes=64)
    paths = D.shard_paths(out, 'train')
    assert len(paths) > 3 and all(len(D.read_shard(p)) <= 500 for p in paths)
    meta = D.load_meta(out)
    _, decode = D.get_tokenizer(meta)
    text = ''.join(decode(D.read_shard(p)) for p in paths + D.shard_paths(out, 'val'))
    assert text == TEXT * 20  # tiny chunks cut at line breaks lose nothing
    P.prepare('text', out_dir=out, input=src)  # a rerun with big shards leaves no old ones behind
    assert len(D.shard_paths(out, 'train')) == 1 and not any(f.endswith('.tmp') for f in os.listdir(out))

def test_max_tokens(tmp_path):
    src = write(tmp_path / 'in.txt', TEXT * 20)
    out = P.prepare('text', out_dir=str(tmp_path / 'o'), input=src, max_tokens=300, chunk_bytes=50)
    meta = D.load_meta(out)
    assert meta['train_tokens'] == 300 and meta['val_tokens'] == 30
    assert len(D.read_shard(D.shard_paths(out, 'train')[0])) == 300

def test_bundled_shakespeare_char(tmp_path):
    text = open(P.BUNDLED, encoding='utf-8').read()
    assert 1_000_000 <= os.path.getsize(P.BUNDLED) <= 2_000_000 and text.isascii()
    assert 'gutenberg' not in text.lower()  # license headers/footers are not in the corpus
    out = P.prepare('shakespeare_char', out_dir=str(tmp_path / 'sc'))
    meta = D.load_meta(out)
    assert meta['tokenizer'] == 'char' and 60 <= meta['vocab_size'] <= 100
    assert meta['train_tokens'] + meta['val_tokens'] == len(text)
    assert 0.09 < meta['val_tokens'] / len(text) < 0.11
    _, decode = D.get_tokenizer(meta)
    assert decode(D.read_shard(D.shard_paths(out, 'val')[0])[:20]) == text[meta['train_tokens']:][:20]

def test_unknown_char(tmp_path):
    out = P.prepare('text', out_dir=str(tmp_path / 'o'), input=write(tmp_path / 'in.txt', TEXT))
    encode, _ = D.get_tokenizer(D.load_meta(out))
    with pytest.raises(D.DataError) as e:
        encode('Speak \u263a')
    assert "'\u263a'" in one_line_error(e)

def test_bad_text_inputs(tmp_path):
    out = str(tmp_path / 'o')
    (tmp_path / 'latin1.txt').write_bytes('caf\u00e9\n'.encode('latin-1') * 50)
    (tmp_path / 'no_text').mkdir()
    (tmp_path / 'no_text' / 'image.png').write_bytes(b'\x89PNG\x00\x00')
    cases = [(None, '--input FILE'), (str(tmp_path / 'missing.txt'), 'no such file or folder'),
             (str(tmp_path / 'no_text'), 'holds no text files'), ('/dev/null', 'not a regular file'),
             (write(tmp_path / 'empty.txt', ''), 'the file is empty'),
             (str(tmp_path / 'no_text' / 'image.png'), 'not a text file (it holds NUL bytes)'),
             (str(tmp_path / 'latin1.txt'), 'not UTF-8 text (bad byte at offset 3)'),
             # too small: name which part would be empty ('\u00e9' is 2 bytes, cut only whole)
             (write(tmp_path / 'a.txt', 'a'), 'the train part would be empty'),
             (write(tmp_path / 'ae.txt', 'a\u00e9'), 'the val part would be empty')]
    for src, what in cases:
        with pytest.raises(D.DataError) as e:
            P.prepare('text', out_dir=out, input=src)
        msg = one_line_error(e)
        assert what in msg and (src is None or msg.startswith(src)), msg
    # short, but both parts have something: that prepares
    P.prepare('text', out_dir=out, input=write(tmp_path / 'one.txt', 'one line only'))
    assert (D.load_meta(out)['train_tokens'], D.load_meta(out)['val_tokens']) == (11, 2)

def prepare_script(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, 'prepare.py'), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)

def test_files_folders_and_a_held_out_file_through_the_script(tmp_path):
    """`prepare.py text --input FOLDER FILE --val_input FILE`: the val split is exactly the held-out
    file; train is the folder's other text files (sorted; hidden, binary and empty ones left out)
    and then the file, a blank line between documents (a line break added where one is missing);
    meta.json records which files went where; train.py trains on it with --data_dir."""
    docs = tmp_path / 'docs'
    (docs / 'sub').mkdir(parents=True)
    write(docs / 'b.txt', 'second doc\nno final newline')
    write(docs / 'a.md', 'first doc\n')
    write(docs / 'sub' / 'c.txt', 'third, in a subfolder\n')
    write(docs / 'held.txt', 'the held-out doc\nwith two lines')
    write(docs / '.hidden.txt', 'not read')
    (docs / 'logo.png').write_bytes(b'\x89PNG\x00')
    write(docs / 'empty.txt', '')
    write(tmp_path / 'extra.txt', 'an extra file\n')
    p = prepare_script('text', '--input', 'docs', 'extra.txt', '--val_input', 'docs/held.txt',
                       '--out_dir', 'out', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert 'left out 2 file(s)' in p.stdout and '1 --val_input file(s) found in an --input folder' in p.stdout
    meta = D.load_meta(str(tmp_path / 'out'))
    _, decode = D.get_tokenizer(meta)
    text = {split: ''.join(decode(D.read_shard(f).tolist()) for f in D.shard_paths(str(tmp_path / 'out'), split))
            for split in ('train', 'val')}
    assert text['val'] == 'the held-out doc\nwith two lines'
    assert text['train'] == ('first doc\n\nsecond doc\nno final newline\n\nthird, in a subfolder\n\n'
                             'an extra file\n')
    assert meta['val_files'] == [str(docs / 'held.txt')]
    assert meta['train_files'] == [str(docs / f) for f in ('a.md', 'b.txt', 'sub/c.txt')] + [str(tmp_path / 'extra.txt')]
    assert meta['command'] == 'python prepare.py text --input docs extra.txt --val_input docs/held.txt --out_dir out'
    p = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), '--data_dir=out', '--max_iters=2',
                        '--eval_interval=2', '--batch_size=2', '--block_size=8', '--n_embd=32', '--n_head=2',
                        '--n_kv_head=2', '--eval_tokens=16', '--out_dir=run'], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and 'eval step 2 |' in p.stdout, p.stderr[-1500:]

def test_text_inputs_that_cannot_be_used_stop_the_script_with_one_line(tmp_path):
    """Through the script, leaving no folder (or lock) behind: a missing file, a file that is not
    UTF-8 (alone or among others), a folder with no text files, a binary file, an empty file, a
    held-out file also given as --input."""
    (tmp_path / 'pictures').mkdir()
    (tmp_path / 'pictures' / 'a.png').write_bytes(b'\x89PNG\x00')
    (tmp_path / 'blob.bin').write_bytes(b'\x00\x01\x02')
    write(tmp_path / 'empty.txt', '')
    write(tmp_path / 'a.txt', 'some text\n')
    (tmp_path / 'latin1.txt').write_bytes('caf\u00e9\n'.encode('latin-1'))
    for args, what in [(['missing.txt'], 'missing.txt: no such file or folder (given as --input)'),
                       (['latin1.txt'], 'latin1.txt: not UTF-8 text (bad byte at offset 3)'),
                       (['a.txt', 'latin1.txt'], 'latin1.txt: not UTF-8 text (bad byte at offset 3)'),
                       (['pictures'], 'pictures: holds no text files (given as --input)'),
                       (['blob.bin'], 'blob.bin: not a text file (it holds NUL bytes) (given as --input)'),
                       (['empty.txt'], 'empty.txt: the file is empty (given as --input)'),
                       (['a.txt', '--val_input', 'a.txt'], 'a.txt: given in both --input and --val_input'),
                       (['a.txt', '--val_input', 'nope.txt'], 'nope.txt: no such file or folder (given as --val_input)')]:
        p = prepare_script('text', '--input', *args, '--out_dir', 'out', cwd=tmp_path)
        assert p.returncode == 1 and p.stderr.startswith(f'error: {what}') and p.stderr.count('\n') == 1, (args, p.stderr)
        assert not (tmp_path / 'out').exists()

def test_bad_numbers(tmp_path):
    src = write(tmp_path / 'in.txt', TEXT)
    for opts, what in [({'max_tokens': 0}, '--max_tokens'), ({'max_tokens': -5}, '--max_tokens'),
                       ({'val_fraction': 1.0}, '--val_fraction'), ({'shard_tokens': 0}, '--shard_tokens')]:
        with pytest.raises(D.DataError) as e:
            P.prepare('text', out_dir=str(tmp_path / 'o'), input=src, **opts)
        assert what in one_line_error(e)
    with pytest.raises(D.DataError, match='--shards'):
        P.prepare('fineweb10B', out_dir=str(tmp_path / 'o'), shards=0)
    assert not (tmp_path / 'o').exists()  # checked before anything is written

def test_bad_out_dirs(tmp_path):
    src = write(tmp_path / 'in.txt', TEXT)
    afile = write(tmp_path / 'afile', 'x')
    for out, what in [(afile, 'is a file, not a folder'),
                      (os.path.join(afile, 'sub'), 'Not a directory')]:
        with pytest.raises(D.DataError) as e:
            P.prepare('text', out_dir=out, input=src)
        msg = one_line_error(e)
        assert msg.startswith(out) and what in msg and '--out_dir' in msg
    assert open(afile).read() == 'x'
    deep = str(tmp_path / 'new' / 'deeper' / 'out')  # missing parents are made
    P.prepare('text', out_dir=deep, input=src)
    assert D.load_meta(deep)['train_tokens'] > 0

def test_permission_denied(tmp_path):
    probe = tmp_path / 'probe'
    probe.write_text('x')
    os.chmod(probe, 0)
    if os.access(probe, os.R_OK):  # root reads whatever the permissions say: rerun this test
        if not shutil.which('setpriv'):  # without root's power to override them
            pytest.skip("running as root, and setpriv (util-linux) is missing")
        r = subprocess.run(['setpriv', '--bounding-set=-dac_override,-dac_read_search',
                            sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                            f'--basetemp={tmp_path / "inner"}', f'{__file__}::test_permission_denied'],
                           capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert r.returncode == 0 and '1 passed' in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        return
    src = write(tmp_path / 'in.txt', TEXT)
    out = P.prepare('text', out_dir=str(tmp_path / 'o'), input=src)
    meta, shard = os.path.join(out, 'meta.json'), D.shard_paths(out, 'train')[0]
    ro = tmp_path / 'ro'; ro.mkdir()
    for p in (src, meta, shard):
        os.chmod(p, 0)
    os.chmod(ro, 0o555)
    try:
        for fn, where, what in [(lambda: P.prepare('text', out_dir=str(tmp_path / 'o2'), input=src), src, 'cannot read it'),
                                (lambda: D.load_meta(out), meta, 'cannot read it'),
                                (lambda: D.read_shard(shard), shard, 'cannot read it'),
                                (lambda: P.prepare('shakespeare_char', out_dir=str(ro)), str(ro), 'cannot write there')]:
            with pytest.raises(D.DataError) as e:
                fn()
            msg = one_line_error(e)
            assert msg.startswith(where) and what in msg and 'Permission denied' in msg, msg
    finally:
        for p in (src, meta, shard, ro):
            os.chmod(p, 0o755)

def test_wrong_meta(tmp_path):
    out = P.prepare('shakespeare_char', out_dir=str(tmp_path / 'shakespeare_char'), max_tokens=100)
    path = os.path.join(out, 'meta.json')
    good = json.load(open(path))
    drop = lambda k: {key: v for key, v in good.items() if key != k}
    cases = [(drop('vocab_size'), "no 'vocab_size'"), (drop('tokenizer'), "no 'tokenizer'"),
             (drop('chars'), "no 'chars'"), ({**good, 'tokenizer': 'bpe'}, "unknown tokenizer 'bpe'"),
             ({**good, 'vocab_size': '80'}, "vocab_size '80'"),
             ({**good, 'chars': good['chars'][::-1]}, "'chars' is not a sorted list"),
             ({**good, 'vocab_size': 3}, "sorted list of 3"), ([1, 2], 'not a JSON object')]
    for bad, what in cases:
        with open(path, 'w') as f:
            json.dump(bad, f)
        with pytest.raises(D.DataError) as e:
            D.load_meta(out)
        msg = one_line_error(e)
        assert msg.startswith(path) and what in msg and '`python prepare.py shakespeare_char' in msg, msg
    with open(path, 'w') as f:
        json.dump(good, f)
    assert D.load_meta(out) == good

# ---------------------------------------------------------------- one long line

def test_one_line_corpus(tmp_path):
    # text8 and enwik8 are one line: val starts at the character boundary after 90% of the bytes
    words = 'anarchism originated as a term of abuse \u00e9\u20ac '
    text = next(t for t in (words * n for n in range(7000, 7100))  # 90% is inside a character
                if t.encode()[int(len(t.encode()) * 0.9)] & 0xC0 == 0x80)
    src = write(tmp_path / 'oneline.txt', text)
    out = P.prepare('text', out_dir=str(tmp_path / 'o'), input=src)
    meta = D.load_meta(out)
    assert 'character boundary' in meta['split']
    _, decode = D.get_tokenizer(meta)
    train = decode(D.read_shard(D.shard_paths(out, 'train')[0]))
    val = decode(D.read_shard(D.shard_paths(out, 'val')[0]))
    assert train + val == text and 0.09 < len(val.encode()) / len(text.encode()) < 0.11
    target = int(len(text.encode()) * 0.9)
    assert 0 < len(train.encode()) - target < 3  # the next character start, no further
    # a line break within reach of the cut is still used
    src2 = write(tmp_path / 'late_break.txt', text[:len(train) + 100] + '\n' + text[len(train) + 100:])
    assert 'next line start' in D.load_meta(P.prepare('text', out_dir=str(tmp_path / 'o2'), input=src2))['split']

def test_long_line_chunks_keep_characters_whole():
    # a line longer than 4 * chunk_bytes is cut inside: never inside a character
    for text in ('\u00e9\u20ac\U0001f600x' * 40, 'ab \u00e9\u20ac \U0001f600' * 40):
        data = text.encode()
        for chunk_bytes in (1, 2, 3, 5, 8):
            for shift in range(4):
                blocks = [data[:shift]] + [data[i:i + chunk_bytes] for i in range(shift, len(data), chunk_bytes)]
                chunks = list(P._text_chunks(iter(blocks), 'where', chunk_bytes))
                assert ''.join(chunks) == text and len(chunks) > 3
                if ' ' in text and chunk_bytes > 1:  # ...and before a space, when the line has
                    # one in reach (its words are shorter than 4 * chunk_bytes): words stay whole
                    assert all(c.startswith(' ') for c in chunks[1:]), chunks[:3]

def test_one_line_gpt2_tokens_do_not_depend_on_chunks(monkeypatch, tmp_path):
    import tiktoken
    enc = FakeEncoding()  # a token per word: a chunk cut inside a word would make two
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: enc)
    text = 'the quick brown fox jumps over the lazy dog ' * 300
    out = P.prepare('text', out_dir=str(tmp_path / 'o'), input=write(tmp_path / 'in.txt', text),
                    tokenizer='gpt2', chunk_bytes=64)
    train = D.read_shard(D.shard_paths(out, 'train')[0]).tolist()
    assert train == enc.encode(text.encode()[:int(len(text) * 0.9)].decode())

def test_memory_stays_flat(tmp_path):
    line = "Now is the winter of our discontent made glorious summer \u00e9\n"
    src = write(tmp_path / 'big.txt', line * (4_000_000 // len(line.encode())))
    size = os.path.getsize(src)
    tracemalloc.start()
    try:
        out = P.prepare('text', out_dir=str(tmp_path / 'o'), input=src, chunk_bytes=32 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    meta = D.load_meta(out)
    assert meta['train_tokens'] + meta['val_tokens'] == size - size // len(line.encode())  # 'é' is 2 bytes, 1 char
    assert peak < size / 4, f"peak {peak} bytes while preparing a {size}-byte file"

# ---------------------------------------------------------------- gpt2

def test_gpt2_offline_error(monkeypatch, tmp_path):
    import tiktoken
    def offline(name):
        raise requests.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'\nmore detail")
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    with pytest.raises(D.DataError) as e:
        D.get_tokenizer({'tokenizer': 'gpt2', 'vocab_size': 50257})
    msg = one_line_error(e)
    assert 'GPT-2' in msg and 'char' in msg
    for needed in ('TIKTOKEN_CACHE_DIR', 'vocab.bpe', 'encoder.json'):  # what an offline machine needs
        assert needed in msg
    out = tmp_path / 'o'
    with pytest.raises(D.DataError, match='GPT-2'):
        P.prepare('shakespeare', out_dir=str(out))
    assert not out.exists()  # failed before writing anything

def test_gpt2_offline_through_the_script_names_the_cache(tmp_path):
    """With an empty tiktoken cache and no network (a proxy that refuses), prepare.py stops
    with one line naming TIKTOKEN_CACHE_DIR and its value, and writes nothing."""
    write(tmp_path / 'a.txt', 'some text\n')
    (tmp_path / 'cache').mkdir()
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / 'cache'), HTTPS_PROXY='http://127.0.0.1:9',
               HTTP_PROXY='http://127.0.0.1:9')
    p = subprocess.run([sys.executable, os.path.join(REPO, 'prepare.py'), 'text', '--input', 'a.txt',
                        '--tokenizer', 'gpt2', '--out_dir', 'out'], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count('\n') == 1, p.stderr
    assert f"TIKTOKEN_CACHE_DIR ({tmp_path / 'cache'})" in p.stderr and not (tmp_path / 'out').exists()

class FakeEncoding:  # stands in for tiktoken's GPT-2: a token per word or space, so ids stay < 50257
    def __init__(self):
        self.vocab = {}
    def encode(self, text, allowed_special=()):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r'\S+|\s', text)]
    def decode(self, ids):
        inv = {i: w for w, i in self.vocab.items()}
        return ''.join(inv[i] for i in ids)

def test_gpt2_pipeline_with_fake_encoding(monkeypatch, tmp_path):
    import tiktoken
    enc = FakeEncoding()
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: enc)
    src = write(tmp_path / 'in.txt', TEXT * 10)
    out = P.prepare('text', out_dir=str(tmp_path / 'o'), input=src, tokenizer='gpt2', chunk_bytes=40)
    meta = D.load_meta(out)
    assert meta['tokenizer'] == 'gpt2' and meta['vocab_size'] == 50257 and 'chars' not in meta
    # chunks are cut after line breaks, so chunked tokens equal whole-text tokens
    data = (TEXT * 10).encode()
    cut = data.index(b'\n', int(len(data) * 0.9) - 1) + 1
    train = np.concatenate([D.read_shard(p, 50257) for p in D.shard_paths(out, 'train')])
    assert train.tolist() == enc.encode(data[:cut].decode())

def test_gpt2_real_tokenizer(tmp_path):
    try:
        import tiktoken
        tiktoken.get_encoding('gpt2')
    except Exception:
        pytest.skip("tiktoken's GPT-2 files are not available offline")
    out = P.prepare('text', out_dir=str(tmp_path / 'o'), input=write(tmp_path / 'in.txt', TEXT * 5), tokenizer='gpt2')
    encode, decode = D.get_tokenizer(D.load_meta(out))
    assert decode(encode(TEXT)) == TEXT and encode('<|endoftext|>') == [50256]

# ---------------------------------------------------------------- downloads (all faked)

def refuse_network(*args, **kwargs):
    raise requests.ConnectionError("HTTPSConnectionPool(host='x'): Max retries exceeded\nwith url: /")

@pytest.mark.parametrize('name,opts', [('shakespeare_char', {'source': 'download'}), ('fineweb10B', {}), ('tinystories', {})])
def test_download_offline(monkeypatch, tmp_path, name, opts):
    monkeypatch.setattr(P.requests, 'get', refuse_network)
    if name == 'tinystories':
        import tiktoken
        monkeypatch.setattr(tiktoken, 'get_encoding', lambda n: FakeEncoding())
    with pytest.raises(D.DataError) as e:
        P.prepare(name, out_dir=str(tmp_path / 'o'), **opts)
    msg = one_line_error(e)
    assert 'could not download https://' in msg and '`python prepare.py text --input FILE` works offline' in msg

def test_cli_prints_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(P.requests, 'get', refuse_network)
    with pytest.raises(SystemExit) as e:
        P.main(['shakespeare_char', '--source', 'download', '--out_dir', str(tmp_path / 'o')])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith('error: could not download') and err.count('\n') == 1 and 'Traceback' not in err

class FakeResponse:
    def __init__(self, body, status=200, length=True):
        self.body, self.status_code = body, status
        self.headers = {'content-length': str(len(body))} if length else {}
    def iter_content(self, n):
        for i in range(0, len(self.body), 7):
            yield self.body[i:i + 7]
    def raise_for_status(self):
        if self.status_code >= 400:
            raise requests.HTTPError(f"{self.status_code} error")
    def __enter__(self):
        return self
    def __exit__(self, *a):
        pass

def test_download_skip_and_resume(monkeypatch, tmp_path):
    body = bytes(range(256)) * 4
    path = str(tmp_path / 'f.bin')
    calls = []
    def fake_get(url, stream, timeout, headers):
        calls.append(headers)
        start = int(headers['Range'][6:-1]) if headers else 0
        return FakeResponse(body[start:], 206) if start else FakeResponse(body)
    monkeypatch.setattr(P.requests, 'get', fake_get)
    P.download('https://x/f.bin', path)
    assert open(path, 'rb').read() == body and calls == [{}] and not os.path.exists(path + '.part')
    P.download('https://x/f.bin', path)  # already there: no request
    assert len(calls) == 1
    os.remove(path)
    with open(path + '.part', 'wb') as f:  # an interrupted earlier download
        f.write(body[:300])
    P.download('https://x/f.bin', path)
    assert calls[-1] == {'Range': 'bytes=300-'} and open(path, 'rb').read() == body
    # a server that ignores Range (200) makes us start over rather than append
    os.remove(path)
    with open(path + '.part', 'wb') as f:
        f.write(b'junk')
    monkeypatch.setattr(P.requests, 'get', lambda url, stream, timeout, headers: FakeResponse(body))
    P.download('https://x/f.bin', path)
    assert open(path, 'rb').read() == body

def test_download_cut_short(monkeypatch, tmp_path):
    class Short(FakeResponse):
        def iter_content(self, n):
            yield self.body[:10]
    monkeypatch.setattr(P.requests, 'get', lambda *a, **k: Short(b'x' * 100))
    path = str(tmp_path / 'f.txt')
    with pytest.raises(D.DataError, match='resume'):
        P.download('https://x/f.txt', path)
    assert not os.path.exists(path) and os.path.getsize(path + '.part') == 10

def test_fineweb_skips_valid_and_refetches_broken(monkeypatch, tmp_path):
    out = tmp_path / 'fineweb10B'; out.mkdir()
    D.write_shard(str(out / 'fineweb_val_000000.bin'), np.arange(50))
    (out / 'fineweb_train_000001.bin').write_bytes(b'<html>not a shard</html>')
    good = tmp_path / 'good.bin'
    D.write_shard(str(good), np.arange(100) + 7)
    fetched = []
    def fake_get(url, stream, timeout, headers):
        fetched.append(url.rsplit('/', 1)[-1])
        return FakeResponse(good.read_bytes())
    monkeypatch.setattr(P.requests, 'get', fake_get)
    P.prepare('fineweb10B', out_dir=str(out), shards=1)
    assert fetched == ['fineweb_train_000001.bin']
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['tokenizer'] == 'gpt2' and meta['vocab_size'] == 50257
    assert (meta['train_tokens'], meta['val_tokens']) == (100, 50)

def test_failed_download_keeps_earlier_data(monkeypatch, tmp_path):
    out = P.prepare('shakespeare_char', out_dir=str(tmp_path / 'sc'), max_tokens=1000)
    monkeypatch.setattr(P.requests, 'get', refuse_network)
    with pytest.raises(D.DataError, match='could not download'):
        P.prepare('shakespeare_char', out_dir=out, source='download')
    assert D.load_meta(out)['train_tokens'] == 1000 and len(D.read_shard(D.shard_paths(out, 'train')[0])) == 1000

def test_out_dir_with_another_dataset(tmp_path):
    D.write_shard(str(tmp_path / 'fineweb_train_000001.bin'), [1, 2, 3])
    with pytest.raises(D.DataError, match='another dataset'):
        P.prepare('text', out_dir=str(tmp_path), input=write(tmp_path / 'in.txt', TEXT))
    assert os.path.exists(tmp_path / 'fineweb_train_000001.bin')

# ---------------------------------------------------------------- a full disk, concurrent runs

FSIZE_CHILD = """
import resource, signal, sys
sys.path.insert(0, sys.argv[1])
import prepare as P
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit raises OSError EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # no file may grow past 100 kB
P.main(sys.argv[2:])
"""

def files(folder):
    return {f: open(os.path.join(folder, f), 'rb').read() for f in sorted(os.listdir(folder))}

def test_full_disk_keeps_earlier_data(monkeypatch, tmp_path):
    src = write(tmp_path / 'in.txt', TEXT * 2000)  # ~300 kB: its train shard is over 100 kB
    out = P.prepare('text', out_dir=str(tmp_path / 'o'), input=src, max_tokens=1000)
    before = files(out)
    r = subprocess.run([sys.executable, '-c', FSIZE_CHILD, REPO, 'text', '--input', src,
                        '--out_dir', out], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count('\n') == 1, r.stderr
    assert r.stderr.startswith(f"error: {out}: could not write") and 'File too large' in r.stderr
    assert files(out) == before  # no .tmp left, the earlier dataset intact
    # meta.json is written last: a disk that fills there
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(P.json, 'dump', full)
    with pytest.raises(D.DataError) as e:
        P.prepare('text', out_dir=out, input=src)
    msg = one_line_error(e)
    assert msg.startswith(out) and 'No space left on device' in msg and files(out) == before
    monkeypatch.undo()
    # ...and while downloading: the .part stays for the next run to resume
    class Full(io.BytesIO):
        def write(self, b):
            full()
    monkeypatch.setattr(P, 'open', lambda *a, **k: Full(), raising=False)
    monkeypatch.setattr(P.requests, 'get', lambda *a, **k: FakeResponse(b'x' * 100))
    with pytest.raises(D.DataError) as e:
        P.download('https://x/f.txt', str(tmp_path / 'f.txt'))
    msg = one_line_error(e)
    assert msg.startswith(str(tmp_path / 'f.txt.part')) and 'No space left' in msg and 'resume' in msg

RACER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import prepare as P
out, ready = sys.argv[2], sys.argv[3]
open(ready, 'w').close()
while not os.path.exists(out + '.go'):  # start together
    time.sleep(0.001)
P.main(['shakespeare_char', '--out_dir', out])
"""

def test_concurrent_preparations_of_one_folder(tmp_path):
    # every node of a multi-node job prepares the same folder on a shared filesystem at once
    out = str(tmp_path / 'shakespeare_char')
    text = open(P.BUNDLED, encoding='utf-8').read()
    for round in range(5):
        ready = [str(tmp_path / f'ready{round}{i}') for i in range(2)]
        procs = [subprocess.Popen([sys.executable, '-c', RACER, REPO, out, r], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in ready]
        deadline = time.time() + 60
        while not all(map(os.path.exists, ready)) and time.time() < deadline:
            time.sleep(0.01)
        open(out + '.go', 'w').close()
        results = [p.communicate(timeout=120) for p in procs]
        os.remove(out + '.go')
        for p, (stdout, stderr) in zip(procs, results):
            assert p.returncode == 0 and 'Traceback' not in stderr, stderr
        # exactly one complete dataset: nothing else, nothing half
        assert sorted(os.listdir(out)) == ['.prepare.lock', 'meta.json', 'shakespeare_char_train_000000.bin',
                                           'shakespeare_char_val_000000.bin']
        meta = D.load_meta(out)
        train, val = (D.read_shard(D.shard_paths(out, s)[0], meta['vocab_size']) for s in ('train', 'val'))
        assert (len(train), len(val)) == (meta['train_tokens'], meta['val_tokens'])
        assert np.array_equal(np.concatenate([train, val]), D.array_encoder(meta)(text))

WAITER = """
import sys
sys.path.insert(0, sys.argv[1])
import data as D, prepare as P
if sys.argv[2] == 'prepare':
    P.main(['shakespeare_char', '--out_dir', sys.argv[3], '--max_tokens', '1000'])
else:
    print('read vocab_size', D.load_meta(sys.argv[3])['vocab_size'])
"""

def test_waits_for_a_running_preparation_and_reuses_it(tmp_path):
    out = P.prepare('shakespeare_char', out_dir=str(tmp_path / 'sc'), max_tokens=1000)
    meta, shard = os.path.join(out, 'meta.json'), D.shard_paths(out, 'train')[0]
    inode = os.stat(shard).st_ino
    logs = {k: str(tmp_path / f'{k}.log') for k in ('prepare', 'read')}
    with P._locked(out):  # as if another preparation were writing the folder right now...
        os.rename(meta, meta + '.aside')  # ...and swapping its shards in
        procs = {k: subprocess.Popen([sys.executable, '-c', WAITER, REPO, k, out], stdout=open(log, 'w'),
                                     stderr=subprocess.STDOUT) for k, log in logs.items()}
        deadline = time.time() + 60
        while time.time() < deadline and not all('waiting' in open(log).read() for log in logs.values()):
            time.sleep(0.05)
        assert all(p.poll() is None for p in procs.values())  # both wait, neither failed
        os.rename(meta + '.aside', meta)
    for k, p in procs.items():
        assert p.wait(timeout=60) == 0, open(logs[k]).read()
    assert 'same command; using that' in open(logs['prepare']).read()
    assert 'read vocab_size' in open(logs['read']).read()
    assert os.stat(shard).st_ino == inode  # reused, not made again

HOLDER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import prepare as P
with P._locked(sys.argv[2]):
    os.mkdir(os.path.join(sys.argv[2], P.TMP_PREFIX + 'half'))  # as a preparation killed midway
    print('locked', flush=True)
    time.sleep(600)
"""

def test_killed_preparation_leaves_no_stale_lock(tmp_path):
    out = str(tmp_path / 'sc')
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, '-c', HOLDER, REPO, out], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == 'locked\n'
    holder.kill()
    holder.wait()
    # the lock died with its holder: this neither waits nor keeps the half-made folder
    r = subprocess.run([sys.executable, '-c', WAITER, REPO, 'prepare', out], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and 'waiting' not in r.stdout, r.stdout + r.stderr
    assert sorted(os.listdir(out)) == ['.prepare.lock', 'meta.json', 'shakespeare_char_train_000000.bin',
                                       'shakespeare_char_val_000000.bin']

def test_filesystem_without_locks(monkeypatch, tmp_path, capsys):
    # some NFS and Lustre mounts refuse flock: prepare anyway, and say so
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(P.fcntl, 'flock', no_locks)
    out = P.prepare('shakespeare_char', out_dir=str(tmp_path / 'sc'), max_tokens=1000)
    assert 'cannot lock it (No locks available)' in capsys.readouterr().out
    assert D.load_meta(out)['train_tokens'] == 1000
