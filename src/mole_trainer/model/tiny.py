"""A tiny Qwen3-VL built from a config, with a locally trained byte-level BPE tokenizer or a given processor.

The result is saved with save_pretrained and loads through exactly the code path of a real
`Qwen/Qwen3-VL-8B-Instruct` directory (AutoProcessor + Qwen3VLForConditionalGeneration), so the
rest of the tool has no tiny-model special cases. Weights are random (fixed seed): it is a stand-in
for tests and the CPU demo on machines with no model hub. Built around a real processor folder
(`processor_dir`), it keeps that processor whole (tokenizer, vocabulary, chat template, special-token
ids, patch and merge sizes) and only the network is tiny.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from .chat import CHAT_TEMPLATE, END_OF_TURN, PAD_TOKEN, QWEN_SPECIAL_TOKENS

# Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A small general corpus: GUI words, tool-call syntax, numbers, months. It only shapes the merges;
# byte-level BPE encodes any text whatever the corpus.
_CORPUS_LINES = [
    "Click on the 14th. Select March 14, 2025. Open the calendar and pick the first Monday.",
    'click(x=512, y=604) type(x=120, y=330, text="alice") scroll(direction="down")',
    "Log in as jdoe. Enter the password. Press the Sign in button. Forgot password? Remember me. Cancel",
    "Username Password Login Sign in Submit OK Cancel Apply Close Save Open Next Back Settings Help",
    "Which series is highest? What is the value of Q3? Revenue Costs Profit Sales Users Visits",
    "January February March April May June July August September October November December",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday Mon Tue Wed Thu Fri Sat Sun",
    "Read the text in the image. Transcribe this receipt. What does the note say? Total Subtotal Tax",
    "Coffee Tea Bread Milk Butter Cheese Apple Orange Lemon Sugar Water Juice Cake Soup Salad",
    "The quick brown fox jumps over the lazy dog. A router picks one expert for each request.",
    "Which expert should handle this request? Answer with one name: calendar, login-window, ocr.",
    "chart-screen calendar login-window ocr expert router routing label answer request image",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31",
    "$ 3.50 12.99 100 250 1000 45% 2024 2025 2026 12:30 PM AM #1 @ & * ( ) [ ] { } < > / \\ | _ - + =",
    "Hello, world! Thank you. Please wait... Error: invalid input. Warning: disk almost full.",
]


@dataclass
class TinySpec:
    """Sizes of the tiny model; the defaults train a router and experts on a CPU in minutes."""

    vocab_size: int = 1024  # BPE vocabulary cap before Qwen's special tokens (the small corpus stops earlier)
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    vision_depth: int = 2
    vision_hidden: int = 64
    vision_intermediate: int = 128
    vision_heads: int = 4
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 64 * 64
    max_pixels: int = 448 * 448
    seed: int = 0
    # Weights drawn with std 0.1 rather than Qwen's 0.02: with a tied embedding of std 0.02 the
    # frozen LM head cannot produce a confident token at hidden size 256 (the loss floors near
    # 4.4 nats whatever the LoRA learns); 0.1 leaves LoRA room to learn the router and experts.
    init_std: float = 0.1
    mrope_section: list[int] = field(default_factory=lambda: [6, 5, 5])  # sums to head_dim / 2


# Sizes for a tiny model around a real processor: with Qwen's 151,936-entry vocabulary the tied
# embedding (vocabulary x hidden) dominates; hidden 64 keeps it at 39 MB in float32 and a CPU step fast.
REAL_VOCAB_SIZES = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16, "mrope_section": [4, 2, 2]}

# Qwen3VLConfig fields that must hold the processor's special-token ids (its defaults are Qwen's ids)
SPECIAL_ID_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def train_tokenizer(spec: TinySpec):
    """Train the byte-level BPE and wrap it as Qwen2's tokenizer class with Qwen's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_CORPUS_LINES * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=END_OF_TURN,
        pad_token=PAD_TOKEN,
        errors="replace",
    )
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_processor(spec: TinySpec, tokenizer):
    """A full Qwen3VLProcessor (image + video processors, tokenizer, chat template)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=spec.patch_size,
        merge_size=spec.merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=spec.patch_size, merge_size=spec.merge_size, temporal_patch_size=spec.temporal_patch_size
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def load_given_processor(processor_dir: str | Path):
    """The processor of a model folder (tokenizer, chat template, image/video processors), as saved there."""
    root = Path(processor_dir)
    if not root.is_dir():
        raise UserError(f"--processor {root}: not a folder")
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(root)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"--processor {root}: cannot load a processor there ({exc})") from None
    missing = [f for f in SPECIAL_ID_FIELDS if getattr(processor, f, None) is None]
    if missing or not hasattr(processor, "image_processor"):
        raise UserError(
            f"--processor {root}: {type(processor).__name__} is not a Qwen3-VL processor "
            f"(no {', '.join(missing) or 'image processor'})"
        )
    if not processor.chat_template:
        raise UserError(f"--processor {root}: no chat template (chat_template.json or .jinja)")
    return processor


def padded_vocab(n_tokens: int) -> int:
    """An embedding size for `n_tokens` tokens, padded to a multiple of 64 like real checkpoints."""
    return n_tokens + (-n_tokens % 64)


def processor_vocab_size(processor_dir: str | Path, processor) -> int:
    """The vocabulary size of a model around a processor folder.

    It is the folder's config.json's (real checkpoints pad it beyond the tokenizer), else the
    tokenizer's length padded. The config's special-token ids, where it has them, must be the
    tokenizer's: a folder that disagrees with itself is refused.
    """
    path = Path(processor_dir) / "config.json"
    n_tokens = len(processor.tokenizer)
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    for name in SPECIAL_ID_FIELDS:
        if name in config and config[name] != getattr(processor, name):
            raise UserError(
                f"{path}: {name} is {config[name]} but the tokenizer gives {getattr(processor, name)}"
            )
    vocab = config.get("text_config", {}).get("vocab_size", config.get("vocab_size"))
    if vocab is None:
        return padded_vocab(n_tokens)
    if vocab < n_tokens:
        raise UserError(f"{path}: vocab_size {vocab} is smaller than the tokenizer's {n_tokens} tokens")
    return int(vocab)


def spec_for_processor(spec: TinySpec, processor) -> TinySpec:
    """`spec` with the image processor's patch, merge and temporal sizes and pixel budget."""
    from dataclasses import replace

    ip = processor.image_processor
    return replace(
        spec,
        patch_size=ip.patch_size,
        merge_size=ip.merge_size,
        temporal_patch_size=ip.temporal_patch_size,
        min_pixels=ip.size["shortest_edge"],
        max_pixels=ip.size["longest_edge"],
    )


def build_config(spec: TinySpec, processor, vocab_size: int):
    """The Qwen3VLConfig; special-token ids come from the processor's tokenizer (never Qwen's defaults)."""
    from transformers import Qwen3VLConfig

    assert sum(spec.mrope_section) * 2 == spec.head_dim, "mrope_section must sum to head_dim / 2"
    tok = processor.tokenizer
    text = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": list(spec.mrope_section),
            "mrope_interleaved": True,
        },
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=spec.init_std,
    )
    vision = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=spec.merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        out_hidden_size=spec.hidden_size,
        deepstack_visual_indexes=list(range(min(spec.vision_depth, spec.num_layers))),
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        **{name: getattr(processor, name) for name in SPECIAL_ID_FIELDS},
        tie_word_embeddings=True,
        initializer_range=spec.init_std,
    )


def generation_config(tokenizer):
    """Greedy decoding that stops at the tokenizer's end of turn (eos) or its padding token."""
    from transformers import GenerationConfig

    eos = list(dict.fromkeys([tokenizer.eos_token_id, tokenizer.pad_token_id]))
    return GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, do_sample=False)


def build_tiny_model(
    out_dir: str | Path, spec: TinySpec | None = None, processor_dir: str | Path | None = None
) -> Path:
    """Build and save the tiny Qwen3-VL (model, processor, generation config) into `out_dir`.

    With `processor_dir`, the model is built around that folder's processor (its tokenizer and
    vocabulary, chat template, special tokens, patch/merge sizes; the vocabulary size from its
    config.json when there is one); otherwise around a locally trained tokenizer.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    spec = spec or TinySpec()
    if processor_dir is not None:
        if Path(out_dir).resolve() == Path(processor_dir).resolve():
            # save_pretrained would replace the folder's config and weight shards with the tiny model's
            raise UserError(f"{out_dir}: --out must not be the --processor folder itself")
        processor = load_given_processor(processor_dir)
        spec = spec_for_processor(spec, processor)
        vocab_size = processor_vocab_size(processor_dir, processor)
    else:
        tokenizer = train_tokenizer(spec)
        processor = build_processor(spec, tokenizer)
        vocab_size = padded_vocab(len(tokenizer))
    config = build_config(spec, processor, vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config = generation_config(processor.tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = {
        **asdict(spec),
        "model_vocab_size": vocab_size,
        "processor": str(processor_dir) if processor_dir is not None else None,
    }
    (out / "mole_tiny_spec.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
