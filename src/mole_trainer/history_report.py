"""The history report: one static HTML page with every figure embedded, and the same figures as PNG.

Figures (matplotlib, Agg backend, imported only here), each a section of the page with this id:

    loss-curves       train/val loss (and every other *loss series) per training run, by step
    router-metrics    top-1 accuracy, top-2 accuracy and ECE of every router evaluation, oldest first
    experts-vs-base   each expert's task metric against the untrained base's (newest value per expert)
    confusion         the newest router evaluation's confusion matrix (counts; rows: true expert)
    reliability       the same evaluation's reliability diagram (accuracy against confidence per bin)
    consistency       the same evaluation's routing consistency (alone vs batched, each perturbation)

then a table of every run with its device, wall time and cost. The page loads nothing: images are
base64 PNG data URIs and the style sheet is inline, so it opens from a file with no network.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from .atomic import write_text
from .errors import UserError
from .history_view import HistoryData, read_history

FIGURES = {
    "loss-curves": "Training and validation loss per run",
    "router-metrics": "Router top-1, top-2 and ECE across evaluations",
    "experts-vs-base": "Each expert's metric against its base",
    "confusion": "Newest router evaluation: confusion matrix",
    "reliability": "Newest router evaluation: reliability diagram",
    "consistency": "Newest router evaluation: routing consistency",
}
MAX_LOSS_PANELS = 12  # the newest training runs with curves drawn on the page
DPI = 100
TRAINING_STAGES = ("train",)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(run: dict) -> str:
    return f"{run['run_id'][:8]} {run['started_at'][:10]}"


def _eval_details(run: dict) -> dict:
    """The confusion matrix, calibration bins and consistency of an eval.router run: recorded with
    the run, else read from the report file it names (runs recorded before these were kept)."""
    metrics = dict(run.get("metrics") or {})
    if "confusion" not in metrics:
        path = (run.get("artifacts") or {}).get("report")
        if path and Path(path).is_file():
            from .history_backfill import eval_metrics

            with contextlib.suppress(ValueError, KeyError, TypeError):  # not a report: no details
                metrics.update(eval_metrics(json.loads(Path(path).read_text())))
    return metrics


def _training_runs(data: HistoryData) -> list[dict]:
    return [
        r
        for r in data.runs
        if r["stage"].split(".")[0] in TRAINING_STAGES and any("loss" in n for n in data.series(r["run_id"]))
    ]


def _evals(data: HistoryData) -> list[dict]:
    return [r for r in data.runs if r["stage"] == "eval.router" and r["status"] == "ok"]


def _newest_eval_with(data: HistoryData, key: str) -> tuple[dict, dict] | None:
    for run in _evals(data):
        details = _eval_details(run)
        if details.get(key):
            return run, details
    return None


# -- figures: each returns a matplotlib figure, or a string saying why there is none --------------
def fig_loss_curves(data: HistoryData, runs: list[dict] | None = None):
    """One panel per training run: every series whose name contains 'loss', by step."""
    runs = (runs if runs is not None else _training_runs(data))[:MAX_LOSS_PANELS]
    if not runs:
        return "no training run with a recorded loss curve"
    plt = _plt()
    cols = min(len(runs), 3)
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, run in zip(axes.flat, runs, strict=False):
        losses = {n: p for n, p in data.series(run["run_id"]).items() if "loss" in n}
        # an expert run's series are 'expert/train_loss': one colour per expert, dashed validation
        groups = list(dict.fromkeys(n.rpartition("/")[0] for n in losses))
        for i, (name, points) in enumerate(losses.items()):
            steps, values = zip(*points, strict=True)
            style = "--" if "val" in name or "eval" in name else "-"
            colour = f"C{groups.index(name.rpartition('/')[0]) if len(groups) > 1 else i}"
            ax.plot(steps, values, style, color=colour, marker="o", markersize=3, label=name)
        ax.set_title(f"{run['stage']} {_short(run)}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def fig_router_metrics(data: HistoryData):
    """Top-1, top-2 and ECE of every router evaluation, oldest first."""
    runs = [r for r in reversed(_evals(data)) if "accuracy" in (r.get("metrics") or {})]
    if not runs:
        return "no router evaluation recorded"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(runs) + 3), 3.8))
    x = list(range(len(runs)))
    for key, label in (("accuracy", "top-1 accuracy"), ("top2", "top-2 accuracy"), ("ece", "ECE")):
        ys = [(r.get("metrics") or {}).get(key) for r in runs]
        pts = [(i, y) for i, y in zip(x, ys, strict=True) if y is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xticks(x, [_short(r) for r in runs], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def expert_results(data: HistoryData) -> dict[str, dict]:
    """{expert: {metric, value, base_value, run_id}}: the newest recorded result of each expert."""
    out: dict[str, dict] = {}
    for run in data.runs:  # newest first: the first result of an expert is kept
        if run["stage"] != "train.experts" or run["status"] != "ok":
            continue
        metrics = run.get("metrics") or {}
        for key, base in metrics.items():
            expert, sep, metric = key.partition(".base_")
            if sep and expert not in out and f"{expert}.{metric}" in metrics:
                value = metrics[f"{expert}.{metric}"]
                out[expert] = {"metric": metric, "value": value, "base_value": base, "run_id": run["run_id"]}
    return dict(sorted(out.items()))


def fig_experts_vs_base(data: HistoryData):
    """Grouped bars: the base's and the expert's value of each expert's own metric."""
    results = expert_results(data)
    if not results:
        return "no expert training recorded"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(results) + 2), 3.8))
    names = list(results)
    x = range(len(names))
    base = [results[n]["base_value"] or 0.0 for n in names]
    value = [results[n]["value"] or 0.0 for n in names]
    ax.bar([i - 0.2 for i in x], base, 0.4, label="untrained base", color="#bbbbbb")
    ax.bar([i + 0.2 for i in x], value, 0.4, label="expert LoRA", color="#3b75af")
    ax.set_xticks(list(x), [f"{n}\n({results[n]['metric']})" for n in names], fontsize=8)
    ax.set_ylabel("task metric")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_confusion(data: HistoryData, run: dict | None = None):
    """Heatmap of the confusion matrix with the count in every cell."""
    found = (run, _eval_details(run)) if run is not None else _newest_eval_with(data, "confusion")
    if not found or not found[1].get("confusion"):
        return "no router evaluation with a confusion matrix"
    run, details = found
    labels, matrix = details["confusion"]["labels"], details["confusion"]["matrix"]
    plt = _plt()
    size = 1.0 + 0.7 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, cmap="Blues")
    top = max((max(row) for row in matrix if row), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true expert")
    ax.set_title(f"eval.router {_short(run)}", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def fig_reliability(data: HistoryData, run: dict | None = None):
    """Accuracy against mean confidence per confidence bin, with the diagonal of perfect calibration."""
    found = (run, _eval_details(run)) if run is not None else _newest_eval_with(data, "calibration_bins")
    bins = [b for b in (found[1].get("calibration_bins") or []) if b.get("count")] if found else []
    if not bins:
        return "no router evaluation with calibration bins"
    run, details = found
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    widths = [b["hi"] - b["lo"] for b in bins]
    ax.bar(centers, [b["accuracy"] for b in bins], widths, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(
        [b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="#c44", label="mean conf."
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    for c, b in zip(centers, bins, strict=True):
        ax.text(c, min(b["accuracy"] + 0.03, 1.0), str(b["count"]), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ece = details.get("ece")
    ax.set_title(f"eval.router {_short(run)}" + (f"  ECE {ece:.3f}" if ece is not None else ""), fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def fig_consistency(data: HistoryData, run: dict | None = None):
    """Bars: the share of routes unchanged when batched, and under each benign perturbation."""
    found = (run, _eval_details(run)) if run is not None else _newest_eval_with(data, "perturbations")
    if not found or not found[1].get("perturbations"):
        return "no router evaluation with routing consistency (eval router --consistency)"
    run, details = found
    bars = {"batched vs alone": details.get("batch_invariance"), **details["perturbations"]}
    bars = {k: v for k, v in bars.items() if v is not None}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(bars) + 2), 3.8))
    ax.bar(range(len(bars)), list(bars.values()), color="#5a9e6f")
    for i, v in enumerate(bars.values()):
        ax.text(i, v + 0.01, f"{v:.3f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(bars)), list(bars), rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("same route")
    ax.set_title(f"eval.router {_short(run)}", fontsize=9)
    fig.tight_layout()
    return fig


DRAW: dict[str, Callable] = {
    "loss-curves": fig_loss_curves,
    "router-metrics": fig_router_metrics,
    "experts-vs-base": fig_experts_vs_base,
    "confusion": fig_confusion,
    "reliability": fig_reliability,
    "consistency": fig_consistency,
}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _plt().close(fig)
    return buf.getvalue()


def render(data: HistoryData) -> dict[str, bytes | str]:
    """Every figure of the report as PNG bytes, or the reason it has none."""
    out: dict[str, bytes | str] = {}
    for name, draw in DRAW.items():
        fig = draw(data)
        out[name] = fig if isinstance(fig, str) else _png(fig)
    return out


# -- the page ------------------------------------------------------------------------------------
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ccc; padding: 3px 6px; }
th { background: #f0f0f0; } td.num { text-align: right; } .empty { color: #888; font-style: italic; }
"""


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _runs_table(data: HistoryData) -> str:
    head = ("run", "stage", "status", "started (UTC)", "wall s", "device", "cost USD", "git", "key metrics")
    rows = []
    for r in data.runs:
        metrics = r.get("metrics") or {}
        scalars = [
            f"{k}={v:.4g}"
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ][:4]
        git = (r.get("git_commit") or "-")[:10] + ("+dirty" if r.get("git_dirty") else "")
        cells = (
            r["run_id"],
            r["stage"],
            r["status"],
            r["started_at"][:19].replace("T", " "),
            _num(r.get("duration_s"), ".1f"),
            r.get("device") or "-",
            _num(r.get("cost_usd"), ".4f"),
            git,
            " ".join(scalars),
        )
        numeric = {4, 6}
        rows.append(
            "<tr>"
            + "".join(
                f'<td class="num">{html.escape(c)}</td>' if i in numeric else f"<td>{html.escape(c)}</td>"
                for i, c in enumerate(cells)
            )
            + "</tr>"
        )
    total = sum(r.get("cost_usd") or 0.0 for r in data.runs)
    priced = sum(r.get("cost_usd") is not None for r in data.runs)
    return (
        f"<p>{len(data.runs)} runs; estimated cost of the {priced} priced runs: ${total:.4f}</p>"
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"
    )


def report_html(data: HistoryData, figures: dict[str, bytes | str], title: str) -> str:
    """The self-contained page: one section per figure (an embedded PNG or why none), then the runs table."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Written {datetime.now(UTC).isoformat(timespec='seconds')}.</p>",
    ]
    for name, caption in FIGURES.items():
        content = figures[name]
        parts.append(f'<section id="{name}"><h2>{html.escape(caption)}</h2>')
        if isinstance(content, bytes):
            data_uri = base64.b64encode(content).decode()
            parts.append(f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data_uri}">')
        else:
            parts.append(f'<p class="empty">{html.escape(content)}</p>')
        parts.append("</section>")
    parts.append(f'<section id="runs"><h2>Runs</h2>{_runs_table(data)}</section>')
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(workdir: str | Path, output: str | Path) -> dict:
    """Write the report of the work directory's history to `output`; returns what it holds."""
    data = read_history(workdir)
    figures = render(data)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    title = f"Mole-Trainer run history: {Path(workdir).resolve()}"
    write_text(output, report_html(data, figures, title))
    return {
        "report": str(output),
        "runs": len(data.runs),
        "figures": [n for n, f in figures.items() if isinstance(f, bytes)],
        "missing": {n: f for n, f in figures.items() if isinstance(f, str)},
    }


def run_figures(data: HistoryData, run: dict) -> dict[str, bytes | str]:
    """The figures about one run: its loss curves (a training run), its confusion matrix, reliability
    diagram and consistency (a router evaluation), its experts against their bases (expert training)."""
    out: dict[str, bytes | str] = {}
    stage = run["stage"]
    if stage.split(".")[0] in TRAINING_STAGES and data.series(run["run_id"]):
        out["loss-curves"] = fig_loss_curves(data, [run])
    if stage == "train.experts":
        out["experts-vs-base"] = fig_experts_vs_base(HistoryData([run], []))
    if stage == "eval.router":
        for name in ("confusion", "reliability", "consistency"):
            out[name] = DRAW[name](data, run)
    return {k: v if isinstance(v, str) else _png(v) for k, v in out.items()}


def write_plots(workdir: str | Path, output_dir: str | Path, run_id: str | None = None) -> dict:
    """Write the figures (the report's, or those of run `run_id`) as OUTPUT_DIR/<figure>.png."""
    data = read_history(workdir)
    if run_id is not None:
        figures = run_figures(data, data.run(run_id))
        if not figures:
            raise UserError(
                f"run {run_id}: a {data.run(run_id)['stage']} run has no figures "
                "(figures are drawn for training runs with curves, expert training and router evaluations)"
            )
    else:
        figures = render(data)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, content in figures.items():
        if isinstance(content, bytes):
            (out / f"{name}.png").write_bytes(content)
            files.append(str(out / f"{name}.png"))
    return {"files": files, "missing": {n: f for n, f in figures.items() if isinstance(f, str)}}
