"""One Tokenizer over tokenizer.json, tokenizer.model and GGUF metadata, with chat templates.

The ids match transformers' `AutoTokenizer(...)(text)["input_ids"]`: special tokens written in the text
map to their single ids, and BOS/EOS follow the model's own files (never added twice).
"""

from __future__ import annotations

import functools
import json
import mmap
import re
import struct
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

# Tokens that end a chat turn; one counts as a stop id when the model's chat template writes it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

# How llama.cpp's `tokenizer.ggml.pre` names split text before byte-level BPE.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("gpt2", "default")
_DIGIT_PRE = ("smollm", "starcoder", "refact")  # GPT-2's split, after cutting numbers into single digits
_REGEX_PRE = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# GGUF token types (the same numbers as SentencePiece's piece types).
_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6


class Tokenizer:
    """Text to ids and back, BOS/EOS rules and the chat template, whatever file the model ships."""

    def __init__(
        self,
        backend: _JsonBackend | _SentencePieceBackend,
        special_tokens: dict[str, str],
        add_bos: bool,
        add_eos: bool = False,
        extra_stop_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self._special = {name: token for name, token in special_tokens.items() if token is not None}
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        self.add_bos = add_bos and self.bos_id is not None
        self.add_eos = add_eos and self.eos_id is not None
        self.chat_template = chat_template
        self.vocab_size = backend.vocab_size
        self.stop_ids = {i for i in (self.eos_id, *extra_stop_ids) if i is not None} | self._end_of_turn_ids()

    # ---------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer:
        """Load from a model directory (tokenizer.json, else tokenizer.model, else one .gguf) or one such file."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        file = _tokenizer_file(path) if path.is_dir() else path
        if file.suffix == ".gguf":
            return cls.from_gguf(file)
        if file.suffix == ".json":
            backend: _JsonBackend | _SentencePieceBackend = _JsonBackend(HFTokenizer.from_file(str(file)))
        elif file.suffix == ".model":
            backend = _SentencePieceBackend(spm.SentencePieceProcessor(model_file=str(file)))
        else:
            raise ValueError(f"{file}: not a tokenizer file (expected tokenizer.json, tokenizer.model or .gguf)")
        return cls._from_files(backend, file.parent)

    @classmethod
    def _from_files(cls, backend: _JsonBackend | _SentencePieceBackend, folder: Path) -> Tokenizer:
        """Combine a backend with the rules in tokenizer_config.json, generation_config.json and config.json."""
        tok_config = _read_json(folder / "tokenizer_config.json")
        token_map = _read_json(folder / "special_tokens_map.json")
        model_config = _read_json(folder / "config.json")
        generation = _read_json(folder / "generation_config.json")

        prefix, suffix = backend.added_by_default()
        special = {}
        for name, fallback in (("bos_token", prefix), ("eos_token", suffix), ("unk_token", []), ("pad_token", [])):
            token = _token_text(tok_config.get(name, token_map.get(name)))
            token_id = model_config.get(f"{name}_id")
            if token is None and isinstance(token_id, int):
                token = backend.id_to_token(token_id)
            if token is None and len(fallback) == 1:
                token = backend.id_to_token(fallback[0])
            special[name] = token if token is not None else backend.default_special(name)

        # tokenizer.json's post-processor adds BOS/EOS in transformers whatever the config says; a config flag
        # can only add one where the post-processor does not (older Llama conversions), never a second.
        if isinstance(backend, _JsonBackend):
            add_bos = bool(prefix) or tok_config.get("add_bos_token") is True
            add_eos = bool(suffix) or tok_config.get("add_eos_token") is True
        else:  # a bare SentencePiece model follows the LLaMA convention (and llama.cpp's): BOS first
            add_bos = tok_config.get("add_bos_token", True)
            add_eos = tok_config.get("add_eos_token", False)
        stop_ids = [*_as_list(generation.get("eos_token_id")), *_as_list(model_config.get("eos_token_id"))]
        return cls(backend, special, add_bos, add_eos, stop_ids, _read_chat_template(folder, tok_config))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its `tokenizer.*` metadata."""
        path = Path(path)
        meta = read_gguf_metadata(path)
        kind = meta.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError(f"{path}: no tokenizer.ggml.tokens in the GGUF metadata")
        if kind == "gpt2":
            backend: _JsonBackend | _SentencePieceBackend = _JsonBackend(_byte_level_bpe(meta, path))
        elif kind == "llama":
            backend = _SentencePieceBackend(spm.SentencePieceProcessor(model_proto=_sentencepiece_proto(meta)))
        else:
            raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2', 'llama')")
        tokens = meta["tokenizer.ggml.tokens"]
        special = {}
        names = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
        for name, key in names.items():
            token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
            special[name] = tokens[token_id] if token_id is not None and token_id < len(tokens) else None
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        stop_ids = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(backend, special, add_bos, add_eos, stop_ids, meta.get("tokenizer.chat_template"))

    # ---------------------------------------------------------------------------- text <-> ids
    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        """Token ids of `text`; bos/eos None follow the model's rule (as transformers does by default)."""
        ids = self._backend.encode(text)
        if self.add_bos if bos is None else bos:
            ids = [self._require("bos_token", self.bos_id), *ids]
        if self.add_eos if eos is None else eos:
            ids = [*ids, self._require("eos_token", self.eos_id)]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, or None when the vocabulary lacks it."""
        return self._backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's chat template, exactly as transformers does."""
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (none in tokenizer_config.json, "
                "chat_template.jinja or the GGUF metadata)"
            )
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None, **self._special
        )

    # ---------------------------------------------------------------------------- saving
    def save(self, out_dir: str | Path) -> None:
        """Write the tokenizer in Hugging Face's layout, so that transformers loads the same ids and template."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tokens = dict(self._special)
        bos = (tokens["bos_token"], self.bos_id) if self.add_bos else None
        eos = (tokens["eos_token"], self.eos_id) if self.add_eos else None
        self._backend.save(out, bos, eos)
        config: dict[str, Any] = {
            "tokenizer_class": self._backend.tokenizer_class,
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            **tokens,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
            (out / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        _write_json(out / "tokenizer_config.json", config)
        _write_json(out / "special_tokens_map.json", tokens)

    # ---------------------------------------------------------------------------- helpers
    def _special_id(self, name: str) -> int | None:
        token = self._special.get(name)
        return None if token is None else self._backend.token_to_id(token)

    def _require(self, name: str, token_id: int | None) -> int:
        if token_id is None:
            raise ValueError(f"this tokenizer has no {name}")
        return token_id

    def _end_of_turn_ids(self) -> set[int]:
        """End-of-turn tokens the chat template writes (e.g. <|im_end|>), so generation stops there too."""
        template = self.chat_template or ""
        ids = (self._backend.token_to_id(token) for token in END_OF_TURN_TOKENS if token in template)
        return {i for i in ids if i is not None}


class _JsonBackend:
    """A `tokenizers` tokenizer (tokenizer.json, or the byte-level BPE built from a GGUF)."""

    tokenizer_class = "PreTrainedTokenizerFast"

    def __init__(self, tok: HFTokenizer) -> None:
        tok.no_truncation()
        tok.no_padding()
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def default_special(self, name: str) -> str | None:
        return None

    def added_by_default(self) -> tuple[list[int], list[int]]:
        """The ids tokenizer.json's post-processor puts before and after a text (e.g. Llama 3's BOS)."""
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []

    def save(self, out: Path, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
        """tokenizer.json with a post-processor stating the BOS/EOS rule, so every loader agrees on it."""
        tok = HFTokenizer.from_str(self.tok.to_str())
        single, specials = "$A:0", []
        if bos is not None:
            single = f"{bos[0]}:0 {single}"
            specials.append(bos)
        if eos is not None:
            single = f"{single} {eos[0]}:0"
            specials.append(eos)
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
        tok.save(str(out / "tokenizer.json"))


class _SentencePieceBackend:
    """A SentencePiece model; control tokens written in the text are matched first, as transformers does."""

    tokenizer_class = "PreTrainedTokenizerFast"  # transformers' own LlamaTokenizer re-derives merges, differently

    def __init__(self, sp: spm.SentencePieceProcessor) -> None:
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.specials = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        # Longest first, so that a token containing another is matched whole.
        names = sorted(self.specials, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str) -> list[int]:
        if self.split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, chunk in enumerate(self.split.split(text)):
            if i % 2:
                ids.append(self.specials[chunk])
            elif chunk:
                # Each chunk between special tokens gets its own dummy prefix, as in transformers.
                ids.extend(self.sp.encode(chunk))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        parts, run = [], []
        for i in ids:
            if 0 <= i < self.vocab_size and (self.sp.is_control(i) or self.sp.is_unknown(i)):
                parts.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    parts.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        parts.append(self.sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        return token_id if self.sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def default_special(self, name: str) -> str | None:
        getter = {
            "bos_token": self.sp.bos_id,
            "eos_token": self.sp.eos_id,
            "unk_token": self.sp.unk_id,
            "pad_token": self.sp.pad_id,
        }[name]
        return self.id_to_token(getter())

    def added_by_default(self) -> tuple[list[int], list[int]]:
        return [], []

    def save(self, out: Path, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
        # transformers reads the BOS/EOS rule for a SentencePiece model from tokenizer_config.json.
        (out / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())


# -------------------------------------------------------------------------------- files
def _tokenizer_file(folder: Path) -> Path:
    """The tokenizer file in a model directory: tokenizer.json, else tokenizer.model, else its only .gguf."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            return folder / name
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    raise FileNotFoundError(f"no tokenizer.json, tokenizer.model or single .gguf file in {folder}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a dict with its "content"."""
    return value.get("content") if isinstance(value, dict) else value


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _read_chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json's chat_template, as in transformers."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


# -------------------------------------------------------------------------------- chat templates
@functools.lru_cache(maxsize=8)
def _compile_template(template: str) -> Any:
    """A sandboxed jinja2 template with the environment transformers gives chat templates."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# -------------------------------------------------------------------------------- GGUF
def read_gguf_metadata(path: str | Path, prefixes: tuple[str, ...] = ("tokenizer.", "general.")) -> dict[str, Any]:
    """The key/value metadata of a GGUF file whose keys start with one of `prefixes` (tensors are not read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        version, _, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        reader, meta = _GGUFCursor(buf, 24), {}
        for _ in range(n_kv):
            key = reader.string()
            value = reader.value(reader.scalar(4))
            if key.startswith(prefixes):
                meta[key] = value
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


def _byte_level_bpe(meta: dict[str, Any], path: Path) -> HFTokenizer:
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


def _sentencepiece_proto(meta: dict[str, Any]) -> bytes:
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
