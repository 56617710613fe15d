"""The end-of-run report: `loss.png` (four curves against step) and a self-contained `report.html`.

Everything comes from `output_dir/metrics.jsonl` (see `app.sft.metrics_log`), read as:
training loss = `loss` of "train" records, validation loss = `val_loss` of "eval" records,
learning rate = `learning_rate` and throughput = `tokens_per_second` of "train" records, epoch ends =
the steps of "epoch" records. `training_summary.json` and `config.yaml`, when present, add the trained
token count, the runtime and the run configuration to the HTML page.

The monitored metric (the summary's `best_metric_name`/`best_metric_mode`, else the config's `best_metric`,
else `val_loss`) gets its own panel, starred at the run's best by name: the trainer's record from the summary
(`best_metric`, `best_step`), else the best of its evaluations. A run evaluated by generation (`gen_*` values in
"eval" records) also gets their curves and, from `generations/step_<N>.jsonl`, a few samples of the first and
the best evaluation side by side (best by the monitored metric when it is a `gen_*` metric).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from app.sft.atomic import write_bytes
from app.sft.config import load_yaml
from app.sft.metrics_log import RECORD_TYPES, numbered_records
from app.sft.paths import GENERATIONS_DIR
from app.sft.precision import PrecisionChoice

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
REPORT_FILE = "report.html"

_NUMBERS = ("epoch", "time", "elapsed_s", "loss", "val_loss", "learning_rate", "tokens_per_second")
"""Record fields the report computes with: numbers (or null) wherever they appear, like every `gen_*` value."""

_LOSS_LABEL = "loss (cross-entropy per token)"


class ReportError(ValueError):
    """A run file the report reads is damaged or was edited, or the report cannot be written; the message names
    the file (and line)."""
_VAL_STYLE: dict[str, Any] = {
    "color": "tab:orange",
    "linewidth": 2,
    "marker": "o",
    "markersize": 5,
    "label": "validation loss",
}


def _series(records: Sequence[dict[str, Any]], type: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the records of `type`, skipping records where it is missing or null."""
    points = [(r["step"], r[key]) for r in records if r.get("type") == type and r.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


class _Monitored(NamedTuple):
    """The run's monitored metric, its mode and its best `(step, value)` (None before one)."""

    name: str
    mode: str
    best: tuple[int, float] | None


def _monitored(records: Sequence[dict[str, Any]], run_summary: dict[str, Any], config: dict[str, Any]) -> _Monitored:
    """The monitored metric and its best: the summary's record (the trainer's), else the config's `best_metric`
    (else `val_loss`) and the best of its evaluations by mode (the first of equal ones, as the trainer keeps)."""
    name = run_summary.get("best_metric_name") or config.get("best_metric") or "val_loss"
    mode = run_summary.get("best_metric_mode") or (
        config.get("best_metric_mode") if config.get("best_metric") == name else None) or "min"
    if run_summary.get("best_metric_name") == name and run_summary.get("best_step") is not None:
        return _Monitored(name, mode, (run_summary["best_step"], run_summary.get("best_metric")))
    points = [p for p in zip(*_series(records, "eval", name), strict=True) if math.isfinite(p[1])]
    pick = max if mode == "max" else min
    return _Monitored(name, mode, pick(points, key=lambda point: point[1], default=None))


def _plot(records: Sequence[dict[str, Any]], title: str, monitored: _Monitored) -> bytes:
    """Draw the 2x2 panels (loss, the monitored metric, learning rate, throughput); returns the PNG bytes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "The training report needs matplotlib: pip install 'llm-playground-sft[report]'"
        ) from err

    train_steps, train_loss = _series(records, "train", "loss")
    val_steps, val_loss = _series(records, "eval", "val_loss")
    epoch_ends = sorted({r["step"] for r in records if r.get("type") == "epoch"})

    fig = Figure(figsize=(12, 8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg without touching pyplot's global backend
    (loss_ax, val_ax), (lr_ax, speed_ax) = fig.subplots(2, 2, sharex=True)
    fig.suptitle(title, fontsize=14)

    loss_ax.plot(train_steps, train_loss, color="tab:blue", linewidth=1.5, label="training loss")
    if val_steps:  # no empty "validation loss" entry in the legend of a run without validation
        loss_ax.plot(val_steps, val_loss, **_VAL_STYLE)
    for i, step in enumerate(epoch_ends):
        loss_ax.axvline(step, color="gray", linestyle=":", linewidth=1, label=None if i else "epoch end")
    _finish(loss_ax, "Loss", _LOSS_LABEL, bool(train_steps or val_steps), "No loss logged")

    name, mode, best = monitored
    steps, values = _series(records, "eval", name)
    if name == "val_loss":
        val_ax.plot(steps, values, **_VAL_STYLE)
        labels = ("Validation loss", _LOSS_LABEL, "No validation in this run")
    else:
        val_ax.plot(steps, values, **{**_VAL_STYLE, "color": "tab:cyan", "label": name})
        better = "higher" if mode == "max" else "lower"
        labels = (f"{name} (monitored)", f"{name} ({better} is better)", f"No {name} evaluated in this run")
    if best is not None and best[1] is not None:
        val_ax.plot(*best, "*", color="tab:red", markersize=16, label=f"best {name} {best[1]:.4g} at step {best[0]}")
    _finish(val_ax, *labels[:2], bool(steps), labels[2])

    lr_steps, lr = _series(records, "train", "learning_rate")
    lr_ax.plot(lr_steps, lr, color="tab:green", linewidth=1.5)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _finish(lr_ax, "Learning rate", "learning rate", bool(lr_steps), "No learning rate logged")

    speed_steps, speed = _series(records, "train", "tokens_per_second")
    speed_ax.plot(speed_steps, speed, color="tab:purple", linewidth=1.5)
    speed_ax.set_ylim(0, max(speed, default=1.0) * 1.1)  # from zero, so a drop in speed reads true to scale
    _finish(speed_ax, "Throughput", "tokens / second", bool(speed_steps), "No throughput logged")

    for ax in (lr_ax, speed_ax):
        ax.set_xlabel("step (optimizer steps)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _finish(ax: Any, title: str, ylabel: str, has_data: bool, empty_message: str) -> None:
    """Title, labels, grid and legend of one panel, or a centred note when it has nothing to show."""
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not has_data:
        ax.text(0.5, 0.5, empty_message, transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_yticks([])
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")  # where it hides the fewest points (the best's star among them)


def _fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits, ints with thousands separators, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _summary_rows(records: Sequence[dict[str, Any]], run_summary: dict[str, Any],
                  monitored: _Monitored) -> list[tuple[str, str]]:
    """The headline numbers of the run, as (label, formatted value) rows; the run's summary is the source where
    it has the number, so the report says what `training_summary.json` and the log say."""
    train_steps, train_loss = _series(records, "train", "loss")
    _, val_loss = _series(records, "eval", "val_loss")
    _, speed = _series(records, "train", "tokens_per_second")
    epochs = [r["epoch"] for r in records if r.get("epoch") is not None]
    elapsed = [r["elapsed_s"] for r in records if r.get("elapsed_s") is not None]
    best_name, found = monitored.name, monitored.best
    best = f"{_fmt(found[1])} (step {found[0]})" if found else "—"
    last_train = f"{_fmt(train_loss[-1])} (step {train_steps[-1]})" if train_loss else "—"
    return [
        ("Optimizer steps", _fmt(run_summary.get("global_step", max((r["step"] for r in records), default=None)))),
        ("Epochs", _fmt(run_summary.get("epochs", max(epochs, default=None)))),
        ("Training loss (mean over the run)", _fmt(run_summary.get("train_loss"))),
        ("Last logged training loss", last_train),
        ("Final validation loss", _fmt(val_loss[-1] if val_loss else None)),
        ("Best validation loss" if best_name == "val_loss" else f"Best {best_name}", best),
        ("Best checkpoint", Path(run_summary["best_checkpoint"]).name if run_summary.get("best_checkpoint") else "—"),
        ("Stopped because", _fmt(run_summary.get("stop_reason"))),
        ("Trained tokens", _fmt(run_summary.get("train_tokens"))),
        ("Mean throughput (tokens/s)", _fmt(sum(speed) / len(speed) if speed else None)),
        ("Runtime", _duration(run_summary.get("runtime_s", max(elapsed, default=None)))),
        ("Precision", _precision(run_summary.get("mixed_precision"))),
    ]


def _precision(record: Any) -> str:
    """The summary's `mixed_precision` record in one line, e.g. `mixed_precision auto: fp32 (measured: ...)`."""
    try:
        return PrecisionChoice.from_dict(record).describe()
    except (TypeError, ValueError, KeyError):
        return "—"


def _table(rows: Sequence[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1400px; padding: 0 1rem; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.8rem; text-align: left; }
th { background: #f5f5f5; font-weight: 600; }
pre { background: #f5f5f5; padding: 1rem; overflow-x: auto; }
.note { color: #666; }
.trained { color: #080; font-weight: bold; }
.fail { color: #b00; font-weight: bold; }
pre.example { white-space: pre-wrap; }
"""


def _html(
    title: str,
    png: bytes,
    summary: list[tuple[str, str]],
    output_dir: Path,
    run_summary: dict[str, Any],
    generation: Sequence[str] = (),
) -> str:
    """The report page; the plot is inlined as base64 so the file can be mailed or opened anywhere."""
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">Run directory: {html.escape(str(output_dir))}. '
        f"Generated {datetime.now().isoformat(timespec='seconds')}.</p>",
        "<h2>Summary</h2>",
        _table(summary),
        "<h2>Curves</h2>",
        f'<img alt="Training loss, the monitored metric, learning rate and throughput against step" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">',
    ]
    sections += generation
    config_path = output_dir / "config.yaml"
    if config_path.is_file():
        config_text = config_path.read_text(encoding="utf-8")
        sections += ["<h2>Configuration (config.yaml)</h2>", f"<pre>{html.escape(config_text)}</pre>"]
    audit = run_summary.get("audit")
    if audit:
        sections += _data_section(audit)
    if run_summary:
        shown = {key: value for key, value in run_summary.items() if key != "audit"}
        summary_text = html.escape(json.dumps(shown, indent=2))
        sections += ["<h2>Training summary (training_summary.json)</h2>", f"<pre>{summary_text}</pre>"]
    body = "\n".join(sections)
    head = f'<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>'
    return f'<!DOCTYPE html>\n<html lang="en">\n<head>\n{head}\n</head>\n<body>\n{body}\n</body>\n</html>\n'


def _data_section(audit: dict[str, Any]) -> list[str]:
    """The data audit: a length histogram with the `max_seq_length` line, truncation and batching figures, the
    checks, and two training examples with their trained tokens highlighted (as `sft preview` colours them)."""
    cut, batching, train = audit["truncation"], audit["batching"], audit["splits"]["train"]
    rows = [
        ("Rows read / examples", f"{train['rows_read']:,} / {train['examples']:,}"),
        ("Rows dropped", ", ".join(f"{k.replace('_', ' ')}: {v:,}" for k, v in train["dropped"].items())),
        ("Rows truncated", f"{cut['rows']:,} ({cut['rows_share']:.1%})"),
        ("Trained tokens lost to truncation",
         f"{cut['trained_tokens_lost']:,} ({cut['trained_tokens_lost_share']:.1%})"),
        ("Rows whose whole response is cut away", f"{cut['rows_response_cut_away']:,}"),
        ("Trained tokens per epoch",
         f"{train['trained_tokens']:,} of {train['tokens']:,} ({train['trained_share']:.1%})"),
        ("Padding share" if not batching["packing"] else "Fill rate (packed)",
         f"{batching['fill_rate' if batching['packing'] else 'padding_share']:.1%}"),
        ("Validation rows also in the training data", f"{audit['leakage']['duplicate_validation_rows']:,}"),
        ("Copies of rows kept on one side of the split", f"{audit['leakage'].get('duplicates_kept_together', 0):,}"),
    ]
    checks = "".join(
        f"<tr><th>{html.escape(c['name'])}</th><td class=\"{'' if c['passed'] else 'fail'}\">"
        f"{'ok' if c['passed'] else 'warning' if c.get('warning') else 'FAILED'}</td>"
        f"<td>{html.escape(c['message'])}</td></tr>"
        for c in audit["checks"]
    )
    examples = []
    for example in audit.get("examples", []):
        text = "".join(f'<span class="trained">{html.escape(t)}</span>' if trained else html.escape(t)
                       for t, trained in example["spans"])
        note = " (truncated to max_seq_length)" if example["truncated"] else ""
        examples.append(f"<h3>Training row {example['row']}{note}</h3><pre class=\"example\">{text}</pre>")
    return [
        "<h2>Data</h2>",
        f'<p class="note">The data audit (audit: {html.escape(audit["mode"])}) of the tokenized training data, '
        "before the first step. Trained tokens are <span class=\"trained\">highlighted</span>.</p>",
        _length_histogram(audit["histogram"], audit["max_seq_length"]),
        _table(rows),
        f"<table>{checks}</table>",
        *examples,
    ]


def _length_histogram(histogram: dict[str, list[int]], max_seq_length: int, width: int = 720,
                      height: int = 220) -> str:
    """An inline SVG bar chart of the training rows' token lengths, with a red line at `max_seq_length`."""
    edges, counts = histogram["edges"], histogram["counts"]
    if not counts or edges[-1] <= edges[0]:
        return ""
    top, span, plot = max(max(counts), 1), edges[-1] - edges[0], height - 30
    bar = width / len(counts)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{plot - plot * c / top:.1f}" width="{bar - 1:.1f}" '
        f'height="{plot * c / top:.1f}" fill="#4477aa"><title>{edges[i]}-{edges[i + 1]} tokens: {c} rows</title>'
        "</rect>"
        for i, c in enumerate(counts)
    )
    x = (max_seq_length - edges[0]) / span * width
    return (
        f'<svg class="lengths" width="{width}" height="{height}" role="img" '
        f'aria-label="Token lengths of the training rows, with max_seq_length">{bars}'
        f'<line class="max-seq-length" x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{plot}" stroke="#c00" '
        f'stroke-width="2"/><text x="{min(x + 4, width - 150):.1f}" y="14" fill="#c00">max_seq_length '
        f'{max_seq_length}</text><text x="0" y="{height - 8}">{edges[0]}</text>'
        f'<text x="{width - 60}" y="{height - 8}">{edges[-1]} tokens</text></svg>'
    )


_GEN_SPEED_KEYS = ("gen_tokens_per_second", "gen_time_s")
_SAMPLES_SHOWN = 5


def _generation_section(records: Sequence[dict[str, Any]], output_dir: Path, monitored: _Monitored) -> list[str]:
    """Evaluation by generation: the `gen_*` curves and, for the first and the best evaluation, a few samples
    side by side (from `generations/step_<N>.jsonl`); nothing when the run had no generation evaluation."""
    evals = [r for r in records if r.get("type") == "eval" and any(k.startswith("gen_") for k in r)]
    names = list(dict.fromkeys(k for r in evals for k in r if k.startswith("gen_") and k not in _GEN_SPEED_KEYS))
    if not evals or not names:
        return []
    monitor, mode, point = monitored
    key = monitor if monitor in names else names[0]
    scored = [r for r in evals if r.get(key) is not None]
    recorded = [r for r in scored if key == monitor and point is not None and r["step"] == point[0]]  # the run's
    best = (recorded[0] if recorded else
            (min if (mode == "min" and key == monitor) else max)(scored, key=lambda r: r[key]) if scored else evals[-1])
    first = evals[0]
    png = _generation_png(evals, names)
    sections = ["<h2>Evaluation by generation</h2>",
                f'<img alt="Generation metrics against step" src="data:image/png;base64,{png}">']
    rows = [("metric", f"first evaluation (step {first['step']})", f"best evaluation (step {best['step']}, by {key})")]
    rows += [(name, _fmt(first.get(name)), _fmt(best.get(name))) for name in names]
    sections.append(_grid(rows))
    first_samples, best_samples = (_samples(output_dir, r["step"]) for r in (first, best))
    if first_samples or best_samples:
        by_index = {s.get("index"): s for s in best_samples}
        grid = [("prompt", "reference", f"first evaluation (step {first['step']})",
                 f"best evaluation (step {best['step']})")]
        for sample in (first_samples or best_samples)[:_SAMPLES_SHOWN]:
            other = by_index.get(sample.get("index"), {})
            grid.append((sample.get("prompt", ""), sample.get("reference", ""),
                         sample.get("prediction", "") if first_samples else "—", other.get("prediction", "—")))
        sections += [f"<h3>Samples (generations/step_{first['step']}.jsonl, step_{best['step']}.jsonl)</h3>",
                     _grid(grid)]
    return sections


def _read_config(path: Path) -> dict[str, Any]:
    """The run's config.yaml as a mapping ({} when there is none)."""
    if not path.is_file():
        return {}
    config = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(config, dict):
        raise ReportError(f"{path}: expected a mapping of settings, got {type(config).__name__}")
    return config


def _samples(output_dir: Path, step: int) -> list[dict[str, Any]]:
    path = output_dir / GENERATIONS_DIR / f"step_{step}.jsonl"
    if not path.is_file():
        return []
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            sample = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(sample, dict):
            raise ReportError(f"{path}:{number}: a sample must be a JSON object, got {type(sample).__name__}")
        if sample:
            samples.append(sample)
    return samples


def _grid(rows: Sequence[Sequence[str]]) -> str:
    """A table whose first row is the header."""
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td><pre>{html.escape(str(c))}</pre></td>" for c in row) + "</tr>"
                   for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _generation_png(evals: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """The `gen_*` curves as a base64 PNG."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name in names:
        ax.plot(*_series(evals, "eval", name), marker="o", label=name)
    _finish(ax, "Generation metrics", "mean score", True, "")
    ax.set_xlabel("step (optimizer steps)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_report(output_dir: str | Path, *, title: str | None = None) -> tuple[Path, Path]:
    """Write `loss.png` and `report.html` into `output_dir` from its `metrics.jsonl`; return their paths.

    Raises FileNotFoundError when the run has no metrics log, `ReportError` naming the file (and line) for a
    damaged or edited metrics log, summary or samples file and for a report it cannot write (a full disk: the
    previous file stays), `ConfigError` for an unreadable config.yaml, and ImportError (with the install
    command) when matplotlib is missing.
    """
    output_dir = Path(output_dir)
    metrics_path = output_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"No metrics log at {metrics_path}: is {output_dir} the output_dir of a run?")
    records = _read_records(metrics_path)
    title = title or f"Training report: {output_dir.resolve().name}"
    run_summary = _read_summary(output_dir / "training_summary.json")
    monitored = _monitored(records, run_summary, _read_config(output_dir / "config.yaml"))

    png_path, html_path = output_dir / PLOT_FILE, output_dir / REPORT_FILE
    png = _plot(records, title, monitored)
    page = _html(title, png, _summary_rows(records, run_summary, monitored), output_dir, run_summary,
                 _generation_section(records, output_dir, monitored))
    for path, data in ((png_path, png), (html_path, page.encode("utf-8"))):
        try:
            write_bytes(path, data)
        except OSError as error:
            raise ReportError(f"{path}: cannot write it ({error.strerror or error}); the file it replaces, if any, "
                              "is kept") from error
    return png_path, html_path


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The metrics log's records, refusing (naming the line) any the report cannot compute with."""
    try:
        numbered = numbered_records(path)
    except ValueError as error:
        raise ReportError(str(error)) from None
    for number, record in numbered:
        where = f"{path}:{number}"
        if record.get("type") not in RECORD_TYPES:
            raise ReportError(f"{where}: field 'type' must be one of {', '.join(RECORD_TYPES)}, got "
                              f"{record.get('type')!r} (the file was edited or damaged)")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ReportError(f"{where}: field 'step' must be a whole number, got {step!r} (the file was edited or "
                              "damaged)")
        for name, value in record.items():
            if (name in _NUMBERS or name.startswith("gen_")) and not (
                    value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))):
                raise ReportError(f"{where}: field {name!r} must be a number or null, got {value!r} (the file was "
                                  "edited or damaged)")
    return [record for _, record in numbered]


def _read_summary(path: Path) -> dict[str, Any]:
    """`training_summary.json` ({} when there is none)."""
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: not valid JSON ({error}): the file was edited or damaged") from None
    if not isinstance(summary, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary
