"""`lorafit evaluate`: loss parity with transformers/PEFT, adapters on and off, generation, lm-eval parity."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lorafit.adapter import AdapterConfig, adapter_parameters
from lorafit.checkpoint import load_model
from lorafit.data import encode_record, format_prompt, prepare_dataset
from lorafit.evaluate import (
    adapter_applied,
    default_score,
    evaluate,
    format_table,
    load_eval_data,
    prompt_and_reference,
    supervised_loss,
)
from lorafit.generate import generate
from lorafit.lora import LoRAConfig, apply_lora, lora_modules, save_peft_adapter
from lorafit.methods import get_method
from lorafit.tokenizer import Tokenizer

NAMES = ["Tom", "Ann", "Bob", "Eve", "Max"]


def records() -> list[dict[str, str]]:
    return [
        {"instruction": "Greet the person warmly.", "input": f"Their name is {n}.", "output": f"Hello {n}, welcome!"}
        for n in NAMES
    ]


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records()))
    return path


@pytest.fixture(scope="module")
def lora_run(tiny_checkpoint, tmp_path_factory) -> Path:
    """A PEFT-format LoRA adapter on the tiny model with non-zero B, so it changes the model."""
    model = load_model(tiny_checkpoint)
    config = LoRAConfig(r=4, alpha=8, targets="all")
    torch.manual_seed(1)  # A's initialisation too: the adapter must not depend on the tests run before
    apply_lora(model, config)
    for _, module in lora_modules(model):
        torch.nn.init.normal_(module.lora_B.weight, std=0.5)
    out = tmp_path_factory.mktemp("lora")
    save_peft_adapter(model, config, out, base_model_name_or_path=str(tiny_checkpoint))
    return out


def hf_loss(model_dir_or_model, samples) -> float:
    """transformers' own mean loss over the supervised tokens of all samples (its labels shift by one)."""
    import transformers

    model = model_dir_or_model
    if isinstance(model, (str, Path)):
        model = transformers.LlamaForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in samples:
            n = int((torch.tensor(labels[1:]) != -100).sum())
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            total += out.loss.item() * n
            count += n
    return total / count


def encoded(tiny_checkpoint) -> list[tuple[list[int], list[int]]]:
    tokenizer = Tokenizer.from_checkpoint(tiny_checkpoint)
    return [encode_record(r, tokenizer, "alpaca", 256)[:2] for r in records()]


def test_loss_equals_transformers_on_the_supervised_tokens(tiny_checkpoint, data_file):
    results = evaluate(tiny_checkpoint, data=data_file)
    base = results["models"][0]
    assert results["records"] == len(NAMES)
    assert base["loss"] == pytest.approx(hf_loss(tiny_checkpoint, encoded(tiny_checkpoint)), abs=1e-4)
    assert base["perplexity"] == pytest.approx(torch.tensor(base["loss"]).exp().item(), rel=1e-6)
    supervised = sum(sum(label != -100 for label in labels[1:]) for _, labels in encoded(tiny_checkpoint))
    assert base["supervised_tokens"] == supervised


def test_lora_column_equals_peft_and_the_base_is_left_untouched(tiny_checkpoint, data_file, lora_run):
    import peft
    import transformers

    results = evaluate(tiny_checkpoint, [lora_run, lora_run], data=data_file)
    base, tuned, again = results["models"]
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)
    expected = hf_loss(peft.PeftModel.from_pretrained(hf, lora_run).eval(), encoded(tiny_checkpoint))
    assert tuned["loss"] == pytest.approx(expected, abs=1e-4)
    assert abs(tuned["loss"] - base["loss"]) > 1e-3  # the adapter matters (a random tiny model: small changes)
    assert again["loss"] == tuned["loss"]  # applied to an unchanged base the second time too


def test_adapter_applied_restores_the_base_exactly(tiny_checkpoint, lora_run):
    model = load_model(tiny_checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with adapter_applied(model, lora_run, lambda: load_model(tiny_checkpoint)) as adapted:
        assert adapted is model and len(list(lora_modules(model))) > 0
    assert not list(lora_modules(model))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_llama_adapter_runs_on_a_fresh_base(tiny_checkpoint, data_file, tmp_path):
    model = load_model(tiny_checkpoint)
    config = AdapterConfig(prompt_length=2, start_layer=0)
    get_method("adapter").apply(model, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.normal_(std=0.5)
    get_method("adapter").save(model, config, tmp_path / "run", tiny_checkpoint, str(tiny_checkpoint))

    results = evaluate(tiny_checkpoint, [tmp_path / "run"], data=data_file)
    tokenizer = Tokenizer.from_checkpoint(tiny_checkpoint)
    expected_model = load_model(tiny_checkpoint)
    get_method("adapter").load(expected_model, tmp_path / "run")
    expected = supervised_loss(expected_model, load_eval_data(data_file, tokenizer).dataset, tokenizer.eos_id)
    assert results["models"][1]["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert abs(results["models"][1]["loss"] - results["models"][0]["loss"]) > 1e-4  # the adapter matters


def test_prepared_directory_uses_its_validation_split(tiny_checkpoint, tmp_path):
    tokenizer = Tokenizer.from_checkpoint(tiny_checkpoint)
    prepare_dataset(records(), tokenizer, tmp_path / "prep", style="alpaca", val_size=2, progress=False)
    data = load_eval_data(tmp_path / "prep", tokenizer)
    from lorafit.data import load_prepared

    _, val = load_prepared(tmp_path / "prep")
    assert len(data.dataset) == 2 and "val split" in data.description
    for i in (0, 1):
        assert torch.equal(data.dataset[i][0], val[i][0]) and torch.equal(data.dataset[i][1], val[i][1])
    assert len(load_eval_data(tmp_path / "prep", tokenizer, max_records=1).dataset) == 1


def test_prompt_is_the_generation_prompt_and_reference_the_output(tiny_checkpoint):
    tokenizer = Tokenizer.from_checkpoint(tiny_checkpoint)
    record = records()[0]
    ids, labels, _ = encode_record(record, tokenizer, "alpaca", 256)
    prompt, reference = prompt_and_reference(torch.tensor(ids), torch.tensor(labels))
    assert prompt == tokenizer.encode(format_prompt(record["instruction"], record["input"], "alpaca", tokenizer))
    assert tokenizer.decode([t for t in reference if t not in tokenizer.stop_ids]) == record["output"]


def test_generated_answers_equal_unbatched_greedy_decoding(tiny_checkpoint, data_file):
    results = evaluate(tiny_checkpoint, data=data_file, generate=True, max_new_tokens=6)
    generation = results["models"][0]["generation"]
    tokenizer = Tokenizer.from_checkpoint(tiny_checkpoint)
    model = load_model(tiny_checkpoint)
    for sample, record in zip(generation["samples"], records(), strict=False):
        prompt = tokenizer.encode(format_prompt(record["instruction"], record["input"], "alpaca", tokenizer))
        alone = list(generate(model, prompt, 6, stop_ids=tokenizer.stop_ids))
        assert sample["answer"] == tokenizer.decode([t for t in alone if t not in tokenizer.stop_ids])
        assert sample["expected"] == record["output"] and sample["prompt"] == record["input"]
    assert generation["exact_match"] == 0.0 and generation["tokens_per_s"] > 0
    assert "valid_json" not in generation  # the references are not JSON


def test_default_score_and_table():
    scores = default_score([' {"a": 1}', '{"a": 2', "x"], ['{"a": 1}', '{"a": 2}', '{"b": 3}'])
    assert scores == {"exact_match": pytest.approx(1 / 3), "valid_json": pytest.approx(1 / 3)}
    results = {
        "records": 3,
        "models": [
            {"name": "base", "loss": 2.0, "perplexity": 7.389, "generation": {**scores, "tokens_per_s": 10.0}},
            {
                "name": "+ run",
                "loss": 0.5,
                "perplexity": 1.6487,
                "generation": {"exact_match": 1.0, "valid_json": 1.0, "tokens_per_s": 12.0},
            },
        ],
    }
    table = format_table(results).splitlines()
    assert table[0] == "| n=3 | base | + run |"
    assert "| exact match | 1/3 | 3/3 |" in table and "| loss (supervised tokens) | 2.0000 | 0.5000 |" in table


def test_cli_json_and_bad_input(tiny_checkpoint, data_file, capsys, tmp_path):
    from lorafit.cli import main

    main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(data_file), "--max-records", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["records"] == 2 and out["models"][0]["name"] == "base"
    for argv, message in [
        (["--data", str(tmp_path / "missing.json")], r"lorafit evaluate: error: .*missing\.json: neither a prepared"),
        ([], "lorafit evaluate: error: nothing to evaluate"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main(["evaluate", "--checkpoint", str(tiny_checkpoint), *argv])
        assert exit.value.code == 2 and re.search(message, capsys.readouterr().err)


# ---- lm-evaluation-harness ------------------------------------------------------------------------


TEXTS = [
    "Once upon a time there was a little girl who loved to play in the park with her dog.",
    "The sun was shining and the birds were singing in the tall green trees.",
]


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """Two lm-eval tasks on local JSON files: multiple choice (loglikelihood) and perplexity (rolling)."""
    mc = [
        {"question": "The cat sat on the", "choices": [" mat", " moon", " tree"], "answer": 0},
        {"question": "She went to the", "choices": [" park", " sky"], "answer": 0},
        {"question": "", "choices": ["Hello", "World"], "answer": 1},
    ]
    (tmp_path / "mc.json").write_text(json.dumps(mc))
    (tmp_path / "ppl.json").write_text(json.dumps([{"text": t} for t in TEXTS]))
    common = "dataset_path: json\ntest_split: test\n"
    (tmp_path / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.json'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    (tmp_path / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'ppl.json'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
    )
    return tmp_path


def lm_eval_samples(model, model_args, task_dir: Path) -> dict[str, list]:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["tiny_mc", "tiny_ppl"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),  # scanning its own is slow
        log_samples=True,
        bootstrap_iters=0,
    )
    return {task: [s["resps"] for s in samples] for task, samples in out["samples"].items()}, out["results"]


def test_lm_eval_model_matches_lm_evals_hf_model_on_the_merged_model(tiny_checkpoint, lora_run, task_dir, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lorafit.lm_eval_model import LorafitLM
    from lorafit.methods import merge_run

    merged = merge_run(lora_run, task_dir / "merged", tiny_checkpoint)
    # max_length 16 cuts the perplexity texts into several rolling windows.
    ours, our_results = lm_eval_samples(
        LorafitLM(checkpoint=str(tiny_checkpoint), adapter=str(lora_run), max_length=16), None, task_dir
    )
    theirs, their_results = lm_eval_samples(
        "hf", {"pretrained": str(merged), "dtype": "float32", "device": "cpu", "max_length": 16}, task_dir
    )
    for task in ("tiny_mc", "tiny_ppl"):
        flat_ours = [x for doc in ours[task] for resp in doc for x in resp]
        flat_theirs = [x for doc in theirs[task] for resp in doc for x in resp]
        assert len(flat_ours) == len(flat_theirs) > 0
        for a, b in zip(flat_ours, flat_theirs, strict=True):
            if isinstance(a, tuple):
                assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
            else:
                assert a == pytest.approx(b, abs=1e-4)
    assert our_results["tiny_ppl"]["word_perplexity,none"] == pytest.approx(
        their_results["tiny_ppl"]["word_perplexity,none"], rel=1e-4
    )


def test_lorafit_model_is_registered_by_name(tiny_checkpoint):
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    import lorafit.lm_eval_model

    assert get_model("lorafit") is lorafit.lm_eval_model.LorafitLM
    # What lm-eval's command line passes: its --device (cuda by default) and --batch_size.
    extra = {"device": "cuda", "batch_size": None, "max_batch_size": None}
    model = get_model("lorafit").create_from_arg_string(f"checkpoint={tiny_checkpoint},max_length=32", extra)
    assert model.max_length == 32 and model.prefix_token_id == 1 and model.batch_size == 8
    assert model.model.embed_tokens.weight.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_evaluate_tasks_from_the_command_line(tiny_checkpoint, task_dir, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lorafit.cli import main

    argv = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--tasks", "tiny_mc", "--include-path", str(task_dir)]
    main([*argv, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["models"][0]["tasks"]["tiny_mc"]["acc"] <= 1
    with pytest.raises(SystemExit) as exit:
        main([*argv[:-4], "--tasks", "no_such_task"])
    assert exit.value.code == 2 and re.search("lm-eval does not know the task.*no_such_task", capsys.readouterr().err)


def test_missing_lm_eval_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails as if not installed
    monkeypatch.delitem(sys.modules, "lorafit.lm_eval_model", raising=False)
    with pytest.raises(RuntimeError, match=r'pip install "lorafit\[eval\]"'):
        import lorafit.lm_eval_model  # noqa: F401
