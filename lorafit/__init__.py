"""lorafit: finetune LLaMA-family models cheaply."""

from lorafit.config import Config

__all__ = ["Config"]
__version__ = "0.1.0"
