"""The memory-lean autograd functions give plain autograd's values and gradients, and save less."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lorafit import ops
from lorafit.lora import LoRALinear
from tests.conftest import rss_file_kib


def saved_bytes(fn, *inputs: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves while fn(*inputs) runs, leaving out the inputs' own."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    own = {t.untyped_storage().data_ptr() for t in inputs}
    return sum(n for ptr, n in storages.items() if ptr not in own)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def grads_of(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn's output and the gradients of <output, fixed random weights> with respect to each input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * probe).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def test_rms_norm_matches_autograd_in_value_and_gradients():
    torch.manual_seed(0)
    x, weight = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    out, grads = grads_of(lambda a, w: ops.rms_norm(a, w, 1e-5), x, weight)
    ref_out, ref_grads = grads_of(lambda a, w: reference_rms_norm(a, w, 1e-5), x, weight)
    # Both normalise in float32 (as Llama does), whatever the input's dtype.
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_swiglu_matches_autograd_in_value_and_gradients():
    torch.manual_seed(0)
    gate, up = torch.randn(3, 4, 10, dtype=torch.float64), torch.randn(3, 4, 10, dtype=torch.float64)
    out, grads = grads_of(ops.swiglu, gate, up)
    ref_out, ref_grads = grads_of(reference_swiglu, gate, up)
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_the_functions_save_only_what_backward_needs():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64, requires_grad=True)
    one_activation = x.numel() * 4
    # A training norm weight: plain autograd also keeps the normed value; the function keeps x (an input),
    # 1/rms and the weight.
    weight = torch.randn(64, requires_grad=True)
    ours = saved_bytes(lambda a: ops.rms_norm(a, weight, 1e-5), x)
    assert ours == 4 * 32 * 4 + 64 * 4
    assert saved_bytes(lambda a: reference_rms_norm(a, weight, 1e-5), x) == ours + one_activation
    # silu(gate) * up: plain autograd also keeps silu(gate).
    gate, up = torch.randn(4, 32, 64, requires_grad=True), torch.randn(4, 32, 64, requires_grad=True)
    assert saved_bytes(reference_swiglu, gate, up) == one_activation
    assert saved_bytes(ops.swiglu, gate, up) == 0


def test_lora_keeps_a_bool_mask_instead_of_the_dropout_output():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64, requires_grad=True)
    layer = LoRALinear(64, 64, r=8, scaling=2.0, dropout=0.1)
    layer.weight.requires_grad_(False)
    plain_dropout = torch.nn.Dropout(0.1)
    plain = saved_bytes(lambda a: F.linear(a, layer.weight) + layer.lora_B(layer.lora_A(plain_dropout(a))) * 2.0, x)
    # Plain: a float mask and the dropped-out input, where LoRALinear keeps x (an input) and a bool mask.
    assert plain - saved_bytes(layer, x) == 2 * x.numel() * 4 - x.numel()


def test_frozen_and_trained_norm_weights_give_the_same_values():
    torch.manual_seed(0)
    x, weight = torch.randn(2, 5, 16), torch.randn(16)
    fused = ops.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(fused, ops.rms_norm(x, weight.requires_grad_(), 1e-5).detach())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_update_matches_nn_dropout_and_autograd(dropout):
    """LoRALinear's update equals the plain B(A(dropout(x))) * scaling, masks included, with equal gradients."""
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, r=4, scaling=2.0, dropout=dropout)
    torch.nn.init.normal_(layer.lora_B.weight)  # B starts at zero; make the update visible
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 5, 16, requires_grad=True)

    def plain(inp: torch.Tensor) -> torch.Tensor:
        h = F.dropout(inp, dropout, training=True) if dropout else inp
        return F.linear(inp, layer.weight) + layer.lora_B(layer.lora_A(h)) * layer.scaling

    results = []
    for forward in (layer, plain):
        torch.manual_seed(1)
        out = forward(x)
        out.pow(2).sum().backward()
        results.append([out.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad])
        x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_trains", [False, True])
def test_linear_cross_entropy_matches_the_plain_loss_and_its_gradients(weight_trains):
    torch.manual_seed(0)
    hidden, weight = torch.randn(37, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(50, (37,))

    def plain(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h, w), targets, reduction="sum")

    def chunked(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ops.linear_cross_entropy_sum(h, w, targets, chunk=8)  # 37 rows: four full chunks and a short one

    results = []
    for fn in (chunked, plain):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_trains)
        loss = fn(h, w)
        (loss * 0.5).backward()  # a scaled loss, as the training loop's mean over the step
        results.append((loss.detach().double(), h.grad, w.grad))
    (loss, grad_h, grad_w), (ref_loss, ref_grad_h, ref_grad_w) = results
    # The logits are float32 by design (as train.py's loss always was).
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad_h, ref_grad_h, rtol=1e-5, atol=1e-6)
    if weight_trains:
        torch.testing.assert_close(grad_w, ref_grad_w, rtol=1e-5, atol=1e-6)
    else:
        assert grad_w is None
    with torch.no_grad():
        torch.testing.assert_close(chunked(hidden, weight).double(), ref_loss, rtol=1e-6, atol=1e-5)


def test_linear_cross_entropy_keeps_no_logits():
    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 16, requires_grad=True), torch.randn(1000, 16)
    targets = torch.randint(1000, (300,))
    plain = saved_bytes(lambda h: F.cross_entropy(F.linear(h, weight), targets, reduction="sum"), hidden)
    assert plain >= 300 * 1000 * 4  # the float32 log-probabilities
    assert saved_bytes(lambda h: ops.linear_cross_entropy_sum(h, weight, targets, 128), hidden) == 300 * 16 * 4


def test_lora_update_backward_runs_under_autocast():
    """bf16-mixed: the forward runs in bf16 under autocast, backward outside it; gradients stay close to float32's."""
    torch.manual_seed(0)
    layer = LoRALinear(32, 24, r=4, scaling=2.0, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 6, 32, requires_grad=True)
    grads = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = layer(x)
        out.float().pow(2).sum().backward()
        grads.append([t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)])
        x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    for full, mixed in zip(*grads, strict=True):
        assert mixed.dtype == torch.float32
        torch.testing.assert_close(mixed, full, rtol=0.05, atol=0.05 * full.abs().max().item())


class _BmmCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.bmm:
            self.calls.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def bmm_calls() -> Iterator[list[tuple[int, ...]]]:
    """The batch shapes torch.bmm is called with, so a test can tell which path ops.linear took.

    A torch function mode, not a patched torch.bmm: torch.compile, set up later in the same process, must
    see the real function (a patched one left it an unknown builtin, and a later compiled test one product short).
    """
    with _BmmCalls() as mode:
        yield mode.calls


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (3, 96), (2, 5, 96), (ops.SPLIT_ROWS, 96)])
def test_linear_few_rows_equals_f_linear(shape: tuple[int, ...], bmm_calls: list) -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(shape), torch.randn(48, 96)
    with torch.no_grad():
        out = ops.linear(x, weight)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous()  # a transposed result slowed every later op of a decode step
    parts = max(2, torch.get_num_threads())
    assert bmm_calls == [(parts, 48 // parts, 96)]  # split over row slices of the weight


@pytest.mark.parametrize(
    "case", ["many rows", "autograd", "bias", "bfloat16", "rows not divisible", "transposed weight"]
)
def test_linear_takes_f_linear_outside_decoding(case: str, bmm_calls: list) -> None:
    torch.manual_seed(0)
    rows = ops.SPLIT_ROWS + 1 if case == "many rows" else 2
    x, weight, bias = torch.randn(rows, 96), torch.randn(48, 96), None
    if case == "bias":
        bias = torch.randn(48)
    if case == "bfloat16":
        x, weight = x.bfloat16(), weight.bfloat16()
    if case == "rows not divisible":
        weight = torch.randn(7 * max(2, torch.get_num_threads()) + 1, 96)
    if case == "transposed weight":
        weight = torch.randn(96, 48).t()
    with torch.set_grad_enabled(case == "autograd"):
        out = ops.linear(x, weight, bias)
    torch.testing.assert_close(out, F.linear(x, weight, bias))
    assert bmm_calls == []


class _OneDnnAtLinear(TorchFunctionMode):
    """Whether oneDNN was switched on at each F.linear call."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.enabled.append(torch.backends.mkldnn.enabled)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows", [1, 2, ops.ONEDNN_MIN_ROWS, ops.SPLIT_ROWS])
def test_linear_takes_bf16_decoding_rows_past_onednn(rows: int) -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(rows, 96).bfloat16(), torch.randn(48, 96).bfloat16()
    with _OneDnnAtLinear() as mode, torch.no_grad():
        out = ops.linear(x, weight)
    assert mode.enabled == [rows >= ops.ONEDNN_MIN_ROWS]
    assert torch.backends.mkldnn.enabled  # switched on again for everything else
    torch.testing.assert_close(out.float(), x.float() @ weight.float().t(), rtol=1e-2, atol=2e-2)
    with pytest.raises(RuntimeError), torch.no_grad():
        ops.linear(x[:1], weight.t())  # wrong shape: the error comes through, the switch is back on
    assert torch.backends.mkldnn.enabled


def test_decode_kernels_keep_the_model_and_its_answers(bmm_calls: list) -> None:
    import gc
    import weakref

    from lorafit.lora import LoRAConfig, apply_lora
    from lorafit.runtime import use_decode_kernels
    from tests.conftest import tiny_model

    model = tiny_model(tie=True).eval()
    reference = tiny_model(tie=True).eval()
    names = dict(model.state_dict())
    use_decode_kernels(model)
    assert all(type(m) is ops.DecodeLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert_packed_in_reading_order(model)  # the tied embedding went into the buffer with the LM head
    assert model.state_dict().keys() == names.keys()
    tokens = torch.tensor([[5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
    parts = max(2, torch.get_num_threads())
    assert (parts, 32 // parts, 32) in bmm_calls, "the attention projections did not take the decode kernel"
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets="all"))  # LoRA still finds plain linear layers to wrap
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 7 and all(m.product is ops.linear for m in wrapped)  # and keeps the decode kernel
    assert LoRALinear.product is F.linear  # only this model's layers changed
    # No reference cycle keeps a dropped model (and its weights) alive until the garbage collector runs.
    gc.disable()
    try:
        alive = weakref.ref(model)
        del model
        assert alive() is None
    finally:
        gc.enable()


def assert_packed_in_reading_order(model: torch.nn.Module) -> None:
    """Every linear weight is a view of one buffer, laid out as a decode step reads them (runtime.decode_order)."""
    from lorafit.runtime import decode_order

    weights = [ops.decode_weight(layer) for group in decode_order(model) for layer in group]
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1
    addresses = [w.data_ptr() for w in weights]
    assert addresses == sorted(addresses) and len(set(addresses)) == len(addresses)
    assert all(ops.decode_weight(group[0]).data_ptr() % 64 == 0 for group in decode_order(model))


def test_decode_kernels_join_each_blocks_projections_without_copying_them(bmm_calls: list, tmp_path) -> None:
    from lorafit.checkpoint import load_model, save_hf_model
    from lorafit.runtime import use_decode_kernels
    from tests.conftest import tiny_model

    model, reference = tiny_model().eval(), tiny_model().eval()
    use_decode_kernels(model)
    attention, mlp = model.layers[0].self_attn, model.layers[0].mlp
    for group in ((attention.q_proj, attention.k_proj, attention.v_proj), (mlp.gate_proj, mlp.up_proj)):
        joined = group[0].joined
        assert joined is not None and joined.sizes == tuple(layer.out_features for layer in group)
        # Each layer's weight is a view of the joined tensor: one copy of the weights, under the same names.
        starts = [group[0].weight.data_ptr() + sum(joined.sizes[:i]) * 32 * 4 for i in range(len(group))]
        assert [layer.weight.data_ptr() for layer in group] == starts
    assert_packed_in_reading_order(model)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    tokens = torch.tensor([[5, 9, 2, 7]])
    model.setup_kv_cache(1, 8)
    reference.setup_kv_cache(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
        bmm_calls.clear()
        torch.testing.assert_close(model(tokens[:, :1], 4), reference(tokens[:, :1], 4), rtol=1e-5, atol=1e-5)
    parts = max(2, torch.get_num_threads())
    qkv_rows = attention.q_proj.out_features + 2 * attention.k_proj.out_features
    hidden = mlp.gate_proj.out_features
    # Per block one product for q, k and v, then o, one for gate and up, then down; then the LM head.
    block = [(parts, qkv_rows // parts, 32), (parts, 32 // parts, 32), (parts, 2 * hidden // parts, 32)]
    block.append((parts, 32 // parts, hidden))
    assert bmm_calls == block * len(model.layers) + [(parts, model.config.vocab_size // parts, 32)]

    # A saved decoding model is the model: the views are written as their own tensors.
    save_hf_model(model.state_dict(), model.config, tmp_path / "saved")
    saved = load_model(tmp_path / "saved")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(saved.state_dict()[name], tensor), name


class _Int8Products(TorchDispatchMode):
    """The output widths of the int8 kernel's calls."""

    def __init__(self) -> None:
        super().__init__()
        self.widths: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._weight_int8pack_mm.default:
            self.widths.append(args[1].shape[0])
        return func(*args, **(kwargs or {}))


def test_int8_layers_decode_from_joined_codes_in_reading_order() -> None:
    from lorafit.generate import prepare_for_decoding
    from lorafit.quant import quantize_model
    from tests.conftest import tiny_model

    model = tiny_model().eval()
    quantize_model(model, "int8")
    reference = copy.deepcopy(model)
    prepare_for_decoding(model, "int8", compile=False)  # an int8 LM head, then packing
    prepare_for_decoding(reference, "int8", compile=True)  # the same int8 layers, packed one by one
    attention, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attention.q_proj.joined.sizes == (32, 16, 16) and mlp.gate_proj.joined.sizes == (64, 64)
    assert getattr(reference.layers[0].self_attn.q_proj, "joined", None) is None
    assert_packed_in_reading_order(model)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    tokens = torch.tensor([[5, 9, 2, 7]])
    for m in (model, reference):
        m.setup_kv_cache(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
        expected = reference(tokens[:, :1], 4)
        with _Int8Products() as products:
            torch.testing.assert_close(model(tokens[:, :1], 4), expected, rtol=1e-5, atol=1e-5)
    # Per block: one product for q, k and v, then o, one for gate and up, then down; then the LM head.
    assert products.widths[:4] == [64, 32, 128, 32] and len(products.widths) == 4 * len(model.layers) + 1


def test_project_computes_layers_one_by_one_once_a_joined_weight_is_replaced() -> None:
    from lorafit.lora import LoRAConfig, apply_lora, merge_lora
    from lorafit.runtime import use_decode_kernels
    from tests.conftest import tiny_model

    torch.manual_seed(0)
    x = torch.randn(1, 1, 32)
    model = tiny_model().eval()
    use_decode_kernels(model)
    attention = model.layers[0].self_attn
    layers = (attention.q_proj, attention.k_proj, attention.v_proj)
    attention.k_proj.weight = torch.nn.Parameter(torch.randn_like(attention.k_proj.weight))  # e.g. a load
    with torch.no_grad():
        for got, layer in zip(ops.project(x, layers), layers, strict=True):
            torch.testing.assert_close(got, F.linear(x, layer.weight))
        # In-place writes go to the joined tensor itself, so the joined product stays right.
        mlp = model.layers[0].mlp
        mlp.up_proj.weight.mul_(2)
        for got, layer in zip(ops.project(x, (mlp.gate_proj, mlp.up_proj)), (mlp.gate_proj, mlp.up_proj), strict=True):
            torch.testing.assert_close(got, F.linear(x, layer.weight))

    # LoRA wraps joined layers: its update is part of the answer, merged or not.
    model, reference = tiny_model().eval(), tiny_model().eval()
    use_decode_kernels(model)
    for m in (model, reference):
        torch.manual_seed(1)
        apply_lora(m, LoRAConfig(r=2, alpha=4, targets="all"))
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)
        m.eval()  # LoRA's new dropout layers start in training mode
    tokens = torch.tensor([[5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
        merge_lora(model)
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-4, atol=1e-4)


def test_project_leaves_training_to_the_layers_own_parameters() -> None:
    from lorafit.runtime import use_decode_kernels
    from tests.conftest import tiny_model

    model = tiny_model()
    use_decode_kernels(model)
    model(torch.tensor([[5, 9, 2]])).sum().backward()
    joined = [p for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "up_proj.weight"))]
    assert joined and all(p.grad is not None for p in joined)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's madvise and /proc/self")
def test_move_rows_lets_a_mapped_sources_pages_go_and_leaves_heap_memory_alone(tmp_path) -> None:
    """What keeps packing a memory-mapped checkpoint's weights from holding them twice."""
    from safetensors.torch import save_file

    from lorafit.checkpoint import read_safetensors
    from lorafit.runtime import move_rows

    values = torch.arange(2**22, dtype=torch.float32).view(2**11, 2**11)  # 16 MiB, two slabs
    save_file({"w": values}, tmp_path / "w.safetensors")
    mapped = read_safetensors(tmp_path / "w.safetensors")["w"]
    assert torch.equal(mapped, values)  # every page now resident
    before = rss_file_kib()
    target = torch.empty_like(values)
    move_rows(mapped, target)
    assert torch.equal(target, values)
    assert rss_file_kib() <= before - 15 * 1024
    assert torch.equal(mapped, values)  # read again, the pages come back from the file
    heap, target = values.clone(), torch.empty_like(values)
    move_rows(heap, target)
    assert torch.equal(heap, values) and torch.equal(target, values)


def test_packing_for_the_compiled_step_and_around_lora_and_quantised_layers() -> None:
    from lorafit.generate import prepare_for_decoding
    from lorafit.lora import LoRAConfig, apply_lora
    from lorafit.quant import QuantizedLinear
    from lorafit.runtime import pack_decode_weights
    from tests.conftest import tiny_model

    tokens = torch.tensor([[5, 9, 2]])
    model, reference = tiny_model(tie=True).eval(), tiny_model(tie=True).eval()
    prepare_for_decoding(model, None, compile=True)  # packed one by one, left plain for inductor
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert_packed_in_reading_order(model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=0, atol=0)

    # Unmerged LoRA on q and v: their base weights move on their own, k stays joinable only by itself; int8 o moves.
    model, reference = tiny_model().eval(), tiny_model().eval()
    for m in (model, reference):
        torch.manual_seed(1)
        apply_lora(m, LoRAConfig(r=2, alpha=4, targets=("q", "v")))
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)
        m.eval()
    attention = model.layers[0].self_attn
    attention.o_proj = QuantizedLinear.from_weight(attention.o_proj.weight.detach(), "int8")
    reference.layers[0].self_attn.o_proj = attention.o_proj  # the same int8 layer in both
    qweight = attention.o_proj.qweight
    assert pack_decode_weights(model, join=True) > 0
    assert getattr(attention.k_proj, "joined", None) is None
    assert attention.o_proj.qweight is not qweight and torch.equal(attention.o_proj.qweight, qweight)  # codes move
    packed = (attention.q_proj.weight, attention.k_proj.weight, attention.o_proj.qweight)
    assert len({tensor.untyped_storage().data_ptr() for tensor in packed}) == 1
    assert [tensor.data_ptr() for tensor in packed] == sorted(tensor.data_ptr() for tensor in packed)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=0, atol=0)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's transparent huge pages")
def test_huge_page_empty_asks_the_kernel_for_huge_pages() -> None:
    from lorafit.runtime import huge_page_empty

    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    buffer = huge_page_empty(8 * 2**20)
    start = buffer.data_ptr()
    maps = Path("/proc/self/smaps").read_text().split("\n")
    for i, line in enumerate(maps):
        fields = line.split()
        if fields and "-" in fields[0] and ":" not in fields[0]:
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= start < high:
                area = maps[i + 1 : i + 40]
                break
    eligible = next(line for line in area if line.startswith("THPeligible:"))
    assert eligible.split()[1] == "1"
