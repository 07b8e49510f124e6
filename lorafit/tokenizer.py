"""One Tokenizer over tokenizer.json, tokenizer.model and GGUF metadata, with chat templates.

The ids match transformers' `AutoTokenizer(...)(text)["input_ids"]`: special tokens written in the text
map to their single ids, and BOS/EOS follow the model's own files (never added twice).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from lorafit.gguf_vocab import byte_level_bpe, read_gguf_metadata, sentencepiece_proto
from lorafit.io import write_atomically, write_json, write_text

# Tokens that end a chat turn; one counts as a stop id when the model's chat template writes it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class ChatTemplateError(ValueError):
    """A chat template that does not parse, or that fails while rendering; the message names where it came from."""


class Tokenizer:
    """Text to ids and back, BOS/EOS rules and the chat template, whatever file the model ships."""

    name: str
    """Where the tokenizer was read from (a file path), for messages that must say which tokenizer."""
    chat_template_source: str
    """Where the chat template was read from, for errors in the template."""

    def __init__(
        self,
        backend: _JsonBackend | _SentencePieceBackend,
        special_tokens: dict[str, str],
        add_bos: bool,
        add_eos: bool = False,
        extra_stop_ids: Sequence[int] = (),
        chat_template: str | None = None,
        name: str = "tokenizer",
        chat_template_source: str | None = None,
    ) -> None:
        self._backend = backend
        self.name = name
        self.chat_template_source = chat_template_source or f"{name}: chat template"
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
        return cls._from_files(backend, file)

    @classmethod
    def _from_files(cls, backend: _JsonBackend | _SentencePieceBackend, file: Path) -> Tokenizer:
        """Combine a backend with the rules in tokenizer_config.json, generation_config.json and config.json."""
        folder = file.parent
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
        template, template_source = _read_chat_template(folder, tok_config)
        return cls(backend, special, add_bos, add_eos, stop_ids, template, str(file), template_source)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its `tokenizer.*` metadata."""
        path = Path(path)
        meta = read_gguf_metadata(path)
        kind = meta.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError(f"{path}: no tokenizer.ggml.tokens in the GGUF metadata")
        if kind == "gpt2":
            backend: _JsonBackend | _SentencePieceBackend = _JsonBackend(byte_level_bpe(meta, path))
        elif kind == "llama":
            backend = _SentencePieceBackend(spm.SentencePieceProcessor(model_proto=sentencepiece_proto(meta)))
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
        template = meta.get("tokenizer.chat_template")
        source = f"{path}: metadata tokenizer.chat_template"
        return cls(backend, special, add_bos, add_eos, stop_ids, template, str(path), source)

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

    def vocabulary_sha256(self) -> str:
        """A hash of every token string in id order: two tokenizers that map any id differently differ here."""
        digest = hashlib.sha256()
        for i in range(self.vocab_size):
            digest.update((self._backend.id_to_token(i) or "").encode("utf-8", errors="surrogatepass") + b"\0")
        return digest.hexdigest()

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's chat template, exactly as transformers does."""
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (none in tokenizer_config.json, "
                "chat_template.jinja or the GGUF metadata)"
            )
        from jinja2.exceptions import TemplateError, TemplateSyntaxError

        try:
            template = _compile_template(self.chat_template)
        except TemplateSyntaxError as err:
            raise ChatTemplateError(
                f"{self.chat_template_source}: the chat template does not parse (line {err.lineno}: {err.message})"
            ) from None
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self._special,
            )
        except TemplateError as err:  # raise_exception() in the template, or something the sandbox refused
            raise ChatTemplateError(f"{self.chat_template_source}: the chat template failed: {err}") from None
        except Exception as err:  # the template is data: any error in it is the template's, not lorafit's
            raise ChatTemplateError(
                f"{self.chat_template_source}: the chat template failed: {type(err).__name__}: {err}"
            ) from None

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
            write_text(out / "chat_template.jinja", self.chat_template)
        write_json(out / "tokenizer_config.json", config)
        write_json(out / "special_tokens_map.json", tokens)

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
        write_atomically(out / "tokenizer.json", lambda tmp: tok.save(str(tmp)))


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
        write_atomically(out / "tokenizer.model", lambda tmp: tmp.write_bytes(self.sp.serialized_model_proto()))


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


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a dict with its "content"."""
    return value.get("content") if isinstance(value, dict) else value


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _read_chat_template(folder: Path, tok_config: dict[str, Any]) -> tuple[str | None, str]:
    """(template, where it came from): chat_template.jinja wins over tokenizer_config.json, as in transformers."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template, f"{folder / 'tokenizer_config.json'}: chat_template"


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
