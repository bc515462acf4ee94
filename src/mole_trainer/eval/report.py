"""Plain-text view of a router evaluation report."""

from __future__ import annotations


def format_router_report(report: dict) -> str:
    """Accuracy, top-k, calibration, per-expert P/R/F1 and the confusion matrix as text."""
    topk = "  ".join(f"top-{k} {v:.3f}" for k, v in report["top_k"].items())
    cal = report["calibration"]
    lines = [
        f"router on {report['n']} records: accuracy {report['accuracy']:.3f}  {topk}  macro-F1 {report['macro_f1']:.3f}",
        f"calibration: ECE {cal['ece']:.3f}  Brier {cal['brier']:.3f}  NLL {cal['nll']:.3f}",
        f"{'expert':<16}{'precision':>10}{'recall':>8}{'f1':>7}{'support':>9}",
    ]
    for name, m in report["per_expert"].items():
        lines.append(f"{name:<16}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>7.3f}{m['support']:>9}")
    names = report["confusion"]["labels"]
    width = max(8, *(len(n) + 1 for n in names))
    lines.append("confusion (rows: true, columns: predicted)")
    lines.append(" " * 16 + "".join(f"{n[: width - 1]:>{width}}" for n in names))
    for n, row in zip(names, report["confusion"]["matrix"], strict=True):
        lines.append(f"{n:<16}" + "".join(f"{v:>{width}}" for v in row))
    if "consistency" in report:
        c = report["consistency"]
        pert = "  ".join(f"{k} {v:.3f}" for k, v in c["perturbations"].items())
        lines.append(f"consistency: alone vs batched {c['batch_invariance']:.3f}; perturbed: {pert}")
    if "report_path" in report:
        lines.append(f"report: {report['report_path']}")
    return "\n".join(lines)
