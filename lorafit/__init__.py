"""lorafit: finetune LLaMA-family models cheaply."""

import lorafit.process  # noqa: F401  (first: its settings must precede torch's import)
from lorafit.config import Config
from lorafit.generate import LLM

load = LLM.load

__all__ = ["LLM", "Config", "load"]
__version__ = "0.1.0"
