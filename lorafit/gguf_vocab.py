"""Rebuild a tokenizer from GGUF metadata: llama.cpp's `tokenizer.ggml.*` keys as a BPE or SentencePiece model.

GGUF files carry their vocabulary, merges, token types and pre-tokenizer name as metadata, not as tokenizer
files; this module reads that metadata (without touching the tensors) and builds the equivalent tokenizer,
so that the ids match transformers' `AutoTokenizer.from_pretrained(..., gguf_file=...)`.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# How llama.cpp's `tokenizer.ggml.pre` names split text before byte-level BPE.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("gpt2", "default")
_DIGIT_PRE = ("smollm", "starcoder", "refact")  # GPT-2's split, after cutting numbers into single digits
_REGEX_PRE = {
    "llama-bpe": LLAMA3_SPLIT,
    "llama3": LLAMA3_SPLIT,
    "llama-v3": LLAMA3_SPLIT,
    "smaug-bpe": LLAMA3_SPLIT,
    "falcon3": LLAMA3_SPLIT,
    "dbrx": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT,
    "deepseek-r1-qwen": QWEN2_SPLIT,
}
# GGUF token types (the same numbers as SentencePiece's piece types).
_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6


def read_gguf_metadata(path: str | Path, prefixes: tuple[str, ...] = ("tokenizer.", "general.")) -> dict[str, Any]:
    """The key/value metadata of a GGUF file whose keys start with one of `prefixes` (tensors are not read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size < 24:
        raise ValueError(f"{path}: not a GGUF file ({path.stat().st_size} bytes, shorter than a GGUF header)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        version, _, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        reader, meta = _GGUFCursor(buf, 24), {}
        try:
            for _ in range(n_kv):
                key = reader.string()
                value = reader.value(reader.scalar(4))
                if key.startswith(prefixes):
                    meta[key] = value
        except (struct.error, ValueError, KeyError) as err:
            # A cut-off file runs out of bytes inside a value; an unknown type byte means the bytes are not GGUF.
            raise ValueError(
                f"{path}: truncated or corrupt GGUF metadata (at byte {reader.offset} of {len(buf)}: {err})"
            ) from None
        return meta


class _GGUFCursor:
    """Reads GGUF metadata values (little-endian) from a buffer, front to back."""

    SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    STRING, ARRAY = 8, 9

    def __init__(self, buf: Any, offset: int) -> None:
        self.buf, self.offset = buf, offset

    def scalar(self, kind: int) -> Any:
        fmt = "<" + self.SCALARS[kind]
        (value,) = struct.unpack_from(fmt, self.buf, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.scalar(10)
        if self.offset + size > len(self.buf):
            raise ValueError(f"a {size}-byte string runs past the end of the file")
        self.offset += size
        return bytes(self.buf[self.offset - size : self.offset]).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == self.STRING:
            return self.string()
        if kind != self.ARRAY:
            return self.scalar(kind)
        item_kind, count = self.scalar(4), self.scalar(10)
        if item_kind in self.SCALARS:  # numbers in one read, not one by one
            dtype = np.dtype("<" + self.SCALARS[item_kind])
            items = np.frombuffer(self.buf, dtype, count, self.offset).tolist()
            self.offset += dtype.itemsize * count
            return items
        return [self.value(item_kind) for _ in range(count)]


def byte_level_bpe(meta: dict[str, Any], path: Path) -> HFTokenizer:
    """GPT-2-style byte-level BPE from tokenizer.ggml.tokens/merges, split as tokenizer.ggml.pre says."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        pre_tokenizer, ignore_merges = byte_level, False
    elif pre in _DIGIT_PRE:
        pre_tokenizer, ignore_merges = pre_tokenizers.Sequence([pre_tokenizers.Digits(True), byte_level]), False
    elif pre in _REGEX_PRE:
        split = pre_tokenizers.Split(Regex(_REGEX_PRE[pre]), behavior="isolated")
        bytes_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        pre_tokenizer = pre_tokenizers.Sequence([split, bytes_only])
        ignore_merges = True  # Llama 3 and Qwen 2 take a whole word from the vocabulary before merging
    else:
        supported = sorted([*_GPT2_PRE, *_DIGIT_PRE, *_REGEX_PRE])
        raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(supported)})")

    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # Every ordinary token is written in the byte alphabet; respell any that is not.
    vocab = {
        (token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode("utf-8"))): i
        for i, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a mislabel; adding it would grow the vocabulary.
    tok.add_special_tokens(
        [
            AddedToken(token, normalized=False, special=True)
            for token, kind in zip(tokens, types, strict=True)
            if kind == _CONTROL and set(token) <= spelled
        ]
    )
    tok.add_tokens(
        [
            AddedToken(token, normalized=False, special=False)
            for token, kind in zip(tokens, types, strict=True)
            if kind == _USER_DEFINED and token in vocab
        ]
    )
    return tok


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def sentencepiece_proto(meta: dict[str, Any]) -> bytes:
    """A serialized SentencePiece ModelProto for a GGUF's SentencePiece vocabulary (tokenizer.ggml.model "llama")."""
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pieces = b"".join(
        _pb_bytes(1, _pb_bytes(1, token.encode("utf-8")) + _pb_float(2, score) + _pb_varint(3, kind))
        for token, score, kind in zip(tokens, scores, types, strict=True)
    )
    trainer = (
        _pb_varint(3, 2)  # model_type: BPE, what llama.cpp's SentencePiece vocabulary means
        + _pb_varint(4, len(tokens))
        + _pb_varint(35, int(_BYTE in types))  # byte_fallback
        + _pb_varint(40, meta.get("tokenizer.ggml.unknown_token_id", 0))
        + _pb_varint(41, meta.get("tokenizer.ggml.bos_token_id", 1))
        + _pb_varint(42, meta.get("tokenizer.ggml.eos_token_id", 2))
        + _pb_varint(43, meta.get("tokenizer.ggml.padding_token_id", -1))
    )
    normalizer = (
        _pb_bytes(1, b"identity")
        + _pb_varint(3, int(meta.get("tokenizer.ggml.add_space_prefix", True)))  # add_dummy_prefix
        + _pb_varint(4, 0)  # remove_extra_whitespaces
        + _pb_varint(5, 1)  # escape_whitespaces
    )
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


def _pb_key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32s are written as ten-byte two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pb_varint(field: int, value: int) -> bytes:
    return _pb_key(field, 0) + _varint(int(value))


def _pb_float(field: int, value: float) -> bytes:
    return _pb_key(field, 5) + struct.pack("<f", value)


def _pb_bytes(field: int, value: bytes) -> bytes:
    return _pb_key(field, 2) + _varint(len(value)) + value
