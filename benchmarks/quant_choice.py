"""Which 4-bit NF4 library lorafit's QLoRA uses: bitsandbytes or torchao, measured on this machine.

For the frozen linear layers of the default model (SmolLM2-135M: 576 -> 576, 576 -> 1536, 1536 -> 576) it
times quantising the weight, and a forward + backward through the quantised layer (the gradient goes to the
input only: the base is frozen, as in QLoRA), and counts the bytes the quantised layer holds.

    OMP_NUM_THREADS=1 python benchmarks/quant_choice.py [--repeats 20] [--tokens 128]

Times are medians over the repeats; on a shared machine they are noisy, compare them only within one run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = ((576, 576), (1536, 576), (576, 1536))  # (out, in) of q/o, gate/up, down in SmolLM2-135M


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _candidates() -> dict[str, Callable[[torch.Tensor], tuple[Callable[[torch.Tensor], torch.Tensor], int]]]:
    """name -> quantise(weight) returning (linear(x), bytes held)."""

    def fp32(w: torch.Tensor):
        return (lambda x: F.linear(x, w)), _nbytes(w)

    candidates = {"float32 (reference)": fp32}
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        def bnb_nf4(double: bool):
            def quantise(w: torch.Tensor):
                q, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)
                held = _nbytes(q, state.absmax, state.code)
                if state.nested:
                    held += _nbytes(state.state2.absmax, state.state2.code) + 4  # + the float offset
                return (lambda x: bnb.matmul_4bit(x, q.t(), quant_state=state)), held

            return quantise

        candidates[f"bitsandbytes {bnb.__version__} nf4"] = bnb_nf4(False)
        candidates[f"bitsandbytes {bnb.__version__} nf4-dq"] = bnb_nf4(True)
    except ImportError:
        print("bitsandbytes is not installed: skipped")
    try:
        import torchao
        from torchao.quantization import to_nf4
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        def ao_nf4(w: torch.Tensor):
            # torchao always double-quantises the absmax constants, and needs their count divisible by the second
            # block size: 576 x 576 has 5184 blocks of 64, not a multiple of 256, so it falls back to 64 there.
            n_blocks = w.numel() // 64
            t = to_nf4(w, 64, math.gcd(n_blocks, 256))
            held = _nbytes(t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean, t.nf4)
            return (lambda x: linear_nf4(x, t)), held

        candidates[f"torchao {torchao.__version__} NF4Tensor (dq)"] = ao_nf4
    except ImportError:
        print("torchao is not installed: skipped")
    from lorafit.quant import QuantizationError, QuantizedLinear

    def lorafit_layer(scheme: str):
        def quantise(w: torch.Tensor):
            layer = QuantizedLinear.from_weight(w, scheme)
            return layer, layer.nbytes

        return quantise

    for scheme in ("nf4", "nf4-dq", "int8"):
        try:
            candidates[f"lorafit QuantizedLinear {scheme}"] = lorafit_layer(scheme)
            lorafit_layer(scheme)(torch.zeros(64, 64))
        except QuantizationError as err:
            print(f"lorafit {scheme}: {err}")
            del candidates[f"lorafit QuantizedLinear {scheme}"]
    return candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=128, help="rows of the input (micro-batch x sequence)")
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(out, inp) * 0.02 for out, inp in SHAPES]
    inputs = [torch.randn(args.tokens, inp, requires_grad=True) for _, inp in SHAPES]
    float_bytes = sum(_nbytes(w) for w in weights)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), shapes {SHAPES}, {args.tokens} tokens")
    print(f"{'library':44} {'quantise ms':>11} {'fwd+bwd ms':>10} {'bytes':>10} {'x fp32':>7} {'max |err|':>9}")
    for name, quantise in _candidates().items():
        quantise_ms, step_ms, held, err = _measure(quantise, weights, inputs, args.repeats)
        print(f"{name:44} {quantise_ms:11.2f} {step_ms:10.2f} {held:10d} {held / float_bytes:7.3f} {err:9.5f}")


def _measure(quantise, weights: list[torch.Tensor], inputs: list[torch.Tensor], repeats: int):  # noqa: ANN001, ANN202
    """(ms to quantise all weights, ms for forward + backward through all, bytes held, max |W - dequantised W|)."""
    quantise_ms = sum(_median_ms(lambda w=w: quantise(w), max(1, repeats // 4)) for w in weights)
    layers = [quantise(w) for w in weights]

    def step() -> None:
        for (linear, _), x in zip(layers, inputs, strict=True):
            linear(x).sum().backward()

    step_ms = _median_ms(step, repeats)
    with torch.no_grad():
        # Feeding the identity gives the weight the layer computes with, transposed.
        err = max(
            (lin(torch.eye(w.shape[1])).t() - w).abs().max().item() for (lin, _), w in zip(layers, weights, strict=True)
        )
    return quantise_ms, step_ms, sum(b for _, b in layers), err


if __name__ == "__main__":
    main()
