"""transformers' own generic model tests (ModelTesterMixin), taken from the installed release's sdist.

The sdist on PyPI ships the top-level `tests/test_modeling_common.py` but not the folders it imports
(`tests/generation/`, `tests/exporters/`), so those two mixins are replaced by empty ones: generation is
covered by our own tests (test_cache.py, test_generation.py). Nothing is copied into this repository: the
sdist is fetched with pip (honouring the user's index settings) into a cache folder on first use.
"""

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import transformers

STUBS = {
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
}


def suite_folder() -> Path:
    """Where the extracted test files of the installed transformers release live."""
    root = os.environ.get("FACTORCONV_HF_TESTS") or Path.home() / ".cache" / "factorconv" / "transformers-tests"
    return Path(root) / transformers.__version__


def fetch_suite() -> Path:
    """Download the installed release's sdist once and unpack `tests/test_modeling_common.py` as a package."""
    folder = suite_folder()
    package = folder / "hf_tests"
    if (package / "test_modeling_common.py").is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        command += [f"transformers=={transformers.__version__}", "--dest", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip download of the transformers sdist failed: {done.stderr.strip()[-300:]}")
        (archive,) = Path(tmp).glob("transformers-*.tar.gz")
        with tarfile.open(archive) as tar:
            member = tar.getmember(f"{archive.name.removesuffix('.tar.gz')}/tests/test_modeling_common.py")
            source = tar.extractfile(member).read()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent))
    (staging / "hf_tests").mkdir()
    (staging / "hf_tests" / "test_modeling_common.py").write_bytes(source)
    for name, text in {"__init__.py": "", **STUBS}.items():
        path = staging / "hf_tests" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    try:
        staging.rename(folder)
    except OSError:  # another process unpacked it first
        pass
    return folder


def load_modeling_common() -> ModuleType:
    """transformers' `tests/test_modeling_common.py` of the installed release, importable as hf_tests."""
    folder = fetch_suite()
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    from hf_tests import test_modeling_common

    return test_modeling_common
