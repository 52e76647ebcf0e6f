"""Two tiers of tests. `python -m pytest -q` is the fast loop, a few minutes on a laptop's CPU:
test_model.py (the model's tests) and every module's behaviour in tests/, tiny models, few
subprocesses. `python -m pytest -q --runslow` adds the end-to-end scenarios marked slow (train.py
runs, two nodes, the experiment, compile, the bad-input sweep, the course kit); CI runs that.
The markers of EXERCISES.md's exercises are registered here."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # the scripts


def files_in_the_repository():
    return {os.path.join(d, f) for d, dirs, files in os.walk(ROOT) for f in files
            if not {'.git', '__pycache__', '.pytest_cache'} & set(d[len(ROOT):].split(os.sep))}


def pytest_sessionstart(session):
    session.files_before = files_in_the_repository()


def pytest_sessionfinish(session, exitstatus):
    """Tests write only under pytest's tmp_path: a file left in the repository fails the run.
    A folder holding a training run's lock at the start or the end is that run's (a student's
    Run beside a Check); a run removes its lock as it ends, so a test's finished run is caught."""
    now = files_in_the_repository()
    busy = {os.path.dirname(f) for f in now | session.files_before if os.path.basename(f) == '.train.lock'}
    new = {f for f in now - session.files_before if os.path.dirname(f) not in busy}
    if new:
        print(f"\nerror: the tests wrote into the repository: {sorted(new)[:5]}", file=sys.stderr)
        session.exitstatus = 1


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow")


EXERCISES = ("block", "gate", "key_bias", "attention", "regularizer", "update", "rule",
             "packed_rows")  # EXERCISES.md's Checks, in order


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end scenario, run with --runslow")
    for name in EXERCISES:
        config.addinivalue_line("markers", f"{name}: a test of the exercise of EXERCISES.md whose "
                                           f"Check selects it with -m {name}")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="slow: python -m pytest --runslow runs it"))
