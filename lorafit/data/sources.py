"""Instruction data sources: Alpaca JSON, Dolly JSONL, generic JSON/JSONL of instructions or chat messages.

Every loader returns plain records: ``{"instruction", "input", "output"}`` or ``{"messages": [...]}``.
A malformed file raises one ``DataError`` naming the file, the line (JSONL) or record (JSON, 0-based
index in the list) and the field. Records with an empty response are skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.hub import cache_dir
from lorafit.io import write_atomically, write_json

ALPACA_URL = "https://raw.githubusercontent.com/tloen/alpaca-lora/main/alpaca_data_cleaned_archive.json"
DOLLY_URL = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"
NAMED_SOURCES = {"alpaca": ALPACA_URL, "dolly": DOLLY_URL}

# Field names per format: (instruction, input, output) as they appear in the file.
FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
}
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file that cannot be read as instruction data; the message names the file, place and field."""


@dataclass
class LoadedData:
    """Records read from a file, and how many were skipped for an empty response."""

    records: list[dict[str, Any]]
    skipped_empty: int
    path: Path


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest_dir: Path | None = None) -> Path:
    """A URL's file in the cache: fetched once, again when the server reports another size, ETag or date.

    The cache name holds a hash of the whole URL, so two URLs ending in the same file name never share a
    copy. Offline, a cached copy is used as is; without one the error names the URL and the --source way out.
    """
    dest_dir = Path(dest_dir) if dest_dir is not None else cache_dir() / "datasets"
    name = Path(urllib.parse.urlparse(url).path).name or "data"
    dest = dest_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    meta_path = dest.with_name(dest.name + ".json")
    try:
        response = urllib.request.urlopen(url)
    except (OSError, ValueError) as err:  # URLError is an OSError; a malformed URL is a ValueError
        if dest.is_file() and meta_path.is_file():
            print(f"lorafit: {url} is unreachable ({_reason(err)}); using the cached copy {dest}", file=sys.stderr)
            return dest
        raise DataError(
            f"could not download {url} ({_reason(err)}); get the file another way and pass it as a local file: "
            "`lorafit prepare ... --source FILE` or `lorafit finetune --data FILE`"
        ) from None
    with response:
        headers = response.headers
        remote = {
            "url": url,
            "size": int(headers.get("Content-Length") or -1),
            "etag": headers.get("ETag"),
            "modified": headers.get("Last-Modified"),
        }
        if dest.is_file() and _same_remote(_read_cached_meta(meta_path), remote, dest):
            return dest
        write_atomically(dest, lambda tmp: _copy_with_progress(response, tmp, name, remote["size"]))
    write_json(meta_path, {**remote, "size": dest.stat().st_size})
    return dest


def _same_remote(cached: dict[str, Any], remote: dict[str, Any], dest: Path) -> bool:
    """True when the cached copy is what the server now offers: same URL and size, and the same ETag and
    Last-Modified where the server sends them."""
    if cached.get("url") != remote["url"] or dest.stat().st_size != cached.get("size"):
        return False
    if remote["size"] >= 0 and remote["size"] != cached["size"]:
        return False
    return all(not remote[key] or cached.get(key) == remote[key] for key in ("etag", "modified"))


def _read_cached_meta(path: Path) -> dict[str, Any]:
    """What was recorded about a cached download; {} (so it is fetched again) when missing or unreadable."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _copy_with_progress(response: Any, out: Path, name: str, total: int) -> None:
    with open(out, "wb") as f:
        done = 0
        for chunk in iter(lambda: response.read(1 << 20), b""):
            f.write(chunk)
            done += len(chunk)
            of_total = f" / {total / 1e6:.1f}" if total > 0 else ""
            print(f"\rdownloading {name}: {done / 1e6:.1f}{of_total} MB", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def _reason(err: BaseException) -> str:
    return str(getattr(err, "reason", None) or err)


def resolve_source(source: str | Path) -> Path:
    """A local file for a source: a named dataset ("alpaca", "dolly"), a URL (downloaded), or a path."""
    text = str(source)
    if text in NAMED_SOURCES:
        return download(NAMED_SOURCES[text])
    if "://" in text:
        return download(text)
    path = Path(text)
    if path.is_dir():
        raise DataError(
            f"{path}: a directory, but not a prepared dataset (no meta.json, train.safetensors and "
            "val.safetensors); pass a JSON/JSONL file, or a directory written by `lorafit prepare`"
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file (and not one of {', '.join(NAMED_SOURCES)} or a URL)")
    return path


def detect_format(obj: Any) -> str:
    """A file's record format from its first record: "dolly" when it has a 'response' and no 'output'."""
    return "dolly" if isinstance(obj, dict) and "response" in obj and "output" not in obj else "alpaca"


def load_records(path: str | Path, fmt: str | None = None) -> LoadedData:
    """Read a JSON list or JSONL file of instruction or chat records, validating every field.

    ``fmt`` names the instruction fields: "alpaca" (instruction, input, output) or "dolly" (instruction,
    context, response); None detects it from the first record.
    """
    path = Path(path)
    if fmt is not None and fmt not in FIELDS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FIELDS)}")
    records, skipped = [], 0
    for where, obj in _read_objects(path):
        fmt = fmt or detect_format(obj)
        record = _to_record(obj, f"{path.name}: {where}", FIELDS[fmt])
        if _is_empty(record):
            skipped += 1
        else:
            records.append(record)
    if not records and not skipped:
        raise DataError(f"{path.name}: file is empty (no records)")
    return LoadedData(records, skipped, path)


def _read_objects(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (place, parsed object) from a JSON list ("record N") or a JSONL file ("line N")."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark (Windows editors) is not data
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path.name}: file is empty (no records)")
    if path.suffix.lower() not in (".jsonl", ".ndjson") and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        for index, obj in enumerate(data):
            yield f"record {index}", obj
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if _is_one_object(text):
                raise DataError(
                    f"{path.name}: one JSON object spread over several lines; expected JSON Lines (one record "
                    "per line) or a JSON list of records"
                ) from None
            raise DataError(f"{path.name}: line {number}: invalid JSON at column {e.colno}: {e.msg}") from None
        yield f"line {number}", obj


def _is_one_object(text: str) -> bool:
    """True when the whole text is a single JSON object (a pretty-printed file mistaken for JSON Lines)."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _to_record(obj: Any, where: str, fields: tuple[str, str, str]) -> dict[str, Any]:
    """Validate one parsed object into an instruction record or a chat record."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    if "messages" in obj:
        return {"messages": _check_messages(obj["messages"], where)}
    instruction_key, input_key, output_key = fields
    record = {}
    for key, name, required in (
        (instruction_key, "instruction", True),
        (input_key, "input", False),
        (output_key, "output", True),
    ):
        if key not in obj:
            if required:
                raise DataError(f"{where}: missing field {key!r}")
            record[name] = ""
        elif not isinstance(obj[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
        else:
            record[name] = obj[key]
    return record


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Validate a chat conversation: a non-empty list of {role, content} with known roles."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    checked = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: field '{field}' must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field '{field}.role' must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: field '{field}.content' must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError(f"{where}: field 'messages' has no assistant turn to learn from")
    return checked


def _is_empty(record: dict[str, Any]) -> bool:
    """True when there is no response to learn from (an empty output, or only empty assistant turns)."""
    if "messages" in record:
        return not any(m["content"].strip() for m in record["messages"] if m["role"] == "assistant")
    return not record["output"].strip()
