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
