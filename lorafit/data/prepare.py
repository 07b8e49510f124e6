"""Tokenise instruction records into (input_ids, labels), split, and save them without pickles.

Labels are aligned with input_ids (as in Hugging Face): ``labels[i]`` is the target for position i
before the usual one-token shift in the loss, or -100 where no loss is taken. With ``mask_prompt``
(the default) only the response is supervised: the Alpaca output plus EOS, or in chat style every
assistant turn up to and including its end-of-turn token.

Truncation to ``max_seq_length`` keeps what the loss needs: the prompt loses tokens from its LEFT
first (after BOS), so the end of the prompt, which holds "### Response:" or the assistant header, stays
next to the response; only if the prompt is gone does the response lose tokens from its end, and its
final EOS / end-of-turn token is always kept.

A prepared directory holds ``train.safetensors`` and ``val.safetensors`` (flat ``input_ids``, flat
``labels`` and ``offsets``, int32/int64) and ``meta.json``. Preparing the same inputs again (same source
hash, tokenizer, style, max_seq_length, mask flag and split) reuses the directory without work. meta.json
names the tokenizer (its file, a behaviour fingerprint and a vocabulary hash), so that data prepared with one
tokenizer is refused for a model with another (check_prepared_tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from lorafit.checkpoint import CheckpointError, read_safetensors
from lorafit.data.prompts import alpaca_prompt, resolve_style, to_messages
from lorafit.data.sources import DataError, file_sha256, load_records, resolve_source
from lorafit.io import write_atomically, write_json

IGNORE_INDEX = -100
FORMAT_VERSION = 1
MAX_DEFAULT_VAL_SIZE = 2000
# A probe text for the tokenizer fingerprint: words, digits, whitespace runs, punctuation and non-ASCII.
_PROBE = "Hello world! 12345  tabs\tand\nnewlines: naïve café, 東京, emoji 🙂, code `x = y**2`."


@dataclass
class PreparedInfo:
    """What a prepare produced: counts, settings and where it went (also written to meta.json)."""

    out_dir: str
    source: str
    prompt_style: str
    max_seq_length: int
    mask_prompt: bool
    val_size: int
    seed: int
    train: int
    val: int
    skipped_empty: int
    truncated: int
    train_tokens: int
    val_tokens: int
    tokenizer: str
    """The tokenizer's fingerprint (see tokenizer_fingerprint)."""
    cache_key: str
    tokenizer_name: str = ""
    """Where the tokenizer came from, for messages (empty in directories prepared before it was recorded)."""
    tokenizer_vocabulary: str = ""
    """Tokenizer.vocabulary_sha256(): catches what the fingerprint's probe text cannot (empty in older directories)."""
    cached: bool = False


class TokenDataset(torch.utils.data.Dataset):
    """Tokenised samples stored flat: sample i is input_ids[offsets[i]:offsets[i+1]] with its labels."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor) -> None:
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets
        self.lengths: list[int] = (offsets[1:] - offsets[:-1]).tolist()

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[list[int], list[int]]]) -> TokenDataset:
        """Build from a list of (input_ids, labels) lists."""
        offsets = [0]
        for ids, _ in samples:
            offsets.append(offsets[-1] + len(ids))
        flat_ids = [t for ids, _ in samples for t in ids]
        flat_labels = [t for _, labels in samples for t in labels]
        return cls(
            torch.tensor(flat_ids, dtype=torch.int32),
            torch.tensor(flat_labels, dtype=torch.int32),
            torch.tensor(offsets, dtype=torch.int64),
        )

    @classmethod
    def load(cls, path: str | Path) -> TokenDataset:
        """Read a dataset saved by ``save``; an unreadable or foreign file is a DataError naming it."""
        try:
            tensors = read_safetensors(path)
        except CheckpointError as err:
            raise DataError(f"{err}; prepare the data again") from None
        missing = [name for name in ("input_ids", "labels", "offsets") if name not in tensors]
        if missing:
            raise DataError(f"{path}: not a prepared dataset file (no {', '.join(missing)} tensor)")
        return cls(tensors["input_ids"], tensors["labels"], tensors["offsets"])

    def save(self, path: str | Path) -> None:
        """Write the three flat tensors to a safetensors file (atomically)."""
        tensors = {"input_ids": self.input_ids, "labels": self.labels, "offsets": self.offsets}
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i %= len(self)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[start:end].long(), self.labels[start:end].long()

    def num_tokens(self) -> int:
        """Total tokens over all samples."""
        return int(self.offsets[-1])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash identifying a tokenizer's behaviour: special ids, chat template and a probe encoding."""
    parts = {
        "bos": tokenizer.bos_id,
        "eos": tokenizer.eos_id,
        "stop": sorted(tokenizer.stop_ids),
        "add_bos": tokenizer.add_bos,
        "chat_template": tokenizer.chat_template,
        "vocab_size": tokenizer.vocab_size,
        "probe": tokenizer.encode(_PROBE, bos=False, eos=False),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def render_segments(record: dict[str, Any], tokenizer: Any, style: str) -> list[tuple[str, bool]]:
    """A record as text pieces, each flagged True where it is response (supervised) text."""
    if style == "alpaca":
        if "messages" in record:
            raise DataError(
                "chat records (with 'messages') need the chat prompt style and a tokenizer with a chat template"
            )
        return [(alpaca_prompt(record["instruction"], record["input"]), False), (record["output"], True)]
    return chat_segments(to_messages(record), tokenizer)


def chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[str, bool]]:
    """Split a rendered conversation into template/user text and assistant turns (supervised)."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    pieces, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The assistant turn is what rendering it adds after the prompt that asks for it.
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through) and len(before) >= pos):
            raise DataError(
                f"the chat template does not render conversations incrementally, so assistant turn "
                f"{i} cannot be located"
            )
        pieces += [(full[pos : len(before)], False), (full[len(before) : len(through)], True)]
        pos = len(through)
    pieces.append((full[pos:], False))
    return [(text, supervised) for text, supervised in pieces if text]


def encode_record(
    record: dict[str, Any], tokenizer: Any, style: str, max_seq_length: int, mask_prompt: bool = True
) -> tuple[list[int], list[int], bool]:
    """Tokenise one record: (input_ids, labels, truncated). See the module docstring for the rules."""
    pieces = render_segments(record, tokenizer, style)
    ids, supervised, response_start = _encode_pieces(pieces, tokenizer)
    stop_ids = set(tokenizer.stop_ids) | {tokenizer.eos_id}
    if not ids or ids[-1] not in stop_ids:
        ids.append(tokenizer.eos_id)
        supervised.append(True)
    keep = _truncate(len(ids), response_start, max_seq_length, keep_first=ids[0] == tokenizer.bos_id)
    labels = [ids[j] if (supervised[j] or not mask_prompt) else IGNORE_INDEX for j in keep]
    return [ids[j] for j in keep], labels, len(keep) < len(ids)


def _encode_pieces(pieces: list[tuple[str, bool]], tokenizer: Any) -> tuple[list[int], list[bool], int]:
    """Encode text pieces in order and flag the supervised tokens: (ids, flags, start of the last response).

    Each step encodes all text so far and keeps the new tail, so the tokens are those of the whole text
    encoded at once (as the model sees a stream). Where a piece would merge with the token before it,
    the piece is encoded alone instead, so earlier tokens, the prompt generation will feed, never change.
    """
    ids: list[int] = []
    flags: list[bool] = []
    response_start, text = 0, ""
    stop_ids = set(tokenizer.stop_ids) | {tokenizer.eos_id}
    for piece, is_response in pieces:
        text += piece
        whole = tokenizer.encode(text, bos=None, eos=False)
        new = whole[len(ids) :] if whole[: len(ids)] == ids else tokenizer.encode(piece, bos=False, eos=False)
        new_flags = [is_response] * len(new)
        if is_response:
            response_start = len(ids)
            stops = [j for j, t in enumerate(new) if t in stop_ids]
            # Template text after the end-of-turn token (such as a newline) is not the model's to learn.
            new_flags = [j <= stops[-1] for j in range(len(new))] if stops else new_flags
        ids += new
        flags += new_flags
    # Nothing after the last response is learned, so it is not kept.
    last = max((j for j, flag in enumerate(flags) if flag), default=len(ids) - 1)
    return ids[: last + 1], flags[: last + 1], response_start


def _truncate(length: int, response_start: int, max_len: int, keep_first: bool) -> list[int]:
    """Indices to keep: drop the prompt's left (after BOS) first, then the response's end before its EOS."""
    excess = length - max_len
    if excess <= 0:
        return list(range(length))
    head = 1 if keep_first and response_start > 0 else 0
    if max_len < head + 1:
        raise ValueError(f"max_seq_length {max_len} is too short to hold a sample")
    drop_prompt = min(excess, response_start - head)
    prompt = list(range(head)) + list(range(head + drop_prompt, response_start))
    response = list(range(response_start, length))
    drop_response = excess - drop_prompt
    if drop_response:
        response = response[: len(response) - drop_response - 1] + response[-1:]
    return prompt + response


def default_val_size(n_records: int) -> int:
    """The validation split when none is given: a tenth of the records, at most 2,000 (Alpaca: 2,000; 20: 2)."""
    return min(MAX_DEFAULT_VAL_SIZE, n_records // 10)


def split_indices(n: int, val_size: int, seed: int = 42) -> tuple[list[int], list[int]]:
    """A deterministic train/val split of range(n): the same permutation as torch's random_split."""
    if not 0 <= val_size < n:
        raise DataError(
            f"val_size {val_size} must leave training data: there are only {n} records "
            f"(leave --val-size unset for {default_val_size(n)}, a tenth of the records, at most 2000)"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[: n - val_size], perm[n - val_size :]


def cache_key(
    source_hash: str,
    tokenizer: Any,
    style: str | None = None,
    max_seq_length: int = 512,
    mask_prompt: bool = True,
    val_size: int | None = None,
    seed: int = 42,
) -> str:
    """The key under which prepared data is reused: everything that changes the tokens or the split."""
    style = resolve_style(style, tokenizer)
    parts = [
        FORMAT_VERSION,
        source_hash,
        tokenizer_fingerprint(tokenizer),
        _vocabulary_sha256(tokenizer),  # two vocabularies the probe text cannot tell apart must not share a cache
        style,
        max_seq_length,
        mask_prompt,
        val_size,
        seed,
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def records_sha256(records: Sequence[dict[str, Any]]) -> str:
    """A hash of in-memory records (for data that has no file, such as the generated demo task)."""
    return hashlib.sha256(json.dumps(list(records), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_info(out_dir: str | Path, key: str | None = None) -> PreparedInfo | None:
    """The PreparedInfo of a prepared directory (None when absent, or when its cache key is not ``key``)."""
    out_dir = Path(out_dir)
    files = [out_dir / "meta.json", out_dir / "train.safetensors", out_dir / "val.safetensors"]
    if not all(f.is_file() for f in files):
        return None
    try:
        meta = json.loads(files[0].read_text(encoding="utf-8"))
        if key is not None and meta.get("cache_key") != key:
            return None
        return PreparedInfo(out_dir=str(out_dir), cached=True, **meta)
    except (ValueError, TypeError, AttributeError) as err:
        raise DataError(
            f"{files[0]}: not a lorafit prepared-dataset meta.json ({err}); prepare the data again"
        ) from None


def check_prepared_tokenizer(data_dir: str | Path, tokenizer: Any) -> None:
    """Refuse a prepared dataset whose tokens came from another tokenizer than `tokenizer` (both are named)."""
    info = read_info(data_dir)
    if info is None:
        raise FileNotFoundError(f"{data_dir}: not a prepared dataset")
    ours = tokenizer_fingerprint(tokenizer)
    # Older directories recorded no vocabulary hash; for them the fingerprint alone decides.
    other_vocabulary = info.tokenizer_vocabulary and info.tokenizer_vocabulary != _vocabulary_sha256(tokenizer)
    if info.tokenizer != ours or other_vocabulary:
        theirs = info.tokenizer_name or "an unrecorded tokenizer"
        raise DataError(
            f"{data_dir}: prepared with tokenizer {theirs} (fingerprint {info.tokenizer}), but this model's "
            f"tokenizer is {getattr(tokenizer, 'name', 'another one')} (fingerprint {ours}); prepare the data "
            "again with this model's tokenizer"
        )


def _vocabulary_sha256(tokenizer: Any) -> str:
    return tokenizer.vocabulary_sha256() if hasattr(tokenizer, "vocabulary_sha256") else ""


def load_prepared(out_dir: str | Path, tokenizer: Any = None) -> tuple[TokenDataset, TokenDataset]:
    """The (train, val) datasets of a prepared directory; given the model's tokenizer, checked against it first."""
    out_dir = Path(out_dir)
    if read_info(out_dir) is None:
        raise FileNotFoundError(
            f"{out_dir}: not a prepared dataset (needs meta.json, train.safetensors, "
            f"val.safetensors); run `lorafit prepare` first"
        )
    if tokenizer is not None:
        check_prepared_tokenizer(out_dir, tokenizer)
    return TokenDataset.load(out_dir / "train.safetensors"), TokenDataset.load(out_dir / "val.safetensors")


def prepare_dataset(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    out_dir: str | Path,
    *,
    style: str | None = None,
    max_seq_length: int = 512,
    mask_prompt: bool = True,
    val_size: int | None = None,
    seed: int = 42,
    source: str = "records",
    source_hash: str | None = None,
    skipped_empty: int = 0,
    progress: bool = True,
) -> PreparedInfo:
    """Tokenise, split and save records into out_dir, or reuse out_dir when it already holds the same.

    val_size None takes default_val_size(len(records)); it is part of the cache key as given.
    """
    style = resolve_style(style, tokenizer)
    key = cache_key(
        source_hash or records_sha256(records), tokenizer, style, max_seq_length, mask_prompt, val_size, seed
    )
    out_dir = Path(out_dir)
    cached = read_info(out_dir, key)
    if cached is not None:
        return cached
    n_val = default_val_size(len(records)) if val_size is None else val_size
    train_idx, val_idx = split_indices(len(records), n_val, seed)
    encoded, truncated = [], 0
    for record in tqdm(records, desc="tokenising", unit="rec", file=sys.stderr, disable=not progress):
        ids, labels, was_truncated = encode_record(record, tokenizer, style, max_seq_length, mask_prompt)
        encoded.append((ids, labels))
        truncated += was_truncated
    train = TokenDataset.from_samples([encoded[i] for i in train_idx])
    val = TokenDataset.from_samples([encoded[i] for i in val_idx])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # a crash while rewriting must not leave a stale key
    train.save(out_dir / "train.safetensors")
    val.save(out_dir / "val.safetensors")
    info = PreparedInfo(
        out_dir=str(out_dir),
        source=source,
        prompt_style=style,
        max_seq_length=max_seq_length,
        mask_prompt=mask_prompt,
        val_size=n_val,
        seed=seed,
        train=len(train),
        val=len(val),
        skipped_empty=skipped_empty,
        truncated=truncated,
        train_tokens=train.num_tokens(),
        val_tokens=val.num_tokens(),
        tokenizer=tokenizer_fingerprint(tokenizer),
        cache_key=key,
        tokenizer_name=str(getattr(tokenizer, "name", "")),
        tokenizer_vocabulary=_vocabulary_sha256(tokenizer),
    )
    meta = {k: v for k, v in asdict(info).items() if k not in ("out_dir", "cached")}
    # meta.json goes last: its presence with this key is what marks the directory as complete.
    write_json(out_dir / "meta.json", meta)
    return info


def prepare_source(
    source: str | Path,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    fmt: str | None = None,
    progress: bool = True,
    **options: Any,
) -> PreparedInfo:
    """Prepare a named dataset ("alpaca", "dolly"), URL or file; an unchanged one is reused without parsing.

    ``options`` are prepare_dataset's: style, max_seq_length, mask_prompt, val_size (None: default_val_size), seed.
    """
    path = resolve_source(source)
    source_hash = file_sha256(path)
    cached = read_info(out_dir, cache_key(source_hash, tokenizer, **options))
    if cached is not None:
        return cached
    loaded = load_records(path, fmt)
    return prepare_dataset(
        loaded.records,
        tokenizer,
        out_dir,
        source=str(source),
        source_hash=source_hash,
        skipped_empty=loaded.skipped_empty,
        progress=progress,
        **options,
    )
