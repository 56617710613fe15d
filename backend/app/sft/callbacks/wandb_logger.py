"""Weights & Biases logging that never stops training: without wandb, credentials or network it degrades."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app.sft.callbacks.base import SFTCallback, epoch_end_step, trainer_api
from app.sft.callbacks.generation_eval import samples_of
from app.sft.callbacks.trackers import config_dict
from app.sft.paths import WANDB_DIR
from app.sft.run_dir import linked_folder_problem

logger = logging.getLogger(__name__)


class WandBCallback(SFTCallback):
    """Logs a run to Weights & Biases: config at the start, metrics every step, epoch metrics, the best loss.

    Args:
        project, run_name, entity: where the run goes and what it is called (None: W&B's defaults).
        config: the run's config; None logs `trainer.config` when the trainer has one.
        log_model: also upload each checkpoint reported by `on_save` as a W&B artifact of type `model` (SFTTrainer
            fires `on_save`; a hand-written loop fires it after saving; a run that reported none says so at its end).
        init_timeout: seconds `wandb.init` may take to reach the W&B server; when it cannot, one warning says
            "W&B unreachable" and the run is logged offline instead (W&B's own default waits 90 s).

    `wandb` is imported only when training starts. A run the user started before (`wandb.init`) is logged into
    (with `config` added) and left open at the end; otherwise the callback starts its own and finishes it. When
    wandb is missing or `wandb.init` fails, one warning is logged, `run` stays None and training goes on; later
    logging errors also only warn (once). With no W&B credentials (no `WANDB_API_KEY`, no netrc entry) and no
    `WANDB_MODE`, the run is written offline and the log says how to upload it (`wandb sync <dir>`). W&B's
    files go into the trainer's `output_dir/wandb` (not the current directory, and never through a `wandb` link
    there: W&B logging is then off, said in one warning) unless `WANDB_DIR` says where. Step metrics use the
    global step as the W&B step; epoch metrics are logged as `epoch/<name>` at the step the epoch ended,
    evaluations (`on_evaluate`) at their step. Only the main process logs; a validation's `best_val_loss` is kept
    in the run summary. The run id is part of `state_dict()`, so a resumed training continues the same W&B run.
    Runs last (`order = 90`), so validation metrics of the step are included.
    """

    order = 90

    def __init__(
        self,
        project: str = "llm-playground-sft",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        log_model: bool = False,
        entity: str | None = None,
        init_timeout: float = 15.0,
    ) -> None:
        self.project = project
        self.init_timeout = init_timeout
        self.run_name = run_name
        self.config = config
        self.log_model = log_model
        self.entity = entity
        self.run: Any = None
        self.run_id: str | None = None
        self._warned: set[str] = set()
        self._last_step = 0  # the newest step logged: a hand-written loop's trainer may have no global_step
        self._saves_seen = False  # whether any on_save reached this callback during the run
        self._owns_run = False  # False for a run the user started before training: theirs to finish

    def on_train_begin(self, trainer: Any, **kwargs: Any) -> None:
        api = trainer_api(trainer)
        self._last_step, self._saves_seen = 0, False
        if self.run is not None or not api.is_main_process:
            return
        try:
            import wandb
        except ImportError:
            self._warn_once("import", "wandb is not installed (pip install wandb): W&B logging is off")
            return
        no_credentials = not os.environ.get("WANDB_MODE") and not _has_wandb_credentials()
        mode = "offline" if no_credentials else None
        config = self.config if self.config is not None else config_dict(api.config)
        if wandb.run is not None:  # the user's own `wandb.init` before training: log into that run
            self._join(wandb.run, config)
            return
        arguments = dict(project=self.project, name=self.run_name, config=config, entity=self.entity,
                         resume="allow", id=self.run_id)
        if not os.environ.get("WANDB_DIR") and api.output_dir is not None:  # not the current directory
            problem = linked_folder_problem(Path(api.output_dir) / WANDB_DIR)  # SFTTrainer refused it already
            if problem is not None:
                self._warn_once("init", f"W&B logging is off: {problem}")
                return
            arguments["dir"] = str(api.output_dir)
        why_offline = "No W&B credentials found"
        try:
            try:
                self.run = wandb.init(**arguments, mode=mode, settings=wandb.Settings(init_timeout=self.init_timeout))
            except wandb.errors.CommError as error:  # the server did not answer in time: go on offline
                if mode == "offline" or os.environ.get("WANDB_MODE") == "offline":
                    raise
                mode, why_offline = "offline", f"W&B unreachable ({str(error).splitlines()[0]}), logging offline"
                self.run = wandb.init(**arguments, mode=mode)
        except Exception as error:  # any failure of the tracker must not stop training
            self._warn_once("init", f"wandb.init failed ({error!r}): W&B logging is off")
            self.run = None
            return
        self.run_id, self._owns_run = self.run.id, True
        if mode == "offline":
            logger.warning("%s: the run is saved offline. Upload it later with `wandb sync %s`", why_offline,
                           self.run.settings.sync_dir)

    def _join(self, run: Any, config: dict[str, Any] | None) -> None:
        """Log into `run`, a W&B run the user started before training (it stays open at the end), with our config."""
        self.run, self.run_id, self._owns_run = run, run.id, False
        logger.info("Logging to the W&B run %s that was already active; it is left open when training ends", run.id)
        if config:
            try:
                run.config.update(config, allow_val_change=True)
            except Exception as error:
                self._warn_once("config", f"adding the config to the active W&B run failed ({error}); training goes on")

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        api = trainer_api(trainer)
        self._last_step = step
        self._log(api.train_metrics(metrics) if api.managed else dict(metrics), step)

    def on_evaluate(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        self._log(dict(metrics), step)
        self._log_samples(samples_of(trainer, step), step)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], **kwargs: Any) -> None:
        self._log(
            {"epoch": epoch, **{f"epoch/{key}": value for key, value in metrics.items()}},
            epoch_end_step(trainer, self._last_step),  # W&B drops a step older than the newest
        )

    def _log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        """An evaluation by generation's samples as the `generations` table."""
        if self.run is None or not samples:
            return
        try:
            import wandb

            score_names = list(samples[0]["scores"])
            columns = ["step", "index", "prompt", "reference", "prediction", "stopped", *score_names]
            rows = [[step, s["index"], s["prompt"], s["reference"], s["prediction"], s["stopped"],
                     *(s["scores"].get(name) for name in score_names)] for s in samples]
            self.run.log({"generations": wandb.Table(columns=columns, data=rows)}, step=step)
        except Exception as error:
            self._warn_once("table", f"logging the generation samples to W&B failed ({error}); training goes on")

    def on_save(self, trainer: Any, step: int, checkpoint_path: str, **kwargs: Any) -> None:
        self._saves_seen = True
        if self.run is None or not self.log_model:
            return
        try:
            import wandb

            artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata={"step": step})
            if os.path.isdir(checkpoint_path):
                artifact.add_dir(checkpoint_path)
            else:
                artifact.add_file(checkpoint_path)
            self.run.log_artifact(artifact, aliases=["latest", f"step-{step}"])
        except Exception as error:
            self._warn_once("artifact", f"logging checkpoint {checkpoint_path} to W&B failed: {error}")

    def on_train_end(self, trainer: Any, error: BaseException | None = None, **kwargs: Any) -> None:
        if self.run is None:
            return
        if self.log_model and not self._saves_seen and error is None:
            self._warn_once("no_model", "log_model=True, but no checkpoint was reported to WandBCallback (on_save), "
                            "so no model was logged: a hand-written loop fires on_save(trainer, step=..., "
                            "checkpoint_path=...) after it saves one (SFTTrainer does so itself)")
        if self._owns_run:
            try:
                self.run.finish(exit_code=1 if error is not None else 0)
            except Exception as finish_error:
                self._warn_once("finish", f"finishing the W&B run failed: {finish_error}")
        self.run = None

    def _log(self, values: dict[str, Any], step: int | None) -> None:
        """Log `values` at `step`; a validation's `best_val_loss` also goes into the summary. Failures only warn."""
        if self.run is None:
            return
        try:
            self.run.log(values, step=step)
            if "best_val_loss" in values:
                self.run.summary["best_val_loss"] = values["best_val_loss"]
        except Exception as error:
            self._warn_once("log", f"logging to W&B failed ({error}); training goes on")

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(message)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")


def _has_wandb_credentials() -> bool:
    """Whether W&B could authenticate without prompting: an API key or identity token, or a netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for candidate in candidates:
        try:
            if netrc.netrc(os.path.expanduser(candidate)).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False
