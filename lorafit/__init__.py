"""lorafit: finetune LLaMA-family models cheaply."""

from lorafit.config import Config
from lorafit.generate import LLM

load = LLM.load

__all__ = ["LLM", "Config", "load"]
__version__ = "0.1.0"
