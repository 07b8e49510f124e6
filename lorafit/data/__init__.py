"""Instruction data: sources, prompt styles, tokenisation with prompt masking, batching, the demo task."""

from lorafit.data.batching import BatchPlan, collate
from lorafit.data.prepare import (
    IGNORE_INDEX,
    PreparedInfo,
    TokenDataset,
    check_prepared_tokenizer,
    default_val_size,
    encode_record,
    load_prepared,
    prepare_dataset,
    prepare_source,
    split_indices,
)
from lorafit.data.prompts import alpaca_prompt, default_style, format_prompt
from lorafit.data.sources import ALPACA_URL, DOLLY_URL, DataError, LoadedData, download, load_records, resolve_source

__all__ = [
    "ALPACA_URL",
    "DOLLY_URL",
    "IGNORE_INDEX",
    "BatchPlan",
    "DataError",
    "LoadedData",
    "PreparedInfo",
    "TokenDataset",
    "alpaca_prompt",
    "check_prepared_tokenizer",
    "collate",
    "default_style",
    "default_val_size",
    "download",
    "encode_record",
    "format_prompt",
    "load_prepared",
    "load_records",
    "prepare_dataset",
    "prepare_source",
    "resolve_source",
    "split_indices",
]
