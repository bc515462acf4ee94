"""The whole pipeline in order on the embedded default (`mole demo`), skipping unchanged stages.

Each stage has a fingerprint made of its own settings, the fingerprints of the stages it reads
from and a digest of the tool's own code; a stage whose fingerprint matches its last successful
run (and whose outputs still exist) is skipped. The default configs are copied into
WORKDIR/config on the first run and read from there, so editing them there re-runs exactly the
stages they feed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .configs import CONFIG_FILES, default_text
from .layout import HISTORY_REPORT_FILE, LABEL_MAP_FILE, SUMMARY_FILE, WorkDir

DEMO_SYNTH_COUNTS = {"train": 330, "val": 16, "test": 32}
DEMO_SEED = 0
DEMO_INFER_PER_EXPERT = 2
DEMO_WORKERS = 2  # preprocessing processes (the output is the same for any number)


def write_default_configs(config_dir: Path) -> None:
    """Copy the packaged default configs into `config_dir` (existing files are left alone)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        dest = config_dir / name
        if not dest.exists():
            dest.write_text(default_text(name))


class StageRunner:
    """Runs stages in order, with fingerprints, timings, a progress display and skip records."""

    def __init__(self, wd: WorkDir, force: bool, total: int):
        from rich.console import Console

        self.wd, self.force, self.total = wd, force, total
        from .hashing import code_digest

        self.code = code_digest()
        self.console = Console(highlight=False)
        self.seconds: dict[str, float] = {}
        self.skipped: list[str] = []
        self.index = 0

    def run(self, name: str, title: str, parts: list, fn, outputs: list[Path]):
        """Run `fn()` unless the stage's fingerprint and outputs are unchanged; returns (result, fingerprint)."""
        from .hashing import fingerprint
        from .history import open_history

        self.index += 1
        fp = fingerprint(name, parts, self.code)
        record = self.wd.stages_dir / f"{name}.json"
        label = f"[{self.index}/{self.total}] {title}"
        if not self.force and record.is_file() and all(p.exists() for p in outputs):
            saved = json.loads(record.read_text())
            if saved.get("fingerprint") == fp:
                self.console.print(f"[dim]{label}: unchanged, skipped[/dim]")
                hist = open_history(self.wd.history_db)
                hist.finish(hist.start(f"demo.{name}", {"fingerprint": fp}), status="skipped")
                self.seconds[name] = 0.0
                self.skipped.append(name)
                return saved["result"], fp
        self.console.rule(label)
        start = time.perf_counter()
        with self.console.status(f"{title} ...", spinner="dots"):
            result = fn()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        self.console.print(f"[green]done[/green] {title} in {self.seconds[name]:.1f} s")
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(
            json.dumps(
                {"fingerprint": fp, "result": result, "seconds": self.seconds[name]}, default=str, indent=2
            )
        )
        return result, fp


def run_demo(workdir: str | Path = "runs/demo", force: bool = False) -> dict:
    """Run every stage on the tiny model and synthetic data; writes WORKDIR/summary.json."""
    from . import stages

    wd = WorkDir(workdir)
    wd.root.mkdir(parents=True, exist_ok=True)
    cfg_files, experts_ckpt, router_cfg = _read_configs(wd)
    router_ckpt = Path(router_cfg.output_dir)
    r = StageRunner(wd, force, total=9)
    root = str(wd.root)

    def say(text: str) -> None:
        r.console.print(text, markup=False)

    prep_router = wd.prep_dir / "router"
    fp, routing_stats = _data_stages(r, wd, cfg_files, router_cfg, prep_router)
    experts, fp_experts = r.run(
        "experts",
        "train the expert LoRAs",
        [fp["synth"], fp["model"], cfg_files["loras.yaml"].read_text()],
        lambda: stages.train_experts(cfg_files["loras.yaml"], root, report=say),
        [experts_ckpt],
    )
    router, fp_router = r.run(
        "router",
        "train the router",
        [fp["preprocess"], cfg_files["router.yaml"].read_text()],
        lambda: stages.train_router(prep_router, cfg_files["router.yaml"], root, report=say),
        [router_ckpt],
    )
    report_path = wd.eval_dir / "router_report.json"
    report, _ = r.run(
        "eval",
        "evaluate the router on the test split",
        [fp_router, fp["routing"]],
        lambda: stages.eval_router(router_ckpt, wd.routing_file, report_path, "test", root, consistency=True),
        [report_path],
    )
    _, fp_deploy = r.run(
        "deploy",
        "deploy router + experts",
        [fp_router, fp_experts],
        lambda: stages.deploy(router_ckpt, experts_ckpt, str(wd.deploy_dir), root),
        [wd.deploy_dir],
    )
    infer_path = wd.eval_dir / "stacked_inference.jsonl"
    stacked, _ = r.run(
        "infer",
        "routed inference on test requests",
        [fp_deploy, fp["routing"]],
        lambda: _demo_inference(wd, infer_path),
        [infer_path],
    )

    from .eval.report import format_router_report

    say(format_router_report(report))
    summary = {
        "router": _router_summary(report, router),
        "experts": _experts_summary(experts),
        "stacked_inference": stacked,
        "routing_data": {
            "records": routing_stats["records"],
            "counts": routing_stats["counts"],
            "augmented": routing_stats.get("augmented"),
        },
        "stage_seconds": r.seconds,
        "skipped_stages": r.skipped,
        "total_seconds": round(sum(r.seconds.values()), 2),
        "artifacts": {
            "model": str(wd.model_dir),
            "expert_datasets": str(wd.experts_data),
            "routing_data": str(wd.routing_file),
            "router_preprocessed": str(prep_router),
            "experts": {n: e["adapter"] for n, e in experts.items()},
            "router": router["adapter"],
            "eval_report": str(report_path),
            "deployment": str(wd.deploy_dir),
            "stacked_inference": str(infer_path),
            "history": str(wd.history_db),
        },
    }
    # last: the report shows every run above (its figures need the eval report and training curves)
    summary["artifacts"]["history_report"] = stages.history_report(root, wd.root / HISTORY_REPORT_FILE)[
        "report"
    ]
    (wd.root / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(r.console, summary)
    return summary


def _data_stages(
    r: StageRunner, wd: WorkDir, cfg_files: dict, router_cfg, prep_router: Path
) -> tuple[dict, dict]:
    """The demo's first four stages: tiny model, synthetic expert data, routing dataset (checked) and the
    router's preprocessed cache. Their fingerprints by stage name, and the routing stats."""
    from . import stages

    root = str(wd.root)
    _, fp_model = r.run(
        "model",
        "build the tiny Qwen3-VL",
        [DEMO_SEED],
        lambda: stages.model_tiny(wd.model_dir, root, DEMO_SEED),
        [wd.model_dir],
    )
    _, fp_synth = r.run(
        "synth",
        "synthesise the expert datasets",
        [DEMO_SYNTH_COUNTS, DEMO_SEED],
        lambda: stages.data_synth(wd.experts_data, root, None, DEMO_SYNTH_COUNTS, DEMO_SEED),
        [wd.experts_data],
    )
    routing_stats, fp_routing = r.run(
        "routing",
        "build the routing dataset",
        [fp_synth, cfg_files["dataset.yaml"].read_text()],
        lambda: _routing_checked(cfg_files["dataset.yaml"], wd.routing_file, root),
        [wd.routing_file],
    )
    _, fp_prep = r.run(
        "preprocess",
        "preprocess the routing dataset",
        [fp_routing, fp_model, router_cfg.image.__dict__],
        lambda: stages.data_preprocess(
            wd.routing_file,
            prep_router,
            router_cfg.base_model,
            "router",
            wd.routing_file.parent / LABEL_MAP_FILE,
            router_cfg.image.min_pixels,
            router_cfg.image.max_pixels,
            root,
            workers=DEMO_WORKERS,
        ),
        [prep_router],
    )
    fp = {"model": fp_model, "synth": fp_synth, "routing": fp_routing, "preprocess": fp_prep}
    return fp, routing_stats


def _read_configs(wd: WorkDir) -> tuple[dict[str, Path], Path, object]:
    """Copy the default configs into WORKDIR/config (first run) and read every one of them, so a broken
    edit fails before the first stage: the config paths, the experts' output folder and the router
    config."""
    from .config import DatasetConfig, LorasConfig, RouterConfig, load_config

    write_default_configs(wd.config_dir)
    cfg_files = {n: wd.config_dir / n for n in CONFIG_FILES}
    load_config(cfg_files["dataset.yaml"], DatasetConfig)
    experts_ckpt = Path(load_config(cfg_files["loras.yaml"], LorasConfig).output_dir)
    return cfg_files, experts_ckpt, load_config(cfg_files["router.yaml"], RouterConfig)


def _router_summary(report: dict, router: dict) -> dict:
    """The router's headline figures: test accuracy, top-2, macro F1, ECE, validation accuracy."""
    return {
        "test_accuracy": report["accuracy"],
        "top2_accuracy": report["top_k"].get("2"),
        "macro_f1": report["macro_f1"],
        "ece": report["calibration"]["ece"],
        "n_test": report["n"],
        "best_val_accuracy": router["best"]["val_accuracy"],
        "consistency": report.get("consistency"),
    }


def _experts_summary(experts: dict) -> dict:
    """Each expert's task metric against its base model's."""
    return {
        n: {
            "metric": e["metric"],
            "value": e["value"],
            "base_value": e["base_value"],
            "beats_base": e["value"] is not None and e["value"] > e["base_value"],
        }
        for n, e in experts.items()
    }


def _routing_checked(config: Path, output: Path, root: Path) -> dict:
    """Build the routing dataset, then verify it with `mole data check` (no leak, labels, images)."""
    from . import stages

    stats = stages.data_routing(config, output, root)
    stats["check"] = {"violations": len(stages.data_check(output.parent, root)["violations"])}
    return stats


def _demo_inference(wd: WorkDir, out: Path) -> dict:
    """Route + generate for a few test requests per expert; returns routing accuracy and samples."""
    from . import stages
    from .data.records import load_jsonl_samples
    from .infer.stacked import write_results

    test = [s for s in load_jsonl_samples(wd.routing_file) if s.split == "test"]
    picked, per = [], {}
    for s in test:
        if per.get(s.expert, 0) < DEMO_INFER_PER_EXPERT:
            picked.append(s)
            per[s.expert] = per.get(s.expert, 0) + 1
    results = stages.infer(str(wd.deploy_dir), picked, str(wd.root))
    for s, res in zip(picked, results, strict=True):
        res["true_expert"], res["reference"] = s.expert, s.answer
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(results, out)
    correct = sum(res["expert"] == res["true_expert"] for res in results)
    return {
        "requests": len(results),
        "routed_correctly": correct,
        "examples": [
            {k: res[k] for k in ("id", "expert", "probability", "output", "reference")}
            for res in results[: len(per)]
        ],
    }


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_summary(console, summary: dict) -> None:
    from rich.table import Table

    t = Table(title="Mole-Trainer demo summary")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_column("untrained base", justify="right")
    router = summary["router"]
    t.add_row("router test accuracy", _num(router["test_accuracy"]), "")
    t.add_row("router top-2 accuracy", _num(router["top2_accuracy"]), "")
    for name, e in summary["experts"].items():
        t.add_row(f"{name}: {e['metric']}", _num(e["value"]), _num(e["base_value"]))
    st = summary["stacked_inference"]
    t.add_row("stacked inference routed correctly", f"{st['routed_correctly']}/{st['requests']}", "")
    for stage, sec in summary["stage_seconds"].items():
        t.add_row(f"seconds: {stage}", "skipped" if stage in summary["skipped_stages"] else f"{sec:.1f}", "")
    console.print(t)
    console.print(f"history report: {summary['artifacts']['history_report']}")
    console.print(f"summary: {Path(summary['artifacts']['history']).parent / SUMMARY_FILE}")
