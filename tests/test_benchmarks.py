"""The benchmarks' own logic on CPU-only CI: the GPU benchmark's --dry-run, FLOP counts, loss forms, tables."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW_FIELDS = {
    "framework",
    "max_length",
    "steps",
    "s_per_step",
    "tokens_per_s",
    "model_flops_per_step",
    "mfu",
    "peak_memory_bytes",
    "final_loss",
    "lora_param_dtype",
}


def test_gpu_benchmark_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run", "--json", str(out), "--lengths", "16"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["meta"]["dry_run"] is True
    assert report["meta"]["steps"] == 2 and report["meta"]["micro_batch"] == 4
    has_peft = importlib.util.find_spec("transformers") and importlib.util.find_spec("peft")
    frameworks = ["lorafit", "peft"] if has_peft else ["lorafit"]
    frameworks += ["lorafit DoRA"] + (["lorafit QLoRA nf4-dq"] if importlib.util.find_spec("bitsandbytes") else [])
    assert [row["framework"] for row in report["results"]] == frameworks
    for row in report["results"]:
        assert ROW_FIELDS <= set(row), row
        assert row["max_length"] == 16 and row["steps"] == 2
        assert row["tokens_per_s"] > 0 and row["s_per_step"] > 0 and row["model_flops_per_step"] > 0
        assert row["mfu"] is None  # no known peak FLOP/s on a CPU
        assert row["lora_param_dtype"] == "float32"
    lorafit = report["results"][0]
    assert lorafit["estimated_peak_bytes"] > 0
    assert report["extrapolation"] == []  # only extrapolated from max length 256
    assert "| lorafit | 16 |" in proc.stdout


def test_model_flops_count() -> None:
    """The LoRA FLOP count: 4N per token plus the head at labelled positions, LoRA and causal attention."""
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    config = gpu.Config.from_name("Llama-2-7B")
    n_blocks = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    tokens = 4 * 256
    expected = (
        4 * n_blocks * tokens
        + 4 * 32000 * 4096 * (4 * 128)
        + 6 * 8 * 32 * tokens * (2 * (4096 + 4096))
        + 6 * 4 * 256 * 256 * 4096 * 32
    )
    assert gpu.model_flops_per_step(config, gpu.LORA, 4, 256) == expected
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_flops("NVIDIA L40S") == 362e12
    assert gpu.peak_flops("NVIDIA L4") == 121e12
    assert gpu.peak_flops("Tesla T4") is None


def load_benchmark(name: str):
    """A script under benchmarks/ as a module (its sibling imports resolved as when it runs)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def test_generate_table_states_each_rows_share_of_the_bandwidth_probed_before_each_run() -> None:
    from argparse import Namespace

    generate = load_benchmark("generate")
    machine = {"cpu": "test CPU", "threads": 2, "torch": "x", "date": "d", "read_gb_per_s": 40.0}
    machine |= {"float32_gflops": 1.0, "bfloat16_gflops": 2.0}
    row = {"warmup_s": 1.0, "time_to_first_token_s": 0.1, "peak_memory_bytes": 2**30, "answers": []}

    def runs(*pairs: tuple[float, float]) -> list[dict]:
        return [
            {"read_gb_per_s": bw, "decode_tokens_per_s": speed, "time_to_first_token_s": 0.1} for bw, speed in pairs
        ]

    results = [
        row | {"engine": "lorafit", "weights": "float32", "decode_tokens_per_s": 50.0, "weight_bytes": 4e8},
        row | {"engine": "lorafit", "weights": "int8", "decode_tokens_per_s": 100.0, "weight_bytes": 1e8},
    ]
    # float32: 0.4 GB x 50 tokens/s = 20 GB/s over 25, 40 and 20 probed: 80%, 50% (a slower bus: 20 over 40) and
    # 100%; the median 80%, where 20 over the median read (25) would say the same only by chance.
    results[0] |= {"read_gb_per_s": 25.0, "runs": runs((25.0, 50.0), (40.0, 50.0), (20.0, 50.0))}
    results[1] |= {"read_gb_per_s": 20.0, "runs": runs((20.0, 100.0), (30.0, 120.0))}  # 50%, 40%: median 45%
    args = Namespace(new_tokens=8, adapter=None, threads=2, runs=1)
    lines = generate.table(results, Path("model"), args, machine).splitlines()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| lorafit")]
    assert [c[-3:] for c in cells] == [["20.0", "25.0", "80%"], ["10.0", "20.0", "45%"]]
    assert cells[1][6] == "2.00x"  # int8 against float32 eager


def test_train_cpu_changes_replace_the_loss_with_the_same_value() -> None:
    """--changes swaps supervised_loss_sum for its plain forms; they take train's arguments and agree with it."""
    import torch

    from lorafit.data import collate
    from lorafit.train import supervised_loss_sum
    from tests.conftest import PAD, tiny_dataset, tiny_model

    train_cpu = load_benchmark("train_cpu")
    model = tiny_model("lora").train()
    data = tiny_dataset(2)
    input_ids, labels = collate([data[0], data[1]], PAD)
    want = supervised_loss_sum(model, input_ids, labels, True)
    for plain in (train_cpu.unchunked_loss_sum, train_cpu.full_head_loss_sum):
        torch.testing.assert_close(plain(model, input_ids, labels, True), want, rtol=1e-5, atol=1e-5)


def test_decode_share_sets_each_round_against_the_probe_just_before_it() -> None:
    from argparse import Namespace

    decode_share = load_benchmark("decode_share")
    machine = {"cpu": "test CPU", "threads": 2, "torch": "x", "date": "d", "read_gb_per_s": 40.0}
    machine |= {"float32_gflops": 1.0, "bfloat16_gflops": 2.0}
    # 0.5 GB a token. Round 1: probe 50 GB/s, eager 20 ms (25 GB/s: 50%), compiled 12.5 ms (40 GB/s: 80%);
    # round 2: probe 25, eager 25 ms (20 GB/s: 80%), compiled 20 ms (25 GB/s: 100%).
    # Eager's narrow twin takes 5 ms a step: reading the weights at the probe's rate takes 10 ms, then 20 ms.
    seconds = {"lorafit": [0.020, 0.025], "lorafit --compile": [0.0125, 0.020], "lorafit, fixed cost": [0.005] * 2}
    args = Namespace(rounds=2, steps=20)
    lines = decode_share.table(seconds, [50.0, 25.0], dict.fromkeys(seconds, int(5e8)), args, machine).splitlines()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| lorafit")]
    assert len(cells) == 2  # the fixed-cost twin is a column, not a row
    # tokens/s from the median step time (22.5 ms, 16.25 ms); shares are medians of the rounds' own ratios.
    # Possible share: 10 / (10 + 5) = 67%, 20 / 25 = 80%; weights streamed: 10 / (20 - 5) = 67%, 20 / 20 = 100%.
    assert cells[0] == ["lorafit", "0.500", "44.4", "22.2", "65%", "50%-80%", "1.00x", "5.0 ms", "73%", "83%"]
    assert cells[1] == ["lorafit --compile", "0.500", "61.5", "30.8", "90%", "80%-100%", "1.42x", "-", "-", "-"]
