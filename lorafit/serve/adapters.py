"""The server's adapters: PEFT LoRA (and DoRA) adapters read from disk, checked against the base, kept in slots.

Adapters named at start and those loaded through the API stay until unloaded; adapters found in
--adapter-dir on first request share the remaining slots as a least-recently-used cache. A slot in use by
a running request is never reused, so unloading or evicting an adapter never changes a running answer.

A QLoRA run was trained over a quantised base; it is served only by a server whose base is quantised the same way
(--quantize), as `lorafit generate --adapter RUN` rebuilds it. Plain LoRA runs are served over whatever base the
server holds, quantised or not.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorafit.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TARGETS,
    LoRAConfig,
    check_lora_tensors,
    config_from_peft,
    from_peft_key,
    target_linears,
)
from lorafit.methods import method_of_run
from lorafit.methods.lora import LoRA
from lorafit.methods.qlora import QLoRA
from lorafit.model import LLaMA
from lorafit.ops import is_plain_linear
from lorafit.quant import QuantizedLinear, quantized_linears
from lorafit.runtime import one_thread
from lorafit.serve.multi_lora import BatchAdapters, MultiLoRALinear


class AdapterError(ValueError):
    """An adapter request that cannot be honoured; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


LayerWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""One adapted layer's A (r, in), B (out, r) and DoRA magnitude (out,) or None."""


@dataclass
class LoadedAdapter:
    """One adapter in memory."""

    name: str
    path: Path
    slot: int
    config: LoRAConfig
    pinned: bool
    tensors: dict[str, LayerWeights] = field(default_factory=dict, repr=False)


def base_quantization(model: LLaMA) -> str | None:
    """The scheme the model's block linears are quantised with (None: not quantised)."""
    layers = quantized_linears(model)
    return layers[0][1].scheme if layers else None


def read_lora_adapter(path: str | Path, base: LLaMA) -> tuple[LoRAConfig, dict[str, LayerWeights]]:
    """A PEFT LoRA adapter's config and {module name: (A, B, magnitude)}, checked against the base's shapes (and, for a
    QLoRA run, its quantisation)."""
    path = Path(path)
    try:
        method = method_of_run(path)
    except (OSError, ValueError) as error:  # not a run, or unreadable JSON, or a PEFT method other than LoRA
        raise AdapterError(f"{path}: not a LoRA adapter directory ({error})") from None
    if not isinstance(method, LoRA):
        raise AdapterError(f"{path}: a {method.name} run; the server serves LoRA only (use lorafit chat --adapter)")
    if isinstance(method, QLoRA):
        scheme, served = method.run_config(path).quantize, base_quantization(base)
        if scheme != served:
            base_is = f"quantised to {served}" if served else "not quantised"
            raise AdapterError(
                f"{path}: a QLoRA run trained over a {scheme} base, and this server's base is {base_is}; "
                f"start the server with --quantize {scheme} to serve it"
            )
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{path}: not a LoRA adapter directory (it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = config_from_peft(json.loads((path / ADAPTER_CONFIG).read_text()), str(path / ADAPTER_CONFIG))
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{path / ADAPTER_CONFIG}: unreadable adapter config ({error!r})") from None
    if "lm_head" in config.targets and base.config.tie_embeddings:
        raise AdapterError(f"{path}: targets lm_head, which this base ties to its embedding; not supported")
    try:
        tensors = {from_peft_key(k): v for k, v in load_file(path / ADAPTER_WEIGHTS).items()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise AdapterError(f"{path / ADAPTER_WEIGHTS}: unreadable ({error})") from None
    # The checks need plain nn.Linear layers with the base's shapes: a copy of the architecture on meta costs nothing.
    with torch.device("meta"):
        shapes = LLaMA(base.config)
    try:
        check_lora_tensors(shapes, config, tensors, str(path / ADAPTER_WEIGHTS))
    except ValueError as error:
        raise AdapterError(f"{error} (was it trained on a different base model?)") from None
    layers = {
        name: (
            tensors[f"{name}.lora_A.weight"],
            tensors[f"{name}.lora_B.weight"],
            tensors.get(f"{name}.lora_magnitude_vector"),
        )
        for name, _ in target_linears(shapes, config.targets)
    }
    return config, layers


class AdapterStore:
    """Loaded adapters by name, their slots in the model's MultiLoRALinear layers, and the LRU of --adapter-dir."""

    def __init__(
        self,
        model: LLaMA,
        capacity: int,
        adapter_dir: str | Path | None = None,
        allow_any_path: bool = False,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"--max-loaded-adapters must be at least 1, got {capacity}")
        self.model, self.capacity = model, capacity
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.allow_any_path = allow_any_path
        # Two locks, always taken in this order. `lock` is held while slots' weights change and while the decode loop
        # runs a step, so a step never sees half an adapter. `books` guards the tables of names, slots and users and
        # is only held for a moment, so a request for an adapter already loaded never waits for a decode step.
        self.lock = threading.RLock()
        self.books = threading.Lock()
        self.batch = BatchAdapters(capacity, model.embed_tokens.weight.device)
        self.loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self.slot_users = [0] * capacity
        self.slot_owner: list[str | None] = [None] * capacity
        self.layers: dict[str, MultiLoRALinear] = {}

    # ---------------------------------------------------------------------------- loading
    def load(self, name: str, path: str | Path, pinned: bool = True, check_path: bool = False) -> LoadedAdapter:
        """Read, check and install an adapter under `name` (an error leaves everything else as it was)."""
        if not name or name != name.strip():
            raise AdapterError(f"invalid adapter name {name!r}")
        path = Path(path)
        if check_path:
            self._check_path(path)
        with self.books:
            if name in self.loaded:
                raise AdapterError(f"an adapter named {name!r} is already loaded")
        # On one thread: the decode thread is to be the only one with an OpenMP team (runtime.one_thread), and
        # loads run in the server's request threads (an adapter's tensors are small).
        with one_thread():
            config, layers = read_lora_adapter(path, self.model)
            with self.lock:  # no decode step and no other load meanwhile; requests for loaded adapters go on
                with self.books:
                    if name in self.loaded:
                        raise AdapterError(f"an adapter named {name!r} is already loaded")
                    slot = self._free_slot()
                adapter = LoadedAdapter(name, path, slot, config, pinned, layers)
                self._install(adapter)
                with self.books:
                    self.loaded[name] = adapter
                    self.slot_owner[slot] = name
                return adapter

    def unload(self, name: str) -> None:
        """Forget an adapter; running requests that use it finish with it, new ones get 404."""
        with self.books:
            if name not in self.loaded:
                raise AdapterError(f"no adapter named {name!r} is loaded", status=404)
            adapter = self.loaded.pop(name)
            self.slot_owner[adapter.slot] = None

    def acquire(self, name: str) -> int:
        """The slot of adapter `name` for a new request (loading it from --adapter-dir if needed); release it after."""
        with self.books:
            if name in self.loaded:
                return self._use(name)
        path = self._in_adapter_dir(name)
        try:
            self.load(name, path, pinned=False)
        except AdapterError as error:
            if name not in self.loaded:  # another request may have loaded it meanwhile
                raise error
        with self.books:
            if name not in self.loaded:
                raise AdapterError(f"the model {name!r} does not exist", status=404)
            return self._use(name)

    def release(self, slot: int) -> None:
        """A request that used `slot` is over."""
        with self.books:
            self.slot_users[slot] -= 1

    def names(self) -> list[str]:
        """Loaded adapters' names, in the order they were loaded or last used."""
        with self.books:
            return list(self.loaded)

    def paths(self) -> dict[str, Path]:
        """Loaded adapters' directories by name."""
        with self.books:
            return {name: adapter.path for name, adapter in self.loaded.items()}

    # ---------------------------------------------------------------------------- helpers
    def _use(self, name: str) -> int:
        self.loaded.move_to_end(name)
        slot = self.loaded[name].slot
        self.slot_users[slot] += 1
        return slot

    def _in_adapter_dir(self, name: str) -> Path:
        unknown = AdapterError(f"the model {name!r} does not exist", status=404)
        if self.adapter_dir is None or name in (".", "..") or Path(name).name != name:
            raise unknown
        path = self.adapter_dir / name
        if not (path / ADAPTER_CONFIG).is_file():
            raise unknown
        return path

    def _check_path(self, path: Path) -> None:
        if self.allow_any_path:
            return
        if self.adapter_dir is None or not path.resolve().is_relative_to(self.adapter_dir):
            raise AdapterError(
                f"lora_path {str(path)!r} is outside --adapter-dir; start the server with --allow-any-adapter-path "
                "to load adapters from anywhere",
                status=403,
            )

    def _free_slot(self) -> int:
        """An unused slot: a never-used or released one, else the least recently used unpinned adapter's."""
        for slot in range(self.capacity):
            if self.slot_owner[slot] is None and self.slot_users[slot] == 0:
                return slot
        for name, adapter in self.loaded.items():
            if not adapter.pinned and self.slot_users[adapter.slot] == 0:
                del self.loaded[name]
                self.slot_owner[adapter.slot] = None
                return adapter.slot
        raise AdapterError(
            f"all {self.capacity} adapter slots are in use (raise --max-loaded-adapters or unload one)", status=503
        )

    def _install(self, adapter: LoadedAdapter) -> None:
        """Write the adapter's weights into its slot of every layer (zeros where it does not adapt a layer)."""
        for name in adapter.tensors:
            if name not in self.layers:
                self._wrap(name)
        for name, layer in self.layers.items():
            A, B, magnitude = adapter.tensors.get(name, (None, None, None))
            layer.set_slot(adapter.slot, A, B, adapter.config.scaling, magnitude)
        adapter.tensors = {}  # the slots hold them now

    def _wrap(self, name: str) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        linear = getattr(parent, child)
        if not (is_plain_linear(linear) or isinstance(linear, QuantizedLinear)) or child not in TARGETS.values():
            raise AdapterError(f"cannot put LoRA on {name}")
        layer = MultiLoRALinear(linear, self.batch)
        setattr(parent, child, layer)
        self.layers[name] = layer
