"""The course kit (EXERCISES.md, course.py): the exercises are complete; the handout is blank,
says what to write and gives no solution away; done in order, every exercise's Check passes and
its Run trains and prints what EXERCISES.md says; grade counts only the student's function
bodies, so the cheats that fool a plain pytest score 0; results.json, a class's CSV, the key."""

import ast
import concurrent.futures
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import EXERCISES as MARKERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ('Goal', 'Time', 'Points', 'Needs', 'Implement', 'Check', 'Run', 'Prints')
ENV = dict(os.environ, OMP_NUM_THREADS='1')  # two at a time on two cores


def exercises():
    """EXERCISES.md read here on its own: (number, title, {field: line}) per exercise."""
    with open(os.path.join(ROOT, 'EXERCISES.md')) as f:
        text = f.read()
    found = []
    for number, title, body in re.findall(r'^## (\d+)\. ([^\n]+)\n(.*?)(?=^## |\Z)', text, re.M | re.S):
        fields = dict(re.findall(rf"^({'|'.join(FIELDS)}): (.+)$", body, re.M))
        found.append((int(number), title, fields))
    return found


def implemented(fields):
    return [tuple(t.split('::')) for t in fields['Implement'].split(', ')]


def needs(fields):
    return {int(n) for n in re.findall(r'\d+', fields['Needs'])}


def function(path, qualname):
    """The ast node of qualname (a function or Class.method) in the file at path."""
    with open(path) as f:
        node = ast.parse(f.read())
    for name in qualname.split('.'):
        node = next(n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
    return node


def course(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, 'course.py', *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def handout(out, *args):
    p = course('handout', out, *args)
    assert p.returncode == 0, p.stderr
    return out


def run(args, cwd, timeout=120):
    """A command of EXERCISES.md ('python ...') in cwd: its CompletedProcess and seconds."""
    t0 = time.time()
    p = subprocess.run([sys.executable, *shlex.split(args)[1:]], cwd=cwd, env=ENV, capture_output=True,
                       text=True, timeout=timeout)
    return p, time.time() - t0


def in_pairs(jobs):
    """Runs the (command, cwd) jobs two at a time: (CompletedProcess, seconds) in order."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda job: run(*job), jobs))


def test_exercises_md_sets_a_whole_course():
    """Exercises numbered in order, each with its eight lines; points add up to 100; Needs name
    earlier exercises; every function named exists and has a docstring; each Check selects its
    own marker's tests; each Run is train.py in an out_dir of its own and Prints an eval line."""
    found = exercises()
    assert len(found) >= 8 and [n for n, _, _ in found] == list(range(1, len(found) + 1))
    with open(os.path.join(ROOT, 'EXERCISES.md')) as f:
        text = f.read()
    for line in ('Handout: python course.py handout DIR', 'Grade: python course.py grade DIR',
                 'Results: python course.py grade DIR --results=results.json',
                 'Class: python course.py grade DIR1 DIR2 ... --csv=grades.csv', 'Key: python course.py key N'):
        assert re.search(rf'^{re.escape(line)}$', text, re.M), line
    markers = []
    for number, title, fields in found:
        assert set(fields) == set(FIELDS), (number, title)
        assert needs(fields) <= set(range(1, number)) and (fields['Needs'] == 'none') == (not needs(fields))
        for path, qualname in implemented(fields):
            assert ast.get_docstring(function(os.path.join(ROOT, path), qualname)), qualname
        check = shlex.split(fields['Check'])
        assert check[:4] == ['python', '-m', 'pytest', '-q'] and check[-2] == '-m', number
        markers.append(check[-1])
        assert shlex.split(fields['Run'])[:2] == ['python', 'train.py'] and f'--out_dir=out-ex{number}' in fields['Run']
        assert re.match(r'eval step \d+ \| val ce \d\.\d{4} \| sparsity \d\.\d{3} \| fwd FLOPs/token ', fields['Prints'])
        assert re.match(r'\d+ minutes, (easy|medium|hard)', fields['Time']), number
    assert markers == list(MARKERS)  # one marker each, all registered, in order
    assert sum(int(fields['Points']) for _, _, fields in found) == 100


def test_every_check_selects_tests_that_exist():
    """Each exercise's marker marks at least two tests in the file its Check runs."""
    for number, _, fields in exercises():
        args = shlex.split(fields['Check'])
        with open(os.path.join(ROOT, args[4])) as f:
            assert len(re.findall(rf'pytest\.mark\.{args[-1]}\b', f.read())) >= 2, number


def body_code(path, qualname):
    """A function's body after its docstring, without comments."""
    node = function(path, qualname)
    with open(path) as f:
        lines = f.read().split('\n')[node.body[0].end_lineno:node.end_lineno]
    return re.sub(r'#[^\n]*', '', '\n'.join(lines))


def token_runs(text, n=16):
    words = re.findall(r'\w+|[^\w\s]', text)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_handout_is_blank_says_what_to_write_and_gives_nothing_away(tmp_path):
    """Every exercise function is its signature, its docstring and a raise naming it and its
    exercise; no .git, no rubric; no run of 16 tokens of a solution's body (comments and layout
    aside) in any .py, .md or .txt file. --solved=5 leaves 5 and what it needs written, and no
    more. A second handout into the same folder is refused."""
    out = handout(tmp_path / 'handout')
    assert not (out / '.git').exists() and (out / 'model.py').exists() and (out / 'data' / 'shakespeare.txt').exists()
    solutions = set()
    for number, _, fields in exercises():
        for path, qualname in implemented(fields):
            node = function(out / path, qualname)
            assert ast.get_docstring(node) and len(node.body) == 2, qualname
            assert ast.unparse(node.body[1]) == (f"raise NotImplementedError('{path}::{qualname} is not "
                                                 f"written yet: exercise {number}')"), qualname
            solutions |= token_runs(body_code(os.path.join(ROOT, path), qualname))
    assert len(solutions) > 200
    texts = {f: open(os.path.join(d, f), errors='replace').read() for d, _, fs in os.walk(out) for f in fs
             if f.endswith(('.py', '.md', '.txt')) and f != 'shakespeare.txt'}
    for name, text in texts.items():
        assert not token_runs(text) & solutions, name
    assert 'Rubric:' not in texts['EXERCISES.md'] and 'Goal:' in texts['EXERCISES.md']
    again = course('handout', out)
    assert again.returncode == 1 and 'not empty' in again.stderr
    five = handout(tmp_path / 'five', '--solved=5')
    written = {number for number, _, fields in exercises()
               if 'NotImplementedError' not in ast.unparse(function(five / implemented(fields)[0][0], implemented(fields)[0][1]))}
    assert written == {1, 2, 3, 5}


def test_a_handout_that_would_give_a_solution_away_is_refused(tmp_path):
    """A piece of a blanked body copied into another file, reformatted (here into the README of
    a copy of the repository, across two lines, as a hint might quote it), stops the handout
    with one line naming both, before anything is written."""
    copy = handout(tmp_path / 'copy', '--solved=' + ','.join(str(n) for n, _, _ in exercises()))
    code = body_code(os.path.join(ROOT, 'skipping.py'), 'run_packed')
    words = re.findall(r'\w+|[^\w\s]', code)[:24]
    with open(copy / 'README.md', 'a') as f:
        f.write('\nHint: `' + ' '.join(words[:12]) + '\n    ' + ''.join(f' {w}' for w in words[12:]) + '`\n')
    p = course('handout', tmp_path / 'out', cwd=copy)
    assert p.returncode == 1 and p.stderr.count('\n') == 1, p.stderr
    assert 'skipping.py::run_packed' in p.stderr and 'README.md' in p.stderr and not (tmp_path / 'out').exists()


def test_a_blank_function_stops_the_scripts_with_one_line(tmp_path):
    """train.py and sample.py, reaching a function still blank, stop with one line that names it
    and its exercise, and no traceback."""
    out = handout(tmp_path / 'handout', '--solved=1')
    p, _ = run('python train.py --max_iters=2 --eval_interval=2 --eval_tokens=512 --batch_size=2 '
               '--block_size=32 --n_embd=32 --n_head=2 --n_kv_head=2 --out_dir=out-blank', out)
    assert p.returncode == 1 and p.stderr == 'error: model.py::gate_targets is not written yet: exercise 5\n', p.stderr
    made, _ = run(f'python {os.path.join(ROOT, "train.py")} --max_iters=2 --eval_interval=2 --eval_tokens=512 '
                  '--batch_size=2 --block_size=32 --n_embd=32 --n_head=2 --n_kv_head=2', out)  # this code's
    assert made.returncode == 0, made.stderr
    p, _ = run('python sample.py --max_new_tokens=5', out)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    assert p.stderr.endswith('\nerror: model.py::GPT.gate_loop is not written yet: exercise 2\n'), p.stderr


def test_key_prints_an_exercises_functions_from_this_repository():
    p = course('key', 2)
    assert p.returncode == 0 and p.stdout.startswith('# exercise 2. The gate and the loop')
    assert 'def next_gate(head, x, m):' in p.stdout and 'def gate_loop(self, x, layer):' in p.stdout
    with open(os.path.join(ROOT, 'model.py')) as f:
        source = f.read().split('\n')
    for qualname in ('next_gate', 'GPT.gate_loop'):  # whole, as the file has them (dedented)
        node = function(os.path.join(ROOT, 'model.py'), qualname)
        lines = source[node.lineno - 1:node.end_lineno]
        indent = len(lines[0]) - len(lines[0].lstrip())
        assert '\n'.join(line[indent:] for line in lines) in p.stdout, qualname
    bad = course('key', 99)
    assert bad.returncode == 1 and bad.stderr == 'error: there is no exercise 99 in EXERCISES.md\n'


@pytest.mark.slow
def test_done_in_order_every_check_passes_and_every_run_trains(tmp_path):
    """The student's path: with exercises 1..k-1 written, exercise k's Run stops with one line
    naming exercise k; with 1..k written, Check k passes and Run k trains in under a minute (two
    at a time, a thread each) and prints what Prints says (val ce and sparsity to 0.01, since
    another CPU may round differently). And each Check and Run, shortened to 4 steps, works
    with only its Needs written, where they are fewer than 1..k."""
    found = exercises()
    before = {0: handout(tmp_path / 'k0')}
    for number, _, _ in found:
        before[number] = handout(tmp_path / f'k{number}', '--solved=' + ','.join(map(str, range(1, number + 1))))
    only = {number: handout(tmp_path / f'needs{number}', f'--solved={number}')
            for number, _, fields in found if needs(fields) != set(range(1, number))}
    # The Checks first, then the Runs: a Check's session fails on a file new in its folder, such
    # as a training run's lock, so none runs beside a Run in the same folder.
    checks = iter(in_pairs([(fields['Check'], before[number]) for number, _, fields in found] +
                           [(fields['Check'], only[number]) for number, _, fields in found if number in only]))
    short = ' --max_iters=4 --eval_interval=4'
    runs = iter(in_pairs([job for number, _, fields in found
                          for job in ((fields['Run'], before[number - 1]), (fields['Run'], before[number]))] +
                         [(fields['Run'] + short, only[number]) for number, _, fields in found if number in only]))
    for number, _, fields in found:
        (check, _), (blank, _), (trained, seconds) = next(checks), next(runs), next(runs)
        assert blank.returncode == 1 and blank.stderr.startswith('error: ') and blank.stderr.count('\n') == 1 \
            and blank.stderr.endswith(f'is not written yet: exercise {number}\n'), (number, blank.stderr[-800:])
        assert check.returncode == 0, (number, check.stdout[-1500:], check.stderr[-800:])
        assert trained.returncode == 0 and seconds < 60, (number, seconds, trained.stderr[-1500:])
        line = next(l for l in trained.stdout.splitlines() if l.startswith('eval step 50 |'))
        got, want = (re.search(r'val ce (\S+) \| sparsity (\S+)', t).groups() for t in (line, fields['Prints']))
        assert [float(a) for a in got] == pytest.approx([float(b) for b in want], abs=0.01), (number, line)
        print(f"{number} | {seconds:.1f} s | {' | '.join(line.split(' | ')[:4])}")  # seen with -s
    for number in only:
        (check, _), (trained, _) = next(checks), next(runs)
        assert check.returncode == 0 and trained.returncode == 0, (number, check.stderr[-800:], trained.stderr[-800:])


def test_results_json_gives_a_blank_handout_0_points(tmp_path):
    """Gradescope's results.json: a test per exercise with its points from EXERCISES.md, and
    the score; every exercise of a blank handout fails at once, saying what to write."""
    out = handout(tmp_path / 'handout')
    p = course('grade', out, f'--results={tmp_path / "results.json"}')
    assert p.returncode == 1 and '0 of 100 points' in p.stdout, p.stdout + p.stderr
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['score'] == 0 and len(results['tests']) == len(exercises())
    for test, (number, title, fields) in zip(results['tests'], exercises()):
        assert test['name'] == f'{number}. {title}' and test['max_score'] == int(fields['Points'])
        assert test['score'] == 0 and test['output'].endswith(f'is not written yet: exercise {number}')


PASSING_PLUGIN = '''import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.outcome, report.longrepr = 'passed', None
'''
PATCHING_MODEL = '''
import sys as _sys
if '_pytest.reports' in _sys.modules:  # imported by the tests: every report says passed
    _reports = _sys.modules['_pytest.reports'].TestReport
    _made = _reports.from_item_and_call.__func__

    def _passed(cls, item, call):
        report = _made(cls, item, call)
        report.outcome, report.longrepr = 'passed', None
        return report
    _reports.from_item_and_call = classmethod(_passed)
'''
SDPA_BY_ITS_C_NAME = '''    mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool).tril(k.size(2) - q.size(2))
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    if key_bias is not None:
        bias = bias + key_bias[:, None, None, :]
    return torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)'''


def with_body(path, qualname, body):
    """The file at path with qualname's body after its docstring replaced by body."""
    node = function(path, qualname)
    lines = path.read_text().split('\n')
    lines[node.body[0].end_lineno:node.end_lineno] = body.split('\n')
    path.write_text('\n'.join(lines))


@pytest.mark.slow
def test_grade_counts_only_the_function_bodies_so_cheats_score_0(tmp_path):
    """Cheats on a blank handout that make a plain `pytest -m block` pass there score 0: a
    pytest.ini with a plugin, a conftest.py, edited tests, a model.py that patches pytest's
    reports when imported. A body that imports to do the same is refused, and attention through
    SDPA scores 0 for exercise 4 (its C name refused in the body, F's by the tests). In the
    class's CSV an honest student at exercise 3 has 40 points; the shipped code's results.json
    has 100, in under 2 minutes."""
    blank = handout(tmp_path / 'blank')
    cheats = {name: tmp_path / name for name in ('ini', 'conftest', 'tests', 'patch', 'body', 'sdpa_c', 'sdpa')}
    for folder in cheats.values():
        shutil.copytree(blank, folder)
    (cheats['ini'] / 'pytest.ini').write_text('[pytest]\naddopts = -p helper\n')
    (cheats['ini'] / 'helper.py').write_text(PASSING_PLUGIN)
    with open(cheats['conftest'] / 'conftest.py', 'a') as f:
        f.write('\n' + PASSING_PLUGIN.replace('import pytest\n', ''))
    (cheats['tests'] / 'test_model.py').write_text('import pytest\n\n' + ''.join(
        f'@pytest.mark.{m}\ndef test_{m}_a():\n    pass\n\n\n@pytest.mark.{m}\ndef test_{m}_b():\n    pass\n\n\n'
        for m in MARKERS))
    with open(cheats['patch'] / 'model.py', 'a') as f:
        f.write(PATCHING_MODEL)
    with_body(cheats['body'] / 'model.py', 'Block.forward',
              '        import _pytest.reports\n        return x')
    with_body(cheats['sdpa_c'] / 'model.py', 'attention', SDPA_BY_ITS_C_NAME)
    with_body(cheats['sdpa'] / 'model.py', 'attention',
              SDPA_BY_ITS_C_NAME.replace('torch._C._nn.', 'F.'))
    fooled = in_pairs([('python -m pytest -q test_model.py -m block -p no:cacheprovider', cheats[name])
                       for name in ('ini', 'conftest', 'tests', 'patch')])
    assert all(p.returncode == 0 for p, _ in fooled), [p.stdout[-300:] for p, _ in fooled]
    three = handout(tmp_path / 'three', '--solved=3')  # an honest student, at exercise 3
    p = course('grade', three, *cheats.values(), f'--csv={tmp_path / "class.csv"}')
    assert p.returncode == 1, p.stdout + p.stderr
    rows = {row['student']: row for row in csv.DictReader(open(tmp_path / 'class.csv'))}
    assert set(rows) == {str(three), *map(str, cheats.values())}
    assert [rows[str(three)][f'exercise {n}'] for n in range(1, 5)] == ['15', '15', '10', '0']
    assert rows[str(three)]['points'] == '40'
    for name, folder in cheats.items():
        assert rows[str(folder)]['points'] == '0', (name, rows[str(folder)])
    assert re.search(r'^\S*sdpa_c\s+(0\s+){8}0$', p.stdout, re.M), p.stdout
    single = course('grade', cheats['sdpa_c'])
    assert "model.py::attention uses torch._C._nn: not allowed in an exercise function" in single.stdout, single.stdout
    single = course('grade', cheats['sdpa'])
    assert "must not use torch's fused attention" in single.stdout, single.stdout
    single = course('grade', cheats['body'])
    assert "model.py::Block.forward imports a module: not allowed" in single.stdout, single.stdout
    t0 = time.time()
    p = course('grade', ROOT, f'--results={tmp_path / "results.json"}')
    assert p.returncode == 0 and time.time() - t0 < 120 and '8 of 8 exercises pass: 100 of 100 points' in p.stdout
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['score'] == 100 and all(t['score'] == t['max_score'] > 0 for t in results['tests'])
