"""The run's final files in `output_dir`: the trained adapter or model, its tokenizer and `config.yaml`
(`save_outputs`), then `training_summary.json` (`run_summary`), the model card and `report.html` + `loss.png`
(`write_summary_and_report`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from app.sft import atomic
from app.sft.config import SFTConfig
from app.sft.model_card import write_model_card
from app.sft.modeling import merge_lora, save_final_model
from app.sft.report import render_report
from app.sft.run_dir import staged_outputs
from app.sft.state import TrainerState

logger = logging.getLogger(__name__)

SUMMARY_FILE = "training_summary.json"


def save_outputs(model: torch.nn.Module, tokenizer: Any, config: SFTConfig, *,
                 state_dict: dict[str, torch.Tensor] | None = None, template: str | None = None) -> None:
    """Write the trained adapter or model, the tokenizer (with the chat `template` when given) and the config
    into `config.output_dir`, and the merged model into `merged/` when `save_merged_model` asks for it."""
    output_dir = Path(config.output_dir)
    with staged_outputs(output_dir) as staging:  # links in output_dir are replaced, not written through
        save_final_model(model, tokenizer, staging, state_dict=state_dict, template=template)
        config.to_yaml(staging / "config.yaml")
    if config.save_merged_model and hasattr(model, "peft_config"):
        merge_lora(output_dir, output_dir / "merged")


def run_summary(state: TrainerState, config: SFTConfig, *, monitor: str, mode: str, final_train_loss: float | None,
                best_val_loss: tuple[float, int] | None, epochs: float, runtime_s: float) -> dict[str, Any]:
    """What `training_summary.json` holds: the losses, the record of the best of `monitor` (by `mode`), where and
    why the run stopped, its tokens, runtime and precision."""
    val_losses = [record["val_loss"] for record in state.log_history if "val_loss" in record]
    return {
        "train_loss": state.train_loss_sum / state.train_tokens if state.train_tokens else None,
        "final_train_loss": final_train_loss,
        "final_val_loss": val_losses[-1] if val_losses else None,
        "best_val_loss": best_val_loss[0] if best_val_loss else None,
        "best_metric": state.best_metric,
        "best_metric_name": monitor,
        "best_metric_mode": mode,
        "best_step": state.best_step,
        "best_checkpoint": state.best_checkpoint,
        "global_step": state.global_step,
        "epochs": epochs,
        "train_tokens": state.train_tokens,
        "runtime_s": round(runtime_s, 3),
        "stop_reason": state.stop_reason,
        "mixed_precision": config.precision_choice.to_dict(),
        "output_dir": str(Path(config.output_dir)),
    }


def write_summary_and_report(output_dir: str | Path, summary: dict[str, Any]) -> None:
    """`training_summary.json` (written last of the outputs), the model card, `report.html` and `loss.png`;
    a report that cannot be drawn is a warning, since the training itself succeeded."""
    output_dir = Path(output_dir)
    atomic.write_json(output_dir / SUMMARY_FILE, summary)
    write_model_card(output_dir)
    try:
        render_report(output_dir)
    except Exception as exc:
        logger.warning("No training report: %s (the training itself succeeded; `sft report %s` retries)",
                       exc, output_dir)
