"""Output folders never cost a user data: protected folders, --overwrite of foreign folders, inputs as outputs,
concurrent runs, interrupted runs (SIGTERM, kill -9) and the stale folders they leave."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB
from test_cli import assert_clean_failure, run

from factorconv.errors import FactorConvError
from factorconv.output_folder import output_lock, publish, staging_folder


def leftovers(parent: Path, name: str) -> list[str]:
    """Hidden partial folders and locks of OUT=parent/name."""
    return sorted(p.name for p in parent.glob(f".{name}.*"))


def test_current_home_and_root_folders_are_refused(source_dirs, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    for output in (".", str(work), "..", "/"):
        result = run("convert", source_dirs["llama_gqa"], output, "--overwrite")
        assert_clean_failure(result, None, "pass a new folder")
    assert (work / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in work.iterdir()) == ["precious.txt"]


def test_the_source_is_never_an_output(converted, tmp_path):
    source = converted("llama_gqa")  # a factorconv folder, so --overwrite alone would not protect it
    before = sorted(p.name for p in source.iterdir())
    for output in (source, source / "inside"):
        assert_clean_failure(run("convert", source, output, "--overwrite"), None, "would overwrite the input")
    assert sorted(p.name for p in source.iterdir()) == before


def test_overwrite_replaces_only_factorconv_outputs(source_dirs, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    result = run("convert", source_dirs["llama_gqa"], foreign, "--overwrite")
    assert_clean_failure(result, None, "not a factorconv output")
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]
    assert leftovers(tmp_path, "photos") == []

    out = tmp_path / "model"
    assert run("convert", source_dirs["llama_gqa"], out).exit_code == 0
    first = (out / "config.json").stat().st_mtime_ns
    assert run("convert", source_dirs["llama_gqa"], out, "--rank-k", "1", "--overwrite").exit_code == 0
    assert (out / "config.json").stat().st_mtime_ns != first
    assert leftovers(tmp_path, "model") == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("convert", source_dirs["llama_gqa"], empty).exit_code == 0  # an empty folder is no one's data


def test_links_and_files_in_the_way_are_refused_before_work(source_dirs, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert_clean_failure(run("convert", source_dirs["llama_gqa"], link, "--overwrite"), None, "symbolic link")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_failure(run("convert", source_dirs["llama_gqa"], blocker / "out"), None, "parent of output")
    assert_clean_failure(run("convert", source_dirs["llama_gqa"], blocker, "--overwrite"), None, "is a file")


def test_live_lock_refuses_and_dead_lock_and_stale_partials_are_cleaned(source_dirs, tmp_path, caplog):
    out = tmp_path / "model"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".model.lock").write_text(str(holder.pid))
        result = run("convert", source_dirs["llama_gqa"], out)
        assert_clean_failure(result, None, f"another factorconv run (pid {holder.pid})")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock and the half-written folders of dead runs are taken over and removed.
    stale = tmp_path / ".model.partial-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    result = run("convert", source_dirs["llama_gqa"], out)
    assert result.exit_code == 0, result.output
    assert "removed 1 unfinished folder" in result.output + caplog.text
    assert leftovers(tmp_path, "model") == []
    assert (out / "config.json").is_file()


def test_an_output_that_appears_meanwhile_is_kept(tmp_path):
    out = tmp_path / "model"
    with output_lock(out):
        staging = staging_folder(out)
        (staging / "config.json").write_text('{"model_type": "factorconv"}')
        out.mkdir()
        (out / "other.txt").write_text("written by someone else meanwhile")
        with pytest.raises(FactorConvError, match="appeared while converting"):
            publish(staging, out, overwrite=False)
        assert (out / "other.txt").is_file()
        (out / "config.json").write_text('{"model_type": "factorconv"}')
        publish(staging, out, overwrite=True)  # a factorconv output, replaced whole
    assert not (out / "other.txt").exists()
    assert leftovers(tmp_path, "model") == []


def _slow_convert(source: Path, out: Path, calib: Path) -> subprocess.Popen:
    """A convert that spends seconds in refinement, so it can be interrupted while its staging folder exists."""
    command = [sys.executable, "-m", "factorconv", "-q", "convert", str(source), str(out), "--to", "mfa",
               "--kv-budget", "0.5", "--calib", str(calib), "--calib-samples", "8", "--calib-seq-len", "64",
               "--refine-steps", "4000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_staging(parent: Path, name: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not list(parent.glob(f".{name}.partial-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.05)


@pytest.fixture
def calib_tokens(tmp_path) -> Path:
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(0).integers(3, VOCAB, size=8 * 64, dtype=np.int64))
    return path


@pytest.mark.slow
def test_sigterm_and_kill_during_convert(source_dirs, tmp_path, calib_tokens):
    out = tmp_path / "model"
    # SIGTERM unwinds like Ctrl-C: nothing is left, neither OUT nor its staging folder nor the lock.
    proc = _slow_convert(source_dirs["llama_gqa"], out, calib_tokens)
    _wait_for_staging(tmp_path, "model", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert not out.exists() and leftovers(tmp_path, "model") == []
    # kill -9 leaves its staging folder and lock; the next run takes both over and finishes.
    proc = _slow_convert(source_dirs["llama_gqa"], out, calib_tokens)
    _wait_for_staging(tmp_path, "model", proc)
    proc.kill()
    proc.wait()
    assert not out.exists() and len(leftovers(tmp_path, "model")) == 2
    result = run("convert", source_dirs["llama_gqa"], out, "--rank-k", "1")
    assert result.exit_code == 0, result.output
    assert leftovers(tmp_path, "model") == [] and (out / "config.json").is_file()


@pytest.mark.slow
def test_two_concurrent_converts_to_one_output(source_dirs, tmp_path, calib_tokens):
    out = tmp_path / "model"
    first = _slow_convert(source_dirs["llama_gqa"], out, calib_tokens)
    _wait_for_staging(tmp_path, "model", first)
    second = _slow_convert(source_dirs["llama_gqa"], out, calib_tokens)
    _, second_err = second.communicate(timeout=300)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode != 0
    lines = [line for line in second_err.splitlines() if line.strip()]
    assert len(lines) == 1 and "another factorconv run" in lines[0], second_err
    assert leftovers(tmp_path, "model") == [] and (out / "config.json").is_file()


@pytest.mark.parametrize("where", ["shard", "lock"])
def test_disk_full_or_read_only_output(source_dirs, tmp_path, monkeypatch, where):
    """A write that fails (disk full while writing shards, read-only folder for the lock): one line, no debris."""
    import errno

    import factorconv.convert.writer as writer
    import factorconv.output_folder as output_folder

    if where == "shard":
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(writer, "save_file", full)
        needle = "No space left on device"
    else:
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(output_folder.os, "open", read_only)
        needle = "Read-only file system"
    result = run("convert", source_dirs["llama_gqa"], tmp_path / "model")
    assert_clean_failure(result, tmp_path, needle, "writable output path")


def _finetune(model: Path, out: Path, data: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "factorconv", "-q", "finetune", str(model), str(out), "--data", str(data),
               "--steps", "300", "--save-every", "25", "--seq-len", "32", "--batch-size", "2", "--lr", "3e-3", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
def test_interrupted_finetune_resumes_bit_identical(converted, tmp_path, how):
    """Killed at a random point after its first checkpoint: nothing half-written counts, --resume ends where an
    uninterrupted run ends, bit for bit."""
    from safetensors.torch import load_file

    model = converted("llama_gqa", rank_k=1, rank_v=1)
    data = tmp_path / "tokens.npy"
    np.save(data, np.random.default_rng(1).integers(3, VOCAB, size=4096, dtype=np.int64))
    straight = _finetune(model, tmp_path / "straight", data)
    interrupted = _finetune(model, tmp_path / "interrupted", data)
    checkpoints = tmp_path / "interrupted" / ".checkpoints"
    deadline = time.monotonic() + 120
    while not any(checkpoints.glob("step-*")):
        assert interrupted.poll() is None, interrupted.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    if how == "SIGTERM":
        interrupted.send_signal(signal.SIGTERM)
    else:
        interrupted.kill()
    _, stderr = interrupted.communicate(timeout=120)
    assert interrupted.returncode != 0 and "Traceback" not in stderr, stderr
    assert not (tmp_path / "interrupted" / "model.safetensors").exists()  # not taken as a finished model
    resumed = _finetune(model, tmp_path / "interrupted", data, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    assert straight.wait(timeout=300) == 0, straight.communicate()
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "interrupted" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_signal_that_a_library_turns_into_its_own_error_still_unwinds_as_an_interruption():
    """safetensors turns an interrupt raised while it builds a tensor into a ValueError (seen in CI); once SIGTERM
    has arrived, the block still ends as KeyboardInterrupt, which the CLI reports in one line."""
    from factorconv.output_folder import sigterm_as_interrupt

    def library_call():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with sigterm_as_interrupt():
            library_call()
    with pytest.raises(ValueError):  # without a signal, errors stay what they are
        with sigterm_as_interrupt():
            raise ValueError("plain")
