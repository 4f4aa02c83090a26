"""Run a test module again in a child pytest with Triton's CPU interpreter on.

TRITON_INTERPRET=1 must be set before triton is imported, and a kernel compiled under it stays interpreted
for the whole process, so the kernel tests (test_fused, test_decode_kernel, test_kernels_engine) re-run
themselves in a child with the variable set (and a flag of their own that selects the child's tests)."""

import os
import subprocess
import sys


def run_in_interpreter(test_file: str, flag: str, *options: str) -> subprocess.CompletedProcess:
    """``pytest -q [options] test_file`` in a child with TRITON_INTERPRET=1 and ``flag``=1; its output captured."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{flag: "1"})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options, os.path.abspath(test_file)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def assert_passes_in_interpreter(test_file: str, flag: str, *options: str) -> None:
    """The child run of ``test_file`` (:func:`run_in_interpreter`) ends well, with tests passed and none failed."""
    result = run_in_interpreter(test_file, flag, *options)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
