"""A run directory belongs to one run: who may write to it, what it holds, and which resumes are allowed.

- One writer at a time: a lock (flock on a file inside the directory) is held for the whole run; the
  kernel drops it when the process dies, so a crashed run never leaves a stale lock.
- A fresh run only starts in an empty (or new) directory; `--overwrite` clears the directory first,
  `--resume` continues the run it holds. Every checkpoint carries the run's id.
- lorafit_run.json records what defines the run. A resume may change the schedule's length and the
  evaluation and checkpoint intervals (each change printed), never what would make it another run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from lorafit.io import write_json

RUN_FILE = "lorafit_run.json"
LOSS_PLOT = "loss.png"  # a finished run's last output
LOCK_FILE = ".lorafit.lock"

RESUMABLE_CHANGES = (
    "epochs",
    "max_steps",
    "warmup_steps",
    "eval_interval",
    "eval_batches",
    "save_interval",
    "keep_checkpoints",
    "activation_checkpointing",
    "cpu_mmap_threshold",
)
"""Training settings a resume may change: how long the run goes on, and how it is watched and saved."""

SETTINGS_ADDED_LATER = {"group_by_length": True}
"""Training settings that run files of older lorafit versions lack, with the behaviour those versions had."""


class RunDirectoryError(ValueError):
    """A run directory that cannot be used as asked (in use, holding another run, incompatible resume)."""


class RunLock:
    """An exclusive lock on a run directory for as long as the `with` block runs."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirectoryError(
                f"{self.path.parent} is in use by another lorafit run ({holder}); wait for it to finish or "
                "choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock; the file itself stays (harmless, reused)
            self._file = None


def contents(run_dir: Path) -> list[Path]:
    """What a directory holds besides the lock file."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name != LOCK_FILE)


def start_fresh(run_dir: Path, overwrite: bool) -> str:
    """Make run_dir ready for a new run and return the run's new id.

    A directory holding anything is refused unless overwrite, which clears it first.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"--out {run_dir} is a file, not a directory")
    held = contents(run_dir)
    if held and not overwrite:
        names = ", ".join(p.name for p in held[:4]) + (" ..." if len(held) > 4 else "")
        raise RunDirectoryError(
            f"--out {run_dir} is not empty (it holds {names}); pass --resume auto to continue the run it holds, "
            "--overwrite to replace it, or choose a new --out"
        )
    for path in held:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return uuid.uuid4().hex


def read_run_file(run_dir: Path) -> dict[str, Any]:
    """The run's lorafit_run.json; a clear error when there is none or it is unreadable."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise RunDirectoryError(f"{run_dir}: no {RUN_FILE}, so there is no lorafit run here to resume")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunDirectoryError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(fields, dict) or "run_id" not in fields:
        raise RunDirectoryError(f"{path}: written by an older lorafit (no run_id); start a new run with --overwrite")
    return fields


def write_run_file(run_dir: Path, fields: dict[str, Any]) -> None:
    """Write lorafit_run.json (atomically): what generate, merge and a resume need to know about the run."""
    write_json(Path(run_dir) / RUN_FILE, fields)


def check_resume(saved: dict[str, Any], new: dict[str, Any], where: Path) -> list[str]:
    """Compare a resume's settings with the run's; returns the allowed changes as lines, raises on any other."""
    changes, notes = [], []
    for key in sorted(set(saved) | set(new)):
        if key in ("run_id", "started", "base_origin", "base_fingerprint"):
            continue
        old, now = saved.get(key), new.get(key)
        if key == "train":
            old = SETTINGS_ADDED_LATER | (old or {})
            for name in sorted(set(old) | set(now or {})):
                a, b = old.get(name), (now or {}).get(name)
                if a == b:
                    continue
                line = f"train.{name}: {a!r} -> {b!r}"
                (notes if name in RESUMABLE_CHANGES else changes).append(line)
        elif old != now:
            changes.append(f"{key}: {old!r} -> {now!r}")
    if changes:
        raise RunDirectoryError(
            f"{where / RUN_FILE}: resuming would change what this run is ({'; '.join(changes)}); resume with the "
            "run's settings, or start a new run (another --out, or --overwrite)"
        )
    return notes
