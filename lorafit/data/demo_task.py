"""The `lorafit demo` task: turn a short free-text contact note into strict JSON.

Notes are generated with a seeded RNG and Faker: a name, email, phone, company and a date written in
one of several human styles, in varied sentence templates. The target is compact JSON with a fixed
key order and the date in ISO form. Slash dates follow the US month/day order.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from faker import Faker

INSTRUCTION = (
    "Extract the contact details from the note as JSON with keys name, email, phone, company, date (YYYY-MM-DD)."
)
KEYS = ("name", "email", "phone", "company", "date")

# Each template names the person, company, email, phone and date; they differ in order and wording.
TEMPLATES = (
    "Met {name} from {company} on {date}. Email: {email}, phone: {phone}.",
    "{name} ({company}) - {email}, {phone}. Next meeting {date}.",
    "Call with {name} of {company} on {date}; reach them at {email} or {phone}.",
    "Spoke to {name} at {company}. Follow up by {date}. Phone {phone} / email {email}",
    "{company} contact: {name}, {phone}, {email}. Demo scheduled for {date}.",
    "{date}: coffee with {name} ({email}), who works at {company}. Cell {phone}.",
    "New lead! {name} works for {company}. {email} | {phone} | meeting {date}",
    "Reminder: send the proposal to {name} at {company} before {date}. {email}, tel. {phone}",
    "Phone {phone}. {name}, {company}. Wants a callback on {date}, or email {email}.",
    "Conference notes - {name}, {company}; email {email}; mobile {phone}; lunch on {date}.",
)


def _ordinal(day: int) -> str:
    """1 -> 1st, 2 -> 2nd, 11 -> 11th, 23 -> 23rd."""
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# Human ways of writing a date; all unambiguous under the US month/day convention.
DATE_STYLES: tuple[Callable[[dt.date], str], ...] = (
    lambda d: f"{d:%B} {_ordinal(d.day)}, {d.year}",  # March 3rd, 2025
    lambda d: f"{d.month}/{d.day}/{d:%y}",  # 3/3/25
    lambda d: d.isoformat(),  # 2025-03-03
    lambda d: f"{d.day} {d:%B} {d.year}",  # 3 March 2025
    lambda d: f"{d:%b} {d.day}, {d.year}",  # Mar 3, 2025
    lambda d: f"{d:%m/%d/%Y}",  # 03/03/2025
    lambda d: f"{d:%A}, {d:%B} {d.day}, {d.year}",  # Monday, March 3, 2025
    lambda d: f"the {_ordinal(d.day)} of {d:%B} {d.year}",  # the 3rd of March 2025
)

PHONE_STYLES = ("({a}) {b}-{c}", "{a}-{b}-{c}", "{a}.{b}.{c}", "+1 {a} {b} {c}")


def _phone(rng: random.Random) -> str:
    """A US-style phone number in one of several common layouts."""
    parts = {"a": rng.randint(201, 989), "b": rng.randint(200, 999), "c": f"{rng.randint(0, 9999):04d}"}
    return rng.choice(PHONE_STYLES).format(**parts)


def _email(rng: random.Random, first: str, last: str, domain: str) -> str:
    """A work email built from the person's name, as people's addresses usually are."""
    first, last = re.sub(r"[^a-z]", "", first.lower()), re.sub(r"[^a-z]", "", last.lower())
    local = rng.choice((f"{first}.{last}", f"{first[0]}{last}", f"{first}", f"{first}_{last}"))
    return f"{local}@{domain}"


def make_contact_note(fake: Faker, rng: random.Random) -> dict[str, str]:
    """One record: {instruction, input (the note), output (the compact JSON)}."""
    first, last = fake.first_name(), fake.last_name()
    company = fake.company()
    date = dt.date(2023, 1, 1) + dt.timedelta(days=rng.randrange(4 * 365))
    fields = {
        "name": f"{first} {last}",
        "email": _email(rng, first, last, fake.domain_name()),
        "phone": _phone(rng),
        "company": company,
        "date": date.isoformat(),
    }
    note = rng.choice(TEMPLATES).format(**{**fields, "date": rng.choice(DATE_STYLES)(date)})
    return {"instruction": INSTRUCTION, "input": note, "output": json.dumps(fields, separators=(",", ":"))}


def make_contact_notes(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n generated contact-note records; the same seed gives the same records."""
    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    return [make_contact_note(fake, rng) for _ in range(n)]


def split(records: Sequence[dict[str, str]], n_test: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test): the last n_test records are held out."""
    if not 0 < n_test < len(records):
        raise ValueError(f"n_test must be between 1 and {len(records) - 1}, got {n_test}")
    return list(records[:-n_test]), list(records[-n_test:])


def parse_prediction(text: str) -> dict[str, Any] | None:
    """The JSON object in a model's answer, tolerating whitespace and a Markdown code fence; None if invalid."""
    text = text.strip()
    fenced = re.fullmatch(r"```[a-zA-Z]*\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """exact_match, valid_json and field_accuracy (share of reference fields reproduced) over the pairs."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references (and some): {len(predictions)} vs {len(references)}")
    exact = valid = fields_right = fields_total = 0
    for prediction, reference in zip(predictions, references, strict=True):
        parsed, expected = parse_prediction(prediction), json.loads(reference)
        valid += parsed is not None
        exact += parsed == expected
        fields_right += sum(parsed is not None and parsed.get(k) == v for k, v in expected.items())
        fields_total += len(expected)
    n = len(references)
    return {"exact_match": exact / n, "valid_json": valid / n, "field_accuracy": fields_right / fields_total}
