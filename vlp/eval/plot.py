"""Training curves from run folders (`vlp plot RUN [RUN ...] --out curves.png`).

A run's `train_log.jsonl` (vlp/engine/loop.py) holds three kinds of records:
- training steps, `{"step", "loss", "lr", ...}` (no "event"),
- evaluations during training, `{"step", "event": "eval", <metric>: value, ...}` (eval.every),
- the end of the run, `{"step", "event": "end", <final metrics>}`.
Other events (`non_finite_loss`) are not plotted. One panel per quantity: the loss, the learning
rate, and every evaluation metric over steps (its eval records, then the final value at the end
step); runs are overlaid, one colour each, labelled by folder name. Counts and times (num_*,
skipped*, train_*, *_images, *_time_s, ...) are bookkeeping, not curves, and are left out.
Drawn with matplotlib's Agg canvas: no display, no pyplot state.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from vlp.eval.inputs import EvalError

LOG = "train_log.jsonl"
TRAIN_SERIES = ("loss", "lr")
# final-record and eval keys that are counts, sizes or times rather than metrics
BOOKKEEPING = re.compile(r"^(step|num_|skipped|train_|total_time|retrieval_(images|captions|"
                         r"unreadable)|rerank_k|retrieval_rerank_k)|(_images|_classes|_texts|"
                         r"_captions|_count|_time_s)$")
COLUMNS = 3


@dataclass
class RunLog:
    """A run's curves: {name: [(step, value), ...]} sorted by step."""
    name: str
    path: Path
    train: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    evals: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_run(run: str | Path) -> RunLog:
    """A run folder (or its train_log.jsonl) -> its curves. A line cut short by a kill is
    skipped; a step logged twice keeps its last record."""
    path = Path(run)
    log = path / LOG if path.is_dir() else path
    if not log.is_file():
        raise EvalError(f"{run}: no {LOG} (give run folders of vlp pretrain / vlp finetune, or "
                        "their train_log.jsonl)")
    train: dict[str, dict[int, float]] = {k: {} for k in TRAIN_SERIES}
    evals: dict[str, dict[int, float]] = {}
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not _number(record.get("step")):
            continue
        step, event = int(record["step"]), record.get("event")
        if event is None and _number(record.get("loss")):
            for key in TRAIN_SERIES:
                if _number(record.get(key)):
                    train[key][step] = float(record[key])
        elif event in ("eval", "end"):
            for key, value in record.items():
                if _number(value) and not BOOKKEEPING.search(key):
                    evals.setdefault(key, {})[step] = float(value)
    if not train["loss"] and not evals:
        raise EvalError(f"{log}: no training or evaluation records to plot")
    name = log.parent.name if log.name == LOG else log.stem
    return RunLog(name, log,
                  {k: sorted(v.items()) for k, v in train.items() if v},
                  {k: sorted(v.items()) for k, v in evals.items()})


def _natural(name: str) -> list:
    """Sort key with numbers compared as numbers: R@1, R@5, R@10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _labels(runs: list[RunLog]) -> list[str]:
    """Folder names, or the paths where two names collide."""
    names = [r.name for r in runs]
    return [r.name if names.count(r.name) == 1 else str(r.path.parent) for r in runs]


def plot_runs(runs: Sequence[str | Path], metrics: Sequence[str] | None = None) -> Figure:
    """The figure: loss, lr, then the evaluation metrics (all, or those matching `metrics`:
    names or fnmatch patterns such as 'i2t_R@*'), each run a line of its own colour."""
    if not runs:
        raise EvalError("vlp plot: give at least one run folder")
    logs = [read_run(r) for r in runs]
    names = sorted({k for log in logs for k in log.evals}, key=_natural)
    if metrics:
        unmatched = [m for m in metrics if not fnmatch.filter(names, m)]
        if unmatched:
            raise EvalError(f"--metrics {' '.join(unmatched)}: not in the logs (they have: "
                            f"{', '.join(names) or 'no evaluation metrics'})")
        names = [n for n in names if any(fnmatch.fnmatchcase(n, m) for m in metrics)]
    panels = [k for k in TRAIN_SERIES if any(k in log.train for log in logs)] + names
    rows = math.ceil(len(panels) / COLUMNS)
    cols = min(COLUMNS, len(panels))
    fig = Figure(figsize=(4.6 * cols, 3.0 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(logs))]
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for log, label, color in zip(logs, _labels(logs), colors):
            points = log.train.get(panel) if panel in TRAIN_SERIES else log.evals.get(panel)
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, color=color, label=label,
                    marker=None if panel in TRAIN_SERIES else "o", markersize=3)
        if panel == "lr":  # 2.0e-04 on each tick: an axis offset label would hit the title
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))
        if i == 0 and len(logs) > 1:
            ax.legend(fontsize="small")
    if len(logs) == 1:
        fig.suptitle(_labels(logs)[0])
    return fig


def save_plot(runs: Sequence[str | Path], out: str | Path,
              metrics: Sequence[str] | None = None) -> Path:
    """Draw `plot_runs` into a PNG (or any format matplotlib knows by the suffix) at `out`."""
    fig = plot_runs(runs, metrics)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
