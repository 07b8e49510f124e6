"""Tokenizer: ids identical to transformers' (and SentencePiece's), BOS rules, chat templates, save round trips."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lorafit.tokenizer import ChatTemplateError, Tokenizer
from tests.conftest import shared_file

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    "Hello, world!",
    "héllo wörld — naïve café",
    "😀🚀 emoji 👩‍👩‍👧 and flags 🇫🇷",
    "中文字符和日本語のテキスト、한국어",
    "def f(x):\n    if x:\n        return  x * 2\n\treturn None\n",
    "a    b\t\tc   \n\n\n  d",
    "\n",
    "   ",
    "  leading and trailing  ",
    "12345 + 3.14159 = 1e10, 2024-01-31, 1,000,000",
    "I'm we'll they've DON'T",
    "Ω≈ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more",
    "x<|im_end|>",
    "<s>Hello</s> there",
    "a <unk> b",
    "x<s>y",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? 😀"},
]


# -------------------------------------------------------------------------------- the default model's GGUF
@pytest.fixture(scope="module")
def gguf_pair(default_gguf: Path) -> tuple[Tokenizer, object]:
    """Our tokenizer and transformers' for the default model's GGUF (the latter takes seconds to build)."""
    ours = Tokenizer.from_gguf(default_gguf)
    theirs = transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    return ours, theirs


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_ids_match_transformers(gguf_pair, text):
    ours, theirs = gguf_pair
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_gguf_special_tokens_and_rules(gguf_pair):
    ours, theirs = gguf_pair
    assert ours.vocab_size == len(theirs) == 49152
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.add_bos is False
    assert ours.token_to_id("<|im_start|>") == 1 and ours.token_to_id("<|im_end|>") == 2
    assert ours.token_to_id("no such token here") is None
    assert ours.stop_ids == {ours.token_to_id("<|im_end|>")}
    # An explicit request still adds them, once.
    assert ours.encode("hi", bos=True, eos=True) == [ours.bos_id, *theirs("hi")["input_ids"], ours.eos_id]


def test_gguf_chat_template_matches_transformers(gguf_pair):
    ours, theirs = gguf_pair
    for messages in (MESSAGES, MESSAGES[1:]):  # with and without a system message (the template adds one)
        for prompt in (True, False):
            expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected
    rendered = ours.apply_chat_template(MESSAGES)
    assert ours.encode(rendered) == theirs(rendered)["input_ids"]


def test_save_round_trip(gguf_pair, tmp_path):
    ours, _ = gguf_pair
    ours.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
    }
    back = Tokenizer.from_checkpoint(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert back.encode(text) == theirs(text)["input_ids"] == ours.encode(text), text
    expected = ours.apply_chat_template(MESSAGES)
    assert back.apply_chat_template(MESSAGES) == expected
    assert theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == expected
    assert (back.bos_id, back.eos_id, back.stop_ids, back.add_bos) == (ours.bos_id, ours.eos_id, ours.stop_ids, False)


# -------------------------------------------------------------------------------- SentencePiece
def _sp_dir(model: Path, folder: Path, add_bos: bool) -> Path:
    """A checkpoint directory holding a SentencePiece model and a tokenizer_config.json stating the BOS rule."""
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.read_bytes())
    config = {"add_bos_token": add_bos, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", ["tokenizer_llama2.model", "tok512.model"])
def test_sentencepiece_matches_sentencepiece(name):
    import sentencepiece as spm

    model = shared_file(f"models/{name}")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ours = Tokenizer.from_checkpoint(model)
    # A bare SentencePiece model follows the LLaMA rule: BOS first.
    assert (ours.bos_id, ours.eos_id, ours.add_bos, ours.vocab_size) == (1, 2, True, sp.get_piece_size())
    for text in TEXTS:
        if "<s>" not in text and "</s>" not in text and "<unk>" not in text:
            assert ours.encode(text) == [1, *sp.encode(text)], text
            assert ours.encode(text, bos=False, eos=True) == [*sp.encode(text), 2], text
            assert ours.decode(ours.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text))
    assert ours.encode("x<s>y</s>", bos=False) == [*sp.encode("x"), 1, *sp.encode("y"), 2]
    assert ours.decode(ours.encode("x<s>y", bos=False)) == "x<s>y"


@pytest.mark.parametrize("name", ["tokenizer_llama2.model", "tok512.model"])
@pytest.mark.parametrize("add_bos", [True, False])
def test_sentencepiece_matches_transformers(name, add_bos, tmp_path):
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model through protobuf")
    folder = _sp_dir(shared_file(f"models/{name}"), tmp_path / "model", add_bos)
    ours = Tokenizer.from_checkpoint(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.add_bos is add_bos
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text

    ours.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    back = Tokenizer.from_checkpoint(tmp_path / "saved")
    theirs_back = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in TEXTS:
        assert back.encode(text) == theirs_back(text)["input_ids"] == ours.encode(text), text


def test_gguf_with_sentencepiece_vocabulary(tmp_path):
    """A GGUF stating tokenizer.ggml.model "llama" tokenizes as the SentencePiece model it came from."""
    import gguf
    import sentencepiece as spm

    model = shared_file("models/tokenizer_llama2.model")  # identity normalizer: nothing the GGUF cannot state
    sp = spm.SentencePieceProcessor(model_file=str(model))
    n = sp.get_piece_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    writer = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(sp.encode_as_pieces("a")[0].startswith("▁"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    ours, reference = Tokenizer.from_gguf(tmp_path / "sp.gguf"), Tokenizer.from_checkpoint(model)
    assert (ours.bos_id, ours.eos_id, ours.add_bos, ours.vocab_size) == (1, 2, True, n)
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text


# ------------------------------------------------------------------------ tokenizer.json with a BOS post-processor
LLAMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{% for message in messages %}\n"
    "    {% if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "        {{ raise_exception('unknown role ' + message['role']) }}\n"
    "    {% endif %}\n"
    "    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
    "{{ '<|eot_id|>' }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "    {{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{% endif %}\n"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3_json(tmp_path_factory) -> Path:
    """A tiny byte-level BPE trained in memory, whose post-processor adds BOS as Llama 3's does."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=LLAMA3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text * 3 for text in TEXTS] + [t["content"] for t in MESSAGES], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))]
    )
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.json"
    tok.save(str(path))
    return path


def _llama3_dir(llama3_json: Path, folder: Path, **config) -> Path:
    folder.mkdir()
    (folder / "tokenizer.json").write_text(llama3_json.read_text())
    config = {
        "bos_token": LLAMA3_SPECIALS[0],
        "eos_token": LLAMA3_SPECIALS[1],
        "chat_template": LLAMA3_TEMPLATE,
        **config,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    return folder


@pytest.mark.parametrize("add_bos", [None, True, False])
def test_post_processor_bos_is_never_doubled(llama3_json, tmp_path, add_bos):
    config = {} if add_bos is None else {"add_bos_token": add_bos}
    folder = _llama3_dir(llama3_json, tmp_path / "model", **config)
    ours = Tokenizer.from_checkpoint(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    # The post-processor's BOS stands whatever the config says, as in transformers; never a second one.
    assert ours.add_bos is True and ours.bos_id == 0
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ids[0] == 0 and ids[1:2] != [0]
    assert ours.encode("hi", bos=False) == theirs("hi", add_special_tokens=False)["input_ids"]

    ours.save(tmp_path / "saved")
    back = Tokenizer.from_checkpoint(tmp_path / "saved")
    theirs_back = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in TEXTS:
        assert back.encode(text) == theirs_back(text)["input_ids"] == ours.encode(text), text


def test_config_flag_adds_bos_missing_from_post_processor(llama3_json, tmp_path):
    folder = _llama3_dir(llama3_json, tmp_path / "model", add_bos_token=True)
    data = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**data, "post_processor": None}))
    ours = Tokenizer.from_checkpoint(folder)
    assert ours.add_bos is True
    assert ours.encode("hi") == [0, *ours.encode("hi", bos=False)] and ours.encode("hi", bos=False)[0] != 0


def test_stop_ids_and_template_blocks(llama3_json, tmp_path):
    folder = _llama3_dir(llama3_json, tmp_path / "model")
    ours = Tokenizer.from_checkpoint(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    # generation_config.json lists two eos ids; the template ends turns with <|eot_id|>.
    assert ours.eos_id == 1 and ours.stop_ids == {1, 4, ours.token_to_id("<|eot_id|>")}
    for prompt in (True, False):  # trim_blocks / lstrip_blocks decide the whitespace here
        expected = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=prompt) == expected
    with pytest.raises(
        ChatTemplateError, match=r"tokenizer_config.json: chat_template: the chat template failed: .*unknown role tool"
    ):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_jinja_file_wins(llama3_json, tmp_path):
    folder = _llama3_dir(llama3_json, tmp_path / "model")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_checkpoint(folder).apply_chat_template(MESSAGES[:2]) == "[Be brief.][What is 2+2?]"


# -------------------------------------------------------------------------------- errors
def test_directory_without_tokenizer(tmp_path):
    message = f"^no tokenizer.json, tokenizer.model or single .gguf file in {re.escape(str(tmp_path))}$"
    with pytest.raises(FileNotFoundError, match=message):
        Tokenizer.from_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(tmp_path / 'missing'))} does not exist$"):
        Tokenizer.from_checkpoint(tmp_path / "missing")


def test_no_chat_template(llama3_json):
    tok = Tokenizer.from_checkpoint(llama3_json)  # a bare tokenizer.json: no config beside it
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="^this tokenizer has no chat template"):
        tok.apply_chat_template(MESSAGES)


def test_unsupported_gguf_pre_tokenizer(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("no-such-pre")
    writer.add_token_list(["a", "b"])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"odd.gguf: tokenizer.ggml.pre 'no-such-pre' is not supported"):
        Tokenizer.from_gguf(tmp_path / "odd.gguf")
