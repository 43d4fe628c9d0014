"""The run directory: committed step outputs, their JSON records, logs, and scratch space.

    RUN/.recipe-runner-run   the marker: this folder is a run directory (written when it is made)
    RUN/.recipe-runner.lock  held (flock) by the one `recipe run` writing here; the OS releases it
    RUN/recipe.yaml          the resolved recipe (what was asked)
    RUN/run.json             the latest run's status per step
    RUN/steps/ID/            a committed step: its outputs and record.json
    RUN/logs/ID.log          each step's log (kept when the step fails)
    RUN/.scratch/ID.N/       a step in progress; never read as complete

A step's outputs become visible only by one atomic rename of its scratch folder into steps/, with
record.json already inside; so a folder in steps/ is always complete, whatever happens mid-step.

The runner writes and deletes only in a folder it made: `claim()` refuses a non-empty folder without
the marker (a user's project, `--run-dir .`), and scratch folders carry a marker of their own, so
cleaning never removes a file the runner did not create.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner import __version__
from runner.errors import RunnerError

RECORD = "record.json"
MARKER = ".recipe-runner-run"
LOCK = ".recipe-runner.lock"
SCRATCH_MARKER = ".recipe-runner-scratch"
# run.json says what it is: a run directory is one with the marker, or with a run.json in this format.
RUN_JSON_FORMAT = "recipe-runner/run.json/1"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so that readers see the old file or the new one, never half of one; the
    temporary file is removed on any failure, and a full disk is a RunnerError naming the path."""
    blob = text.encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise disk_error(path, exc, len(blob)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise disk_error(path, exc, len(blob)) from None
        raise


class DiskFull(RunnerError):
    """No space left (or a quota reached) writing a path; the message names it and what is free."""


def disk_error(path: Path, exc: OSError, needed: int | None = None) -> Exception:
    """A full disk (or quota) as a clear RunnerError with the path, the space needed and what is free; a
    read-only or forbidden path as one naming it; any other OSError as it is."""
    if exc.errno == errno.EROFS:
        return RunnerError(f"cannot write {path}: it is on a read-only file system. Give a --run-dir on a "
                           "writable disk (or remount it read-write)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return RunnerError(f"cannot write {path}: permission denied. Give a --run-dir you can write to "
                           "(or fix its permissions)")
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return exc
    try:
        free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    except (OSError, StopIteration):
        free = None
    amounts = "; ".join(([f"needs {needed} bytes"] if needed is not None else [])
                        + ([f"{free} bytes free"] if free is not None else []))
    return DiskFull(f"no space left on the device writing {path}" + (f" ({amounts})" if amounts else "")
                    + ": free some space and run again; every completed step is kept")


def host_versions() -> dict[str, str]:
    return {"runner": __version__, "python": platform.python_version(), "platform": sys.platform}


@dataclass
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        self.root = self.root.resolve()

    @property
    def steps_dir(self) -> Path:
        return self.root / "steps"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def step_dir(self, step_id: str) -> Path:
        return self.steps_dir / step_id

    def log_path(self, step_id: str) -> Path:
        return self.logs_dir / f"{step_id}.log"

    def record(self, step_id: str) -> dict[str, Any] | None:
        """The committed record of a step, or None if the step has not completed."""
        # A string path: plan and dry run ask this for each of tens of thousands of steps, most of
        # which have no record yet, and pathlib's joins cost more than the failed open.
        path = os.path.join(self.root, "steps", step_id, RECORD)
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def is_complete(self, step_id: str, key: str) -> bool:
        record = self.record(step_id)
        return bool(record and record.get("status") == "complete" and record.get("key") == key)

    def output(self, step_id: str, name: str) -> Path:
        """An output a committed step declared in its record (paths are relative to its folder)."""
        record = self.record(step_id) or {}
        value = (record.get("outputs") or {}).get(name)
        if value is None:
            raise KeyError(f"step {step_id} has no output {name!r}")
        path = Path(value)
        return path if path.is_absolute() else self.step_dir(step_id) / path

    def is_run_dir(self) -> bool:
        """Made by the runner: its marker (the JSON claim() writes), or a run.json in the runner's own
        format. A look-alike (a user's run.json with a status and steps next to a steps/ folder, an
        empty file named like the marker) is not, so the runner never writes or deletes in it."""
        try:
            marker = json.loads((self.root / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            marker = None
        if isinstance(marker, dict) and "runner" in marker and "created" in marker:
            return True
        status = self._read_status()
        return status is not None and status.get("format") == RUN_JSON_FORMAT

    def claim(self) -> None:
        """Make the folder a run directory (new or empty), or refuse one that is someone else's."""
        if self.root.exists() and not self.root.is_dir():
            raise RunnerError(f"run directory {self.root} is a file; choose another --run-dir")
        if self.root.is_dir() and not self.is_run_dir() and any(self.root.iterdir()):
            raise RunnerError(
                f"{self.root} is not empty and is not a run directory (no {MARKER}): the runner writes and "
                "deletes files in its run directory, so it takes only a new or empty folder, or one it made. "
                "Choose another --run-dir (or execution.run_dir); nothing was written")
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / MARKER).is_file():
            write_json_atomic(self.root / MARKER, {"created": now(), "runner": __version__})

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory's lock for one writer; another `recipe run` is told who holds it."""
        import fcntl

        try:
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only run directory, or a full one that cannot take the lock file
            raise disk_error(self.root / LOCK, exc) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                raise RunnerError(f"another `recipe run` (pid {holder}) is writing to {self.root}; wait for it "
                                  "to finish or stop it (plan and card still work meanwhile)") from None
            with contextlib.suppress(OSError):  # the pid only informs a second run; a full disk keeps the lock
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)  # closing releases the lock; a crash releases it too

    def is_locked(self) -> bool:
        """Whether a `recipe run` holds this run directory now (alive: the OS drops a dead one's lock)."""
        import fcntl

        if not (self.root / LOCK).is_file():
            return False
        fd = os.open(self.root / LOCK, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def run_status(self) -> dict[str, Any] | None:
        """run.json, with "running" corrected to "died" when no live process holds the directory (a run
        killed with SIGKILL, or a machine that went down, could not write its last status)."""
        status = self._read_status()
        if status is not None and status.get("status") == "running" and not self.is_locked():
            status["status"] = "died"
            status["note"] = (f"run.json said running (pid {status.get('pid', '?')}, last update "
                              f"{status.get('updated_at', '?')}) but no process holds the run directory")
        return status

    def save_status(self, status: dict[str, Any]) -> None:
        """Write run.json atomically. On a full disk it is overwritten in place with its essentials (the
        status, and a note saying why the rest is missing): truncating it frees the space it takes, so
        run.json tells how the run ended even when nothing else can be written any more. Raises the
        clear RunnerError when even that fails."""
        path = self.root / "run.json"
        try:
            write_json_atomic(path, status)
            return
        except DiskFull as exc:
            if not path.is_file():
                raise
            brief = {k: status[k] for k in ("format", "recipe", "status", "updated_at", "pid") if k in status}
            brief["note"] = f"the disk was full, so only the status was written: {exc}"
            try:
                with open(path, "r+b") as fh:
                    fh.truncate(0)
                    fh.write((json.dumps(brief, indent=2, sort_keys=True) + "\n").encode())
            except OSError:
                raise exc from None

    def _read_status(self) -> dict[str, Any] | None:
        try:
            status = json.loads((self.root / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return status if isinstance(status, dict) else None

    def mark_died(self) -> None:
        """Call holding the lock (recipe clean): a run.json that says "running" is a dead run's, and says
        so from now on."""
        status = self._read_status()
        if status is not None and status.get("status") == "running":
            status |= {"status": "died", "note": f"marked by recipe clean at {now()}: no process held the run "
                       f"directory (last update {status.get('updated_at', '?')})"}
            self.save_status(status)

    def new_scratch(self, step_id: str) -> Path:
        base = self.root / ".scratch"
        base.mkdir(parents=True, exist_ok=True)
        # Leftovers of an interrupted attempt are never reused: start clean (only folders the runner made).
        for old in base.glob(f"{step_id}.*"):
            if (old / SCRATCH_MARKER).is_file():
                shutil.rmtree(old, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(dir=base, prefix=f"{step_id}."))
        (scratch / SCRATCH_MARKER).touch()
        return scratch

    def remove_scratch(self) -> list[Path]:
        """Delete the scratch folders the runner made (marked), nothing else; returns them."""
        base = self.root / ".scratch"
        removed = [d for d in base.glob("*") if d.is_dir() and (d / SCRATCH_MARKER).is_file()] if base.is_dir() else []
        for folder in removed:
            shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            base.rmdir()  # only when nothing else is left in it
        return removed

    def commit(self, step_id: str, scratch: Path, record: dict[str, Any]) -> Path:
        """Atomically publish a finished step: record into scratch, then one rename into steps/."""
        (scratch / SCRATCH_MARKER).unlink(missing_ok=True)
        write_json_atomic(scratch / RECORD, record)
        target = self.step_dir(step_id)
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        if target.exists():
            # A stale result (different key): move it out of the way first, then delete it.
            trash = Path(tempfile.mkdtemp(dir=self.root / ".scratch", prefix=f"{step_id}.stale."))
            os.replace(target, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(scratch, target)
        return target


def link_tree(source: Path, target: Path) -> None:
    """Copy a folder by hard links where possible: a 10 GB checkpoint costs no space or time.

    Fix-ups replace the files they edit (never write through a link), so the source stays intact.
    """
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)
