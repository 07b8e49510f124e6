"""QLoRA as a method of the registry: a run over a 4-bit base, generated from, resumed and merged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafit.estimate import estimate_memory
from lorafit.finetune import DataOptions, finetune
from lorafit.generate import LLM, generate
from lorafit.methods import get_method, merge_run, method_of_run
from lorafit.methods.qlora import QLoRAConfig
from lorafit.quant import QuantizedLinear, quantized_linears
from tests.conftest import small_config

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def numbers(tmp_path_factory):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} {i}"} for i in range(20)]
    path = tmp_path_factory.mktemp("data") / "numbers.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("dora", [False, True])
def test_a_qlora_run_trains_over_a_4bit_base_and_is_served_and_merged(numbers, tiny_checkpoint, tmp_path, dora):
    out = tmp_path / "run"
    config = QLoRAConfig(r=4, alpha=8, targets="all-linear", quantize="nf4-dq", dora=dora)
    method = get_method("qlora")
    trained = {}
    save = method.save

    def keep(model, *args, **kwargs):
        trained["model"] = model
        return save(model, *args, **kwargs)

    method.save = keep
    try:
        result = finetune("qlora", numbers, out, tiny_checkpoint, small_config(max_steps=6, max_seq_length=64),
                          config, DataOptions(val_size=2), progress=False, device="cpu")  # fmt: skip
    finally:
        del method.save
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 6 and losses[-1] < losses[0]
    model = trained["model"].eval()
    assert len(quantized_linears(model)) == 14  # every block linear of the 2-layer model, under LoRA
    run_file = json.loads((out / "lorafit_run.json").read_text())
    assert run_file["method"] == "qlora" and run_file["qlora"]["quantize"] == "nf4-dq"
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is dora
    assert method_of_run(out).name == "qlora"

    prompt = [1, 20, 31, 44, 7]
    expected = list(generate(model, prompt, max_new_tokens=8))
    llm = LLM.load(adapter=out)  # the same 4-bit base rebuilt from the run file, the adapter beside it
    assert any(isinstance(m, QuantizedLinear) for m in llm.model.modules())
    assert list(generate(llm.model, prompt, max_new_tokens=8)) == expected

    merged = merge_run(out, tmp_path / "merged")  # folded into the dequantised base, a plain Llama
    plain = LLM.load(merged)
    assert not quantized_linears(plain.model)
    model.clear_kv_cache()  # generate leaves its cache for a next turn; a plain forward runs without
    with torch.no_grad():
        ids = torch.tensor([prompt])
        torch.testing.assert_close(plain.model(ids), model(ids), atol=1e-4, rtol=1e-4)


def test_qlora_resumes_exactly(numbers, tiny_checkpoint, tmp_path):
    config = QLoRAConfig(r=4, alpha=8, targets="q,v", quantize="nf4")
    cfg = small_config(max_steps=4, max_seq_length=64, save_interval=2)

    def run(out, **kwargs):
        return finetune("qlora", numbers, out, tiny_checkpoint, cfg, config, DataOptions(val_size=2),
                        progress=False, device="cpu", **kwargs)  # fmt: skip

    run(tmp_path / "whole")
    run(tmp_path / "cut")
    (tmp_path / "cut" / "checkpoints" / "step-000004").rename(tmp_path / "gone")
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[:2]
    (tmp_path / "cut" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run(tmp_path / "cut", resume="auto")
    read = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("whole", "cut")]
    assert [json.loads(x)["train_loss"] for x in read[0].splitlines()] == [
        json.loads(x)["train_loss"] for x in read[1].splitlines()
    ]


def test_the_7b_qlora_estimate_is_below_litgpts_measured_peak():
    from lorafit.config import Config

    config = Config.from_name("Llama-2-7B")
    qlora = estimate_memory(config, "qlora", 4, 256, "bf16-true", QLoRAConfig(targets="q,v"))
    lora = estimate_memory(config, "lora", 4, 256, "bf16-true")
    assert qlora.total < 13.84e9  # litgpt, --quantize bnb.nf4-dq, A100
    assert qlora.weights < 0.3 * lora.weights and qlora.activations == lora.activations


def test_quantize_is_refused_where_it_cannot_serve(tiny_checkpoint, tmp_path, capsys):
    from lorafit.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["finetune", "full", "--quantize", "nf4", "--data", "d", "--out", str(tmp_path)])
    assert exit.value.code == 2 and "unrecognized arguments: --quantize nf4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["finetune", "qlora", "--quantize", "int4", "--data", "d", "--out", str(tmp_path)])
    assert exit.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_generate_over_a_quantised_base_agrees_with_float32(tiny_checkpoint, tmp_path, scheme):
    """--quantize for inference: the block linears quantised (a run's adapter folded in first), int8's LM head too."""
    full = LLM.load(tiny_checkpoint)
    quantized = LLM.load(tiny_checkpoint, quantize=scheme)
    assert len(quantized_linears(quantized.model)) == 14 + (scheme == "int8")
    ids = torch.tensor([[1, 20, 31, 44, 7, 9, 100, 3]])
    with torch.no_grad():
        error = (quantized.model(ids) - full.model(ids)).abs().max() / full.model(ids).abs().max()
    assert error < (0.02 if scheme == "int8" else 0.2)


MAPPED_AFTER_FINETUNE = """
import json, sys, torch
from lorafit.finetune import DataOptions, finetune
from lorafit.methods import get_method
from tests.conftest import small_config

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

method, data, checkpoint, out = sys.argv[1:]
config = get_method(method).config_from_dict({"r": 2, "quantize": "nf4"} if method == "qlora" else {"r": 2})
finetune(method, data, out, checkpoint, small_config(max_steps=1, max_seq_length=32), config,
         DataOptions(val_size=2), progress=False, device="cpu")  # fmt: skip
warm = [torch.ones(2**19) for _ in range(4)]  # 2 MiB buffers, freed: glibc's adaptive threshold rises past them
del warm
buffers = [torch.ones(2**19) for _ in range(50)]
before = rss_mib()
del buffers[::2]
print(before - rss_mib())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc Linux only")
def test_a_qlora_run_returns_its_large_temporaries_to_the_system(numbers, tiny_checkpoint, tmp_path):
    """QLoRA dequantises into a fresh buffer per call: its runs map large buffers on their own (LoRA's do not)."""

    def returned_mib(method: str) -> float:
        command = [sys.executable, "-c", MAPPED_AFTER_FINETUNE, method, numbers, tiny_checkpoint, tmp_path / method]
        env = os.environ | {"THP_MEM_ALLOC_ENABLE": "0"}  # huge pages (lorafit.process) would map these for both
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1], env=env)
        assert done.returncode == 0, done.stderr
        return float(done.stdout.split()[-1])

    assert returned_mib("qlora") > 45  # of the 50 MiB freed
    assert returned_mib("lora") < 5
