import json

import pytest
import torch

from lorafit.config import CONFIGS, Config
from lorafit.model import LLaMA

# Parameter counts as published on each model's Hugging Face page (safetensors metadata).
PUBLISHED_PARAMETERS = {
    "SmolLM2-135M": 134_515_008,
    "SmolLM2-135M-Instruct": 134_515_008,
    "SmolLM2-360M": 361_821_120,
    "SmolLM2-360M-Instruct": 361_821_120,
    "SmolLM2-1.7B": 1_711_376_384,
    "SmolLM2-1.7B-Instruct": 1_711_376_384,
    "TinyLlama-1.1B": 1_100_048_384,
    "Llama-2-7B": 6_738_415_616,
    "Llama-2-13B": 13_015_864_320,
    "Llama-2-70B": 68_976_648_192,
    "Llama-3.1-8B": 8_030_261_248,
    "Llama-3.1-70B": 70_553_706_496,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
    "Mistral-7B-v0.1": 7_241_732_096,
}


def test_every_named_config_has_a_published_count():
    assert {c["name"] for c in CONFIGS} == set(PUBLISHED_PARAMETERS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = LLaMA(Config.from_name(name))
    # parameters() yields a tied weight once, as the published counts do.
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


def test_from_name_accepts_repo_id_and_any_case():
    assert Config.from_name("meta-llama/llama-2-7b-hf").name == "Llama-2-7B"
    assert Config.from_name("smollm2-135m-instruct").n_kv_head == 3
    with pytest.raises(ValueError, match="unknown model name 'gpt-5'"):
        Config.from_name("gpt-5")


def test_hf_config_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    for name in ("Llama-3.1-8B", "Mistral-7B-v0.1", "SmolLM2-135M"):
        config = Config.from_name(name)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config.to_hf()))
        again = Config.from_hf(path, name=name)
        assert again.to_dict() | {"hf_repo": None, "extra": {}} == config.to_dict() | {"hf_repo": None, "extra": {}}
        hf = transformers.AutoConfig.from_pretrained(path)
        assert Config.from_hf(hf.to_dict(), name=name).rope_scaling == config.rope_scaling


def test_from_hf_rejects_other_architectures(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture \['GPT2LMHeadModel'\]"):
        Config.from_hf(path)
