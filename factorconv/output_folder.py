"""Output folders that never cost a user data: what may be replaced, one writer at a time, atomic publication.

Every command that writes a model folder (convert, finetune, run) checks its output here before any work,
writes into a hidden staging folder beside it while holding a lock, and publishes by rename. Nothing here
removes a folder that factorconv did not write.
"""

import json
import logging
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FactorConvError

logger = logging.getLogger("factorconv")

# Files of an output folder that several writers and readers name (each defined here once).
REPORT_FILE = "factorconv_report.json"  # what the conversion did, layer by layer
RECIPE_FILE = "factorconv_recipe.yaml"  # the options that produced the folder
EXPORT_FILE = "factorconv_export.json"  # an export's provenance; also marks the folder as factorconv's
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def is_factorconv_output(folder: Path) -> bool:
    """A folder factorconv wrote: a factorconv config.json (converted or fine-tuned), a fine-tuning run's files or
    an export (its factorconv_export.json)."""
    config = folder / "config.json"
    if config.is_file() and not (folder / EXPORT_FILE).is_file():
        try:
            return json.loads(config.read_text()).get("model_type") == "factorconv"
        except (OSError, ValueError):
            return False
    return (
        (folder / ".checkpoints").is_dir()
        or (folder / "finetune_metrics.jsonl").is_file()
        or (folder / EXPORT_FILE).is_file()
    )


def check_output(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse, before any work, an output that would destroy something or that exists without `overwrite`."""
    check_output_path(output, inputs)
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise FactorConvError(f"output folder {output} exists; pass --overwrite to replace it")
        refuse_foreign(output)


def refuse_foreign(output: Path) -> None:
    """`--overwrite` replaces only what factorconv wrote."""
    if output.is_dir() and any(output.iterdir()) and not is_factorconv_output(output):
        raise FactorConvError(
            f"output folder {output} is not a factorconv output, so --overwrite will not replace it; "
            "remove it yourself or pass another output"
        )


def check_output_path(output: Path, inputs: list[Path]) -> None:
    """Refuse outputs that are the current, home or root folder, an input (or inside one), a link or a file."""
    output = Path(output).expanduser()
    here = output.resolve()
    protected = {Path.cwd().resolve(): "the current folder", Path.home().resolve(): "your home folder"}
    protected[Path(here.anchor)] = "the filesystem root"
    if here in protected or here in Path.cwd().resolve().parents:
        name = protected.get(here, "a parent of the current folder")
        raise FactorConvError(f"output {output} is {name}; pass a new folder for the result, e.g. out/model")
    for folder in inputs:
        there = Path(folder).expanduser().resolve()
        if here == there or there in here.parents or here in there.parents:
            raise FactorConvError(f"output {output} would overwrite the input {folder}; pass another output")
    if output.is_symlink():
        raise FactorConvError(f"output {output} is a symbolic link; pass the folder it points to or another path")
    if output.exists() and not output.is_dir():
        raise FactorConvError(f"output {output} is a file, not a folder; pass another output path")
    if any(parent.exists() and not parent.is_dir() for parent in output.parents):
        raise FactorConvError(f"a parent of output {output} is a file; pass another output path")


def unwritable(output: Path, err: OSError) -> FactorConvError:
    """Disk full, read-only filesystem, no permission: one line naming the folder and the fix."""
    return FactorConvError(f"cannot write {output}: {err.strerror or err}; free space or pass a writable output path")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as someone else's process
        pass
    return True


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold `.OUT.lock` beside OUT for the whole run: a second run to the same OUT stops with one line.

    A lock whose process is gone (kill -9, OOM) is taken over; the staging folders of dead runs are removed.
    """
    output = Path(output).expanduser()
    lock = output.parent / f".{output.name}.lock"
    for _ in range(2):
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid) and pid != os.getpid():
                raise FactorConvError(
                    f"another factorconv run (pid {pid}) is writing {output}; wait for it or pass another output"
                ) from None
            lock.unlink(missing_ok=True)  # left by a run that died
            continue
        except OSError as err:
            raise unwritable(output, err) from None
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        break
    else:
        raise FactorConvError(f"cannot take the lock {lock}; remove it if no factorconv run is writing {output}")
    try:
        _remove_stale_staging(output)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _remove_stale_staging(output: Path) -> None:
    """Under the lock no other run writes OUT, so every staging folder of OUT belongs to a dead run."""
    stale = sorted(output.parent.glob(f".{output.name}.partial-*"))
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if stale:
        logger.warning("removed %d unfinished folder(s) of interrupted runs beside %s", len(stale), output)


def staging_folder(output: Path) -> Path:
    """A new hidden folder beside OUT, on the same filesystem, so publishing is one rename."""
    folder = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
    except OSError as err:
        raise unwritable(output, err) from None
    return folder


def publish(staging: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished staging folder to OUT; an OUT that appeared meanwhile is kept unless `overwrite`."""
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FactorConvError(f"output folder {output} appeared while converting; pass --overwrite to replace it")
        refuse_foreign(output)
        old = output.parent / f".{output.name}.partial-old-{uuid.uuid4().hex[:8]}"
        output.rename(old)  # the previous result stays whole until the new one is in place
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
        return
    if output.exists():
        output.rmdir()
    staging.rename(output)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (timeout, docker stop, Slurm, systemd) and Ctrl-C unwind as KeyboardInterrupt, so staging folders
    are cleaned up.

    A signal that lands inside a library call can come out as that library's own error (safetensors turns the
    interrupt raised while it builds a tensor into a ValueError): once a signal has arrived, whatever error ends
    the block is reported as the interruption it is.
    """
    received: list[str] = []

    def interrupt(signum, frame):
        received.append(signal.Signals(signum).name)
        raise KeyboardInterrupt(f"signal {received[-1]}")

    try:
        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    except Exception:
        if received:
            raise KeyboardInterrupt(f"signal {received[0]}") from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def staged_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """A staging folder for OUT, written under OUT's lock with SIGTERM as Ctrl-C: published whole when the block
    ends, removed when it fails (a full disk or a read-only folder reported as one line)."""
    with sigterm_as_interrupt(), output_lock(output):
        staging = staging_folder(output)
        try:
            yield staging
            publish(staging, output, overwrite)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, OSError):
                raise unwritable(output, err) from None
            raise
