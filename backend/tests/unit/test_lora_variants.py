"""LoRA variants through peft and transformers: DoRA, rsLoRA, `all-linear` targets and NEFTune noise.

Each trains a tiny model, resumes exactly after a stop, and saves an adapter that plain peft loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_tokenizer, tiny_llama
from peft import PeftModel
from test_resume import SignalAt, lora_config, run, trained_weights
from test_trainer import instruction_rows
from transformers import AutoModelForCausalLM

from app.sft import SFTCallback, SFTConfig, SFTTrainer
from app.sft.checkpointing import CheckpointError
from app.sft.config import ConfigError
from app.sft.modeling import merge_lora

STEPS = 6
VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True, "lora_alpha": 8},
    "all-linear": {"lora_target_modules": "all-linear"},
    "neftune": {"neftune_noise_alpha": 5.0},
}


def variant_config(tmp_path, model_dir, name: str, **overrides):
    return lora_config(tmp_path, model_dir, name, **{"max_steps": STEPS, "eval_steps": 3, **VARIANTS[name],
                                                     **overrides})


def wrapped_modules(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_resumes_exactly_and_loads_in_plain_peft(variant, tmp_path, tiny_model_dir):
    full, full_recorder, _ = run(variant_config(tmp_path / "full", tiny_model_dir, variant))
    losses = [m["loss"] for m in full_recorder.step_metrics()]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]

    config = variant_config(tmp_path, tiny_model_dir, variant)
    _, first, stopped = run(config, callbacks=[SignalAt(3)])
    assert stopped["global_step"] == 3
    resumed, second, result = run(config, resume="latest")
    assert result["global_step"] == STEPS
    assert [m["loss"] for m in first.step_metrics() + second.step_metrics()] == losses  # bit for bit
    for name, tensor in trained_weights(resumed).items():
        assert torch.equal(tensor, trained_weights(full)[name]), name

    out = Path(config.output_dir)
    adapter = json.loads((out / "adapter_config.json").read_text())
    model = resumed.accelerator.unwrap_model(resumed.model).eval()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    ids = torch.tensor([[5, 9, 14, 22, 7, 3]])
    merged_dir = merge_lora(out, tmp_path / "merged", str(tiny_model_dir))  # what `sft merge` writes
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    assert adapter["use_dora"] is VARIANTS[variant].get("use_dora", False)
    assert adapter["use_rslora"] is VARIANTS[variant].get("use_rslora", False)
    if variant == "dora":
        assert any("lora_magnitude_vector" in name for name, _ in plain.named_parameters())
    if variant == "rslora":
        q_proj = plain.base_model.model.model.layers[0].self_attn.q_proj
        assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # alpha / sqrt(r), not alpha / r
    if variant == "all-linear":  # peft's choice: every linear layer but the output head
        projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == projections
        assert wrapped_modules(plain) == projections
    if variant == "neftune":  # the noise hook is gone once training ends: nothing of it is saved or left
        embeddings = model.get_input_embeddings()
        assert not hasattr(embeddings, "neftune_noise_alpha") and not embeddings._forward_hooks


class NeftuneProbe(SFTCallback):
    """At step 1: the input embeddings' output in train mode and in eval mode, against the plain lookup."""

    def on_step_end(self, trainer, step, metrics, **kw):
        if step != 1:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        embeddings = model.get_input_embeddings()
        ids = torch.tensor([[5, 9, 14, 22]])
        plain = torch.nn.functional.embedding(ids, embeddings.weight)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.train()
            self.noisy = embeddings(ids)
            model.eval()
            self.evaluated = embeddings(ids)
            model.train()
        self.plain = plain.detach()


def test_neftune_noise_is_added_in_training_only(tmp_path, tiny_model_dir):
    probe = NeftuneProbe()
    config = variant_config(tmp_path, tiny_model_dir, "neftune", max_steps=2)
    run(config, callbacks=[probe])
    noise = (probe.noisy - probe.plain).abs()
    bound = 5.0 / math.sqrt(4 * 32)  # alpha / sqrt(sequence length x hidden size): transformers' NEFTune
    assert noise.max() > 0 and noise.max() <= bound + 1e-6
    assert torch.equal(probe.evaluated, probe.plain)  # evaluation and generation (eval mode) see no noise

    without = lora_config(tmp_path, tiny_model_dir, "plain", max_steps=2, eval_steps=3)
    _, noisy_run, _ = run(config.model_copy(update={"output_dir": str(tmp_path / "again")}))
    _, plain_run, _ = run(without)
    assert noisy_run.step_metrics()[0]["loss"] != plain_run.step_metrics()[0]["loss"]  # it does train with noise


def test_trl_and_axolotl_names_are_read():
    config = SFTConfig(base_model="m", lora_target_linear=True, peft_use_dora=True, peft_use_rslora=True,
                       neftune_noise_alpha=5)
    assert (config.lora_target_modules, config.use_dora, config.use_rslora) == ("all-linear", True, True)
    assert config.neftune_noise_alpha == 5.0
    assert SFTConfig(base_model="m", lora_target_linear=False).lora_target_modules is None
    assert SFTConfig(base_model="m", lora_target_modules=["q_proj"]).lora_target_modules == ["q_proj"]
    assert SFTConfig.from_dict(SFTConfig(base_model="m", lora_target_linear=True).to_dict()).lora_target_modules \
        == "all-linear"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora_target_modules": "all"}, "lora_target_modules"),
        ({"neftune_noise_alpha": 0}, "neftune_noise_alpha"),
        ({"use_dora": "sometimes"}, "use_dora"),
        ({"lora_target_linear": True, "lora_target_modules": ["q_proj"]}, "lora_target_linear and lora_target_modules"),
    ],
)
def test_bad_variant_settings_name_their_field(settings, message):
    with pytest.raises(ConfigError, match=message):
        SFTConfig(base_model="m", **settings)


def test_resume_refuses_switching_dora_on(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "switch", max_steps=4)
    run(config, callbacks=[SignalAt(2)])
    trainer = SFTTrainer(config.model_copy(update={"use_dora": True}), model=tiny_llama(seed=0),
                         tokenizer=build_tiny_tokenizer(), train_dataset=instruction_rows(20),
                         eval_dataset=instruction_rows(8, seed=9))
    with pytest.raises(CheckpointError, match="use_dora: False -> True"):
        trainer.train(resume_from_checkpoint="latest")
