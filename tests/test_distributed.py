"""Two processes (gloo, CPU) train exactly like one: DDP for LoRA, FSDP2 for full finetuning, checkpoints either way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit import distributed
from lorafit.methods import get_method
from lorafit.model import LLaMA
from lorafit.train import TrainConfig, latest_checkpoint, train
from tests import conftest
from tests.conftest import PAD, read_metrics, small_config, tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT_S = 240  # a hung collective fails the test instead of the whole run


def tiny_model(method: str) -> LLaMA:
    """test_train's tiny model, with LoRA dropout off: masks are drawn per rank, so 1 and 2 processes would differ."""
    return conftest.tiny_model(method, tie=method == "full", lora_dropout=0.0)


# ---- splitting a step --------------------------------------------------------------------------


def test_micro_batches_are_dealt_round_robin_and_short_steps_padded_with_weightless_repeats():
    step = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert distributed.local_micro_batches(step, 0, 2) == [([0, 1], True), ([4, 5], True)]
    assert distributed.local_micro_batches(step, 1, 2) == [([2, 3], True), ([6, 7], True)]
    # An epoch's short last step: every rank still runs as many passes as the others.
    short = [[0, 1], [2, 3], [4, 5]]
    assert distributed.local_micro_batches(short, 1, 2) == [([2, 3], True), ([0, 1], False)]
    assert distributed.local_micro_batches(short[:1], 1, 2) == [([0, 1], False)]
    assert distributed.local_micro_batches(step, 0, 1) == [(b, True) for b in step]


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused():
    distributed.check_batch_layout(16, 2, 4)
    with pytest.raises(
        ValueError,
        match=r"global_batch_size \(12\) must be a multiple of micro_batch_size \(4\) "
        r"× processes \(2\) = 8",
    ):
        distributed.check_batch_layout(12, 4, 2)


def test_finetune_refuses_the_layout_before_launching_workers(tmp_path):
    from lorafit.finetune import finetune

    cfg = TrainConfig(micro_batch_size=2, global_batch_size=6)
    with pytest.raises(ValueError, match=r"global_batch_size \(6\) must be a multiple of .* = 4"):
        finetune("lora", tmp_path / "none.json", tmp_path / "run", train_config=cfg, devices=2, device="cpu")
    with pytest.raises(ValueError, match="devices and nodes must be at least 1; got devices=0, nodes=1"):
        finetune("lora", tmp_path / "none.json", tmp_path / "run", train_config=cfg, devices=0, device="cpu")


def test_several_nodes_without_torchrun_need_the_rendezvous_address(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="--nodes 2 needs MASTER_ADDR, MASTER_PORT, NODE_RANK in the environment"):
        distributed.launch(print, {}, devices=2, nodes=2)


# ---- two processes against one -----------------------------------------------------------------

# 22 samples in micro-batches of 2 are 11 micro-batches an epoch: steps of 4, 4 and 3, so the epoch's
# last step leaves rank 1 with a padding micro-batch. 6 steps cross an epoch boundary.
N_SAMPLES = 22


def run_config() -> TrainConfig:
    return small_config(
        max_steps=6,
        micro_batch_size=2,
        global_batch_size=8,
        warmup_steps=2,
        eval_interval=3,
        save_interval=3,
        keep_checkpoints=2,
    )


def train_tiny(method: str, run_dir: Path, resume: Path | None = None) -> None:
    """The same tiny run in whatever processes call it (LoRA without dropout: masks are drawn per rank)."""
    model = tiny_model(method)
    train(
        model,
        tiny_dataset(N_SAMPLES),
        tiny_dataset(6, seed=1),
        run_config(),
        run_dir,
        PAD,
        resume=resume,
        progress=False,
        strategy=get_method(method).strategy,
    )


def two_process_worker(method: str, fresh_dir: Path, resumed_dir: Path, one_process_checkpoint: Path) -> None:
    """In each of 2 workers: a fresh run, then a run resumed from a checkpoint that 1 process wrote."""
    torch.set_num_threads(1)
    with distributed.process_group(torch.device("cpu"), timeout_s=TIMEOUT_S) as env:
        assert env.world_size == 2
        train_tiny(method, fresh_dir)
        train_tiny(method, resumed_dir, resume=one_process_checkpoint)


def losses(records: list[dict]) -> list[tuple[int, float, float | None]]:
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in records]


def assert_same_losses(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for have, expected in zip(got, want, strict=True):
        assert have["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-4), have["step"]
        assert (have.get("val_loss") is None) == (expected.get("val_loss") is None), have["step"]
        if "val_loss" in expected:
            assert have["val_loss"] == pytest.approx(expected["val_loss"], abs=1e-4), have["step"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_train_like_one_and_checkpoints_move_between_them(tmp_path, method):
    one, two, one_to_two = tmp_path / "one", tmp_path / "two", tmp_path / "one_to_two"
    train_tiny(method, one)
    one_checkpoint = one / "checkpoints" / "step-000003"
    assert latest_checkpoint(one).name == "step-000006"  # the last step is saved too

    distributed.launch(
        two_process_worker,
        dict(method=method, fresh_dir=two, resumed_dir=one_to_two, one_process_checkpoint=one_checkpoint),
        devices=2,
        timeout_s=TIMEOUT_S,
        start_method="fork",  # no second import of torch: seconds on a small machine
    )
    uninterrupted = read_metrics(one)
    assert [r["step"] for r in uninterrupted if "val_loss" in r] == [3, 6]
    assert_same_losses(read_metrics(two), uninterrupted)
    assert_same_losses(read_metrics(one_to_two), uninterrupted[3:])  # 1 process saved, 2 continued

    # The checkpoint 2 processes wrote (FSDP shards gathered) is the one 1 process writes.
    two_checkpoint = two / "checkpoints" / "step-000003"
    assert sorted(p.name for p in two_checkpoint.iterdir()) == sorted(p.name for p in one_checkpoint.iterdir())
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        want, got = load_file(one_checkpoint / name), load_file(two_checkpoint / name)
        assert set(got) == set(want) | ({"rng::cpu::rank1"} if name == "optimizer.safetensors" else set())
        for key, value in want.items():
            if not key.startswith("rng::"):
                torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)

    # 2 processes saved, 1 continues: the same losses as the uninterrupted run.
    two_metrics = read_metrics(two)
    train_tiny(method, two, resume=two_checkpoint)
    assert losses(read_metrics(two))[:3] == losses(two_metrics)[:3]
    assert_same_losses(read_metrics(two), uninterrupted)


# ---- finetune(devices=2) end to end ------------------------------------------------------------


def test_finetune_with_two_devices_launches_workers_and_writes_the_outputs_once(tmp_path, tiny_checkpoint):
    from lorafit.finetune import DataOptions, finetune

    records = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))} for i in range(1, 21)
    ]
    data = tmp_path / "counting.json"
    data.write_text(json.dumps(records))
    cfg = small_config(max_steps=3, micro_batch_size=2, global_batch_size=4, eval_interval=0, max_seq_length=96)
    runs = {}
    for devices in (1, 2):
        run_dir = tmp_path / f"devices{devices}"
        result = finetune(
            "full",
            data,
            run_dir,
            checkpoint=tiny_checkpoint,
            train_config=cfg,
            data_options=DataOptions(val_size=4),
            progress=False,
            device="cpu",
            devices=devices,
        )
        assert result.steps == 3
        runs[devices] = run_dir
    assert sorted(p.name for p in runs[2].iterdir()) == sorted(p.name for p in runs[1].iterdir())
    assert_same_losses(read_metrics(runs[2]), read_metrics(runs[1]))
    one, two = (load_file(runs[d] / "model" / "model.safetensors") for d in (1, 2))
    assert set(two) == set(one)
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=1e-5, msg=key)
