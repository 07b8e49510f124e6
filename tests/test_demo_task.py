"""The demo task: generated contact notes, their JSON targets, and the metrics."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest

from lorafit.data.demo_task import (
    DATE_STYLES,
    INSTRUCTION,
    KEYS,
    TEMPLATES,
    make_contact_notes,
    parse_prediction,
    score,
    split,
)

MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
ABBREVIATED = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"
WEEKDAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"


def dates_in(note: str) -> set[dt.date]:
    """Every date a reader would see in a note, parsed independently of the generator (US month/day)."""
    found = set()
    for day, month, year in re.findall(rf"\b(\d{{1,2}})(?:st|nd|rd|th)? of ({MONTHS}) (\d{{4}})", note):
        found.add(dt.datetime.strptime(f"{day} {month} {year}", "%d %B %Y").date())
    for month, day, year in re.findall(rf"\b({MONTHS}|{ABBREVIATED}) (\d{{1,2}})(?:st|nd|rd|th)?, (\d{{4}})", note):
        fmt = "%B %d %Y" if len(month) > 3 or month == "May" else "%b %d %Y"
        found.add(dt.datetime.strptime(f"{month} {day} {year}", fmt).date())
    for day, month, year in re.findall(rf"\b(\d{{1,2}}) ({MONTHS}) (\d{{4}})", note):
        found.add(dt.datetime.strptime(f"{day} {month} {year}", "%d %B %Y").date())
    for iso in re.findall(r"\b\d{4}-\d{2}-\d{2}\b", note):
        found.add(dt.date.fromisoformat(iso))
    for month, day, year in re.findall(r"(?<![\d.])(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})\b", note):
        found.add(dt.date(int(year) + (2000 if len(year) == 2 else 0), int(month), int(day)))
    return found


def test_same_seed_same_records_and_different_seed_differs():
    assert make_contact_notes(30, seed=7) == make_contact_notes(30, seed=7)
    assert make_contact_notes(30, seed=7) != make_contact_notes(30, seed=8)
    assert make_contact_notes(10, seed=7) == make_contact_notes(30, seed=7)[:10]


def test_outputs_are_strict_json_matching_the_note():
    records = make_contact_notes(400, seed=3)
    used = set()
    for record in records:
        assert record["instruction"] == INSTRUCTION
        target = json.loads(record["output"])
        assert tuple(target) == KEYS
        assert record["output"] == json.dumps(target, separators=(",", ":"))
        for key in ("name", "email", "phone", "company"):
            assert target[key] in record["input"]
        date = dt.date.fromisoformat(target["date"])
        assert dates_in(record["input"]) == {date}, record["input"]
        weekday = re.search(WEEKDAYS, record["input"])
        if weekday:
            assert weekday.group() == f"{date:%A}"
        used |= {
            (t, d)
            for t, template in enumerate(TEMPLATES)
            for d, style in enumerate(DATE_STYLES)
            if template.format(**{**target, "date": style(date)}) == record["input"]
        }
    assert len({r["input"] for r in records}) == 400
    # Every sentence template and every date style occurs.
    assert {t for t, _ in used} == set(range(len(TEMPLATES))) and {d for _, d in used} == set(range(len(DATE_STYLES)))


def test_split_holds_out_the_last_records():
    records = make_contact_notes(20, seed=0)
    train, test = split(records, 5)
    assert train == records[:15] and test == records[15:]
    with pytest.raises(ValueError, match="n_test must be between 1 and 19, got 20"):
        split(records, 20)


def test_parse_prediction_tolerates_whitespace_and_fences():
    assert parse_prediction('  {"a": 1}\n') == {"a": 1}
    assert parse_prediction('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_prediction('```\n{"a": 1}```') == {"a": 1}
    assert parse_prediction('{"a": 1') is None
    assert parse_prediction("[1, 2]") is None
    assert parse_prediction("Sure! {}") is None


def test_score_on_hand_made_cases():
    reference = '{"name":"Ann Lee","email":"ann@x.com","phone":"555-1234","company":"X Inc","date":"2025-03-03"}'
    right = json.loads(reference)
    predictions = [
        reference,  # exact
        "```json\n" + json.dumps(right, indent=2) + "\n```",  # exact, fenced and pretty-printed
        json.dumps({**right, "date": "03/03/2025"}),  # valid, 4 of 5 fields
        json.dumps({k: v for k, v in right.items() if k != "phone"}),  # valid, 4 of 5 fields, missing key
        "The name is Ann Lee.",  # not JSON
    ]
    result = score(predictions, [reference] * 5)
    assert result == {"exact_match": 2 / 5, "valid_json": 4 / 5, "field_accuracy": (5 + 5 + 4 + 4 + 0) / 25}
    with pytest.raises(ValueError, match="need as many predictions as references"):
        score(["{}"], [reference, reference])


def test_demo_evaluates_on_exactly_the_training_prompts_and_targets(default_checkpoint, tmp_path):
    """The demo's held-out notes, tokenised by evaluate as for training: the prompt generation starts from is
    format_prompt's (chat template, generation prompt), and the reference is the record's output."""
    from lorafit.data import format_prompt
    from lorafit.evaluate import load_eval_data, prompt_and_reference
    from lorafit.io import write_json
    from lorafit.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_checkpoint(default_checkpoint)
    notes = make_contact_notes(6, seed=3)
    write_json(tmp_path / "notes.json", notes)
    data = load_eval_data(tmp_path / "notes.json", tokenizer, "chat")
    for i, note in enumerate(notes):
        prompt, reference = prompt_and_reference(*data.dataset[i])
        assert prompt == tokenizer.encode(format_prompt(note["instruction"], note["input"], "chat", tokenizer))
        assert reference[-1] in tokenizer.stop_ids  # the end-of-turn token is supervised: the model learns to stop
        assert tokenizer.decode(reference, skip_special_tokens=True) == note["output"]


def test_demo_recipe_reaches_the_training_loop_and_lora():
    """Every recipe field of DemoConfig is what finetune gets; the README's run is 40 optimizer steps."""
    from lorafit.demo import DemoConfig
    from lorafit.train import total_steps

    cfg = DemoConfig(seed=3)
    train, lora = cfg.training(), cfg.lora()
    assert (train.epochs, train.micro_batch_size, train.global_batch_size) == (1, 4, 8)
    assert (train.learning_rate, train.warmup_steps, train.seed) == (2e-3, 2, 3)
    assert (lora.r, lora.alpha, lora.dropout) == (16, 32, 0.05)
    assert lora.targets == ("q", "k", "v", "o", "gate", "up", "down")
    assert total_steps(train, cfg.n_train) == 40
    assert DemoConfig(lora_dropout=0.0).lora().dropout == 0.0
