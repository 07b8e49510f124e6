"""Atomic writes: a file or a directory appears whole under its final name, or not at all.

Every writer in lorafit (adapters, checkpoints, merged models, run files, downloads) goes through
these two helpers, so a crash, a kill -9 or a full disk never leaves a half-written file where a
reader would trust it. Both write beside the target (same filesystem, so the rename is atomic) and
clean up their temporary on failure.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call write(temporary_path), then rename it over `path`; the temporary is removed if write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    """Write a JSON file atomically, indented, ending in a newline. NaN and infinity are refused (not JSON)."""
    return write_text(path, json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with its I/O failures (a full disk) raised as OSError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as err:
        raise OSError(f"{path}: could not write ({err})") from err


@contextmanager
def atomic_directory(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes `path`, on failure it is removed.

    An existing `path` is an error unless replace=True, in which case it is swapped out only after
    the new directory is complete (the old one is deleted last, so a crash keeps one of the two).
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
