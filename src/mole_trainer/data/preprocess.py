"""Preprocessing for Qwen3-VL: chat template, pixel budget, label masks, cached on disk.

An example is a dict of tensors (input_ids, attention_mask, mm_token_type_ids, labels,
pixel_values, image_grid_thw); the cache stores the processor's resized uint8 pixels (compressed)
and rebuilds bit-equal pixel_values when an example is read (data/pixels.py). Expert examples
supervise every assistant turn of the conversation (its content and end-of-turn token, found from
the chat template's own rendering); the system prompt, user turns, role headers and images are
masked with -100. Router examples supervise the expert name after the router prompt. The cache
folder holds each split as shards of SHARD_RECORDS input records (`<split>-00000.pt`, ...),
`meta.json` describing what made it (task, base, processor digest, pixel budget, counts) and
`rejects.jsonl` (records left out, and why), so training steps never re-run the processor; only
generation-based scoring (validation routing accuracy, expert task metrics) re-encodes the prompts
of the records it scores. Shards are encoded in parallel worker processes when asked; the files do
not depend on the number of workers.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import replacing
from ..errors import UserError
from ..layout import LABEL_MAP_FILE, PREPROCESS_META_FILE, PREPROCESS_SHARD_FILE, REJECTS_FILE, SPLITS
from ..model.chat import end_of_turn
from ..router_prompt import label_names, router_messages
from .pixels import COMPACT, PLAIN, RAW_PIXEL_KWARGS, PixelSpec, pack_example, same_example, unpack_example
from .records import Reject, Sample, write_jsonl

IGNORE_INDEX = -100
# v2: splits in shards, image paths relative to the cache; v3: resized uint8 pixels (zlib), narrow ints
CACHE_FORMAT = "mole-preprocessed-v3"
FORMAT_PREFIX = "mole-preprocessed-"  # every version's format starts so: an older cache is recognised
TASKS = ("sft", "router")


def load_images(sample: Sample):
    """Open a sample's images as RGB PIL images (images already decoded, e.g. a server's, are used as they are)."""
    from PIL import Image

    out = []
    for p in sample.images:
        if isinstance(p, Image.Image):
            out.append(p if p.mode == "RGB" else p.convert("RGB"))
            continue
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except Exception as exc:
            raise UserError(f"{sample.source}: image '{p}' cannot be decoded ({exc})") from None
    return out


def prompt_messages(sample: Sample, task: str, names: list[str] | None) -> list[dict]:
    """The user turn the model sees for this task (the expert's own, or the router prompt)."""
    if task == "router":
        return router_messages(sample.instruction, len(sample.images), names)
    return sample.messages(with_answer=False)


def target_text(sample: Sample, task: str) -> str:
    """What the model must answer: the expert name for the router, the assistant answer otherwise."""
    return sample.expert if task == "router" else sample.answer


def encode_prompt(processor, messages: list[dict], images) -> dict:
    """Processor output for a prompt ending in the assistant header (what generation starts from)."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=images or None, return_tensors="pt")


class TemplateError(UserError):
    """The chat template does not render a conversation turn by turn: labels cannot be placed."""


def supervised_text(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans to supervise) of a conversation ending with an assistant turn.

    Every assistant turn is supervised: its content and its end-of-turn token, as the template
    renders them. The spans come from the template itself: the rendering of the turns before an
    assistant turn with the generation prompt must be a prefix of the rendering that includes it,
    which must be a prefix of the whole conversation's; a template that does not render
    incrementally raises TemplateError. The text ends with the last end-of-turn token.
    """

    def render(msgs: list[dict], generation: bool) -> str:
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)

    full = render(messages, False)
    eot = end_of_turn(processor.tokenizer)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, upto = render(messages[:k], True), render(messages[: k + 1], False)
        if not (upto.startswith(head) and full.startswith(upto)):
            raise TemplateError(
                f"the chat template does not render turn by turn (turn {k}: the prompt before an "
                "assistant turn is not a prefix of the conversation), so label masks cannot be placed"
            )
        body = upto[len(head) :]
        end = body.rfind(eot)
        if end < 0 or body[end + len(eot) :].strip():
            raise TemplateError(
                f"the chat template does not end assistant turn {k} with {eot}, so label masks "
                "cannot be placed"
            )
        spans.append((len(head), len(head) + end + len(eot)))
    if not spans:
        raise ValueError("the conversation has no assistant turn to supervise")
    return full[: spans[-1][1]], spans


def encode_conversation(processor, messages: list[dict], images, raw_pixels: bool = False) -> dict[str, Any]:
    """Tokenise a conversation; labels are the tokens of every assistant turn (content and end of
    turn), -100 everywhere else (system prompt, user turns, role headers, images).

    `raw_pixels`: pixel_values are the resized uint8 patches, before rescale and normalise.
    """
    text, spans = supervised_text(processor, messages)
    kwargs = RAW_PIXEL_KWARGS if raw_pixels and images else {}
    enc = processor(text=[text], images=images or None, return_tensors="pt", **kwargs)
    ids = enc["input_ids"][0]
    # the processor repeats each image's pad token once per visual token; collapse those runs to
    # line the ids up with the tokenizer's ids of the same text, where character spans are found
    full = ids.tolist()
    image_id = processor.image_token_id
    keep = [i for i, t in enumerate(full) if not (t == image_id and i and full[i - 1] == image_id)]
    tok = processor.tokenizer
    plain = tok(text)["input_ids"]
    if [full[i] for i in keep] != plain:
        raise ValueError("the processor's tokens differ from the tokenizer's for this record")
    labels = ids.new_full(ids.shape, IGNORE_INDEX)
    for start, end in spans:
        a, b = tok(text[:start])["input_ids"], tok(text[:end])["input_ids"]
        if plain[: len(a)] != a or plain[: len(b)] != b:
            raise ValueError(
                "an assistant turn does not tokenise the same alone as inside the conversation "
                "(its first or last characters merge with the turn header's tokens)"
            )
        for c in range(len(a), len(b)):
            labels[keep[c]] = full[keep[c]]
    example = {k: v[0] for k, v in enc.items() if k not in ("pixel_values", "image_grid_thw")}
    example["labels"] = labels
    if "pixel_values" in enc:
        example["pixel_values"] = enc["pixel_values"]
        example["image_grid_thw"] = enc["image_grid_thw"]
    return example


def encode_example(
    processor, messages: list[dict], answer: str, images, raw_pixels: bool = False
) -> dict[str, Any]:
    """Tokenise a prompt and its answer; only the answer and its end-of-turn token are supervised."""
    answer_turn = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    return encode_conversation(processor, [*messages, answer_turn], images, raw_pixels)


def encode_sample(
    processor, sample: Sample, task: str, names: list[str] | None = None, raw_pixels: bool = False
) -> dict[str, Any]:
    """One training example for a sample (task 'sft' for experts, 'router' for the router).

    Experts train on the whole conversation (system prompt kept, every assistant turn supervised);
    the router on its prompt (router_messages of the router view) and the expert name.
    `raw_pixels`: uint8 pixel patches before rescale/normalise (what the cache stores).
    """
    try:
        if task == "router":
            msgs = prompt_messages(sample, task, names)
            return encode_example(processor, msgs, target_text(sample, task), load_images(sample), raw_pixels)
        if sample.conversation()[-1]["role"] != "assistant":
            raise ValueError("the conversation does not end with an assistant turn")
        messages = sample.messages(with_answer=True)
        return encode_conversation(processor, messages, load_images(sample), raw_pixels)
    except TemplateError:
        raise
    except ValueError as exc:
        raise UserError(f"{sample.source}: cannot encode this record ({exc})") from None


def pad_values(pad_id: int) -> dict:
    """What `collate` pads each per-token field with."""
    return {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}


def concat_batches(batches: list[dict], pad_id: int) -> dict:
    """Right-padded batches (from `collate`) joined into one: the batch `collate` makes of all their rows.

    Works where the tensors are (each batch's on one device), so batches already copied to a GPU are
    joined there. Every batch must hold the same per-token fields.
    """
    import torch

    if len(batches) == 1:
        return dict(batches[0])
    fill = pad_values(pad_id)
    keys = [k for k in fill if k in batches[0]]
    if any([k for k in fill if k in b] != keys for b in batches):
        raise ValueError(f"batches with different fields cannot be joined: {[sorted(b) for b in batches]}")
    longest = max(b[keys[0]].shape[1] for b in batches)
    out: dict = {}
    for key in keys:
        rows = []
        for b in batches:
            t = b[key]
            pad = torch.full((t.shape[0], longest - t.shape[1]), fill[key], dtype=t.dtype, device=t.device)
            rows.append(torch.cat([t, pad], dim=1))
        out[key] = torch.cat(rows)
    return _join_images(out, batches)


def _join_images(batch: dict, parts: list[dict]) -> dict:
    """`batch` with the image patches and grids of `parts` (examples or batches) concatenated in order."""
    import torch

    with_images = [p for p in parts if "pixel_values" in p]
    if with_images:
        batch["pixel_values"] = torch.cat([p["pixel_values"] for p in with_images])
        batch["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in with_images])
    return batch


def collate(examples: list[dict], pad_id: int, padding_side: str = "right") -> dict:
    """Pad a list of examples into one batch (pixel patches concatenated in order)."""
    import torch

    longest = max(len(e["input_ids"]) for e in examples)
    fill = pad_values(pad_id)
    batch: dict[str, Any] = {}
    for key, value in fill.items():
        if key not in examples[0]:
            continue
        rows = []
        for e in examples:
            t = e[key]
            pad = torch.full((longest - len(t),), value, dtype=t.dtype)
            rows.append(torch.cat([t, pad]) if padding_side == "right" else torch.cat([pad, t]))
        batch[key] = torch.stack(rows)
    return _join_images(batch, examples)


def sample_to_dict(s: Sample, base: Path | None = None) -> dict:
    """Plain form of a sample kept beside its encoding (generation-based evaluation needs it).

    With `base` (the cache folder), image paths are stored relative to it, so a work directory
    that moves as a whole keeps a working cache; load_preprocessed resolves them again.
    """
    return {
        "id": s.id,
        "images": [_relative(p, base) for p in s.images],
        "instruction": s.instruction,
        "answer": s.answer,
        "expert": s.expert,
        "metadata": s.metadata,
        "source": s.source,
        "system": s.system,
        "turns": s.turns,
    }


def _relative(path: Path, base: Path | None) -> str:
    if base is None:
        return str(path)
    try:
        return os.path.relpath(path, base.resolve())
    except ValueError:  # another drive (Windows): no relative form
        return str(path)


def sample_from_dict(d: dict) -> Sample:
    """Inverse of sample_to_dict."""
    return Sample(
        id=d["id"],
        images=[Path(p) for p in d["images"]],
        instruction=d["instruction"],
        answer=d["answer"],
        metadata=d["metadata"],
        expert=d["expert"],
        source=d["source"],
        system=d.get("system"),
        turns=d.get("turns"),  # absent in caches written before conversations were kept
    )


# ---------------------------------------------------------------------------------------------------------
# the cache writer: shards of SHARD_RECORDS input records, encoded in-process or by a process pool

SHARD_RECORDS = 32  # input records per shard file (and per pool task); fixed, so output never depends on N

# set in each worker process (and in the parent for in-process work): the processor and what to encode
_WORKER: dict[str, Any] = {}


def _start_method() -> str:
    """'fork' where the platform has it (workers inherit the loaded processor at no cost), else 'spawn'.

    Forking is safe here: preprocessing never touches CUDA, the pool is created before any progress
    thread starts, and every worker runs torch on one thread (no OpenMP pool inherited in use). The
    output lock's heartbeat thread (locking.py) only sleeps or rewrites the lock file, which the
    workers never touch.
    """
    import multiprocessing as mp

    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _init_worker(model: str, min_pixels: int | None, max_pixels: int | None, task: str, names) -> None:
    import torch

    torch.set_num_threads(1)
    if _WORKER.get("key") != (model, min_pixels, max_pixels):  # spawn: nothing inherited, load once
        from ..model.loading import load_processor

        _WORKER["processor"] = load_processor(model, min_pixels, max_pixels)
        _WORKER["key"] = (model, min_pixels, max_pixels)
    _WORKER.update(task=task, names=names, spec=PixelSpec.of(_WORKER["processor"].image_processor))


def _encode_stored(processor, sample: Sample, task: str, names) -> tuple[dict, str]:
    """(stored example, storage mode) of a sample: compact where it rebuilds the processor's output.

    Until one example with an image has rebuilt bit-equal to the processor's own encoding, each
    example is checked against a second, ordinary encoding; then compact storage is trusted for the
    rest of this process. A processor whose arithmetic the rebuild does not reproduce (another
    image-processor backend) gets the exact float storage instead, for every later example too.
    """
    spec, mode = _WORKER["spec"], _WORKER.get("storage")
    if mode == PLAIN:
        return pack_example(encode_sample(processor, sample, task, names), spec, PLAIN), PLAIN
    raw = encode_sample(processor, sample, task, names, raw_pixels=True)
    try:
        stored = pack_example(raw, spec, COMPACT)
    except ValueError:
        stored = None
    if mode != COMPACT or stored is None:
        fresh = encode_sample(processor, sample, task, names)
        if stored is None or not same_example(unpack_example(stored, spec), fresh):
            _WORKER["storage"] = PLAIN
            return pack_example(fresh, spec, PLAIN), PLAIN
        if "pixel_values" in fresh:
            _WORKER["storage"] = COMPACT
    return stored, COMPACT


def _encode_shard(job: tuple[str, Path, list[Sample]], progress=None) -> tuple[int, list[dict], list[str]]:
    """Encode one shard and save it; return (examples written, rejects as dicts, storage modes used)."""
    import torch

    split, dest, samples = job
    processor, task, names = _WORKER["processor"], _WORKER["task"], _WORKER["names"]
    examples, kept, rejects, modes = [], [], [], set()
    for s in samples:
        try:
            example, mode = _encode_stored(processor, s, task, names)
            examples.append(example)
            modes.add(mode)
            kept.append(sample_to_dict(s, dest.parent))
        except TemplateError:
            raise  # the template's fault, not the record's: every record would fail the same way
        except UserError as exc:
            reason = str(exc).removeprefix(f"{s.source}: ")
            rejects.append(Reject(s.file or s.source, s.line, s.id, reason, split).to_dict())
        if progress:
            progress(1)
    with replacing(dest) as tmp:
        torch.save({"examples": examples, "samples": kept}, tmp)
    return len(examples), rejects, sorted(modes)


def _run_jobs(jobs, workers: int, init: tuple, take, progress, start_method: str | None) -> None:
    """Encode every shard job in order (in-process for one worker, else in a process pool)."""
    import torch

    if workers == 1:
        if progress:
            progress(0)
        # one thread, as in the workers: intra-op threads barely help on one image at a time, and
        # their spin-waits collapse throughput when other processes share the cores
        threads = torch.get_num_threads()
        _init_worker(*init)
        try:
            for job in jobs:
                take(job, _encode_shard(job, progress))
        finally:
            torch.set_num_threads(threads)
        return

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context(start_method or _start_method())
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init) as pool:
        futures = [pool.submit(_encode_shard, job) for job in jobs]
        if progress:  # only now: the workers are forked, so no progress thread runs at fork time
            progress(0)
        try:
            for job, fut in zip(jobs, futures, strict=True):  # in order: deterministic strict errors
                take(job, fut.result())
                if progress:
                    progress(len(job[2]))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def preprocess_splits(
    splits: dict[str, list[Sample]],
    output: str | Path,
    model: str,
    task: str = "sft",
    label_map: dict[str, int] | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    progress=None,
    source: str | None = None,
    workers: int = 1,
    strict: bool = False,
    rejects: list[Reject] | None = None,
    start_method: str | None = None,
) -> dict:
    """Encode every split into a cache folder (shards + meta.json + rejects.jsonl); returns the meta.

    `workers` > 1 encodes shards in that many processes; the files written are the same whatever
    the number. A record that cannot be encoded (unreadable image, ...) is left out and listed in
    rejects.jsonl with the loader's `rejects`, unless `strict`, where it raises a UserError.
    `progress(done, total)` is called as records are encoded (per record in-process, per shard
    with workers).
    """

    from ..model.loading import load_processor

    names = _check_task(splits, task, label_map, workers)
    loader_rejects = [r.to_dict() for r in rejects or []]
    if strict and loader_rejects:
        raise UserError(Reject(**loader_rejects[0]).message())
    processor = load_processor(model, min_pixels, max_pixels)
    spec = PixelSpec.of(processor.image_processor)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.pt"), out / PREPROCESS_META_FILE, out / REJECTS_FILE]:
        old.unlink(missing_ok=True)  # a previous run's shards must not mix with this one's
    jobs, shards = _shard_jobs(splits, out)

    init = (model, min_pixels, max_pixels, task, names)
    _WORKER.update(processor=processor, key=(model, min_pixels, max_pixels))
    counts = dict.fromkeys(SPLITS, 0)
    encode_rejects: list[dict] = []
    storage: set[str] = set()

    def take(job, result) -> None:
        n, bad, modes = result
        counts[job[0]] += n
        storage.update(modes)
        if strict and bad:
            raise UserError(Reject(**bad[0]).message())
        encode_rejects.extend(bad)

    total, done = sum(len(job[2]) for job in jobs), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    try:
        _run_jobs(jobs, workers, init, take, advance if progress else None, start_method)
    finally:
        _WORKER.clear()

    all_rejects = sorted(loader_rejects + encode_rejects, key=lambda r: (r["file"], r["line"] or 0))
    write_jsonl(out / REJECTS_FILE, all_rejects)
    if PLAIN in storage:
        print(
            f"warning: {out}: the processor's pixels cannot be rebuilt from the resized image "
            "(another image-processor backend?); the cache stores float32 patches, tens of times larger",
            file=sys.stderr,
        )
    meta = _cache_meta(processor, spec, model, task, counts, storage, all_rejects, shards, label_map, source)
    (out / PREPROCESS_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if label_map:
        (out / LABEL_MAP_FILE).write_text(json.dumps(label_map, indent=2) + "\n")
    if not meta["records"]["accepted"] and all_rejects:
        raise UserError(
            f"no usable records: all {len(all_rejects)} were rejected (reasons in {out / REJECTS_FILE})"
        )
    return meta


def _check_task(
    splits: dict[str, list[Sample]], task: str, label_map: dict[str, int] | None, workers: int
) -> list[str] | None:
    """Check the task, the worker count and (router task) that every record's expert is in the label
    map; the label names of a router task, else None."""
    if task not in TASKS:
        raise UserError(f"unknown task '{task}' (expected one of {', '.join(TASKS)})")
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    if task != "router":
        return None
    if not label_map:
        raise UserError("router preprocessing needs a label map")
    names = label_names(label_map)
    for samples in splits.values():
        for s in samples:
            if s.expert not in label_map:
                raise UserError(
                    f"{s.source}: expert '{s.expert}' is not in the label map ({', '.join(names)})"
                )
    return names


def _shard_jobs(splits: dict[str, list[Sample]], out: Path) -> tuple[list[tuple], dict[str, list[str]]]:
    """(split, shard path, samples) jobs of SHARD_RECORDS records each (one, maybe empty, at least per
    split) and the shard file names of each split."""
    jobs, shards = [], {split: [] for split in SPLITS}
    for split in SPLITS:
        samples = splits.get(split, [])
        for index, start in enumerate(range(0, max(len(samples), 1), SHARD_RECORDS)):
            name = PREPROCESS_SHARD_FILE.format(split=split, index=index)
            shards[split].append(name)
            jobs.append((split, out / name, samples[start : start + SHARD_RECORDS]))
    return jobs, shards


def _cache_meta(
    processor, spec, model, task, counts, storage, all_rejects, shards, label_map, source
) -> dict:
    """The cache's meta.json: pixel spec, processor identity, record counts that reconcile, shards."""
    from ..model.loading import processor_digest

    size = processor.image_processor.size
    meta = {
        "temporal_patch_size": spec.temporal_patch_size,
        "pixels": {**spec.to_dict(), "storage": sorted(storage)},
        "format": CACHE_FORMAT,
        "task": task,
        "model": model,
        "processor_digest": processor_digest(model),
        "min_pixels": size["shortest_edge"],
        "max_pixels": size["longest_edge"],
        "counts": counts,
        "records": {
            "input": sum(counts.values()) + len(all_rejects),
            "accepted": sum(counts.values()),
            "rejected": len(all_rejects),
        },
        "rejected": {sp: sum(1 for r in all_rejects if r["split"] == sp) for sp in (*SPLITS, None)},
        "shards": shards,
        "label_map": label_map,
        "source": source,
    }
    meta["rejected"]["unknown"] = meta["rejected"].pop(None)
    return meta


def dataset_digest(root: str | Path) -> str:
    """sha256 over every file below a dataset folder (names and bytes, streamed), for cache invalidation.

    For `DIR#NAME` (a LLaMA-Factory dataset by name), the folder's files and the selection.
    """
    from ..hashing import folder_digest
    from ..layout import LOCK_FILE
    from .formats import split_dataset_path

    root, selection = split_dataset_path(root)
    # an output lock (and its temporary files) is not data: a run writing the folder must not change it
    salt = b"" if selection is None else f"#{selection}\0".encode()
    return folder_digest(root, salt, skip_prefix=LOCK_FILE)


def check_compatible(meta: dict, task: str, base_model: str, image, where: str | Path) -> None:
    """Preprocessed data must match the training run: task, tokenizer/processor, pixel budget."""
    from ..model.loading import processor_digest

    if meta["task"] != task:
        raise UserError(
            f"{where}: preprocessed for task '{meta['task']}', expected '{task}' "
            f"(run 'mole data preprocess --task {task}')"
        )
    if meta.get("processor_digest") != processor_digest(base_model):
        raise UserError(
            f"{where}: preprocessed with the processor of {meta['model']}, which differs from "
            f"{base_model}'s; preprocess again with --model {base_model}"
        )
    check_pixels(meta, image, where)


def check_pixels(meta: dict, image, where: str | Path) -> None:
    """The pixel budget of preprocessed data must be the one the training config declares."""
    if (meta["min_pixels"], meta["max_pixels"]) != (image.min_pixels, image.max_pixels):
        raise UserError(
            f"{where}: preprocessed with min_pixels={meta['min_pixels']} max_pixels={meta['max_pixels']}, "
            f"but the config asks image.min_pixels={image.min_pixels} image.max_pixels={image.max_pixels}; "
            "re-run 'mole data preprocess' with the config's values or change the config"
        )


def is_preprocessed(path: str | Path) -> bool:
    """True when `path` is a cache folder written by preprocess_splits (of any version)."""
    meta = Path(path) / PREPROCESS_META_FILE
    if not meta.is_file():
        return False
    try:
        return str(json.loads(meta.read_text()).get("format", "")).startswith(FORMAT_PREFIX)
    except json.JSONDecodeError:
        return False


def load_preprocessed(path: str | Path, split: str) -> tuple[dict, dict]:
    """(metadata, split payload) of a cache folder; payload['examples'] is the list of examples."""
    import torch

    path = Path(path)
    if not is_preprocessed(path):
        raise UserError(
            f"{path}: not a preprocessed dataset (no {PREPROCESS_META_FILE}; run 'mole data preprocess')"
        )
    meta = json.loads((path / PREPROCESS_META_FILE).read_text())
    if meta["format"] != CACHE_FORMAT:
        raise UserError(
            f"{path}: preprocessed by an older mole-trainer (format {meta['format']}, this version reads "
            f"{CACHE_FORMAT}); run 'mole data preprocess' again on its input"
        )
    files = meta["shards"][split]
    stored, samples = [], []
    for name in files:
        f = path / name
        if not f.is_file():
            raise UserError(f"{path}: split file {f.name} is missing")
        # memory-mapped: tensors are read from disk when a batch touches them, not all at once
        part = torch.load(f, weights_only=True, mmap=True)
        stored += part["examples"]
        samples += part["samples"]
    base = path.resolve()
    for d in samples:  # relative image paths are relative to the cache folder
        d["images"] = [str(base / p) if not os.path.isabs(p) else p for p in d["images"]]
    payload = {"examples": CachedExamples(stored, PixelSpec.from_dict(meta["pixels"])), "samples": samples}
    return meta, payload


class CachedExamples(Sequence):
    """Examples of a cache split; each one's pixel_values are rebuilt when it is accessed.

    `__getitem__` returns what the processor gave for the record (the dict `collate` takes).
    """

    def __init__(self, stored: list[dict], spec: PixelSpec):
        self.stored, self.spec = stored, spec

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return unpack_example(self.stored[index], self.spec)
