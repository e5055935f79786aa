"""What CI relies on to report honestly: `@pytest.mark.real(paths)` skips without ../shared/real but fails when
FACTORCONV_REQUIRE_REAL is set (as .ci/run sets it where the folder exists), and .ci/skips.py lists the GPU skips
by test id and counts the others by reason."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SKIPS = TESTS.parent / ".ci" / "skips.py"

INNER = '''
from pathlib import Path

import pytest
from conftest import REAL

@pytest.mark.real(REAL / "no-such-file.txt")
def test_needs_a_missing_file():
    pass

@pytest.mark.real(Path(__file__))  # present wherever the suite runs, ../shared beside the clone or not
def test_needs_a_present_file():
    pass

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_on_a_gpu():
    pass

@pytest.mark.skipif(True, reason="needs a machine without CUDA")
def test_without_cuda():
    pass
'''


def run_inner(folder: Path, require: bool) -> tuple[subprocess.CompletedProcess, Path]:
    """pytest on INNER with this suite's conftest as a plugin; returns the run and its JUnit report."""
    (folder / "test_inner.py").write_text(INNER)
    report = folder / f"report-{require}.xml"
    env = {k: v for k, v in os.environ.items() if k != "FACTORCONV_REQUIRE_REAL"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    if require:
        env["FACTORCONV_REQUIRE_REAL"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "--rootdir", str(folder),
         f"--junitxml={report}", "-W", "ignore::pytest.PytestUnknownMarkWarning", "test_inner.py"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )
    return result, report


def test_real_mark_skips_without_the_files_and_fails_when_required(tmp_path):
    relaxed, report = run_inner(tmp_path, require=False)
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert "1 passed, 3 skipped" in relaxed.stdout
    required, _ = run_inner(tmp_path, require=True)
    assert required.returncode == 1, required.stdout + required.stderr
    assert "no-such-file.txt is absent, and FACTORCONV_REQUIRE_REAL is set" in required.stdout
    assert "1 passed, 2 skipped, 1 error" in required.stdout

    summary = subprocess.run([sys.executable, str(SKIPS), str(report)], cwd=tmp_path, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert summary[:2] == [
        "skipped because they need a GPU: 1 tests:",
        "  test_inner.py::test_on_a_gpu  (needs a CUDA device)",
    ]
    # "without CUDA" names CUDA but skips where there is one: not a GPU test.
    missing = [line for line in summary[3:] if "no-such-file.txt" in line]
    assert summary[2] == "other skips: 2, by reason:" and len(summary) == 5
    assert "     1  needs a machine without CUDA" in summary[3:]
    assert len(missing) == 1 and missing[0].startswith("     1  needs ../shared/real: ")
