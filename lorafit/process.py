"""Process-wide settings that only take effect when made before torch is imported; lorafit sets them on import.

`lorafit/__init__.py` imports this module first, so the `lorafit` command and `python -m lorafit` always run
with them; a program that allocates tensors before importing lorafit keeps torch's own defaults (importing
torch alone allocates nothing that reads them). A value already in the environment is left alone (set
THP_MEM_ALLOC_ENABLE=0 or ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 to opt out).
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
    # oneDNN (PyTorch's bf16 matmuls on the CPU) keeps up to this many compiled primitives, one per operation and
    # shape, 1024 by default. Training meets a new batch shape every few steps, and the kept primitives grew the
    # peak RSS by hundreds of MiB; a step needs far fewer than 64 at once. LoRA epoch of benchmarks/train_cpu.py
    # (2-core AMD EPYC, bf16 mixed, 2026-11-30, one run each): peak RSS 2353 MiB at 64 (2239 at 32, 2488 at 256)
    # instead of 2744, at 294 vs 306 real tokens/s (the runs' spread); the demo's shape (LoRA on every linear,
    # micro-batch 8): 3113-3166 instead of 3216-3266 MiB at the same speed. The price: bf16 one-token forwards at
    # 1..32 rows in turn (a server with bf16 weights) take 40 ms instead of 37, as primitives are rebuilt.
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",
}

for name, value in PROCESS_ENV.items():
    os.environ.setdefault(name, value)
