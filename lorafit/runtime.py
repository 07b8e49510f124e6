"""Where and how computation runs: device, dtype and precision, peak memory, and the opt-in process switches.

Every command resolves its device, weight dtype and training precision here, so "auto" means the
same thing everywhere. The switches at the end change process-wide state (glibc's malloc,
inductor's passes, the memory layout of weights); each is off unless a caller asks for it, and each
says what it changes and what it was measured to do.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorafit.io import write_json
from lorafit.ops import DecodeLinear, decode_weight, join_linears, joinable, linear

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """The device to run on: the requested one (checked to exist), else CUDA when available, else the CPU."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise ValueError(f"--device {requested!r} is not a device (e.g. cpu, cuda, cuda:1)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: this machine has no CUDA GPU (or torch is a CPU-only build)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type not in ("cpu", "mps"):
        raise ValueError(f"--device {requested}: unsupported device type {device.type!r} (use cpu or cuda)")
    return device


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a name ("float32", "bf16", ...); None: bfloat16 on GPUs, float32 on CPUs."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete training precision for 'auto': bf16 mixed on GPUs; on the CPU, whichever multiplies faster here.

    On the CPU, bf16 matrix products ran ~30x slower than float32 ones on an AVX2 EPYC and about half as
    fast on an AVX-512 Xeon without AMX, but faster on CPUs with bf16 instructions (AMX, avx512_bf16),
    so 'auto' asks cpu_matmul_probe (measured once per machine, then cached) rather than the CPU's name.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16-mixed"
        if device.type == "cpu":
            return "bf16-mixed" if cpu_matmul_probe().bf16_faster else "32-true"
        return "32-true"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


# ------------------------------------------------------------------------------------------------
# The CPU's precision, by measurement: a small float32 and bf16 matmul timed once per machine.

PROBE_SIZE = 512  # the size of a LoRA step's products on a small model; < 1 s even where bf16 is 30x slower
# bf16-mixed also casts weights and activations every step, so a near tie in matmul speed is not a win.
BF16_MARGIN = 1.2
PROBE_FILE = "cpu_matmul_probe.json"


@dataclass(frozen=True)
class MatmulProbe:
    """One CPU's measured matrix-product speed in float32 and bfloat16 on `threads` threads."""

    cpu: str
    torch_version: str
    threads: int
    float32_gflops: float
    bfloat16_gflops: float

    @property
    def bf16_faster(self) -> bool:
        """Whether bf16 products beat float32 ones by BF16_MARGIN here: then 'auto' trains in bf16-mixed."""
        return self.bfloat16_gflops >= BF16_MARGIN * self.float32_gflops


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it (/proc/cpuinfo on Linux), else platform.processor()."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def _cpuinfo_field(name: str) -> str:
    """The first value of `name` in /proc/cpuinfo, or "" where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def matmul_gflops(dtype: torch.dtype, size: int, repeats: int = 3, budget_s: float | None = None) -> float:
    """Best GFLOP/s of a size³ product in `dtype` on torch's threads: one warm-up, then up to `repeats` timed.

    With budget_s, stops timing once that many seconds have gone by (after at least one timed product).
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)  # the first call picks and prepares the kernel
    best, started = float("inf"), time.perf_counter()
    for _ in range(repeats):
        tick = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - tick)
        if budget_s is not None and time.perf_counter() - started > budget_s:
            break
    return 2 * size**3 / best / 1e9


def measure_matmul() -> MatmulProbe:
    """Time the probe's float32 and bf16 products now (under a second)."""
    return MatmulProbe(
        cpu=cpu_model(),
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        float32_gflops=matmul_gflops(torch.float32, PROBE_SIZE, budget_s=0.2),
        bfloat16_gflops=matmul_gflops(torch.bfloat16, PROBE_SIZE, budget_s=0.2),
    )


def probe_key() -> str:
    """This machine's entry in the probe cache: CPU model, a hash of its flags, torch version and threads.

    The flags are part of it because a virtual machine's model name can be generic ("AMD EPYC" named
    both an AVX2 and an avx512_bf16 CPU here), and a home directory may be shared between machines.
    """
    flags = hashlib.sha256(_cpuinfo_field("flags").encode()).hexdigest()[:12]
    return f"{cpu_model()} | flags {flags} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def cpu_matmul_probe() -> MatmulProbe:
    """This machine's MatmulProbe: from the cache under lorafit's cache dir, else measured now and cached."""
    from lorafit.hub import cache_dir

    path, key = cache_dir() / PROBE_FILE, probe_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: start a new one
        cached = {}
    cached = cached if isinstance(cached, dict) else {}
    try:
        return MatmulProbe(**cached[key])
    except (KeyError, TypeError):  # this machine is not in it yet (or its entry is of another form)
        pass
    probe = measure_matmul()
    try:
        write_json(path, {**cached, key: asdict(probe)})
    except OSError:  # a read-only cache only means measuring again next time
        pass
    return probe


def auto_precision_note(device: torch.device) -> str | None:
    """The line saying what 'auto' chose on the CPU and why (the probe's numbers); None on other devices."""
    if device.type != "cpu":
        return None
    probe = cpu_matmul_probe()
    return (
        f"precision auto: {resolve_precision('auto', device)} (bf16 matmul {probe.bfloat16_gflops:.0f} GFLOP/s "
        f"vs float32 {probe.float32_gflops:.0f} on {probe.cpu}, {probe.threads} threads)"
    )


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype weights are stored in for a concrete precision: bf16 only for bf16-true."""
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast for bf16-mixed; nothing for the other precisions."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()


def store_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Keep each frozen linear layer's weight in `dtype`, the dtype autocast computes its products in.

    Under bf16 autocast a float32 weight is cast on every call, and backward keeps the cast copy (the
    input's gradient needs it): every step holds a second, bf16, copy of every frozen weight. Stored
    in bf16 the products are bit for bit the same, and neither the casts nor the copies exist. Weights
    that train, or that another kind of layer shares (an embedding tied to the LM head), stay as they
    are. On the CPU every other tensor is copied off the checkpoint's memory map, so that the float32
    pages are let go rather than kept resident beside the copies. Returns how many weights changed.
    """
    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(False)}
    stored: dict[int, torch.nn.Parameter] = {}  # by the float32 weight's id: linears sharing one keep sharing
    for module in model.modules():
        weight = getattr(module, "weight", None) if isinstance(module, torch.nn.Linear) else None
        if weight is None or weight.requires_grad or id(weight) in shared or weight.dtype == dtype:
            continue
        if id(weight) not in stored:
            stored[id(weight)] = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        module.weight = stored[id(weight)]
    if stored:
        kept = {id(p) for p in stored.values()}
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and id(tensor) not in kept:
                tensor.data = tensor.data.clone()
    return len(stored)


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory so far: allocated tensors on CUDA, the process's peak resident set size on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


# ------------------------------------------------------------------------------------------------
# Opt-in process switches.


def release_large_buffers(threshold: int) -> bool:
    """Make glibc's malloc map every buffer of >= threshold bytes on its own, so freeing one returns it to the system.

    By default glibc raises this threshold as large buffers are freed (up to 32 MiB), after which
    activations come from its heap, where memory freed by steps of other shapes stays resident and
    fragments: measured on a LoRA run, a quarter of the peak resident memory. The price is a page fault
    per fresh page of every large buffer: at no measurable cost on benchmarks/train_cpu.py, but 30%
    slower on the demo's run (LoRA on every linear, batch 8). Hence a switch (--cpu-mmap-threshold).
    Affects the whole process; a no-op (returns False) off glibc or when the user has set
    MALLOC_MMAP_THRESHOLD_ themselves.
    """
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    m_mmap_threshold = -3  # from malloc.h
    return bool(libc.mallopt(m_mmap_threshold, threshold))


def trim_heap() -> bool:
    """Return the free memory inside glibc's heap to the system now (malloc_trim); False off glibc.

    Loading that quantises layer by layer frees many few-MiB temporaries between the tensors it keeps; their
    pages stay resident (and in the peak RSS of everything after) until trimmed. One call after such a phase
    costs a few milliseconds.
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.malloc_trim(0))


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with torch on one CPU thread (torch.set_num_threads(1)); the thread count after is as before.

    For work before a thread that decodes on all cores (lorafit serve's decode loop): PyTorch's CPU threads are
    GNU OpenMP's, and libgomp keeps a team of worker threads for every thread that ever ran a parallel region,
    for as long as that thread lives. Once it manages more threads than there are CPUs, every team's workers
    sleep between parallel regions instead of spinning, and a decode step runs hundreds of short regions. The
    thread that loads the model would keep its team, so it loads on one thread and keeps none, and so do the
    request threads that load adapters; the decode thread sets its own count (serve.scheduler.Engine). 2-core
    AMD EPYC, SmolLM2-135M, `lorafit serve`, one streaming client: 27 instead of 35-36 ms per token.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def allow_matvec_reductions() -> None:
    """Turn on inductor's pass that rewrites (1 x k) @ (k x n) products as reductions, for any k and n.

    Used by the compiled decode step (generate.compiled_decode_step): on 2 AVX2 cores the fused
    reductions read row-major float32 weights at about twice the bandwidth MKL reaches for one token.
    The pass limits itself on the CPU to n, k <= 2048 (a Llama projection or LM head is wider); the
    limit is a module attribute it reads at compile time. This changes inductor's settings for the
    whole process.
    """
    from torch._inductor import config
    from torch._inductor.fx_passes import decompose_mem_bound_mm

    config.post_grad_fusion_options.setdefault("decompose_mm_pass", {})
    decompose_mem_bound_mm.cpu_max_other_dimension_decomposition = sys.maxsize


def use_decode_kernels(model: torch.nn.Module) -> None:
    """Compute every linear layer's W x + b with ops.linear, which is faster for the few rows of decoding.

    Each plain nn.Linear is replaced by an ops.DecodeLinear sharing its weight (names, tied weights and
    values unchanged); a LoRA or LLaMA-Adapter v2 layer gets ops.linear as its base product, and one that
    wraps a DecodeLinear later keeps it. Prefill and anything under autograd take F.linear as before. The
    compiled decode step writes its own kernels: it is not combined with this.

    The weights are then packed in reading order (pack_decode_weights), a Llama block's query, key and value
    projections, and its gate and up projections, joined, so decoding computes each group as one product.
    """
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, DecodeLinear.wrap(module))
        elif isinstance(module, torch.nn.Linear):
            module.product = linear
    pack_decode_weights(model, join=True)


def decode_order(model: torch.nn.Module) -> list[tuple[torch.nn.Module, ...]]:
    """A Llama's linear layers in the order a decode step reads them, grouped by the input they read."""
    groups: list[tuple[torch.nn.Module, ...]] = []
    for block in getattr(model, "layers", ()):
        attention, mlp = block.self_attn, block.mlp
        groups += [(attention.q_proj, attention.k_proj, attention.v_proj), (attention.o_proj,)]
        groups += [(mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)]
    return groups + [(model.lm_head,)] if hasattr(model, "lm_head") else groups


PACK_ALIGNMENT = 64  # bytes: a cache line, and more than any kernel asks of a weight's address


def pack_decode_weights(model: torch.nn.Module, join: bool) -> int:
    """Copy the linear layers' weights into one buffer on huge pages, in the order decoding reads them.

    A decoded token reads every weight once, so the step is as fast as the memory system streams them. A
    checkpoint's memory-mapped (or a heap's scattered) weights sit on 4 KiB pages, where each page costs the
    processor a TLB miss and a restart of its prefetcher; one buffer on 2 MiB pages, read front to back, does
    not (2-core AMD EPYC, SmolLM2-135M float32, same process, alternating: eager steps 1.07-1.11x as fast,
    compiled 1.04-1.13x; benchmarks/decode_share.py). Each layer keeps its weight parameter, now a view into the
    buffer (names, values and tying unchanged).

    join: each group of decode_order that ops.joinable allows (all DecodeLinears, or all int8 layers) is joined for
    ops.project; the rest are packed one by one (a LoRA layer's base weight; with join False every layer, for the
    compiled step, which writes its own kernels). int8 layers' codes move too; nf4 layers stay where they are. A
    memory-mapped weight's pages are let go as it is copied (move_rows), so the peak does not hold the weights
    twice. Returns the bytes packed.
    """
    groups = []
    for group in decode_order(model):
        if join and joinable(group):
            groups.append(group)
        else:
            groups += [(layer,) for layer in group if joinable((layer,))]
    if not groups:
        return 0
    sizes = [sum(decode_weight(layer).nbytes for layer in group) for group in groups]
    offsets = [0]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + -(-size // PACK_ALIGNMENT) * PACK_ALIGNMENT)
    buffer = huge_page_empty(offsets[-1] + sizes[-1], decode_weight(groups[0][0]).device)
    for group, offset, size in zip(groups, offsets, sizes, strict=True):
        weights = [decode_weight(layer).detach() for layer in group]
        joined = buffer[offset : offset + size].view(weights[0].dtype).view(-1, weights[0].shape[1])
        for weight, slot in zip(weights, joined.split([w.shape[0] for w in weights]), strict=True):
            move_rows(weight, slot)
        join_linears(group, joined)
    return sum(sizes)


MOVE_CHUNK_BYTES = 8 * 2**20


def move_rows(source: torch.Tensor, target: torch.Tensor) -> None:
    """target.copy_(source) for matrices, a slab of rows at a time. A source that lies in a file mapping (a
    memory-mapped checkpoint) has each slab's pages dropped once copied (drop_pages; were they read again, they
    would come back from the file), so the copy does not hold the weights twice while the file stays mapped for
    the others: decoding SmolLM2-135M peaks at 0.87 GiB, 1.13 without this. A heap source is left alone."""
    release = bool(file_mapped([source]))
    rows = max(1, MOVE_CHUNK_BYTES // max(1, source[0].nbytes))
    for first in range(0, len(source), rows):
        target[first : first + rows].copy_(source[first : first + rows])
        if release:
            drop_pages(source[first : first + rows])


def huge_page_empty(nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised uint8 buffer which, on a CPU under Linux, the kernel backs with transparent huge pages
    (2 MiB) where it can: advised before anything touches it. Elsewhere a plain torch.empty."""
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    _madvise(buffer, MADV_HUGEPAGE)
    return buffer


MADV_DONTNEED, MADV_HUGEPAGE = 4, 14  # Linux's values (asm-generic/mman-common.h)


def _madvise(tensor: torch.Tensor, advice: int) -> int:
    """madvise(advice) on the whole pages inside a CPU tensor; returns the bytes advised (0 if none or not Linux)."""
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux") or tensor.numel() == 0:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
    first, last = -(-start // page) * page, end // page * page
    if last <= first or ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice):
        return 0
    return last - first


def drop_pages(tensor: torch.Tensor) -> int:
    """madvise(MADV_DONTNEED) on the whole pages inside a CPU tensor about to be dropped; returns the bytes dropped.

    A file-backed page is read again from the file if ever touched, an anonymous one reads as zeros, and nothing
    else lives inside a tensor's pages: the caller must hold no other use of the tensor. Linux only (elsewhere 0).
    """
    return _madvise(tensor, MADV_DONTNEED)


def file_mapped(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Those of `tensors` that lie in a mapping of a file (a memory-mapped checkpoint's weights). Linux only."""
    if sys.platform != "linux" or not tensors:
        return []
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            mapped.append((start, end))
    return [t for t in tensors if any(lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi for lo, hi in mapped)]
