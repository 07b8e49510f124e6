"""The whole CLI on a tiny model: prepare -> finetune -> merge -> generate, plus recipes and errors."""

import json

import pytest
import torch

from lorafit.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    records = [
        {"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(6) for b in range(4)
    ]
    path = tmp_path_factory.mktemp("data") / "sums.json"
    path.write_text(json.dumps(records))
    return path


def run_cli(*argv: str) -> None:
    main([str(a) for a in argv])


def test_prepare_finetune_merge_generate(tiny_checkpoint, data_file, tmp_path, capsys):
    prepared, run, merged = tmp_path / "prepared", tmp_path / "run", tmp_path / "merged"
    run_cli(
        "prepare",
        "json",
        "--source",
        data_file,
        "--out",
        prepared,
        "--checkpoint",
        tiny_checkpoint,
        "--val-size",
        4,
        "--max-seq-length",
        64,
    )
    assert "20 train / 4 val samples" in capsys.readouterr().out

    run_cli(
        "finetune",
        "lora",
        "--checkpoint",
        tiny_checkpoint,
        "--data",
        prepared,
        "--out",
        run,
        "--max-steps",
        3,
        "--micro-batch-size",
        2,
        "--global-batch-size",
        4,
        "--warmup-steps",
        1,
        "--eval-interval",
        2,
        "--save-interval",
        2,
        "--learning-rate",
        1e-2,
        "--lora-targets",
        "q,k,v,o",
    )
    assert {"adapter_model.safetensors", "adapter_config.json", "lorafit_run.json", "metrics.jsonl", "loss.png"} <= {
        p.name for p in run.iterdir()
    }
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3

    run_cli("merge", run, "--out", merged)
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    hf_with_adapter = peft.PeftModel.from_pretrained(base, run).eval()  # PEFT reads our adapter on the base
    idx = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_merged(idx).logits, hf_with_adapter(idx).logits, atol=1e-5, rtol=0)

    capsys.readouterr()
    run_cli("generate", "--adapter", run, "--prompt", "Add 2 and 3.", "--max-new-tokens", 8)
    with_adapter = capsys.readouterr().out
    run_cli("generate", "--checkpoint", merged, "--prompt", "Add 2 and 3.", "--max-new-tokens", 8)
    assert capsys.readouterr().out == with_adapter


def test_finetune_takes_a_raw_file_and_a_yaml_recipe(tiny_checkpoint, data_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"checkpoint: {tiny_checkpoint}\ndata: {data_file}\nmax_steps: 2\nmicro-batch-size: 2\n"
        "global_batch_size: 2\nwarmup_steps: 1\nval_size: 4\nlora_r: 4\n"
    )
    run = tmp_path / "run"
    run_cli("finetune", "lora", "--config", recipe, "--out", run, "--lora-r", 2)
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["r"] == 2  # the flag beats the recipe
    assert adapter["base_model_name_or_path"] == str(tiny_checkpoint)
    assert json.loads((run / "lorafit_run.json").read_text())["train"]["max_steps"] == 2


def test_unknown_recipe_key_is_named(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora_rank: 4\n")
    with pytest.raises(SystemExit):
        run_cli("finetune", "lora", "--config", recipe, "--data", "x", "--out", "y")
    assert "recipe.yaml: unknown keys for `lorafit finetune lora`: lora_rank" in capsys.readouterr().err


def test_bad_data_file_is_one_clear_error(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 3}\n')
    with pytest.raises(SystemExit) as exit:
        run_cli("prepare", "json", "--source", bad, "--out", tmp_path / "out", "--checkpoint", tiny_checkpoint)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafit prepare: error: ") and "\n" not in err
    assert "bad.jsonl: line 2: field 'output' must be a string" in err
