"""
The course kit: EXERCISES.md sets the exercises, and this makes a student's copy of the
repository with their functions blanked, grades students' copies, or prints the teacher's key.

    python course.py handout DIR               # this repository in DIR (a new folder), every
                                               # exercise's functions blanked
    python course.py handout DIR --solved=1,4  # ... but exercises 1 and 4, and what they need,
                                               # left written (to start a class further on)
    python course.py handout DIR --only=8      # only exercise 8 blanked (one for homework)
    python course.py grade DIR                 # every exercise's Check on DIR, a line each
    python course.py grade DIR --results=FILE  # ... and Gradescope's results.json in FILE
    python course.py grade DIR1 DIR2 ... --csv=FILE   # many students: a table, and a CSV
    python course.py key 3                     # exercise 3's functions as this repository has them

A blanked function keeps its signature and docstring, and its body becomes a `raise
NotImplementedError` that names the function and its exercise. The handout has no .git, none of
EXERCISES.md's teacher's notes (its "Rubric:" paragraphs), and no run of code from a blanked
body anywhere else in it: handout checks that before it writes anything.

grade trusts nothing of DIR but the bodies of the exercise functions. It puts each into a fresh
copy of this repository, in place of this repository's body, and runs this repository's Checks
there with its own tests and settings; nothing else of DIR is read (no pytest.ini, conftest.py,
plugin, test or helper of the student's). A body that imports, reaches a module's private or
system parts (names that begin with _, `sys`, `os`, `getattr`, ...), or changes anything but its
own arguments and locals is refused with a line that says what it used. Checks run two at a
time, each with one thread and a minute at most; the exit status is 0 only when all pass.
"""
import ast
import concurrent.futures
import csv as csv_files
import inspect
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tokenize

from configurator import configure, joined

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ('handout', 'grade', 'key')
FIELDS = ('Goal', 'Time', 'Points', 'Needs', 'Implement', 'Check', 'Run', 'Prints')
BLANK = 'raise NotImplementedError("{where} is not written yet: exercise {number}")'
# settings
solved = ''              # handout: exercises to leave written, e.g. '1,4' (with what they need)
only = ''                # handout: the exercises to blank, e.g. '8' ('': all but the solved ones)
results = ''             # grade: write Gradescope's results.json here (one DIR)
csv = ''                 # grade: write a row per DIR here (exercise points and the total)
# end of settings
argv = joined(sys.argv[1:], globals())
positional = [a for a in argv if not a.startswith('-')]
configure(globals(), [a for a in argv if a.startswith('-')])
if len(positional) < 2 or positional[0] not in MODES or (positional[0] != 'grade'
                                                         and len(positional) != 2):
    sys.exit("error: usage: python course.py handout DIR [--solved=1,2 | --only=3] | python "
             "course.py grade DIR [DIR ...] [--results=FILE] [--csv=FILE] | python course.py key N")
mode, folders = positional[0], positional[1:]


def exercises(path=os.path.join(HERE, 'EXERCISES.md')):
    """EXERCISES.md's exercises in order: dicts of number, title and the fields (Implement as
    (file, function) pairs, Needs as numbers, Points as a number)."""
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
        ex['points'] = int(ex['points'])
        found.append(ex)
    return found


def chosen(text, with_needs=False):
    """The exercise numbers in text ('1,4'), and with_needs those of every exercise they need."""
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


# --------------------------------------------------------------- functions and their bodies

def function_node(tree, qualname):
    """The ast node of qualname, a function or Class.method, in the module tree, or None."""
    node = tree
    for name in qualname.split('.'):
        node = next((n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == name), None)
        if node is None:
            return None
    return node


def documented(node):
    return isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)


def body_lines(node):
    """Where a function's body begins and ends (0-based lines, end excluded), after its
    docstring, and the indentation of its first statement; None if it has no body but that."""
    statements = node.body[1:] if documented(node) else node.body
    if not statements:
        return None
    start = node.body[0].end_lineno if documented(node) else statements[0].lineno - 1
    return start, node.end_lineno, statements[0].col_offset  # comments before it go too


def body_of(source, qualname):
    """The body of qualname in source, dedented, and its statements; None if it has none."""
    node = function_node(ast.parse(source), qualname)
    span = body_lines(node)
    if span is None:
        return None
    start, end, _ = span
    body = textwrap.dedent('\n'.join(source.split('\n')[start:end]))
    return body, node.body[1:] if documented(node) else node.body


def with_body(source, qualname, body):
    """source with the body of qualname replaced by body (dedented text)."""
    node = function_node(ast.parse(source), qualname)
    start, end, indent = body_lines(node)
    lines = source.split('\n')
    lines[start:end] = textwrap.indent(body, ' ' * indent).split('\n')
    return '\n'.join(lines)


def blank_line(number, where):
    return BLANK.format(where=where, number=number)


# ------------------------------------------------------------------------------- the handout

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


RUN = 16  # tokens in a row of a blanked body that would give it away


def code_tokens(code):
    """code's tokens, without comments and layout."""
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER)
    lines = iter(code.splitlines(keepends=True))
    return [t.string for t in tokenize.generate_tokens(lambda: next(lines, ''))
            if t.type not in skip]


def runs_of(words):
    return {tuple(words[i:i + RUN]) for i in range(len(words) - RUN + 1)}


def handout(out, keep):
    """A student's copy of this repository in out: the exercises not in keep blanked."""
    if os.path.exists(out) and os.listdir(out):
        sys.exit(f"error: {out} is not empty; the handout goes into a new folder")
    files = {p: open(os.path.join(HERE, p), 'rb').read() for p in repository_files(HERE)}
    solutions = {}  # a run of RUN tokens of a blanked body: (exercise, file::function)
    for ex in EXERCISES:
        if ex['number'] in keep:
            continue
        for path, qualname in ex['implement']:
            where = f"{path}::{qualname}"
            body, _ = body_of(files[path].decode(), qualname)
            files[path] = with_body(files[path].decode(), qualname,
                                    blank_line(ex['number'], where)).encode()
            solutions.update(dict.fromkeys(runs_of(code_tokens(body)), (ex['number'], where)))
    files['EXERCISES.md'] = without_teachers_notes(files['EXERCISES.md'].decode()).encode()
    for path, data in files.items():  # no run of a blanked body may be readable anywhere else
        if path.endswith(('.py', '.md', '.txt')) and len(data) < 500_000:
            words = re.findall(r'\w+|[^\w\s]', data.decode(errors='replace'))
            for run in runs_of(words) & solutions.keys():
                number, where = solutions[run]
                sys.exit(f"error: code of {where} (exercise {number}) is also in {path}: "
                         f"{' '.join(run)!r}; reword one of them, or the handout gives it away")
    for path, data in files.items():
        os.makedirs(os.path.join(out, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(out, path), 'wb') as f:
            f.write(data)
    blanked = sum(len(ex['implement']) for ex in EXERCISES if ex['number'] not in keep)
    print(f"wrote {len(files)} files to {out}: {blanked} function(s) blanked"
          + (f", exercises {', '.join(map(str, sorted(keep)))} left written" if keep else ""))


# ---------------------------------------------------------------------------------- grading

def private_parts():
    """Attribute names an exercise body may not use: modules reachable from torch, nn, F,
    math and functools (sys, os, testing, ...; not nn, F, linalg and their like), and what loads
    code or reaches a frame."""
    import functools
    import torch
    names = {k for m in (torch, torch.nn, torch.nn.functional, math, functools, torch.Tensor)
             for k, v in vars(m).items() if inspect.ismodule(v)}
    names -= {'nn', 'functional', 'linalg', 'fft', 'special', 'grad', 'math', 'random', 'init'}
    return names | {'ops', 'load', 'load_library', 'save', 'system', 'popen', 'modules',
                    'f_globals', 'f_locals', 'f_back', 'tb_frame', 'tb_next', 'gi_frame'}


NOT_ALLOWED = {'exec', 'eval', 'compile', 'globals', 'locals', 'vars', 'getattr', 'setattr',
               'delattr', 'open', 'breakpoint', 'input', 'exit', 'quit', 'help', 'memoryview'}


def refusal(statements, params, private):
    """Why an exercise body (its ast statements; params, its arguments) may not be graded, or
    None: it must compute from its arguments, torch and the module's functions, and change
    nothing but its arguments and its own values."""
    for node in (n for s in statements for n in ast.walk(s)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return "imports a module"
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            return f"declares {type(node).__name__.lower()} {', '.join(node.names)}"
        if isinstance(node, ast.Name) and (node.id in NOT_ALLOWED or node.id.startswith('__')):
            return f"uses {node.id}"
        if isinstance(node, ast.Attribute) and (node.attr.startswith('_') or node.attr in private):
            return f"uses {ast.unparse(node)}"
        targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in targets:
            root, attribute = target, False
            while isinstance(root, (ast.Attribute, ast.Subscript)):
                attribute |= isinstance(root, ast.Attribute)
                root = root.value
            if root is not target and not (isinstance(root, ast.Name) and (
                    root.id in params or not attribute and not is_global(root.id, statements))):
                return f"changes {ast.unparse(target)}, which is not its own"
    return None


def is_global(name, statements):
    """Whether name is read but never bound in the body (so it is the module's, or a builtin)."""
    bound = {n.id for s in statements for n in ast.walk(s)
             if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return name not in bound


def student_bodies(student, private):
    """Each exercise function's body in the student's folder, or why it cannot be graded:
    {(file, qualname): (body text, None) or (None, why)}."""
    found = {}
    for ex in EXERCISES:
        for path, qualname in ex['implement']:
            where = f"{path}::{qualname}"
            try:
                with open(os.path.join(student, path)) as f:
                    source = f.read()
                tree = ast.parse(source)
            except (OSError, UnicodeDecodeError) as e:
                found[path, qualname] = None, f"{path} cannot be read: {e}"
                continue
            except SyntaxError as e:
                found[path, qualname] = None, f"{path} does not parse: {e.msg} (line {e.lineno})"
                continue
            node = function_node(tree, qualname)
            got = body_of(source, qualname) if node is not None else None
            if node is None or got is None:
                found[path, qualname] = None, f"{where} is not there, or has no body"
                continue
            body, statements = got
            blank = (len(statements) == 1 and isinstance(statements[0], ast.Raise)
                     and 'NotImplementedError' in ast.unparse(statements[0]))
            params = {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
            refused = refusal(statements, params, private)
            why = (f"{where} is not written yet: exercise {ex['number']}" if blank else
                   refused and f"{where} {refused}: not allowed in an exercise function")
            found[path, qualname] = (None, why) if why else (body, None)
    return found


def first_failure(output):
    """The first failed test and why, from pytest's short summary (or its last line)."""
    for line in output.splitlines():
        if line.startswith(('FAILED ', 'ERROR ')):
            return line if len(line) < 200 else line[:197] + '...'
    lines = output.strip().splitlines()
    return lines[-1] if lines else ''


def check(ex, work):
    """Runs an exercise's Check in work, with one thread: (passed, why not, seconds)."""
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, *shlex.split(ex['check'])[1:], '-p',
                            'no:cacheprovider'], cwd=work, capture_output=True, text=True,
                           timeout=60, env=dict(os.environ, COLUMNS='1000', OMP_NUM_THREADS='1'))
        ok, why = p.returncode == 0, first_failure(p.stdout + p.stderr)
    except subprocess.TimeoutExpired:
        ok, why = False, 'over the minute a Check may take'
    return ok, why, time.time() - t0


def grade_one(student, private):
    """Every exercise's result on the student's folder: (exercise, passed, why not, seconds)."""
    bodies = student_bodies(student, private)
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, 'work')
        for path in repository_files(HERE):  # a fresh copy of this repository
            os.makedirs(os.path.join(work, os.path.dirname(path)), exist_ok=True)
            shutil.copy(os.path.join(HERE, path), os.path.join(work, path))
        for (path, qualname), (body, why) in bodies.items():
            if body is None:
                continue
            with open(os.path.join(work, path)) as f:
                source = with_body(f.read(), qualname, body)
            with open(os.path.join(work, path), 'w') as f:
                f.write(source)
        verdicts = {}
        for ex in EXERCISES:  # a body that cannot be graded fails its exercise without a Check
            why = next((bodies[f][1] for f in ex['implement'] if bodies[f][1]), None)
            verdicts[ex['number']] = (False, why, 0.0) if why else None
        todo = [ex for ex in EXERCISES if verdicts[ex['number']] is None]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for ex, verdict in zip(todo, pool.map(check, todo, [work] * len(todo))):
                verdicts[ex['number']] = verdict
    return [(ex, *verdicts[ex['number']]) for ex in EXERCISES]


def gradescope(graded):
    """Gradescope's results.json of one student's grade."""
    tests = [{'name': f"{ex['number']}. {ex['title']}", 'score': ex['points'] if ok else 0,
              'max_score': ex['points'], 'output': 'pass' if ok else why}
             for ex, ok, why, _ in graded]
    return {'score': sum(t['score'] for t in tests), 'tests': tests}


def grade(students):
    """Grades each folder; one folder gets a line per exercise, several a row each."""
    for student in students:
        if not os.path.isdir(student):
            sys.exit(f"error: {student} is not a folder; pass the folder a handout was written to")
    if results and len(students) > 1:
        sys.exit("error: --results writes one student's results.json: give one DIR (--csv takes "
                 "many)")
    private, rows, every_pass = private_parts(), [], True
    total = sum(ex['points'] for ex in EXERCISES)
    if len(students) > 1:
        print(f"{'student':<30}" + ''.join(f" {ex['number']:>3}" for ex in EXERCISES) +
              f"  points (of {total})")
    for student in students:
        graded = grade_one(student, private)
        score = gradescope(graded)['score']
        every_pass &= all(ok for _, ok, _, _ in graded)
        rows.append([student, *[ex['points'] if ok else 0 for ex, ok, _, _ in graded], score])
        if len(students) > 1:
            print(f"{student[-30:]:<30}" + ''.join(f" {p:>3}" for p in rows[-1][1:-1]) +
                  f"  {score}", flush=True)
            continue
        for ex, ok, why, seconds in graded:
            print(f"{ex['number']:>3}  {ex['title']:<48} {'pass' if ok else 'FAIL'} "
                  f"{seconds:5.1f}s" + ('' if ok else f"  {why}"), flush=True)
        passed = sum(ok for _, ok, _, _ in graded)
        print(f"{passed} of {len(EXERCISES)} exercises pass: {score} of {total} points")
        if results:
            with open(results, 'w') as f:
                json.dump(gradescope(graded), f, indent=1)
    if csv:
        with open(csv, 'w', newline='') as f:
            out = csv_files.writer(f)
            out.writerow(['student', *[f"exercise {ex['number']}" for ex in EXERCISES], 'points'])
            out.writerows(rows)
    return every_pass


def key(number):
    """Exercise number's functions, whole, as this repository has them."""
    ex = next((e for e in EXERCISES if e['number'] == number), None)
    if ex is None:
        sys.exit(f"error: there is no exercise {number} in EXERCISES.md")
    print(f"# exercise {number}. {ex['title']}")
    for path, qualname in ex['implement']:
        with open(os.path.join(HERE, path)) as f:
            source = f.read()
        node = function_node(ast.parse(source), qualname)
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        print(f"\n# {path}::{qualname}\n" +
              textwrap.dedent('\n'.join(source.split('\n')[start:node.end_lineno])))


EXERCISES = exercises()
if mode == 'handout':
    if solved and only:
        sys.exit("error: --solved and --only: give one of them")
    every = {ex['number'] for ex in EXERCISES}
    handout(folders[0], every - chosen(only) if only else chosen(solved, with_needs=True))
elif mode == 'key':
    key(int(folders[0]) if folders[0].isdigit() else -1)
else:
    sys.exit(0 if grade(folders) else 1)
