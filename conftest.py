"""Test markers. `pytest -q -m "not slow"`: the specification of the method, seconds. `pytest -q -n 2`: everything on
CPU (end-to-end runs, fault injection, two processes), in two workers of one thread each. `pytest -m cuda -q`: the GPU
acceptance tests, skipped without CUDA. `pytest -m experiment`: whole experiments at toy scale (minutes), skipped
otherwise (CI runs the method and the bookkeeping, not the experiments)."""
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: a core per worker, for its own work and the runs it starts
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run (seconds to minutes); deselect with -m 'not slow'")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "experiment: a whole experiment at toy scale (minutes); only with -m experiment")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_experiment = pytest.mark.skip(reason="a whole experiment at toy scale: pytest -m experiment")
    asked = "experiment" in (config.getoption("-m") or "")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "experiment" in item.keywords and not asked:
            item.add_marker(skip_experiment)
