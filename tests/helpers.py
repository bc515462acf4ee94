"""Small settings for end-to-end tests: the demo's configs with tiny sizes merged in."""

from mole_trainer.configs import write_configs

NAMES = ["calendar", "chart-screen", "login-window", "ocr"]
SMALL_TRAIN = {"lr": 0.003, "steps": 4, "batch_size": 4, "eval_every": 2, "warmup_ratio": 0.0, "patience": 0}
SMALL_LORA = {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}
SMALL_IMAGE = {"min_pixels": 4096, "max_pixels": 20000}
SMALL = {
    "dataset.yaml": {"train_per_expert": 8, "val_per_expert": 2, "test_per_expert": 3},
    "loras.yaml": {"image": SMALL_IMAGE, "lora": SMALL_LORA, "train": SMALL_TRAIN, "eval_records": 2},
    "router.yaml": {"image": SMALL_IMAGE, "lora": SMALL_LORA, "train": SMALL_TRAIN},
}


def write_small_configs(config_dir) -> None:
    """The demo's three configs with test sizes, in `config_dir` (WORKDIR/config layout)."""
    write_configs(config_dir, SMALL, every_expert={"loras.yaml": {"max_new_tokens": 4}})
