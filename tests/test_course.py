"""The course kit (EXERCISES.md, course.py): the exercises are complete; the handout is blank and
gives no solution away; grade is red on the handout and green as shipped; each exercise passes
with only the exercises it needs written; and each exercise's Run, the real train.py, fails with
its functions blank and passes as shipped."""

import ast
import concurrent.futures
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from conftest import EXERCISES as MARKERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ('Goal', 'Time', 'Needs', 'Implement', 'Check', 'Run')
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


def function(path, qualname):
    """The ast node of qualname (a function or Class.method) in the file at path."""
    with open(path) as f:
        node = ast.parse(f.read())
    for name in qualname.split('.'):
        node = next(n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
    return node


def body_source(path, qualname):
    """The lines of a function's body after its docstring."""
    node = function(path, qualname)
    with open(path) as f:
        lines = f.read().split('\n')
    return lines[node.body[0].end_lineno:node.end_lineno]


def course(*args, timeout=600):
    return subprocess.run([sys.executable, 'course.py', *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def in_pairs(jobs):
    """Runs the (args, cwd) subprocesses two at a time; their CompletedProcesses in order."""
    def go(job):
        args, cwd = job
        return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(go, jobs))


def test_exercises_md_sets_a_whole_course():
    """At least ten exercises, numbered in order, each with its six lines; Needs name earlier
    exercises; every function named exists and has a docstring; each Check selects its own
    marker's tests; each Run trains with train.py in an out_dir of its own."""
    found = exercises()
    assert len(found) >= 10 and [n for n, _, _ in found] == list(range(1, len(found) + 1))
    with open(os.path.join(ROOT, 'EXERCISES.md')) as f:
        text = f.read()
    assert re.search(r'^Handout: python course\.py handout DIR$', text, re.M)
    assert re.search(r'^Grade: python course\.py grade DIR$', text, re.M)
    markers = set()
    for number, title, fields in found:
        assert set(fields) == set(FIELDS), (number, title)
        needs = fields['Needs']
        assert needs == 'none' or all(0 < int(n) < number for n in re.findall(r'\d+', needs)), number
        for path, qualname in implemented(fields):
            assert ast.get_docstring(function(os.path.join(ROOT, path), qualname)), qualname
        check = shlex.split(fields['Check'])
        assert check[:4] == ['python', '-m', 'pytest', '-q'] and check[-2] == '-m', number
        markers.add(check[-1])
        run = shlex.split(fields['Run'])
        assert run[:2] == ['python', 'train.py'] and f'--out_dir=out-ex{number}' in run, number
        assert re.match(r'\d+ minutes, (easy|medium|hard)', fields['Time']), number
    assert markers == set(MARKERS)  # one marker each, all registered


def test_every_check_selects_tests_that_exist():
    """Each exercise's marker marks at least two tests in the file its Check runs."""
    for number, _, fields in exercises():
        args = shlex.split(fields['Check'])
        with open(os.path.join(ROOT, args[4])) as f:
            assert len(re.findall(rf'^@pytest\.mark\.{args[-1]}$', f.read(), re.M)) >= 2, number


@pytest.mark.slow
def test_handout_is_blank_and_gives_nothing_away(tmp_path):
    """Every function of every exercise is its signature, its docstring and `raise
    NotImplementedError`; no .git, no rubric; no line of 30 or more characters of a solution's
    body appears in any .py, .md or .txt file of the handout. A second handout into the same
    folder is refused."""
    out = tmp_path / 'handout'
    p = course('handout', out)
    assert p.returncode == 0, p.stderr
    assert not (out / '.git').exists() and (out / 'model.py').exists() and (out / 'data' / 'shakespeare.txt').exists()
    solutions = []
    for number, _, fields in exercises():
        for path, qualname in implemented(fields):
            node = function(out / path, qualname)
            assert ast.get_docstring(node) and len(node.body) == 2, qualname
            assert ast.unparse(node.body[1]) == 'raise NotImplementedError', qualname
            solutions += [line.strip() for line in body_source(os.path.join(ROOT, path), qualname)
                          if len(line.strip()) >= 30]
    assert len(solutions) > 40
    texts = {f: open(os.path.join(d, f), errors='replace').read() for d, _, fs in os.walk(out) for f in fs
             if f.endswith(('.py', '.md', '.txt'))}
    for name, text in texts.items():
        for line in solutions:
            assert line not in text, (name, line)
    assert 'Rubric:' not in texts['EXERCISES.md'] and 'Goal:' in texts['EXERCISES.md']
    again = course('handout', out)
    assert again.returncode == 1 and 'not empty' in again.stderr


@pytest.mark.slow
def test_grade_is_red_on_the_handout_and_green_as_shipped(tmp_path):
    """A line per exercise: every one fails on the handout, naming the first failure, and
    passes as shipped; each grade takes under 3 minutes."""
    out = tmp_path / 'handout'
    assert course('handout', out).returncode == 0
    n = len(exercises())
    for folder, ok in ((out, False), (ROOT, True)):
        t0 = time.time()
        p = course('grade', folder)
        assert time.time() - t0 < 180
        lines = [line for line in p.stdout.splitlines() if re.match(r'\s*\d+  ', line)]
        assert len(lines) == n and p.returncode == (0 if ok else 1), p.stdout + p.stderr
        for line, (number, title, _) in zip(lines, exercises()):
            assert line.split()[0] == str(number) and title in line
            assert (' pass ' in line) == ok and (' FAIL ' in line) != ok, line
            assert ok or 'NotImplementedError' in line, line
        assert f"{n if ok else 0} of {n} exercises pass" in p.stdout


@pytest.mark.slow
def test_each_exercise_passes_with_only_what_it_needs(tmp_path):
    """For each exercise, a handout with it and its Needs written (everything else blank): its
    Check passes there."""
    jobs = []
    for number, _, fields in exercises():
        out = tmp_path / f'ex{number}'
        p = course('handout', out, f'--solved={number}')
        assert p.returncode == 0, p.stderr
        jobs.append(([sys.executable, *shlex.split(fields['Check'])[1:], '-p', 'no:cacheprovider'], out))
    for (number, _, _), p in zip(exercises(), in_pairs(jobs)):
        assert p.returncode == 0, (number, p.stdout[-1500:])


@pytest.mark.slow
def test_each_run_fails_with_its_functions_blank_and_passes_as_shipped(tmp_path):
    """Each Run, as EXERCISES.md gives it, in a handout where only that exercise is blank (it
    fails, and says NotImplementedError), and in an unblanked copy, for 4 steps (it trains to the
    end; Runs that differ only in their out_dir run once)."""
    shipped = tmp_path / 'shipped'
    every = ','.join(str(n) for n, _, _ in exercises())
    assert course('handout', shipped, f'--solved={every}').returncode == 0  # nothing blank
    jobs, whole = [], {}
    for number, _, fields in exercises():
        blank = tmp_path / f'blank{number}'
        assert course('handout', blank, f'--only={number}').returncode == 0
        run = [sys.executable, *shlex.split(fields['Run'])[1:]]
        jobs.append((run, blank))
        whole.setdefault(tuple(a for a in run if not a.startswith('--out_dir=')), run)
    short = ['--max_iters=4', '--eval_interval=4']
    results = in_pairs(jobs + [(run + short, shipped) for run in whole.values()])
    for (number, _, fields), blank in zip(exercises(), results):
        assert blank.returncode != 0 and 'NotImplementedError' in blank.stderr, (number, blank.stderr[-800:])
    for run, p in zip(whole.values(), results[len(jobs):]):
        assert p.returncode == 0 and 'eval step 4 |' in p.stdout, (run, p.stderr[-1500:])
    assert len(whole) >= 7


@pytest.mark.slow
def test_a_handout_that_would_give_a_solution_away_is_refused(tmp_path):
    """A line of a blanked body copied into another file (here the README of a copy of the
    repository) stops the handout with one line naming both, before anything is written."""
    copy = tmp_path / 'copy'
    every = ','.join(str(n) for n, _, _ in exercises())
    assert course('handout', copy, f'--solved={every}').returncode == 0
    line = next(l.strip() for l in body_source(os.path.join(ROOT, 'model.py'), 'next_gate') if len(l.strip()) >= 30)
    with open(copy / 'README.md', 'a') as f:
        f.write(f'\n    {line}\n')
    p = subprocess.run([sys.executable, 'course.py', 'handout', str(tmp_path / 'out')], cwd=copy, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count('\n') == 1, p.stderr
    assert 'model.py::next_gate' in p.stderr and 'README.md' in p.stderr and not (tmp_path / 'out').exists()
