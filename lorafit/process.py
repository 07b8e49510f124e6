"""Process-wide settings that only take effect when made before torch is imported; lorafit sets them on import.

`lorafit/__init__.py` imports this module first, so the `lorafit` command and `python -m lorafit` always run
with them; a program that allocates tensors before importing lorafit keeps torch's own defaults (importing
torch alone allocates nothing that reads them). A value already in the environment is left alone (set
THP_MEM_ALLOC_ENABLE=0, or ONEDNN_PRIMITIVE_CACHE_CAPACITY and LRU_CACHE_CAPACITY to 1024, to opt out).
"""

from __future__ import annotations

import os

PROCESS_ENV = {
    # PyTorch's CPU allocator aligns buffers to pages and asks the kernel for transparent huge pages for those of
    # 2 MiB and more (it reads the variable once, at its first allocation). The page alignment also sends buffers
    # just past glibc's adaptive mmap threshold to their own mappings, which go back to the system when freed. One
    # LoRA epoch of benchmarks/train_cpu.py (2-core AMD EPYC, bf16 mixed, 2026-11-29, three runs each): peak RSS
    # 3194-3269 MiB instead of 3702-3791 (-14%) at the same speed (249-279 vs 249-266 real tokens/s); on the demo's
    # shapes (LoRA on every linear layer) +2% (3953 vs 3889 MiB), also at the same speed.
    "THP_MEM_ALLOC_ENABLE": "1",
    # PyTorch's bf16 matmuls on the CPU run through oneDNN, whose compiled primitives (one per operation and shape,
    # with their buffers) two caches keep: oneDNN's own and ideep's (PyTorch's wrapper), 1024 each by default.
    # Training meets a new batch shape every few steps, and the kept primitives grew the peak RSS by hundreds of
    # MiB (pytorch/pytorch#27971); one step needs far fewer than 64. LoRA epoch of benchmarks/train_cpu.py (2-core
    # AMD EPYC, bf16 mixed, 2026-11-30, one run each, lorafit's worker alone): peak RSS 1725 MiB with both at 64,
    # 2092 with oneDNN's alone at 64, 2157 with ideep's alone, 2475 with neither, at 297-320 real tokens/s (the
    # runs' spread); the demo's shape (LoRA on every linear, micro-batch 8): the same speed. The price: bf16
    # one-token forwards at 1..32 rows in turn (a server with bf16 weights) take 45 ms instead of 40, as primitives
    # are rebuilt; float32 products do not go through oneDNN.
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",
    "LRU_CACHE_CAPACITY": "64",
}

for name, value in PROCESS_ENV.items():
    os.environ.setdefault(name, value)
