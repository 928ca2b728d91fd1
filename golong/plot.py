"""`golong plot RUN_DIR`: per-task reward curves, entropy and rollout/trainer logprob mismatch.

Reads RUN_DIR/metrics.jsonl (the trainer's per-step rows; a resumed run's repeated steps keep
their last value) and draws one PNG with four panels: training reward per task, validation reward
per task, policy entropy, and the rollout-vs-trainer mismatch (KL and max |delta logprob|).
"""

from __future__ import annotations

import os
from pathlib import Path

from golong.logger import read_metrics

TRAIN_TASK_PREFIX = "reward/task/"
VAL_TASK_PREFIX = "val/reward/task/"


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    last: dict[int, float] = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and "step" in r:
            last[int(r["step"])] = float(v)
    steps = sorted(last)
    return steps, [last[s] for s in steps]


def _keys(rows: list[dict], prefix: str) -> list[str]:
    # every key under the prefix is a task: a task named by its data_source may hold "/" ("longbench/qa")
    return sorted({k for r in rows for k in r if k.startswith(prefix)})


def _is_metric_row(row: object) -> bool:
    # a trainer row (RL step, validation, SFT step) has a numeric step and "family/name" keys; a dataset record
    # or a rollout dump row does not
    return isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and any("/" in k for k in row)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN_DIR/metrics.jsonl (`run_dir` may name that file) to `out` (default RUN_DIR/curves.png); returns
    the PNG path. ValueError when the file holds no metric row (a dataset, a rollout dump): nothing is written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if run_dir.is_file():  # the metrics file itself was named
        path, run_dir = run_dir, run_dir.parent
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    try:
        rows = [r for r in read_metrics(path) if _is_metric_row(r)]
    except UnicodeDecodeError:  # a binary file (an image, a parquet) named as the metrics file
        rows = []
    if not rows:  # refused before drawing: four "no data" panels would overwrite a real plot beside the file
        raise ValueError(f"no metric rows in {path}")
    into_dir = isinstance(out, str) and out.endswith(("/", os.sep))  # "new/" names a directory to make, as cp -r
    out = Path(out) if out is not None else run_dir / "curves.png"
    if out.is_dir() or into_dir:  # like cp: into the directory
        out = out / "curves.png"
    elif not out.suffix:  # matplotlib would add ".png" itself, and the path we report would not exist
        out = out.with_name(out.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:  # checked before drawing: matplotlib raises only when saving
        raise ValueError(f"--out {out}: unsupported image format {out.suffix!r}; use one of: "
                         f"{', '.join('.' + f for f in sorted(formats))}")

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    train_tasks = [(k, k[len(TRAIN_TASK_PREFIX):]) for k in _keys(rows, TRAIN_TASK_PREFIX)]
    val_tasks = [(k, k[len(VAL_TASK_PREFIX):]) for k in _keys(rows, VAL_TASK_PREFIX)]
    panels = [  # (axes, title, [(key, label)], log axis when every value is > 0)
        (axes[0, 0], "training reward per task", train_tasks + [("reward/mean", "all")], False),
        (axes[0, 1], "validation reward per task", val_tasks + [("val/reward/mean", "all")], False),
        (axes[1, 0], "policy entropy (nats / token)", [("actor/entropy", "entropy")], False),
        # log axis: a KL ~1e-13 beside a max |delta| ~1e-6 is a flat line at 0 on a linear one
        (axes[1, 1], "rollout vs trainer logprob mismatch",
         [("mismatch/kl", "KL(rollout || trainer)"), ("mismatch/max_abs", "max |delta logprob|")], True),
    ]
    for ax, title, series, log_scale in panels:
        drawn = 0
        positive = True
        for key, label in series:
            steps, vals = _series(rows, key)
            positive = positive and all(v > 0 for v in vals)
            if steps:
                style = dict(color="black", linewidth=2.2) if label == "all" else dict(linewidth=1.3)
                ax.plot(steps, vals, marker="o" if len(steps) < 30 else None, markersize=3, label=label, **style)
                drawn += 1
        ax.set_title(title)
        if log_scale and drawn and positive:  # a 0 (identical logprobs) has no place on a log axis
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, ncol=2 if drawn > 5 else 1)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(f"golong run: {run_dir.name}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
