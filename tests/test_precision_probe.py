"""Training precision 'auto' on the CPU, chosen by a cached matmul probe (the timing itself is monkeypatched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafit import runtime
from lorafit.finetune import DataOptions, finetune
from lorafit.lora import LoRAConfig
from lorafit.rundir import RUN_FILE
from tests.conftest import small_config

CPU = torch.device("cpu")


def fake_probe(float32: float, bfloat16: float) -> runtime.MatmulProbe:
    return runtime.MatmulProbe("Test CPU 9000", torch.__version__, 2, float32, bfloat16)


class Probes(list):
    """Probes for measure_matmul to return, in order; .measured: those it has returned."""

    measured: list[runtime.MatmulProbe]


@pytest.fixture
def probes(monkeypatch, tmp_path) -> Probes:
    """Route the cache to tmp_path; measure_matmul returns (and records) whatever the test appends."""
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    queued = Probes()
    queued.measured = []

    def measure() -> runtime.MatmulProbe:
        queued.measured.append(queued.pop(0))
        return queued.measured[-1]

    monkeypatch.setattr(runtime, "measure_matmul", measure)
    return queued


def cache_file(tmp_path: Path) -> Path:
    return tmp_path / "home" / runtime.PROBE_FILE


@pytest.mark.parametrize(
    ("float32", "bfloat16", "expected"),
    [
        (307.0, 165.0, "32-true"),  # the AVX-512 Xeon of issue 14: bf16 slower
        (100.0, 110.0, "32-true"),  # faster, but within the margin
        (100.0, 120.0, "bf16-mixed"),  # exactly the margin
        (50.0, 400.0, "bf16-mixed"),  # AMX
    ],
)
def test_auto_on_the_cpu_follows_the_measured_matmul_speeds(probes, float32, bfloat16, expected):
    probes.append(fake_probe(float32, bfloat16))
    assert runtime.resolve_precision("auto", CPU) == expected
    assert len(probes.measured) == 1


def test_probe_is_measured_once_per_machine_and_cached(probes, monkeypatch, tmp_path):
    probes.append(fake_probe(10.0, 30.0))
    assert runtime.resolve_precision("auto", CPU) == "bf16-mixed"
    assert runtime.resolve_precision("auto", CPU) == "bf16-mixed"  # read back: nothing left to measure
    assert len(probes.measured) == 1
    saved = json.loads(cache_file(tmp_path).read_text())
    assert saved == {runtime.probe_key(): {**vars(fake_probe(10.0, 30.0))}}

    # Another CPU (or torch version) sharing the cache gets its own entry; the first one stays.
    monkeypatch.setattr(runtime, "probe_key", lambda: "Other CPU | torch 0")
    probes.append(fake_probe(300.0, 100.0))
    assert runtime.resolve_precision("auto", CPU) == "32-true"
    assert len(probes.measured) == 2
    assert set(json.loads(cache_file(tmp_path).read_text())) == {"Other CPU | torch 0", *saved}


def test_probe_key_names_cpu_flags_torch_and_threads():
    key = runtime.probe_key()
    assert key.startswith(f"{runtime.cpu_model()} | flags ")
    assert key.endswith(f" | torch {torch.__version__} | {torch.get_num_threads()} threads")


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"%s": {"cpu": "x"}}'])
def test_an_unreadable_cache_is_measured_again_and_replaced(probes, tmp_path, content):
    cache_file(tmp_path).parent.mkdir(parents=True)
    cache_file(tmp_path).write_text(content.replace("%s", runtime.probe_key()))
    probes.append(fake_probe(300.0, 100.0))
    assert runtime.resolve_precision("auto", CPU) == "32-true"
    assert len(probes.measured) == 1
    assert json.loads(cache_file(tmp_path).read_text())[runtime.probe_key()]["float32_gflops"] == 300.0


def test_other_devices_and_explicit_precisions_measure_nothing(probes):
    assert runtime.resolve_precision("auto", torch.device("cuda")) == "bf16-mixed"
    assert runtime.resolve_precision("auto", torch.device("mps")) == "32-true"
    for precision in runtime.PRECISIONS:
        assert runtime.resolve_precision(precision, CPU) == precision
    assert runtime.auto_precision_note(torch.device("cuda")) is None
    with pytest.raises(ValueError, match="precision must be auto, 32-true, bf16-mixed, bf16-true; got 'fp8'"):
        runtime.resolve_precision("fp8", CPU)
    assert probes.measured == []


def test_note_says_the_choice_and_the_numbers(probes):
    probes.append(fake_probe(23.4, 53.9))
    assert runtime.auto_precision_note(CPU) == (
        "precision auto: bf16-mixed (bf16 matmul 54 GFLOP/s vs float32 23 on Test CPU 9000, 2 threads)"
    )


def test_matmul_gflops_times_a_real_product(one_thread):
    assert 0 < runtime.matmul_gflops(torch.float32, 64, repeats=2) < float("inf")


def test_finetune_prints_the_auto_choice_once(probes, tiny_checkpoint, tmp_path, capsys):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} {i}"} for i in range(8)]
    data = tmp_path / "numbers.json"
    data.write_text(json.dumps(records))
    probes.append(fake_probe(300.0, 100.0))
    cfg = small_config(max_steps=1, max_seq_length=64, precision="auto")
    finetune("lora", data, tmp_path / "run", tiny_checkpoint, cfg, LoRAConfig(r=2), DataOptions(val_size=2),
             progress=False, device="cpu")  # fmt: skip
    out = capsys.readouterr().out
    note = "precision auto: 32-true (bf16 matmul 100 GFLOP/s vs float32 300 on Test CPU 9000, 2 threads)"
    assert out.count(note) == 1
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text())["train"]["precision"] == "32-true"
