"""Bad inputs on the reading side (checkpoints, tokenizers, data, the hub): one clear error naming the file or
field, never a traceback from a library, and nothing left behind (issue 10)."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import RepositoryNotFoundError
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

from lorafit import hub
from lorafit.checkpoint import CheckpointError, load_config, load_model, load_state_dict, read_safetensors
from lorafit.data import DataError, load_prepared, load_records, prepare_dataset, resolve_source
from lorafit.data.sources import ALPACA_URL, download
from lorafit.hub import HubError, resolve_checkpoint
from lorafit.tokenizer import ChatTemplateError, Tokenizer

RECORDS = [{"instruction": f"say the number {i}", "input": "", "output": f"number {i}"} for i in range(12)]
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A one-layer Llama saved by transformers (config.json + model.safetensors)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    out = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def copy_of(folder: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for file in folder.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def word_tokenizer(folder: Path, words: list[str], template: str | None = None) -> Tokenizer:
    """A small word-level tokenizer.json with BOS/EOS, saved in `folder` and loaded the usual way."""
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_checkpoint(folder)


# ------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_model_safetensors_names_the_file(tiny_dir, tmp_path, damage):
    folder = copy_of(tiny_dir, tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))

    with pytest.raises(CheckpointError, match=rf"^{weights}: not a readable safetensors file \(.*\); is it truncated"):
        load_model(folder)
    with pytest.raises(CheckpointError, match=f"^{weights}: "):
        read_safetensors(weights)


def test_config_missing_a_key_names_file_and_key(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    del config["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointError, match=rf"^{folder / 'config.json'}: missing key 'num_hidden_layers'$"):
        load_config(folder)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname", "sub/../../outside.safetensors"])
def test_shard_index_may_not_point_outside_its_directory(tiny_dir, tmp_path, shard):
    folder = copy_of(tiny_dir, tmp_path / "ckpt")
    (tmp_path / "outside.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"model.norm.weight": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(CheckpointError, match=rf"index.json: shard '{shard}' is outside the checkpoint directory"):
        load_state_dict(folder)


def test_shard_index_that_is_not_an_index(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path / "ckpt")
    (folder / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"index.json: not a shard index with a 'weight_map' object"):
        load_state_dict(folder)


# ------------------------------------------------------------------------------------- tokenizers


def small_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(["a", "b", "ab", "<s>", "</s>"] + [f"t{i}" for i in range(200)])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_truncated_gguf_as_a_tokenizer_names_the_file(tmp_path):
    path = small_gguf(tmp_path / "tok.gguf")
    assert Tokenizer.from_checkpoint(path).encode("ab", bos=False) == [2]  # the intact file works
    data = path.read_bytes()
    for cut in (10, 200, len(data) - 300):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"^{path}: (not a GGUF file|truncated or corrupt GGUF metadata)"):
            Tokenizer.from_checkpoint(path)


def test_chat_template_that_does_not_parse(tmp_path):
    tokenizer = word_tokenizer(tmp_path / "tok", ["hi"], template="{% for m in messages %}{{ m.content }")
    source = re.escape(str(tmp_path / "tok" / "tokenizer_config.json"))
    with pytest.raises(
        ChatTemplateError, match=rf"^{source}: chat_template: the chat template does not parse \(line 1"
    ):
        tokenizer.apply_chat_template(MESSAGES)


def test_chat_template_that_raises(tmp_path):
    tokenizer = word_tokenizer(tmp_path / "tok", ["hi"])
    jinja = tmp_path / "tok" / "chat_template.jinja"
    jinja.write_text("{{ raise_exception('System role not supported') }}")
    tokenizer = Tokenizer.from_checkpoint(tmp_path / "tok")
    with pytest.raises(ChatTemplateError, match=rf"^{re.escape(str(jinja))}: .*System role not supported$"):
        tokenizer.apply_chat_template(MESSAGES)
    jinja.write_text("{{ messages[0].content + 1 }}")  # a TypeError inside the template
    with pytest.raises(ChatTemplateError, match=rf"^{re.escape(str(jinja))}: the chat template failed: "):
        Tokenizer.from_checkpoint(tmp_path / "tok").apply_chat_template(MESSAGES)


# ------------------------------------------------------------------------------------- data files


def test_directory_passed_as_data(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(DataError, match=rf"^{tmp_path / 'runs'}: a directory, but not a prepared dataset"):
        resolve_source(tmp_path / "runs")


@pytest.mark.parametrize("name", ["bom.json", "bom.jsonl"])
def test_json_with_a_byte_order_mark_is_read(tmp_path, name):
    text = json.dumps(RECORDS[:2]) if name.endswith(".json") else "\n".join(json.dumps(r) for r in RECORDS[:2])
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_records(tmp_path / name).records == RECORDS[:2]


def test_pretty_printed_object_in_a_jsonl_file(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps(RECORDS[0], indent=2))
    with pytest.raises(DataError, match=r"^data.jsonl: one JSON object spread over several lines; expected JSON Lines"):
        load_records(tmp_path / "data.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')  # two
    with pytest.raises(DataError, match=r"^broken.jsonl: line 2: invalid JSON"):
        load_records(tmp_path / "broken.jsonl")


def test_truncated_prepared_train_file_names_it(tmp_path):
    tokenizer = word_tokenizer(tmp_path / "tok", ["say", "the", "number"])
    prepare_dataset(RECORDS, tokenizer, tmp_path / "prepared", style="alpaca", max_seq_length=64, progress=False)
    train_file = tmp_path / "prepared" / "train.safetensors"
    train_file.write_bytes(train_file.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"^{train_file}: not a readable safetensors file .*prepare the data again$"):
        load_prepared(tmp_path / "prepared")


def test_data_prepared_with_another_tokenizer_is_refused(tmp_path):
    ours = word_tokenizer(tmp_path / "ours", ["say", "the", "number"])
    theirs = word_tokenizer(tmp_path / "theirs", ["number", "the", "say"])  # same size, other ids
    prepare_dataset(RECORDS, theirs, tmp_path / "prepared", style="alpaca", max_seq_length=64, progress=False)

    train, _ = load_prepared(tmp_path / "prepared", theirs)
    assert len(train) == 11  # 12 records: one for validation by default
    with pytest.raises(DataError) as err:
        load_prepared(tmp_path / "prepared", ours)
    message = str(err.value)
    assert (
        str(tmp_path / "theirs" / "tokenizer.json") in message and str(tmp_path / "ours" / "tokenizer.json") in message
    )
    assert message.startswith(f"{tmp_path / 'prepared'}: prepared with tokenizer ")
    # Preparing again with the right tokenizer really re-tokenises: the cache key tells the vocabularies apart.
    again = prepare_dataset(RECORDS, ours, tmp_path / "prepared", style="alpaca", max_seq_length=64, progress=False)
    assert not again.cached and len(load_prepared(tmp_path / "prepared", ours)[0]) == 11


# ------------------------------------------------------------------------------------- downloads


def test_url_cache_is_keyed_by_the_whole_url(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    first, second = tmp_path / "u1" / "train.json", tmp_path / "u2" / "train.json"
    for path, records in ((first, RECORDS[:2]), (second, RECORDS[2:5])):
        path.parent.mkdir()
        path.write_text(json.dumps(records))

    assert load_records(resolve_source(first.as_uri())).records == RECORDS[:2]
    assert load_records(resolve_source(second.as_uri())).records == RECORDS[2:5]  # not u1's copy
    first.write_text(json.dumps(RECORDS[:3]))  # another size: fetched again
    assert load_records(resolve_source(first.as_uri())).records == RECORDS[:3]
    first.write_text(json.dumps(RECORDS[3:6]))  # the same size, a later date: fetched again
    os.utime(first, (first.stat().st_atime, first.stat().st_mtime + 5))
    assert load_records(resolve_source(first.as_uri())).records == RECORDS[3:6]


def test_offline_named_dataset_says_what_it_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as err:
        resolve_source("alpaca")
    message = str(err.value)
    assert message.startswith(f"could not download {ALPACA_URL} (") and "--source FILE" in message
    assert "\n" not in message
    assert not (tmp_path / "home" / "datasets").exists() or not any((tmp_path / "home" / "datasets").iterdir())


def test_offline_uses_a_cached_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    source = tmp_path / "data.json"
    source.write_text(json.dumps(RECORDS[:2]))
    cached = download(source.as_uri())
    source.unlink()  # the "server" is gone
    assert download(source.as_uri()) == cached


# ------------------------------------------------------------------------------------- hub names


@pytest.fixture
def no_network_hub(tmp_path, monkeypatch) -> Path:
    """Empty caches; snapshot_download acts as the Hub does for a repo that does not exist."""
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "work").mkdir()
    (tmp_path / "hf").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # so that ../x names a path that does not exist

    def snapshot_download(repo_id, **kwargs):
        # Create the repo's cache folder first, as a download that gets as far as writing refs would.
        (tmp_path / "hf" / f"models--{repo_id.replace('/', '--')}" / "refs").mkdir(parents=True, exist_ok=True)
        response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise RepositoryNotFoundError(f"404 Client Error.\n\nRepository Not Found for {repo_id}", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return tmp_path


def all_paths(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


@pytest.mark.parametrize("name", ["../x", "../../etc/x", "/abs/name", "org/../x", "org--x/y"])
def test_base_model_outside_the_cache_is_refused(no_network_hub, monkeypatch, name):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("no download for " + name))
    before = all_paths(no_network_hub)

    with pytest.raises(CheckpointError, match=rf"^{re.escape(repr(name))} is (neither an existing|not a Hugging Face)"):
        resolve_checkpoint(name)
    with pytest.raises(CheckpointError):
        hub.download(name)
    assert all_paths(no_network_hub) == before  # no directories created anywhere


def test_path_typo_taken_for_a_repo_id_leaves_no_cache_folder(no_network_hub):
    before = all_paths(no_network_hub)

    with pytest.raises(HubError) as err:
        resolve_checkpoint("runs/tiny")
    message = str(err.value)
    assert message.startswith("'runs/tiny' is neither an existing path nor a reachable Hugging Face repo: ")
    assert "404 Client Error." in message and "\n" not in message
    assert all_paths(no_network_hub) == before
