"""Several processes, one training loop: process groups, launching workers, splitting each step, sharding.

Every process runs the same code (torchrun's model). A run is distributed when the environment
says so (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, as torchrun sets them); `launch`
starts such workers itself for `--devices N`. Each optimizer step's micro-batches are dealt round
robin to the ranks, and the loss is normalised by the supervised tokens of the whole step, so the
summed gradient equals the single-process one up to float summation order.

Which strategy a run uses is its finetuning method's (Method.strategy): adapters (LoRA) train under
DDP, which all-reduces only the trainable parameters' gradients; full
finetuning shards parameters, gradients and optimizer state with FSDP2 (`fully_shard`, which also
runs on the CPU with gloo).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lorafit.runtime import resolve_device

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Environment:
    """Where this process sits among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def environment() -> Environment:
    """This process's place, from the initialised process group or else the torchrun variables."""
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return Environment(dist.get_rank(), dist.get_world_size(), local_rank)
    return Environment(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def print_main(*args: Any, **kwargs: Any) -> None:
    """print, on rank 0 only: N processes would otherwise say everything N times."""
    if is_main():
        print(*args, **kwargs)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. preparing a shared data cache); the others then run it after."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ------------------------------------------------------------------------------------------------
# Joining a process group, and launching workers when torchrun did not.


def device_for(requested: str | None, env: Environment) -> torch.device:
    """The device this process trains on: its own GPU (cuda:LOCAL_RANK) when distributed on CUDA."""
    device = resolve_device(requested)
    if device.type == "cuda" and env.world_size > 1:
        if env.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {env.local_rank} has no GPU: this machine has {torch.cuda.device_count()} "
                "(use at most that many devices per node)"
            )
        device = torch.device("cuda", env.local_rank)
    return device


@contextmanager
def process_group(device: torch.device, timeout_s: float = 1800) -> Iterator[Environment]:
    """Join the process group the environment describes (nccl on CUDA, gloo on CPU) and leave it at the end.

    Nothing happens for one process, or when the caller already initialised a group.
    """
    env = environment()
    if env.world_size == 1 or dist.is_initialized():
        yield env
        return
    missing = [name for name in ENV_VARS if name not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is {env.world_size} but {', '.join(missing)} not set (launch with torchrun)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    device_id = device if backend == "nccl" else None
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), device_id=device_id)
    try:
        yield environment()
    finally:
        dist.destroy_process_group()


def should_launch(devices: int, nodes: int = 1) -> bool:
    """True when several processes were asked for and this process is not already one of them."""
    if devices < 1 or nodes < 1:
        raise ValueError(f"devices and nodes must be at least 1; got devices={devices}, nodes={nodes}")
    return devices * nodes > 1 and "WORLD_SIZE" not in os.environ


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks one for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    fn: Callable[..., Any],
    kwargs: dict[str, Any],
    devices: int,
    nodes: int = 1,
    timeout_s: float | None = None,
    start_method: str = "spawn",
) -> Any:
    """Run fn(**kwargs) in `devices` worker processes on this node, set up as torchrun would; rank 0's result.

    On several nodes, start the same command on each with MASTER_ADDR, MASTER_PORT and NODE_RANK set.
    "spawn" starts fresh interpreters (safe with CUDA and threads); "fork" starts faster, for CPU-only callers.
    """
    if nodes > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"--nodes {nodes} needs {', '.join(missing)} in the environment on every node "
                f"(or launch with torchrun --nnodes {nodes} --nproc-per-node {devices})"
            )
    node_rank = int(os.environ.get("NODE_RANK", 0))
    if not 0 <= node_rank < nodes:
        raise ValueError(f"NODE_RANK {node_rank} is outside 0..{nodes - 1}")
    env = {
        "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port()),
        "WORLD_SIZE": str(devices * nodes),
        "LOCAL_WORLD_SIZE": str(devices),
        "NODE_RANK": str(node_rank),
    }
    results = mp.get_context(start_method).SimpleQueue()
    context = mp.start_processes(
        _worker, args=(fn, kwargs, env, results), nprocs=devices, join=False, start_method=start_method
    )
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if deadline is not None and time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"distributed workers did not finish within {timeout_s:g} s")
    return results.get() if not results.empty() else None


def _worker(local_rank: int, fn: Callable[..., Any], kwargs: dict[str, Any], env: dict[str, str], results) -> None:
    """One spawned process: torchrun's variables, then the caller's function; rank 0 reports the result."""
    devices = int(env["LOCAL_WORLD_SIZE"])
    global_rank = int(env["NODE_RANK"]) * devices + local_rank
    os.environ.update(env, RANK=str(global_rank), LOCAL_RANK=str(local_rank))
    if "OMP_NUM_THREADS" not in os.environ:
        # As torchrun does, keep N processes from fighting over the same cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    result = fn(**kwargs)
    if global_rank == 0:
        results.put(result)


# ------------------------------------------------------------------------------------------------
# Splitting a step across ranks.


def check_batch_layout(global_batch_size: int, micro_batch_size: int, n_processes: int) -> None:
    """Each step's global batch must split into whole micro-batches, the same number on every rank."""
    if global_batch_size % (micro_batch_size * n_processes):
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be a multiple of micro_batch_size ({micro_batch_size}) "
            f"× processes ({n_processes}) = {micro_batch_size * n_processes}"
        )


def local_micro_batches(batches: Sequence[list[int]], rank: int, n_processes: int) -> list[tuple[list[int], bool]]:
    """This rank's share of one step: micro-batches rank, rank + N, ..., each with whether it counts.

    An epoch's last step may hold fewer micro-batches than the others; every rank still runs the
    same number of forward/backward passes (collectives must match), padding with a repeat of the
    step's first micro-batch whose loss is multiplied by zero.
    """
    mine = [(batch, True) for batch in batches[rank::n_processes]]
    per_rank = -(-len(batches) // n_processes)
    return mine + [(batches[0], False)] * (per_rank - len(mine))


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (the numbers themselves in one process)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ------------------------------------------------------------------------------------------------
# Wrapping the model: DDP for adapters, FSDP2 for full finetuning.


def broadcast_trainable(model: nn.Module) -> None:
    """Copy rank 0's trainable weights to every rank (e.g. LoRA's randomly initialised A matrices)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def parallelize(loss_module: nn.Module, blocks: Sequence[nn.Module], strategy: str, device: torch.device) -> nn.Module:
    """Wrap the module that computes the loss for `strategy`; the inner model keeps its parameter names."""
    if strategy == "single":
        return loss_module
    broadcast_trainable(loss_module)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # The frozen base comes from the same checkpoint on every rank: no need to broadcast it.
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(loss_module, device_ids=device_ids, init_sync=False)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        return fully_shard(loss_module)
    raise ValueError(f"unknown strategy {strategy!r}; choose single, ddp or fsdp")


def gradient_sync(module: nn.Module, enabled: bool):
    """A context in which backward does (enabled) or does not yet (accumulating) reduce gradients."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        return nullcontext() if enabled else module.no_sync()
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
    return nullcontext()


def reshard(module: nn.Module) -> None:
    """Put FSDP's root parameters back into shards after a forward without backward (evaluation).

    The root keeps its gathered parameters after forward, expecting backward; until resharded, the
    model's parameters are not the shards the optimizer holds.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.reshard()


# ------------------------------------------------------------------------------------------------
# Sharded tensors and per-rank RNG state, for checkpoints.


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a collective: every rank must call it); others as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a full tensor laid out as `param` (which may be an FSDP shard)."""
    if not is_sharded(param) or value.shape != param.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    # Every rank read the same full tensor, so each cuts its own piece: no communication.
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def all_rng_states() -> dict[str, torch.Tensor]:
    """Every rank's RNG states: rank 0's as rng::cpu / rng::cuda, others' with a ::rankN suffix.

    Each rank draws its own dropout masks (rank r > 0 is seeded seed + r at the start), so an exact
    resume restores each rank's stream; a run resumed on more ranks than saved seeds the extra ones.
    """
    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    gathered = [mine]
    if world_size() > 1:
        gathered = [None] * world_size()
        dist.all_gather_object(gathered, mine)
    out = {}
    for r, states in enumerate(gathered):
        suffix = "" if r == 0 else f"::rank{r}"
        out |= {f"rng::{kind}{suffix}": state for kind, state in states.items()}
    return out


def restore_rng_states(tensors: dict[str, torch.Tensor]) -> None:
    """Set this rank's RNG states from all_rng_states' keys, where the checkpoint has them."""
    suffix = "" if rank() == 0 else f"::rank{rank()}"
    if f"rng::cpu{suffix}" in tensors:
        torch.set_rng_state(tensors[f"rng::cpu{suffix}"])
    if f"rng::cuda{suffix}" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng::cuda{suffix}"])
