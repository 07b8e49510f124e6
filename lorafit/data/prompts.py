"""Prompt styles: how an {instruction, input, output} record becomes text for the model.

Two styles:
- ``alpaca``: lit-llama's Alpaca template, verbatim, for base models without a chat template.
- ``chat``: the model's own chat template (user turn = instruction and input, assistant turn = output).
"""

from __future__ import annotations

from typing import Any

STYLES = ("alpaca", "chat")

# Verbatim from lit-llama's scripts/prepare_alpaca.py (the response follows "### Response:" directly).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def default_style(tokenizer: Any) -> str:
    """The style that follows the model: chat when its tokenizer has a chat template, else alpaca."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def resolve_style(style: str | None, tokenizer: Any) -> str:
    """Check a requested style (None: the model's default) and that the tokenizer supports it."""
    if style is None:
        return default_style(tokenizer)
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")
    if style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt style 'chat' needs a tokenizer with a chat template; this one has none")
    return style


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for an instruction and optional input, ending at "### Response:"."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def user_message(instruction: str, input: str = "") -> dict[str, str]:
    """The chat user turn for an instruction record: the instruction, then the input after a blank line."""
    content = f"{instruction}\n\n{input}" if input else instruction
    return {"role": "user", "content": content}


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A record as chat messages: its own messages, or a user turn plus an assistant turn for the output."""
    if "messages" in record:
        return record["messages"]
    user = user_message(record["instruction"], record.get("input", ""))
    return [user, {"role": "assistant", "content": record["output"]}]


def format_prompt(instruction: str, input: str, style: str | None, tokenizer: Any) -> str:
    """The prompt text a model sees before its response, exactly as in training (for generate and evaluate)."""
    style = resolve_style(style, tokenizer)
    if style == "alpaca":
        return alpaca_prompt(instruction, input)
    return tokenizer.apply_chat_template([user_message(instruction, input)], add_generation_prompt=True)
