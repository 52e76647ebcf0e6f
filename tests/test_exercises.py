"""EXERCISES.md is gradable: each exercise's Check command fails, within a minute, when the
functions on its Implement line have their bodies replaced by `raise NotImplementedError`
(docstrings kept), and passes with them in place. Run on a copy of the scripts and tests."""

import ast
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def exercises():
    with open(os.path.join(ROOT, "EXERCISES.md")) as f:
        text = f.read()
    implements = re.findall(r"^Implement: (.+)$", text, re.M)
    checks = re.findall(r"^Check: (.+)$", text, re.M)
    assert len(implements) == len(checks) == len(re.findall(r"^## ", text, re.M))
    return list(zip(implements, checks))


def blank(source, qualname):
    """source with the body of qualname (a function, or Class.method) replaced by
    `raise NotImplementedError`, its docstring kept."""
    node = ast.parse(source)
    for name in qualname.split("."):
        node = next(n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                    and n.name == name)
    body = node.body
    documented = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    code = body[1:] if documented else body
    lines = source.split("\n")
    lines[code[0].lineno - 1:code[-1].end_lineno] = [" " * code[0].col_offset
                                                      + "raise NotImplementedError"]
    return "\n".join(lines)


def check(command, cwd):
    """The Check command, as a student runs it, in cwd; its exit code (None: over a minute)."""
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "pytest"]
    try:
        return subprocess.run([sys.executable, *args[1:], "-p", "no:cacheprovider"], cwd=cwd,
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    except subprocess.TimeoutExpired:
        return None


def test_exercises_name_functions_that_exist():
    for implement, command in exercises():
        for target in implement.split(", "):
            path, qualname = target.split("::")
            with open(os.path.join(ROOT, path)) as f:
                blank(f.read(), qualname)  # finds it
        assert command.startswith("python -m pytest -q tests/")


@pytest.mark.slow
@pytest.mark.parametrize("number", range(1, len(exercises()) + 1))
def test_exercise_check_fails_when_blanked_and_passes_when_whole(tmp_path, number):
    implement, command = exercises()[number - 1]
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py")):
        dest = tmp_path / os.path.relpath(path, ROOT)
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(path, dest)
    assert check(command, tmp_path) == 0, "the Check fails with the functions in place"
    for target in implement.split(", "):
        path, qualname = target.split("::")
        (tmp_path / path).write_text(blank((tmp_path / path).read_text(), qualname))
    assert check(command, tmp_path) not in (0, None), "blanked, the Check must fail within 60 s"
