"""Evaluating a router checkpoint on routing records: accuracy, top-k, per-expert P/R/F1, confusion,
calibration, written as one JSON report (plus per-record predictions)."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapter_info import adapter_digest, find_adapter_dir, read_adapter_info
from ..data.records import Sample, load_jsonl_samples
from ..errors import UserError
from ..layout import EVAL_REPORT_FILE
from ..router_prompt import label_names


def load_router(
    checkpoint: str | Path, device: str = "auto", dtype: str = "auto", base_model: str | None = None
):
    """(model, processor, label_map, info) of a router checkpoint folder or adapter folder."""
    from peft import PeftModel

    from ..model.loading import load_base, load_processor

    adapter = find_adapter_dir(checkpoint)
    info = read_adapter_info(adapter, "router")
    base = base_model or info["base_model"]
    processor = load_processor(base, info["min_pixels"], info["max_pixels"])
    model = PeftModel.from_pretrained(load_base(base, dtype, device), adapter).eval()
    return model, processor, info["label_map"], info


def load_routing_records(path: str | Path, split: str | None, label_map: dict[str, int]) -> list[Sample]:
    """Routing records of a JSONL file (those of `split` when records carry one), labels checked."""
    samples = load_jsonl_samples(path)
    if split and any(s.split for s in samples):
        samples = [s for s in samples if s.split == split]
    if not samples:
        raise UserError(f"{path}: no records{f' in split {split!r}' if split else ''}")
    for s in samples:
        if s.expert is None:
            raise UserError(f"{s.source}: routing records need an 'expert' field")
        if s.expert not in label_map:
            raise UserError(
                f"{s.source}: expert '{s.expert}' is not in the router's label map "
                f"({', '.join(label_names(label_map))})"
            )
    return samples


def evaluate_router(
    checkpoint: str | Path,
    test_data: str | Path,
    output: str | Path | None = None,
    split: str | None = "test",
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    ks: tuple[int, ...] = (1, 2),
    consistency: bool = False,
    base_model: str | None = None,
) -> dict:
    """Score every test record in one forward pass per batch and write the JSON report.

    With `consistency`, also route each record alone and under benign perturbations (see
    eval/consistency.py) and report the agreement rates.
    """
    from ..eval.metrics import router_report
    from ..infer.scoring import route_probs

    model, processor, label_map, info = load_router(checkpoint, device, dtype, base_model)
    names = label_names(label_map)
    samples = load_routing_records(test_data, split, label_map)
    probs = route_probs(model, processor, samples, names, batch_size).numpy()
    labels = [label_map[s.expert] for s in samples]
    report = router_report(probs, labels, names, ks=ks)
    if consistency:
        from .consistency import consistency_report

        def route(batch, bs):
            return route_probs(model, processor, batch, names, bs)

        report["consistency"] = consistency_report(route, samples, probs.argmax(-1).tolist(), batch_size)
    report["checkpoint"] = str(checkpoint)
    # which weights were evaluated: `mole deploy --min-accuracy` trusts a report only for these
    report["adapter_sha256"] = adapter_digest(find_adapter_dir(checkpoint))
    report["test_data"] = str(test_data)
    report["split"] = split
    out = Path(output) if output else Path(checkpoint) / EVAL_REPORT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    with out.with_suffix(".predictions.jsonl").open("w") as fh:
        for s, p in zip(samples, probs, strict=True):
            pred = int(p.argmax())
            fh.write(
                json.dumps(
                    {
                        "id": s.id,
                        "expert": s.expert,
                        "predicted": names[pred],
                        "probability": round(float(p[pred]), 6),
                        "probs": {n: round(float(v), 6) for n, v in zip(names, p, strict=True)},
                    }
                )
                + "\n"
            )
    report["report_path"] = str(out)
    return report
