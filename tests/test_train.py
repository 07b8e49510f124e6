"""The training loop: LR schedule, loss, exact accumulation, learning, resume, checkpoints, metrics, finetune()."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lorafit.data import IGNORE_INDEX, collate
from lorafit.lora import LoRAConfig
from lorafit.train import (
    SupervisedLoss,
    TrainConfig,
    evaluate,
    latest_checkpoint,
    learning_rate_at,
    load_checkpoint,
    make_optimizer,
    plot_losses,
    save_checkpoint,
    supervised_loss_sum,
    train,
)
from tests.conftest import (
    PAD,
    VOCAB,
    read_metrics,
    repetitive_dataset,
    small_config,
    tiny_dataset,
    tiny_model,
    trainable_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- learning-rate schedule --------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    lr = [learning_rate_at(step, total, cfg) for step in range(total)]
    assert lr[0] == pytest.approx(1e-4)
    assert lr[4] == pytest.approx(5e-4)
    assert lr[9] == pytest.approx(1e-3)
    assert lr[10] == pytest.approx(1e-3)  # the cosine starts at the peak
    assert lr[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: the middle of peak and floor
    assert lr[35] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate_at(total, total, cfg) == pytest.approx(1e-4)  # the floor is the end
    assert lr[:11] == sorted(lr[:11]) and lr[10:] == sorted(lr[10:], reverse=True)
    assert min(lr) >= 1e-4


def test_learning_rate_without_warmup_starts_at_the_peak():
    cfg = TrainConfig(learning_rate=2e-4, warmup_steps=0, min_lr_ratio=0.0)
    assert learning_rate_at(0, 50, cfg) == pytest.approx(2e-4)
    assert learning_rate_at(25, 50, cfg) == pytest.approx(1e-4)


# ---- loss ---------------------------------------------------------------------------------------


def test_supervised_loss_sum_equals_full_logits_cross_entropy():
    model = tiny_model("full")
    input_ids, labels = collate([tiny_dataset(6)[i] for i in range(6)], PAD)
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()

    ours = supervised_loss_sum(model, input_ids, labels)
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(input_ids)[:, :-1]
    reference = F.cross_entropy(
        logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours_grads[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)


# ---- gradient accumulation ----------------------------------------------------------------------


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # One step is the whole epoch (8 samples), so both runs see the same samples at every step; the
    # samples have very different numbers of supervised tokens, so a per-micro-batch mean would differ.
    data = tiny_dataset(8, seed=3)
    results = {}
    for micro in (2, 8):
        model = tiny_model("full")
        cfg = small_config(max_steps=3, micro_batch_size=micro, global_batch_size=8, learning_rate=1e-3)
        train(model, data, None, cfg, tmp_path / f"micro{micro}", PAD, progress=False)
        results[micro] = (trainable_state(model), [r["train_loss"] for r in read_metrics(tmp_path / f"micro{micro}")])
    (accumulated, accumulated_losses), (big, big_losses) = results[2], results[8]
    assert accumulated_losses == pytest.approx(big_losses, abs=1e-5)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=0, atol=1e-5, msg=name)
    initial = tiny_model("full").layers[0].self_attn.q_proj.weight
    assert not torch.equal(big["layers.0.self_attn.q_proj.weight"], initial)  # the steps did move the weights


def test_a_micro_batch_s_graph_is_freed_before_the_next_forward(tmp_path, monkeypatch):
    """A finished graph left alive through the next step fragments the CPU heap (train.py says by how much)."""
    alive: list[weakref.ref] = []

    class Marker(torch.autograd.Function):  # its node, and so its ctx, lives as long as the graph does
        @staticmethod
        def forward(ctx, loss: torch.Tensor) -> torch.Tensor:
            ctx.marker = torch.nn.Identity()
            alive.append(weakref.ref(ctx.marker))
            return loss.clone()

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            return grad

    plain_forward = SupervisedLoss.forward

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        assert all(ref() is None for ref in alive), "an earlier micro-batch's graph is still alive"
        return Marker.apply(plain_forward(self, input_ids, labels))

    monkeypatch.setattr(SupervisedLoss, "forward", forward)
    cfg = small_config(max_steps=3, micro_batch_size=2, global_batch_size=4)
    train(tiny_model("lora"), tiny_dataset(8), None, cfg, tmp_path, PAD, progress=False)
    assert len(alive) == 6  # 3 steps of 2 micro-batches, each checked before its forward


# ---- learning -----------------------------------------------------------------------------------


def test_lora_training_lowers_the_loss(tmp_path):
    model = tiny_model("lora", lora_dropout=0.0)
    frozen_before = model.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = small_config(max_steps=40, micro_batch_size=8, global_batch_size=8, learning_rate=2e-2, warmup_steps=4)
    result = train(model, repetitive_dataset(32), None, cfg, tmp_path, PAD, progress=False)
    losses = [r["train_loss"] for r in read_metrics(tmp_path)]
    assert result.steps == 40 and len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    # Only LoRA weights moved.
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, frozen_before)


# ---- exact resume -------------------------------------------------------------------------------


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_a_crash_continues_exactly(tmp_path, method):
    data, val = tiny_dataset(24), tiny_dataset(6, seed=1)
    # 8 steps of 4 samples over 24 samples: the run crosses two epoch boundaries.
    cfg = small_config(max_steps=8, warmup_steps=2, eval_interval=5, save_interval=3, keep_checkpoints=2)

    whole = tiny_model(method)
    train(whole, data, val, cfg, tmp_path / "whole", PAD, progress=False)

    def crash_at_5(step: int, val_loss: float) -> None:
        if step == 5:
            raise Crash  # the process dies after the step-3 checkpoint and after step 4 was logged

    crashed = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(tiny_model(method), data, val, cfg, crashed, PAD, on_eval=crash_at_5, progress=False)
    assert [r["step"] for r in read_metrics(crashed)] == [1, 2, 3, 4]
    with (crashed / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train_lo')  # killed while writing a record
    checkpoint = latest_checkpoint(crashed)
    assert checkpoint is not None and checkpoint.name == "step-000003"

    # Full finetuning restores every weight, so start from other ones; LoRA needs the same frozen base.
    resumed = tiny_model(method, seed=1 if method == "full" else 0)
    torch.manual_seed(1234)  # not the RNG state the crashed run had at step 3: the checkpoint must restore it
    result = train(resumed, data, val, cfg, crashed, PAD, resume=checkpoint, progress=False)
    assert result.steps == 5

    expected, got = read_metrics(tmp_path / "whole"), read_metrics(crashed)
    assert [r["step"] for r in got] == list(range(1, 9))
    for want, have in zip(expected, got, strict=True):
        assert (have["step"], have["train_loss"], have["lr"]) == (want["step"], want["train_loss"], want["lr"])
        assert have.get("val_loss") == want.get("val_loss")
    assert [r["step"] for r in got if "val_loss" in r] == [5, 8]
    for name, value in trainable_state(whole).items():
        assert torch.equal(resumed.get_parameter(name), value), name


# ---- checkpoints --------------------------------------------------------------------------------


def test_checkpoints_are_step_directories_and_only_the_newest_are_kept(tmp_path):
    model = tiny_model("lora")
    cfg = small_config(max_steps=8, save_interval=2, keep_checkpoints=2)
    train(model, tiny_dataset(16), None, cfg, tmp_path, PAD, progress=False)
    # Saved after steps 2, 4, 6 and the last, 8 (so a finished run can be extended); 2 and 4 were dropped.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    newest = latest_checkpoint(tmp_path)
    assert newest == tmp_path / "checkpoints" / "step-000008"
    assert sorted(p.name for p in newest.iterdir()) == [
        "optimizer.safetensors",
        "trainable.safetensors",
        "trainer_state.json",
    ]
    assert json.loads((newest / "trainer_state.json").read_text()) == {"step": 8, "run_id": ""}
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_a_checkpoint_interrupted_while_writing_is_never_used(tmp_path, monkeypatch):
    model = tiny_model("lora")
    optimizer = make_optimizer(model, small_config())
    save_checkpoint(tmp_path, 1, model, optimizer, keep=3)

    def die(tensors, path):  # the process is killed while the second file is written
        if Path(path).name == "optimizer.safetensors":
            raise Crash
        save_file(tensors, path)

    monkeypatch.setattr("lorafit.train.save_safetensors", die)
    with pytest.raises(Crash):
        save_checkpoint(tmp_path, 2, model, optimizer, keep=3)
    # The half-written directory never got the checkpoint's name, and was cleaned up.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000001"

    monkeypatch.undo()
    save_checkpoint(tmp_path, 2, model, optimizer, keep=3)  # the next save replaces the leftover
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_load_checkpoint_rejects_a_directory_that_is_not_one(tmp_path):
    model = tiny_model("lora")
    optimizer = make_optimizer(model, small_config())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: not a lorafit checkpoint \(missing trainable.safetensors\)"):
        load_checkpoint(tmp_path / "empty", model, optimizer)


def test_load_checkpoint_rejects_a_different_trainable_set(tmp_path):
    lora = tiny_model("lora")
    path = save_checkpoint(tmp_path, 3, lora, make_optimizer(lora, small_config()), keep=1)
    full = tiny_model("full")
    with pytest.raises(
        ValueError,
        match=r"step-000003: checkpoint does not match this run's trainable parameters "
        r"\(missing \['embed_tokens.weight', .*unexpected \['layers.0.mlp",
    ):
        load_checkpoint(path, full, make_optimizer(full, small_config()))


def test_full_finetuning_checkpoint_round_trips_with_tied_embeddings(tmp_path):
    model = tiny_model("full", tie=True)
    cfg = small_config(max_steps=2)
    train(model, tiny_dataset(8), None, cfg, tmp_path, PAD, progress=False)
    optimizer = make_optimizer(model, cfg)
    path = save_checkpoint(tmp_path, 2, model, optimizer, keep=1)
    other = tiny_model("full", tie=True, seed=5)
    assert load_checkpoint(path, other, make_optimizer(other, cfg)) == 2
    assert other.lm_head.weight is other.embed_tokens.weight  # still tied after loading
    for name, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name


# ---- metrics and plot ---------------------------------------------------------------------------


def test_metrics_have_one_record_per_step_and_val_loss_at_eval_steps(tmp_path):
    cfg = small_config(max_steps=5, eval_interval=2, warmup_steps=2)
    result = train(tiny_model("lora"), tiny_dataset(16), tiny_dataset(4, seed=1), cfg, tmp_path, PAD, progress=False)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 5]  # every eval_interval steps and at the end
    assert [r["lr"] for r in records] == [learning_rate_at(s, 5, cfg) for s in range(5)]
    assert all(math.isfinite(r["train_loss"]) and r["step_tokens_per_s"] > 0 for r in records)
    assert records[-1]["val_ppl"] == pytest.approx(math.exp(records[-1]["val_loss"]))
    assert result.final_val_loss == records[-1]["val_loss"] and result.final_train_loss == records[-1]["train_loss"]

    # A fresh run in the same directory starts a fresh log.
    train(tiny_model("lora"), tiny_dataset(16), None, small_config(max_steps=2), tmp_path, PAD, progress=False)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]

    plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png", title="tiny")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.glob("loss*")) == ["loss.png"]


# ---- finetune() end to end ----------------------------------------------------------------------


def test_finetune_lora_end_to_end_and_auto_resume(tmp_path, tiny_checkpoint, capsys):
    from lorafit.finetune import DataOptions, finetune
    from lorafit.rundir import read_run_file

    records = [
        {"instruction": f"Say the number {i}.", "input": "" if i % 2 else "quickly", "output": f"{i} {i} {i}"}
        for i in range(20)
    ]
    data = tmp_path / "numbers.json"
    data.write_text(json.dumps(records))
    run_dir = tmp_path / "run"
    cfg = small_config(max_steps=4, save_interval=2, eval_interval=2, max_seq_length=96)
    lora = LoRAConfig(r=4, alpha=8, dropout=0.1, targets="q,v")
    result = finetune(
        "lora",
        data,
        run_dir,
        checkpoint=tiny_checkpoint,
        train_config=cfg,
        method_config=lora,
        data_options=DataOptions(val_size=4),
        progress=False,
        device="cpu",
    )
    assert result.steps == 4
    for name in ("adapter_model.safetensors", "adapter_config.json", "lorafit_run.json", "metrics.jsonl", "loss.png"):
        assert (run_dir / name).is_file(), name
    run = read_run_file(run_dir)
    assert (run["method"], run["prompt_style"], run["lora"]["r"]) == ("lora", "alpaca", 4)
    assert run["train"]["max_steps"] == 4
    assert json.loads((run_dir / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    first = read_metrics(run_dir)
    assert [r["step"] for r in first] == [1, 2, 3, 4] and "val_loss" in first[1]
    assert latest_checkpoint(run_dir).name == "step-000004"  # the last step is always saved
    capsys.readouterr()

    # As if killed after step 3: the final checkpoint and outputs never got written, metrics reach step 3.
    shutil.rmtree(latest_checkpoint(run_dir))
    (run_dir / "adapter_model.safetensors").unlink()
    (run_dir / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (run_dir / "metrics.jsonl").read_text().splitlines()[:3])
    )
    # resume="auto" picks the newest checkpoint and redoes steps 3 and 4 exactly.
    again = finetune(
        "lora",
        data,
        run_dir,
        checkpoint=tiny_checkpoint,
        train_config=cfg,
        method_config=lora,
        data_options=DataOptions(val_size=4),
        resume="auto",
        progress=False,
        device="cpu",
    )
    assert f"resumed from {run_dir / 'checkpoints' / 'step-000002'} at step 2" in capsys.readouterr().out
    assert again.steps == 2
    second = read_metrics(run_dir)
    assert [(r["step"], r["train_loss"], r.get("val_loss")) for r in second] == [
        (r["step"], r["train_loss"], r.get("val_loss")) for r in first
    ]


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_leaves_the_model_in_the_mode_it_found_it(training):
    model = tiny_model("lora")
    model.train(training)
    evaluate(model, tiny_dataset(6), small_config(), pad_id=0, device=torch.device("cpu"))
    assert model.training is training


RSS_RETURNED = """
import sys, torch
from lorafit.runtime import release_large_buffers, trim_heap

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "release":
    assert release_large_buffers(1 << 20)
if sys.argv[1] == "trim":  # small buffers, which always come from the heap, freed every other one, then trimmed
    buffers = [torch.ones(2**14) for _ in range(6400)]  # 400 MiB in 64 KiB buffers
    before = rss_mib()
    del buffers[::2]
    assert trim_heap()
    print(before - rss_mib())
    sys.exit()
warm = [torch.ones(2**19) for _ in range(4)]  # 2 MiB buffers, freed: glibc's adaptive threshold rises past them
del warm
buffers = [torch.ones(2**19) for _ in range(100)]  # 200 MiB in 2 MiB buffers
before = rss_mib()
del buffers[::2]  # free every other one, as activations of different lifetimes are: holes in the heap
print(before - rss_mib())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or sys.platform != "linux", reason="glibc Linux only")
def test_large_buffers_go_back_to_the_system_when_freed():
    """With cpu_mmap_threshold, freed activation-sized buffers leave the resident set; by default glibc keeps them."""
    import subprocess

    def returned_mib(mode: str) -> float:
        command = [sys.executable, "-c", RSS_RETURNED, mode]
        env = os.environ | {"THP_MEM_ALLOC_ENABLE": "0"}  # torch's own allocator defaults (see lorafit.process)
        return float(subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout)

    assert returned_mib("release") > 90  # of the 100 MiB freed
    assert returned_mib("default") < 10
    assert returned_mib("trim") > 150  # of the 200 MiB freed in holes of the heap
