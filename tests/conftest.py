import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from hypothesis import settings  # noqa: E402

# CI runs the same examples every time (a failure reproduces); HYPOTHESIS_PROFILE=explore searches anew
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# tests/interpreted runs the Triton kernels in triton's CPU interpreter, which must be switched on
# before a kernel is defined: tests/test_interpreted.py runs it in a process of its own
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpreted"]

# `make test` runs the suite in a worker process per core (pytest-xdist): each worker's torch
# threads, and those of the processes a test starts, are its share of the cores this process may
# run on (as xdist counts them: a container can see more than it is given), so that the workers
# do not fight over them
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _share = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = _share
    import torch  # noqa: E402

    torch.set_num_threads(int(_share))


def pytest_collection_modifyitems(config, items):
    """The Triton interpreter's run (a pytest process of its own, minutes long) first: started
    last, the other worker would wait for it at the end."""
    items.sort(key=lambda item: item.nodeid != "tests/test_interpreted.py::test_kernels_under_the_interpreter")
