"""MLflow tracking that never stops training: without mlflow or a reachable tracking server it warns and goes on."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from app.sft.callbacks.base import SFTCallback, epoch_end_step, trainer_api
from app.sft.callbacks.generation_eval import samples_of
from app.sft.callbacks.trackers import config_dict, scalar, without_credentials
from app.sft.config import flatten
from app.sft.paths import MLFLOW_DIR

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "llm-playground-sft"
RUN_ARTIFACTS = ("training_summary.json", "report.html", "loss.png", "config.yaml")
"""Files of the run folder logged as artifacts when training ends (those this run wrote)."""

_MAX_PARAM_LENGTH = 6000  # mlflow's limit on a param value
_MAX_NAME_LENGTH = 250  # mlflow's limit on a param or metric name
_BATCH = 100  # mlflow's limit on params per log_batch call


class MLflowCallback(SFTCallback):
    """Logs a run to MLflow: the config as params, every step's metrics, evaluations, the report and summary.

    Args:
        tracking_uri: where runs go: a server (`http://host:5000`), `databricks`, `sqlite:///path.db`, ...; None:
            the `MLFLOW_TRACKING_URI` environment variable, else the store of a run the user opened in this
            process (`mlflow.start_run()`), else a local store in the run folder
            (`sqlite:///<output_dir>/mlflow/mlflow.db`, artifacts in `<output_dir>/mlflow/artifacts`).
        experiment: the experiment's name, created when missing; None: `MLFLOW_EXPERIMENT_NAME`, else
            "llm-playground-sft".
        run_name: the MLflow run's name (None: MLflow's).
        config: the params to log; None: the trainer's config, as resolved for this machine, flattened
            (`distributed.strategy`).
        log_model: also log the final adapter or model (and its tokenizer) as artifacts under `model/`: the
            files this training saved into the output folder (a hand-written loop: `save_pretrained(output_dir)`
            before `on_train_end`).
        timeout: seconds one request to a tracking server may take.

    Metrics are logged at the global step: a step's training metrics under their names (`loss`, `learning_rate`),
    each evaluation's (`val_loss`, `gen_exact_match`, ...), epoch-end metrics as `epoch/<name>` (at the newest
    step); the samples of an evaluation by generation as `generations/step_<N>.json`. A name MLflow rejects
    (`acc@1`) is logged as one it accepts (`acc_1`), with a warning. When training ends, the run's
    `training_summary.json`, `report.html`, `loss.png` and `config.yaml` are logged, and the run is marked
    FINISHED, FAILED (an exception) or KILLED (stopped by a signal, or a second one that aborted it: a
    KeyboardInterrupt, before its outputs were written).

    Like Hugging Face's MLflowCallback, a run the user opened in this process (`with mlflow.start_run():`, in
    the same store) or the run `MLFLOW_RUN_ID` names gets the metrics instead of a new run; the run the user
    opened is left open, for them to end. The run id is part of `state_dict()`, so a resumed training continues
    the same MLflow run (a training without a checkpoint starts a new one, also with the same callback); steps
    that the run already has after the checkpoint's step are not logged again, so every metric has each step
    once.
    `mlflow` is imported only when training starts. When it is missing, or the tracking server cannot be
    reached (mlflow's HTTP retries are cut to seconds), one warning is logged and training goes on without
    MLflow; a later failure also warns once and turns MLflow logging off (`metrics.jsonl` keeps everything).
    Only the main process logs. Runs last (`order = 90`).
    """

    order = 90

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        log_model: bool = False,
        timeout: float = 10.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.config = config
        self.log_model = log_model
        self.timeout = timeout
        self.client: Any = None
        self.run_id: str | None = None
        self._checkpoint_run: str | None = None  # the run to continue: that of the checkpoint loaded last
        self._logged: set[tuple[str, int]] = set()  # (metric, step) the interrupted run logged after the checkpoint
        self._names: dict[str, str] = {}  # a metric or param name -> the name MLflow accepts
        self._last_step = 0  # the newest step of on_step_end: a hand-written loop's trainer may keep no global_step
        self._open_run: str | None = None  # the run the user opened in this process (mlflow.start_run), if ours
        self._artifacts = True  # whether files are logged: not into another run folder's store
        self._started = 0.0

    # --- events ------------------------------------------------------------------------------------------------

    def on_train_begin(self, trainer: Any, **kwargs: Any) -> None:
        api = trainer_api(trainer)
        if self.client is not None or not api.is_main_process:
            return
        try:
            import mlflow
            from mlflow import MlflowClient
        except ImportError:
            logger.warning("mlflow is not installed (pip install 'llm-playground-sft[mlflow]'): MLflow logging is off")
            return
        self._started = time.time()
        output_dir = Path(api.output_dir or "runs")
        active = mlflow.active_run()  # a run the user opened (mlflow.start_run) gets the metrics
        uri = (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or (mlflow.get_tracking_uri() if active else _local_store_uri(output_dir)))
        self._open_run = active.info.run_id if active and uri == mlflow.get_tracking_uri() else None
        users_run = os.environ.get("MLFLOW_RUN_ID") or self._open_run
        try:
            if uri == _local_store_uri(output_dir):
                _make_local_store(output_dir / MLFLOW_DIR)
            with self._http_limits(retries=0):  # a server that is not there fails at once, without retry warnings
                self.client = MlflowClient(tracking_uri=uri)
                step = int(api.global_step or 0)
                self.run_id, self._checkpoint_run = self._checkpoint_run, None
                resumed = self.run_id is not None and self._continue_run(step, "of the checkpoint")
                if not resumed and users_run:
                    self.run_id = users_run
                    resumed = self._continue_run(step, "the user opened")
                if not resumed:
                    self._start_run(uri, output_dir)
                local = uri == _local_store_uri(output_dir)
                self._artifacts = not local or self._artifacts_inside(output_dir / MLFLOW_DIR)
                self._log_params(config_dict(api.config if self.config is None else self.config), resumed)
        except Exception as error:  # any failure of the tracker must not stop training
            self.client = None
            logger.warning("MLflow tracking at %s failed (%s): MLflow logging is off, training goes on",
                           without_credentials(uri), _first_line(error))
            return
        logger.info("MLflow run %s in %s", self.run_id, without_credentials(uri))

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        api = trainer_api(trainer)
        self._last_step = step
        self._log_metrics(api.train_metrics(metrics) if api.managed else metrics, step)

    def on_evaluate(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        self._log_metrics(metrics, step)
        samples = samples_of(trainer, step) if self.client is not None and self._artifacts else []
        if samples:
            self._call(self.client.log_dict, self.run_id, {"step": step, "samples": samples},
                       f"generations/step_{step}.json")

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], **kwargs: Any) -> None:
        values = {f"epoch/{key}": value for key, value in metrics.items()}  # `epoch` is each step's fractional one
        self._log_metrics(values, epoch_end_step(trainer, self._last_step))

    def on_train_end(self, trainer: Any, error: BaseException | None = None, **kwargs: Any) -> None:
        if self.client is None:
            return
        output_dir = Path(trainer_api(trainer).output_dir or "runs")
        written = [output_dir / name for name in RUN_ARTIFACTS if self._written_now(output_dir / name)]
        for path in written if self._artifacts else []:
            self._call(self.client.log_artifact, self.run_id, str(path))
        if self.log_model and error is None and self._artifacts:
            from app.sft.run_dir import model_files

            for path in filter(self._written_now, model_files(output_dir)):  # also a hand-written loop's save
                self._call(self.client.log_artifact, self.run_id, str(path), "model")
        finished = (output_dir / RUN_ARTIFACTS[0]) in written
        status = ("KILLED" if isinstance(error, KeyboardInterrupt) or (error is None and not finished)
                  else "FAILED" if error is not None else "FINISHED")
        if self.run_id != self._open_run:  # the run the user opened is theirs to end
            self._call(self.client.set_terminated, self.run_id, status)
        self.client = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        run_id = state.get("run_id")
        self.run_id = run_id if isinstance(run_id, str) and run_id.isalnum() else None
        self._checkpoint_run = self.run_id

    # --- MLflow ------------------------------------------------------------------------------------------------

    def _start_run(self, uri: str, output_dir: Path) -> None:
        """A new run in the experiment (created when missing; in the local store with its artifacts beside it)."""
        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage != "active":
            raise ValueError(f"the experiment {name!r} was deleted; restore it (mlflow experiments restore "
                             f"--experiment-id {experiment.experiment_id}) or log to another (mlflow_experiment)")
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            local = uri == _local_store_uri(output_dir)
            location = (output_dir / MLFLOW_DIR / "artifacts").resolve().as_uri() if local else None
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        self._logged = set()

    def _continue_run(self, step: int, origin: str) -> bool:
        """Reopen the run (`origin`: "of the checkpoint", "the user opened") and note the steps it logged after
        `step`; False when it is gone (a store that cannot be reached raises)."""
        try:
            run = self.client.get_run(self.run_id)
        except Exception as error:
            if getattr(error, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.warning("The MLflow run %s %s is not in this tracking store (%s); starting a new run",
                           self.run_id, origin, _first_line(error))
            return False
        if run.info.lifecycle_stage != "active":
            logger.warning("The MLflow run %s %s was deleted; starting a new run", self.run_id, origin)
            return False
        self.client.update_run(self.run_id, status="RUNNING")
        self._logged = {(key, metric.step) for key in run.data.metrics
                        for metric in self.client.get_metric_history(self.run_id, key) if metric.step > step}
        logger.info("Continuing the MLflow run %s from step %d", self.run_id, step)
        return True

    def _artifacts_inside(self, store: Path) -> bool:
        """Whether the run's artifacts go into `store`, the local store in the run folder; one copied or moved
        from another run folder still sends them to that folder: then none are logged, with a warning."""
        location = urlsplit(self.client.get_run(self.run_id).info.artifact_uri)
        path = Path(unquote(location.path)).resolve()
        if location.scheme == "file" and path.is_relative_to(store.resolve()):
            return True
        logger.warning("The MLflow store in %s was made in another run folder (copied or moved): its artifacts would "
                       "go to %s, so this run logs none there (metrics and params are logged)", store, path)
        return False

    def _log_params(self, config: Mapping[str, Any] | None, resumed: bool) -> None:
        """The config as params, in batches; a resumed run adds only params it does not have (MLflow params are
        immutable: a changed value is in the resumed run's config.yaml)."""
        from mlflow.entities import Param

        if not config:
            return
        flat = {self._name(key): str(value)[:_MAX_PARAM_LENGTH] for key, value in flatten(config).items()}
        if resumed:
            existing = self.client.get_run(self.run_id).data.params
            flat = {key: value for key, value in flat.items() if key not in existing}
        params = [Param(key, value) for key, value in flat.items()]
        for first in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[first:first + _BATCH])

    def _log_metrics(self, values: Mapping[str, Any], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        numbers = {self._name(key): number for key, value in values.items() if (number := scalar(value)) is not None}
        metrics = [Metric(key, number, now, step) for key, number in numbers.items() if (key, step) not in self._logged]
        if metrics:
            self._call(self.client.log_batch, self.run_id, metrics)

    def _name(self, name: str) -> str:
        """`name` as MLflow accepts it (one warning when that is another name): characters other than letters,
        digits, `_-.:/` and space as `_`, no empty, `.` or `..` parts between slashes, at most 250 characters."""
        if name not in self._names:
            cleaned = re.sub(r"[^\w.\- :/]", "_", str(name))
            parts = [part for part in cleaned.split("/") if part not in ("", ".", "..")]
            self._names[name] = "/".join(parts)[:_MAX_NAME_LENGTH].rstrip("/") or "_"
            if self._names[name] != name:
                logger.warning("MLflow does not accept the name %r: logged as %r", name, self._names[name])
        return self._names[name]

    def _call(self, method: Any, *args: Any) -> None:
        """`method(*args)` with short HTTP limits; a failure warns once and turns MLflow logging off."""
        try:
            with self._http_limits():
                method(*args)
        except Exception as error:
            logger.warning("MLflow logging failed (%s): it is off for the rest of this run, training goes on "
                           "(metrics.jsonl has every metric)", _first_line(error))
            self.client = None

    @contextlib.contextmanager
    def _http_limits(self, retries: int = 2) -> Iterator[None]:
        """mlflow's HTTP retries and request timeout cut to seconds while we call it (its defaults retry for
        minutes), and its "View run at <URI>" lines off when the URI holds a password; a variable the user set is
        kept."""
        limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(self.timeout)))}
        uri = self.client.tracking_uri if self.client is not None else ""
        if without_credentials(uri) != uri:
            limits["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        added = {key: value for key, value in limits.items() if key not in os.environ}
        os.environ.update(added)
        try:
            yield
        finally:
            for key in added:
                os.environ.pop(key, None)

    def _written_now(self, path: Path) -> bool:
        """A file this run wrote (not one an earlier run left in the folder)."""
        try:
            return path.is_file() and not path.is_symlink() and path.stat().st_mtime >= self._started - 1
        except OSError:
            return False


def _make_local_store(folder: Path) -> None:
    """The local store's folder inside the run folder; a symlink there (out of the run folder) is refused."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OSError(f"{folder} is not a folder of ours (a link or a file); the local MLflow store goes there")
    folder.mkdir(parents=True, exist_ok=True)


def _local_store_uri(output_dir: Path) -> str:
    """The local store's URI; its path quoted, so a `?`, `#` or `%` in a folder name stays in the path."""
    return f"sqlite:///{quote(str((output_dir / MLFLOW_DIR / 'mlflow.db').resolve()), safe='/')}"


def _first_line(error: BaseException) -> str:
    """The error's first line, without credentials of URLs in it."""
    text = str(error).strip()
    return without_credentials(text.splitlines()[0]) if text else type(error).__name__
