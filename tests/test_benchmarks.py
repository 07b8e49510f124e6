"""The GPU benchmark's --dry-run, so the script cannot rot on CPU-only CI."""

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


def test_train_cpu_changes_replace_the_loss_with_the_same_value() -> None:
    """--changes swaps supervised_loss_sum for its plain forms; they take train's arguments and agree with it."""
    import torch

    from lorafit.data import collate
    from lorafit.train import supervised_loss_sum
    from tests.conftest import PAD, tiny_dataset, tiny_model

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("train_cpu_benchmark", REPO / "benchmarks" / "train_cpu.py")
        train_cpu = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train_cpu)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    model = tiny_model("lora").train()
    data = tiny_dataset(2)
    input_ids, labels = collate([data[0], data[1]], PAD)
    want = supervised_loss_sum(model, input_ids, labels, True)
    for plain in (train_cpu.unchunked_loss_sum, train_cpu.full_head_loss_sum):
        torch.testing.assert_close(plain(model, input_ids, labels, True), want, rtol=1e-5, atol=1e-5)
