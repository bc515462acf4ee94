"""One source for file and folder names shared by several stages (the work-directory layout)."""

from __future__ import annotations

from pathlib import Path

# files inside artifacts
LABEL_MAP_FILE = "label_map.json"
ROUTING_STATS_SUFFIX = ".stats.json"  # beside a routing JSONL: routing_data.jsonl -> routing_data.stats.json
MANIFEST_FILE = "manifest.json"
DEPLOY_METADATA_FILE = "deploy_metadata.json"
PREPROCESS_META_FILE = "meta.json"
REJECTS_FILE = "rejects.jsonl"  # records left out by preprocessing or conversion, and why
PREPROCESS_SHARD_FILE = "{split}-{index:05d}.pt"  # one shard of a preprocessed split
# what `datasets` save_to_disk writes: a DatasetDict folder, a single Dataset folder
HF_DATASET_DICT_FILE = "dataset_dict.json"
HF_DATASET_STATE_FILE = "state.json"
LLAMAFACTORY_INFO_FILE = "dataset_info.json"  # LLaMA-Factory's list of datasets in a folder
DATASET_NAME_SEP = "#"  # DIR#NAME: the dataset NAME of DIR/dataset_info.json
# where images extracted from datasets with embedded bytes go (default ~/.cache/mole-trainer)
CACHE_DIR_ENV = "MOLE_CACHE_DIR"
EXPERT_INFO_FILE = "expert_info.json"
ROUTER_INFO_FILE = "router_info.json"
TRAIN_LOG_FILE = "train_log.jsonl"
CHECKPOINTS_DIR = "checkpoints"  # inside a training output folder: best/ adapter + resumable step-N/
TENSORBOARD_DIR = "tensorboard"  # inside a training output folder: TensorBoard event files
EVAL_REPORT_FILE = "eval_report.json"
HISTORY_DB = "history.sqlite"
HISTORY_DIR = "history"  # beside HISTORY_DB: run records as JSONL files, one per writer (shared Volumes)
HISTORY_REPORT_FILE = "history_report.html"  # what `mole history report` writes by default
SUMMARY_FILE = "summary.json"
OCR_UNLABELED_FILE = "unlabeled.jsonl"  # OCR crops whose text is unknown (requests, not training records)
OCR_SUMMARY_FILE = "ocr_crops.json"  # what `mole data ocr-crops` did (counts, options, skipped images)
SPLITS = ("train", "val", "test")

# one writer per output folder (locking.py): the lock file inside the folder, and its lease
LOCK_FILE = ".mole-lock.json"
LOCK_LEASE_S = 60.0  # a lock not renewed for this long is stale where its pid cannot be checked
LOCK_SHARED_ENV = "MOLE_LOCK_SHARED"  # "1": the folder is on a shared Volume: judge every lock by its lease

# deployment layout (what the serving side reads)
DEPLOY_ROUTER_DIR = "routing/adapter"
DEPLOY_EXPERTS_DIR = "loras"
DEPLOY_EXPERT_ADAPTER = "adapter"
RELEASES_DIR = "releases"  # DEST/releases/<release-id>/: one immutable release each (releases.py)
CURRENT_FILE = "CURRENT"  # DEST/CURRENT: the release readers load
DEPLOY_CACHE_DIR = "deployments"  # below $MOLE_CACHE_DIR: downloaded releases, by manifest sha256


def cache_root() -> Path:
    """mole's cache folder: $MOLE_CACHE_DIR, else ~/.cache/mole-trainer."""
    import os

    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "mole-trainer")


class WorkDir:
    """Paths of one work directory: every stage of the pipeline writes below it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def model_dir(self) -> Path:
        return self.root / "model" / "tiny-qwen3-vl"

    @property
    def experts_data(self) -> Path:
        return self.root / "data" / "experts"

    @property
    def routing_file(self) -> Path:
        return self.root / "data" / "routing" / "routing_data.jsonl"

    @property
    def prep_dir(self) -> Path:
        return self.root / "prep"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def deploy_dir(self) -> Path:
        return self.root / "deploy"

    @property
    def history_db(self) -> Path:
        return self.root / HISTORY_DB

    @property
    def stages_dir(self) -> Path:
        return self.root / ".stages"
