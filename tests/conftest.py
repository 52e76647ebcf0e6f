"""Two tiers of tests. `python -m pytest -q` is the fast loop, a few minutes on a laptop's CPU:
every module's behaviour, tiny models, few subprocesses. `python -m pytest -q --runslow` adds
the end-to-end scenarios marked slow (train.py runs, two nodes, the experiment, compile, the
bad-input sweep); CI runs that."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end scenario, run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="slow: python -m pytest --runslow runs it"))
