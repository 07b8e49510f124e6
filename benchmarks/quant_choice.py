"""Which 4-bit NF4 library lorafit's QLoRA uses: bitsandbytes or torchao, measured on this machine.

For the frozen linear layers of the default model (SmolLM2-135M: 576 -> 576, 576 -> 1536, 1536 -> 576) it
times quantising the weight, and a forward + backward through the quantised layer (the gradient goes to the
input only: the base is frozen, as in QLoRA), and counts the bytes the quantised layer holds.

    OMP_NUM_THREADS=1 python benchmarks/quant_choice.py [--repeats 20] [--tokens 128]

With --checkpoint it also trains LoRA (q,v, r=8) for a few steps of micro-batch 1 x --tokens on that model, each
base (float32, nf4, nf4-dq; with and without DoRA) in a fresh process, and reports loading time, peak RSS
after loading and after the steps (ru_maxrss), and the median step time. Run it with MALLOC_MMAP_THRESHOLD_
set (e.g. 1048576, what `finetune --cpu-mmap-threshold` does): glibc's heap otherwise keeps every freed
dequantised weight resident.

Times are medians over the repeats; on a shared machine they are noisy, compare them only within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
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


Quantise = Callable[[torch.Tensor], tuple[Callable[[torch.Tensor], torch.Tensor], int]]
"""quantise(weight) -> (the layer as a function of its input, bytes it holds)."""


def _candidates() -> dict[str, Quantise]:
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
    parser.add_argument("--checkpoint", help="also time LoRA training steps on this model (e.g. the default model)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one --checkpoint configuration, as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_train_steps(args.checkpoint, args.one, args.tokens, args.steps)))
        return
    torch.manual_seed(0)
    weights = [torch.randn(out, inp) * 0.02 for out, inp in SHAPES]
    inputs = [torch.randn(args.tokens, inp, requires_grad=True) for _, inp in SHAPES]
    float_bytes = sum(_nbytes(w) for w in weights)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), shapes {SHAPES}, {args.tokens} tokens")
    print(f"{'library':44} {'quantise ms':>11} {'fwd+bwd ms':>10} {'bytes':>10} {'x fp32':>7} {'max |err|':>9}")
    for name, quantise in _candidates().items():
        quantise_ms, step_ms, held, err = _measure(quantise, weights, inputs, args.repeats)
        print(f"{name:44} {quantise_ms:11.2f} {step_ms:10.2f} {held:10d} {held / float_bytes:7.3f} {err:9.5f}")
    if args.checkpoint:
        _compare_training(args)


def _compare_training(args: argparse.Namespace) -> None:
    print(f"\nLoRA q,v r=8 on {args.checkpoint}, micro-batch 1 x {args.tokens}, {args.steps} steps, one process each")
    print(f"{'base':16} {'load s':>7} {'RSS load MiB':>12} {'step s':>7} {'tokens/s':>8} {'peak RSS MiB':>12}")
    for base in ("float32", "nf4", "nf4-dq", "float32+dora", "nf4-dq+dora"):
        command = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--one", base]
        command += ["--tokens", str(args.tokens), "--steps", str(args.steps)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(
            f"{base:16} {r['load_s']:7.1f} {r['rss_load_mib']:12.0f} {r['step_s']:7.2f} "
            f"{args.tokens / r['step_s']:8.1f} {r['rss_peak_mib']:12.0f}"
        )


def _train_steps(checkpoint: str, base: str, tokens: int, steps: int) -> dict[str, float]:
    """Load the model (quantised or not), put LoRA on q,v and time `steps` optimizer steps."""
    from lorafit.checkpoint import load_model
    from lorafit.lora import LoRAConfig, apply_lora
    from lorafit.quant import load_quantized
    from lorafit.train import supervised_loss_sum

    scheme, _, dora = base.partition("+")
    start = time.perf_counter()
    model = load_model(checkpoint) if scheme == "float32" else load_quantized(checkpoint, scheme)
    result = {"load_s": time.perf_counter() - start, "rss_load_mib": _peak_rss_mib()}
    apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.05, targets="q,v", dora=bool(dora)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = supervised_loss_sum(model, ids, ids) / (tokens - 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    result["step_s"] = statistics.median(times[1:] or times)  # the first step also warms up
    result["rss_peak_mib"] = _peak_rss_mib()
    return result


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(
    quantise: Quantise, weights: list[torch.Tensor], inputs: list[torch.Tensor], repeats: int
) -> tuple[float, float, int, float]:
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
