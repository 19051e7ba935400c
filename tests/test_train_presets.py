"""Per-model presets: which file a checkpoint gets, that flags override it, and the derived batch settings."""

from __future__ import annotations

import json

import pytest
from transformers import Gemma2Config, LlamaConfig, MistralConfig

from uniattn.convert import uniattn_config_from
from uniattn.train.presets import CONFIGS_DIR, read_preset, select_preset
from uniattn.train import build_parser, parse_args

# The presets must carry the seed's settings as the method spec states them (docs/METHOD.md, "Seed defaults"),
# not as the YAML happens to say: the expected values below are checked against that paragraph first.
SEED_LR = {"llama2_7b.yaml": 2e-5, "llama3.1_8b.yaml": 7e-6, "mistral_7b.yaml": 1e-6, "gemma2_9b.yaml": 1e-6}
SPEC_NAMES = {"llama2_7b.yaml": "LLaMA-2 7B", "llama3.1_8b.yaml": "LLaMA-3.1 8B", "mistral_7b.yaml": "Mistral 7B",
              "gemma2_9b.yaml": "Gemma-2 9B"}
SPEC_PHRASES = ("1 epoch", "cosine", "warmup 3%", "weight decay 0", "bf16", "max length 1024", "effective batch 48")


def test_expected_values_are_the_specs():
    text = (CONFIGS_DIR.parent / "docs" / "METHOD.md").read_text()
    seed = " ".join(text[text.index("Seed defaults"):].split("\n\n")[0].split())
    for name, lr in SEED_LR.items():
        assert f"{SPEC_NAMES[name]} {lr:g}".replace("e-0", "e-") in seed, (name, seed)
    assert all(phrase in seed for phrase in SPEC_PHRASES), seed


def configs():
    return {
        "llama3.1_8b.yaml": LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, vocab_size=128256),
        "llama2_7b.yaml": LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, vocab_size=32000),
        "mistral_7b.yaml": MistralConfig(num_hidden_layers=32, hidden_size=4096, vocab_size=32000),
        "gemma2_9b.yaml": Gemma2Config(num_hidden_layers=42, hidden_size=3584, vocab_size=256000),
        "smollm2_135m.yaml": LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                         vocab_size=49152, num_attention_heads=9, num_key_value_heads=3),
        "default.yaml": LlamaConfig(num_hidden_layers=5, hidden_size=48, num_attention_heads=6, vocab_size=97),
    }


@pytest.mark.parametrize("name", list(configs()))
def test_preset_is_chosen_from_the_config(name):
    config = configs()[name]
    assert select_preset(config).path.name == name
    if name != "default.yaml":  # a UniAttn checkpoint matches through its base family
        layout = (4, 2, config.num_hidden_layers + 1)
        assert select_preset(uniattn_config_from(config, layout)).path.name == name


def test_every_preset_is_complete_and_uses_known_flags():
    dests = {a.dest for a in build_parser()._actions}
    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        preset = read_preset(path)
        assert set(preset.training) <= dests, (path.name, set(preset.training) - dests)
        t = preset.training
        assert (t["num_train_epochs"], t["lr_scheduler_type"], t["warmup_steps"], t["weight_decay"]) == (1, "cosine", 0.03, 0.0)
        assert t["bf16"] is True and t["max_length"] == 1024 and t["effective_batch_size"] == 48
        assert (CONFIGS_DIR.parent / t["deepspeed"]).is_file()
        if path.name in SEED_LR:
            assert t["learning_rate"] == SEED_LR[path.name]
        assert "uniattn" in path.read_text().split("match:")[0], "header comment must show the launch command"
    for name in ("ds_zero2.json", "ds_zero3.json"):
        ds = json.loads((CONFIGS_DIR / name).read_text())
        assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"


def _model_dir(tmp_path, config):
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def test_flags_override_the_preset_and_accumulation_is_derived(tmp_path, monkeypatch):
    model_dir = _model_dir(tmp_path, configs()["smollm2_135m.yaml"])
    base = ["--mode", "plain", "--model_dir", model_dir, "--output_dir", str(tmp_path / "out")]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    script, targs, _ = parse_args(base)
    assert script.preset_path.endswith("smollm2_135m.yaml")
    assert targs["learning_rate"] == 2e-5 and script.max_length == 1024
    assert targs["per_device_train_batch_size"] == 6 and targs["gradient_accumulation_steps"] == 8  # 6 x 8 = 48
    assert targs["bf16"] is False and targs["use_cpu"] is True  # this machine has no GPU
    assert targs["deepspeed"].endswith("configs/ds_zero2.json")
    assert targs["gradient_checkpointing_kwargs"] == {"use_reentrant": False}

    monkeypatch.setenv("WORLD_SIZE", "2")
    _, targs, _ = parse_args(base)
    assert targs["gradient_accumulation_steps"] == 4  # 6 x 4 x 2 = 48

    script, targs, _ = parse_args(base + ["--learning_rate", "3e-4", "--max_length", "512", "--gradient_accumulation_steps", "1",
                                          "--preset", "llama3.1_8b"])
    assert targs["learning_rate"] == 3e-4 and script.max_length == 512 and targs["gradient_accumulation_steps"] == 1
    assert script.preset_path.endswith("llama3.1_8b.yaml") and targs["deepspeed"].endswith("ds_zero3.json")
    assert targs["gradient_checkpointing"] is True


def test_unknown_preset_is_named(tmp_path):
    model_dir = _model_dir(tmp_path, configs()["default.yaml"])
    with pytest.raises(FileNotFoundError, match="preset nope does not exist.*smollm2_135m.yaml"):
        parse_args(["--mode", "plain", "--model_dir", model_dir, "--output_dir", "x", "--preset", "nope"])
