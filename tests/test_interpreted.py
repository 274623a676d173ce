"""Runs tests/interpreted (the Triton kernels under triton's CPU interpreter) in a process of its
own, with TRITON_INTERPRET=1 and REVPASS_KERNELS=triton: triton reads TRITON_INTERPRET when a
kernel is defined, so this process, which may have defined them already, cannot."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", REVPASS_KERNELS="triton")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           os.path.join(HERE, "interpreted")], env=env, cwd=os.path.dirname(HERE),
                          capture_output=True, text=True, timeout=1800)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
