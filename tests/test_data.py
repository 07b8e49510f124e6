"""lorafit.data: prompt styles, sources and their errors, tokenisation with masks, caching, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafit.data import default_val_size
from lorafit.data import prepare as prepare_module
from lorafit.data.batching import BatchPlan, collate
from lorafit.data.prepare import (
    IGNORE_INDEX,
    TokenDataset,
    encode_record,
    load_prepared,
    prepare_dataset,
    prepare_source,
    split_indices,
)
from lorafit.data.prompts import alpaca_prompt, default_style, format_prompt, resolve_style
from lorafit.data.sources import DataError, download, load_records, resolve_source
from lorafit.tokenizer import Tokenizer
from tests.conftest import shared_file

# A minimal ChatML-like template, so chat tests do not need the default model.
SIMPLE_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def llama2() -> Tokenizer:
    return Tokenizer.from_checkpoint(shared_file("models/tokenizer_llama2.model"))


@pytest.fixture
def chat_tok() -> Tokenizer:
    tok = Tokenizer.from_checkpoint(shared_file("models/tokenizer_llama2.model"))
    tok.chat_template = SIMPLE_TEMPLATE
    return tok


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def supervised_ids(ids: list[int], labels: list[int]) -> list[int]:
    return [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]


# ---------------------------------------------------------------------------- prompts
def test_alpaca_template_is_lit_llamas_verbatim():
    assert alpaca_prompt("Add 2 and 3.", "2, 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd 2 and 3.\n\n### Input:\n2, 3\n\n### Response:"
    )
    assert alpaca_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:"
    )


def test_default_style_follows_the_tokenizer(llama2, chat_tok):
    assert default_style(llama2) == "alpaca"
    assert default_style(chat_tok) == "chat"
    assert format_prompt("Say hi.", "to Bob", None, chat_tok) == "<|user|>\nSay hi.\n\nto Bob</s>\n<|assistant|>\n"
    with pytest.raises(ValueError, match="prompt style 'chat' needs a tokenizer with a chat template"):
        resolve_style("chat", llama2)
    with pytest.raises(ValueError, match="unknown prompt style 'vicuna'"):
        resolve_style("vicuna", llama2)


# ---------------------------------------------------------------------------- sources
def test_real_alpaca_sample_skips_the_empty_output():
    loaded = load_records(shared_file("data/alpaca_3k.json"))
    assert (len(loaded.records), loaded.skipped_empty) == (2999, 1)
    assert set(loaded.records[0]) == {"instruction", "input", "output"}
    assert sum(bool(r["input"]) for r in loaded.records) == 1165


def test_real_dolly_maps_context_and_response():
    loaded = load_records(shared_file("data/dolly_14k.jsonl"))
    assert (len(loaded.records), loaded.skipped_empty) == (14515, 0)
    first = loaded.records[0]
    assert first["instruction"] == "When did Virgin Australia start operating?"
    assert first["input"].startswith("Virgin Australia, the trading name")
    assert first["output"].startswith("Virgin Australia commenced services on 31 August 2000")


def test_generic_jsonl_instructions_and_chat(tmp_path):
    lines = [
        {"instruction": "a", "output": "b"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
    ]
    path = write(tmp_path, "mixed.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    loaded = load_records(path)
    assert loaded.records == [{"instruction": "a", "input": "", "output": "b"}, lines[1]]
    assert loaded.skipped_empty == 1


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "data.json",
            '[\n  {"instruction": "a",\n   "output": "b"\n  ,,]',
            "data.json: invalid JSON at line 4, column 4: Expecting property name enclosed in double quotes",
        ),
        (
            "data.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n',
            "data.jsonl: line 2: invalid JSON at column 21: Expecting ',' delimiter",
        ),
        (
            "data.jsonl",
            '{"instruction": "a", "output": "b"}\n' * 6 + '{"instruction": "a", "output": 7}\n',
            "data.jsonl: line 7: field 'output' must be a string, got int",
        ),
        (
            "data.json",
            '[{"instruction": "a", "output": "b"}, {"instruction": "a"}]',
            "data.json: record 1: missing field 'output'",
        ),
        (
            "data.json",
            '[{"instruction": "a", "input": null, "output": "b"}]',
            "data.json: record 0: field 'input' must be a string, got NoneType",
        ),
        (
            "dolly.jsonl",
            '{"instruction": "a", "context": "", "response": "b"}\n{"instruction": "a", "context": ""}',
            "dolly.jsonl: line 2: missing field 'response'",
        ),
        (
            "chat.jsonl",
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}',
            "chat.jsonl: line 1: field 'messages[1].role' must be one of system, user, assistant, got 'bot'",
        ),
        (
            "chat.jsonl",
            '{"messages": [{"role": "user", "content": 3}]}',
            "chat.jsonl: line 1: field 'messages[0].content' must be a string, got int",
        ),
        (
            "chat.jsonl",
            '{"messages": [{"role": "user", "content": "hi"}]}',
            "chat.jsonl: line 1: field 'messages' has no assistant turn to learn from",
        ),
        ("chat.jsonl", '{"messages": []}', "chat.jsonl: line 1: field 'messages' must be a non-empty list"),
        ("data.json", '[["a", "b"]]', "data.json: record 0: expected an object, got list"),
        ("empty.jsonl", "\n  \n", "empty.jsonl: file is empty (no records)"),
        ("empty.json", "[]", "empty.json: file is empty (no records)"),
    ],
)
def test_data_errors_name_file_place_and_field(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(DataError) as error:
        load_records(path)
    assert str(error.value).startswith(message)


def test_download_from_a_url_into_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    source = write(tmp_path, "remote.json", json.dumps([{"instruction": "a", "output": "b"}]))
    path = resolve_source(source.as_uri())
    assert path.parent == tmp_path / "home" / "datasets" and path.name.endswith("-remote.json")
    assert path.read_bytes() == source.read_bytes()
    assert "downloading remote.json" in capsys.readouterr().err
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".json"]  # no temporaries
    mtime = path.stat().st_mtime_ns
    assert download(source.as_uri()) == path and path.stat().st_mtime_ns == mtime  # unchanged: reused
    assert "downloading" not in capsys.readouterr().err
    with pytest.raises(DataError, match="nope.json: no such file"):
        resolve_source(tmp_path / "nope.json")


# ---------------------------------------------------------------------------- tokenisation
def test_alpaca_masks_exactly_the_prompt(llama2):
    for record in load_records(shared_file("data/alpaca_3k.json")).records[:200]:
        ids, labels, truncated = encode_record(record, llama2, "alpaca", 2048)
        prompt = llama2.encode(alpaca_prompt(record["instruction"], record["input"]))
        assert not truncated
        assert ids[: len(prompt)] == prompt and prompt[0] == llama2.bos_id
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :]
        response = supervised_ids(ids, labels)
        assert response[-1] == llama2.eos_id
        assert llama2.decode(response[:-1]) == record["output"]


def test_unmasked_keeps_all_labels(llama2):
    ids, labels, _ = encode_record({"instruction": "a", "input": "", "output": "b"}, llama2, "alpaca", 64, False)
    assert labels == ids and ids[-1] == llama2.eos_id


def test_truncation_drops_prompt_left_first_then_response_end(llama2):
    record = {"instruction": "Summarise.", "input": "word " * 300, "output": "A short summary."}
    full, full_labels, _ = encode_record(record, llama2, "alpaca", 10_000)
    response = supervised_ids(full, full_labels)
    ids, labels, truncated = encode_record(record, llama2, "alpaca", 64)
    assert truncated and len(ids) == 64
    assert ids[0] == llama2.bos_id  # BOS stays; the prompt loses its left, keeping "### Response:"
    assert ids[1:] == full[len(full) - 63 :]
    assert supervised_ids(ids, labels) == response
    assert llama2.decode(ids[-len(response) - 4 : -len(response)]).endswith("### Response:")

    record = {"instruction": "Write.", "input": "", "output": "word " * 300}
    full, full_labels, _ = encode_record(record, llama2, "alpaca", 10_000)
    response = supervised_ids(full, full_labels)[:-1]
    ids, labels, truncated = encode_record(record, llama2, "alpaca", 32)
    assert truncated and len(ids) == 32
    assert ids == [llama2.bos_id] + response[:30] + [llama2.eos_id]
    assert labels == [IGNORE_INDEX] + response[:30] + [llama2.eos_id]


def test_chat_multi_turn_supervises_only_assistant_turns(chat_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
    ids, labels, _ = encode_record({"messages": messages}, chat_tok, "chat", 512)
    eos = chat_tok.eos_id
    turns, current = [], []
    for t, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(t)
            if t == eos:
                turns.append(current)
                current = []
    assert not current and [chat_tok.decode(turn[:-1]) for turn in turns] == ["Hello.", "It is 4."]
    assert ids[-1] == eos
    whole = chat_tok.apply_chat_template(messages, add_generation_prompt=False)
    assert ids == chat_tok.encode(whole)[: len(ids)]  # the same tokens as the whole conversation encoded at once
    # The prompt of the first turn is exactly what generation would feed.
    prompt = chat_tok.encode(chat_tok.apply_chat_template(messages[:2], add_generation_prompt=True))
    assert ids[: len(prompt)] == prompt


def test_chat_on_the_default_model_matches_whole_text_encoding(default_gguf):
    tok = Tokenizer.from_gguf(default_gguf)
    record = {"instruction": "Name a colour.", "input": "Not red.", "output": "Blue."}
    ids, labels, _ = encode_record(record, tok, default_style(tok), 512)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Name a colour.\n\nNot red."}, {"role": "assistant", "content": "Blue."}],
        add_generation_prompt=False,
    )
    assert ids == tok.encode(text.rstrip("\n"))  # the whole text up to the final end-of-turn token
    assert tok.decode(supervised_ids(ids, labels)) == "Blue.<|im_end|>"


def test_chat_records_need_the_chat_style(llama2):
    with pytest.raises(DataError, match="need the chat prompt style"):
        encode_record({"messages": [{"role": "assistant", "content": "x"}]}, llama2, "alpaca", 64)


# ---------------------------------------------------------------------------- split, save, cache
def test_split_matches_random_split_and_alpaca_sizes():
    train, val = split_indices(51_759, 2000, seed=42)
    assert (len(train), len(val)) == (49_759, 2000)
    assert sorted(train + val) == list(range(51_759))
    expected = torch.utils.data.random_split(range(51_759), [49_759, 2000], torch.Generator().manual_seed(42))
    assert train == list(expected[0].indices) and val == list(expected[1].indices)
    assert split_indices(51_759, 2000, seed=42) == (train, val)
    with pytest.raises(ValueError, match="val_size 20 must leave training data: there are only 20 records"):
        split_indices(20, 20)


def test_default_val_size_fits_small_files_and_alpaca():
    assert [default_val_size(n) for n in (1, 9, 20, 25, 3000, 51_759)] == [0, 0, 2, 2, 300, 2000]


def test_prepare_without_val_size_uses_the_rule(llama2, tmp_path):
    records = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(20)]
    info = prepare_dataset(records, llama2, tmp_path / "d", max_seq_length=64, progress=False)
    assert (info.train, info.val, info.val_size) == (18, 2, 2)
    assert prepare_dataset(records, llama2, tmp_path / "d", max_seq_length=64, progress=False).cached
    one = prepare_dataset(records[:1], llama2, tmp_path / "one", max_seq_length=64, progress=False)
    assert (one.train, one.val) == (1, 0)
    with pytest.raises(DataError, match=r"val_size 20 must leave training data: there are only 20 records \(leave"):
        prepare_dataset(records, llama2, tmp_path / "e", max_seq_length=64, val_size=20, progress=False)
    assert not (tmp_path / "e").exists()


def test_prepare_alpaca_saves_reloads_and_caches(llama2, tmp_path, monkeypatch):
    source = shared_file("data/alpaca_3k.json")
    out = tmp_path / "alpaca"
    info = prepare_source(source, llama2, out, max_seq_length=256, val_size=300, progress=False)
    assert (info.train, info.val, info.skipped_empty, info.cached) == (2699, 300, 1, False)
    assert info.prompt_style == "alpaca"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.safetensors", "val.safetensors"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["truncated"] == info.truncated and meta["source"] == str(source)

    records = load_records(source).records
    train_idx, val_idx = split_indices(len(records), 300)
    expected = [encode_record(records[i], llama2, "alpaca", 256) for i in train_idx + val_idx]
    assert info.truncated == sum(t for _, _, t in expected) > 0
    train, val = load_prepared(out)
    assert (len(train), len(val)) == (2699, 300)
    for i in (0, 17, 2698):
        ids, labels = train[i]
        assert (ids.tolist(), labels.tolist()) == expected[i][:2]
    ids, labels = val[299]
    assert (ids.tolist(), labels.tolist()) == expected[-1][:2]
    assert max(train.lengths) == 256 and train.num_tokens() == info.train_tokens

    # The same inputs again: reused without parsing or tokenising.
    monkeypatch.setattr(prepare_module, "load_records", lambda *a, **k: pytest.fail("parsed again"))
    monkeypatch.setattr(prepare_module, "encode_record", lambda *a, **k: pytest.fail("tokenised again"))
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    again = prepare_source(source, llama2, out, max_seq_length=256, val_size=300, progress=False)
    assert again.cached and again.cache_key == info.cache_key
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == mtimes  # nothing rewritten
    monkeypatch.undo()
    changed = prepare_source(source, llama2, out, max_seq_length=128, val_size=300, progress=False)
    assert not changed.cached and changed.truncated > info.truncated


def test_prepare_in_memory_records_and_dolly(llama2, tmp_path):
    loaded = load_records(shared_file("data/dolly_14k.jsonl"))
    records = loaded.records[:1000]
    info = prepare_dataset(records, llama2, tmp_path / "d", max_seq_length=512, val_size=100, progress=False)
    assert (info.train, info.val) == (900, 100)
    assert prepare_dataset(records, llama2, tmp_path / "d", max_seq_length=512, val_size=100).cached
    train, _ = load_prepared(tmp_path / "d")
    ids, labels = train[0]
    assert ids.dtype == torch.long and labels.dtype == torch.long
    assert labels[-1] == llama2.eos_id and max(train.lengths) <= 512
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        load_prepared(tmp_path / "missing")


# ---------------------------------------------------------------------------- batching
def test_batch_plan_covers_every_sample_once_and_groups_lengths():
    lengths = [(i * 37) % 501 + 1 for i in range(1234)]
    plan = BatchPlan(lengths, micro_batch_size=4, seed=42, mega_batch_factor=10)
    for epoch in (0, 1):
        batches = plan.batches(epoch)
        assert len(batches) == len(plan) == sum(-(-min(40, 1234 - s) // 4) for s in range(0, 1234, 40))
        assert sorted(i for b in batches for i in b) == list(range(1234))
    assert plan.batches(0) == BatchPlan(lengths, 4, 42, 10).batches(0)
    assert plan.batches(0) != plan.batches(1)
    real = sum(plan.token_counts(b)[0] for b in plan.batches(0))
    padded = sum(plan.token_counts(b)[1] for b in plan.batches(0))
    assert real == sum(lengths)
    shuffled = [lengths[i : i + 4] for i in range(0, 1232, 4)]
    padded_unsorted = sum(max(b) * len(b) for b in shuffled) + max(lengths[1232:]) * 2
    assert padded - real < 0.25 * (padded_unsorted - real)  # grouping by length wastes far less on padding
    for epoch in (0, 1):  # the largest batch first, so a run that cannot fit fails at once
        batches = plan.batches(epoch)
        assert plan.token_counts(batches[0])[1] == max(plan.token_counts(b)[1] for b in batches)


def test_batch_plan_without_grouping_draws_micro_batches_at_random():
    lengths = list(range(1, 401))  # sample i has length i + 1: grouped batches hold neighbours
    grouped, random_draw = BatchPlan(lengths, 4, seed=0), BatchPlan(lengths, 4, seed=0, mega_batch_factor=1)
    for plan in (grouped, random_draw):
        assert sorted(i for b in plan.batches(0) for i in b) == list(range(400))

    def spread(plan: BatchPlan) -> float:  # mean length range inside a micro-batch
        return sum(max(b) - min(b) for b in plan.batches(0)) / len(plan)

    assert spread(grouped) < 10 < 100 < spread(random_draw)


def test_batch_plan_is_a_function_of_seed_and_epoch():
    """A resumed run rebuilds the plan and gets the same batches: nothing depends on what was asked before."""
    plan = BatchPlan([5, 3, 8, 1, 9, 2, 7], micro_batch_size=2, seed=1, mega_batch_factor=2)
    later = [plan.batches(epoch) for epoch in (3, 0, 1)]
    fresh = BatchPlan([5, 3, 8, 1, 9, 2, 7], micro_batch_size=2, seed=1, mega_batch_factor=2)
    assert [fresh.batches(epoch) for epoch in (3, 0, 1)] == later
    assert fresh.batches(0) != BatchPlan([5, 3, 8, 1, 9, 2, 7], 2, seed=2, mega_batch_factor=2).batches(0)


def test_collate_right_pads_to_the_longest():
    samples = [(torch.tensor([1, 2, 3]), torch.tensor([-100, 2, 3])), (torch.tensor([4]), torch.tensor([4]))]
    ids, labels = collate(samples, pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert labels.tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_token_dataset_round_trip(tmp_path):
    data = TokenDataset.from_samples([([1, 2, 3], [-100, 2, 3]), ([7], [7])])
    data.save(tmp_path / "x.safetensors")
    loaded = TokenDataset.load(tmp_path / "x.safetensors")
    assert loaded.lengths == [3, 1] and loaded[1][0].tolist() == [7] and loaded[0][1].tolist() == [-100, 2, 3]
    assert loaded[-1][0].tolist() == [7]
    with pytest.raises(IndexError):
        loaded[2]
