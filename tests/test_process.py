"""lorafit.process: settings that must precede torch's first allocation, made when lorafit is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Page-aligned addresses of three 3 MiB tensors: torch aligns buffers to pages only when its allocator is asked to
# put them on transparent huge pages (otherwise to 64 bytes).
ALIGNMENT = """
import sys
exec(sys.argv[1])
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), all(torch.empty(3 << 20, dtype=torch.uint8).data_ptr() % 4096 == 0
      for _ in range(3)))
"""


def run(imports: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    command = [sys.executable, "-c", ALIGNMENT, f"import os\n{imports}"]
    return subprocess.run(command, capture_output=True, text=True, check=True, env=clean).stdout.split("\n")[-2]


@pytest.mark.skipif(sys.platform != "linux", reason="transparent huge pages are a Linux feature")
def test_importing_lorafit_puts_large_buffers_on_huge_pages_unless_the_user_said_otherwise():
    assert run("import torch") == "None False"  # torch alone: 64-byte alignment
    assert run("import lorafit, torch") == "1 True"
    assert run("import torch, lorafit") == "1 True"  # torch reads the variable at its first allocation, not import
    assert run("import lorafit, torch", THP_MEM_ALLOC_ENABLE="0") == "0 False"


# bf16 products of 65 shapes, then the first shape again: oneDNN's verbose log says whether its primitive was kept.
# (Fewer than 5 rows take another kernel than oneDNN's.)
PRIMITIVE_CACHE = """
import sys
exec(sys.argv[1])
weight = torch.randn(32, 32).bfloat16()
for rows in [*range(8, 73), 8]:
    torch.randn(rows, 32).bfloat16() @ weight
"""


def last_primitive_lookup(imports: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    clean |= {"ONEDNN_VERBOSE": "2"} | env
    command = [sys.executable, "-c", PRIMITIVE_CACHE, imports]
    log = subprocess.run(command, capture_output=True, text=True, check=True, env=clean).stdout
    return [line.split(",")[3] for line in log.splitlines() if ",create:" in line and ",8x32:" in line][-1]


def test_importing_lorafit_keeps_64_onednn_primitives_unless_the_user_said_otherwise():
    assert last_primitive_lookup("import torch") == "create:cache_hit"  # oneDNN's default keeps 1024
    assert last_primitive_lookup("import lorafit, torch") == "create:cache_miss"  # 65 shapes later, evicted
    assert last_primitive_lookup("import lorafit, torch", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024") == "create:cache_hit"


def test_importing_lorafit_keeps_64_of_ideep_s_primitives_unless_the_user_said_otherwise():
    show = "import os\nexec(sys.argv[1])\nprint(os.environ.get('LRU_CACHE_CAPACITY'))"
    clean = {k: v for k, v in os.environ.items() if k != "LRU_CACHE_CAPACITY"}

    def value(imports: str, **env: str) -> str:
        command = [sys.executable, "-c", "import sys\n" + show, imports]
        return subprocess.run(command, capture_output=True, text=True, check=True, env=clean | env).stdout.strip()

    assert value("import torch") == "None"
    assert value("import lorafit") == "64"
    assert value("import lorafit", LRU_CACHE_CAPACITY="1024") == "1024"
