"""
The course kit: EXERCISES.md sets the exercises, and this makes a student's copy of the
repository with their functions blanked, or grades one.

    python course.py handout DIR               # this repository in DIR (a new folder), every
                                               # exercise's functions blanked
    python course.py handout DIR --solved=1,4  # ... but exercises 1 and 4, and what they need,
                                               # left written (to start a class further on)
    python course.py handout DIR --only=8      # only exercise 8 blanked (one for homework)
    python course.py grade DIR                 # every exercise's Check on DIR, a line each; the
                                               # exit status is 0 only when all of them pass

A blanked function keeps its signature and docstring, and its body becomes `raise
NotImplementedError`. The handout has no .git, none of EXERCISES.md's teacher's notes (its
"Rubric:" paragraphs), and no line of a blanked body anywhere else in it: handout checks that
before it writes anything. grade runs each Check on a copy of DIR whose tests are this
repository's (a student's edits to the tests count for nothing), two at a time with one thread
each, and a minute for each.
"""
import ast
import concurrent.futures
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from configurator import configure

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ('handout', 'grade')
TESTS = ('test_model.py', 'conftest.py', 'tests')  # what grade takes from this repository
FIELDS = ('Goal', 'Time', 'Needs', 'Implement', 'Check', 'Run')  # one line each per exercise
# settings
solved = ''              # handout: exercises to leave written, e.g. '1,4' (with what they need)
only = ''                # handout: the exercises to blank, e.g. '8' ('': all but the solved ones)
# end of settings
positional = [a for a in sys.argv[1:] if not a.startswith('-')]
configure(globals(), [a for a in sys.argv[1:] if a.startswith('-')])
if len(positional) != 2 or positional[0] not in MODES:
    sys.exit("error: usage: python course.py handout DIR [--solved=1,2 | --only=3] | python "
             "course.py grade DIR")
mode, folder = positional


def exercises(path=os.path.join(HERE, 'EXERCISES.md')):
    """EXERCISES.md's exercises in order: dicts of number, title and the six fields (Implement
    as (file, function) pairs, Needs as numbers)."""
    with open(path) as f:
        text = f.read()
    found = []
    sections = re.findall(r'^## (\d+)\. ([^\n]+)\n(.*?)(?=^## |\Z)', text, re.M | re.S)
    for number, title, body in sections:
        ex = {'number': int(number), 'title': title.strip()}
        for field in FIELDS:
            line = re.search(rf'^{field}: (.+)$', body, re.M)
            if line is None:
                sys.exit(f"error: {path}: exercise {number} has no '{field}:' line")
            ex[field.lower()] = line.group(1).strip()
        ex['implement'] = [tuple(t.split('::')) for t in ex['implement'].split(', ')]
        ex['needs'] = [int(n) for n in re.findall(r'\d+', ex['needs'])]
        found.append(ex)
    return found


def chosen(text, with_needs=False):
    """The exercise numbers in text ('1,4'), and with_needs those of every exercise they need,
    and so on."""
    needs = {ex['number']: ex['needs'] for ex in EXERCISES}
    todo, done = [int(n) for n in re.findall(r'\d+', text)], set()
    while todo:
        n = todo.pop()
        if n not in needs:
            sys.exit(f"error: there is no exercise {n} in EXERCISES.md")
        if n not in done:
            done.add(n)
            todo += needs[n] if with_needs else []
    return done


def function_node(tree, qualname):
    """The ast node of qualname, a function or Class.method, in the module tree."""
    node = tree
    for name in qualname.split('.'):
        node = next((n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == name), None)
        if node is None:
            sys.exit(f"error: EXERCISES.md names {qualname}, which is not there")
    return node


def body_lines(source, qualname):
    """Where the body of qualname (a function, or Class.method) begins and ends (0-based, end
    excluded), after its docstring, and the indentation of its first statement."""
    node = function_node(ast.parse(source), qualname)
    documented = isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    if documented and len(node.body) == 1:
        sys.exit(f"error: {qualname} has a docstring and nothing else to blank")
    first = node.body[1] if documented else node.body[0]
    start = node.body[0].end_lineno if documented else first.lineno - 1  # comments go too
    return start, node.end_lineno, first.col_offset


def blank(source, qualname):
    """source with the body of qualname replaced by `raise NotImplementedError`, and that body."""
    start, end, indent = body_lines(source, qualname)
    lines = source.split('\n')
    body = lines[start:end]
    lines[start:end] = [' ' * indent + 'raise NotImplementedError']
    return '\n'.join(lines), body


def repository_files(root):
    """The repository's files under root, relative: not .git, caches, runs (out*/), prepared
    datasets (data/*/, but for the bundled tiny model) or handouts made inside it."""
    paths = []
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        dirs[:] = sorted(x for x in dirs if x not in ('.git', '__pycache__', '.pytest_cache')
                         and not (rel == '.' and (x.startswith('out') or
                                                  os.path.isfile(os.path.join(d, x, 'course.py'))))
                         and not (rel == 'data' and x != 'skip_middle_tiny'))
        paths += [os.path.normpath(os.path.join(rel, f)) for f in sorted(files)
                  if not f.endswith(('.pyc', '.tmp', '.lock'))]
    return paths


def without_teachers_notes(text):
    """EXERCISES.md without its 'Rubric:' paragraphs."""
    return re.sub(r'^Rubric:.*?(\n\n|\Z)', '', text, flags=re.M | re.S)


def handout(out, keep):
    """A student's copy of this repository in out: the exercises not in keep blanked."""
    if os.path.exists(out) and os.listdir(out):
        sys.exit(f"error: {out} is not empty; the handout goes into a new folder")
    files = {p: open(os.path.join(HERE, p), 'rb').read() for p in repository_files(HERE)}
    solutions = []  # (exercise, file::function, a line of its body)
    for ex in EXERCISES:
        if ex['number'] in keep:
            continue
        for path, qualname in ex['implement']:
            source, body = blank(files[path].decode(), qualname)
            files[path] = source.encode()
            solutions += [(ex['number'], f"{path}::{qualname}", line.strip()) for line in body
                          if len(line.strip()) >= 30]
    files['EXERCISES.md'] = without_teachers_notes(files['EXERCISES.md'].decode()).encode()
    for path, data in files.items():  # no blanked line may be readable anywhere else
        if path.endswith(('.py', '.md', '.txt')):
            text = data.decode(errors='replace')
            for number, where, line in solutions:
                if line in text:
                    sys.exit(f"error: a line of {where} (exercise {number}) is also in {path}: "
                             f"{line!r}; reword one of them, or the handout gives it away")
    for path, data in files.items():
        os.makedirs(os.path.join(out, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(out, path), 'wb') as f:
            f.write(data)
    blanked = sum(len(ex['implement']) for ex in EXERCISES if ex['number'] not in keep)
    print(f"wrote {len(files)} files to {out}: {blanked} function(s) blanked"
          + (f", exercises {', '.join(map(str, sorted(keep)))} left written" if keep else ""))


def first_failure(output):
    """The first failed test and why, from pytest's short summary (or its last line)."""
    for line in output.splitlines():
        if line.startswith(('FAILED ', 'ERROR ')):
            return line if len(line) < 160 else line[:157] + '...'
    lines = output.strip().splitlines()
    return lines[-1] if lines else ''


def check(ex, work):
    """Runs an exercise's Check in work, with one thread: (passed, why not, seconds)."""
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, *shlex.split(ex['check'])[1:], '-p', 'no:cacheprovider'],
                           cwd=work, capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, COLUMNS='1000', OMP_NUM_THREADS='1'))
        ok, why = p.returncode == 0, first_failure(p.stdout + p.stderr)
    except subprocess.TimeoutExpired:
        ok, why = False, 'over the minute a Check may take'
    return ok, why, time.time() - t0


def grade(student):
    """Every exercise's Check on a copy of student with this repository's tests, two at a time:
    a line each."""
    if not os.path.isdir(student):
        sys.exit(f"error: {student} is not a folder; pass the folder a handout was written to")
    passed = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, 'work')
        for path in repository_files(student):
            os.makedirs(os.path.join(work, os.path.dirname(path)), exist_ok=True)
            shutil.copy(os.path.join(student, path), os.path.join(work, path))
        for name in TESTS:
            source, dest = os.path.join(HERE, name), os.path.join(work, name)
            if os.path.isdir(source):
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(source, dest, ignore=shutil.ignore_patterns('__pycache__'))
            else:
                shutil.copy(source, dest)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for ex, (ok, why, seconds) in zip(EXERCISES, pool.map(check, EXERCISES,
                                                                   [work] * len(EXERCISES))):
                passed += ok
                print(f"{ex['number']:>3}  {ex['title']:<44} {'pass' if ok else 'FAIL'} "
                      f"{seconds:5.1f}s" + ('' if ok else f"  {why}"), flush=True)
    print(f"{passed} of {len(EXERCISES)} exercises pass")
    return passed == len(EXERCISES)


EXERCISES = exercises()
if mode == 'handout':
    if solved and only:
        sys.exit("error: --solved and --only: give one of them")
    every = {ex['number'] for ex in EXERCISES}
    handout(folder, every - chosen(only) if only else chosen(solved, with_needs=True))
else:
    sys.exit(0 if grade(folder) else 1)
