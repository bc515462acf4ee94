"""The one inference engine: route a batch of requests, then answer them in ONE mixed-expert generate.

`Engine(deployment)` loads the base once and stacks the router and every expert of the deployment
into it (infer/stacked_lora.py: slot i = expert i in label order, then the router, then "no
adapter" for the base fallback). `Engine.run(requests)` works batch by batch:

1. Images: each request's images are decoded once (paths or PIL images), processed once per pixel
   budget (the router's and each expert's recorded min/max pixels), and run through the vision tower
   once per budget for the whole batch. The router prompt and the expert prompt of a request reuse
   the same image features (passed to the model as `mm_encoder_outputs`, which Qwen3-VL's forward
   and `generate` accept) whenever the budgets match: no LoRA touches the vision tower.
2. Routing: the requests without a forced expert are scored in one prefill + one packed label
   continuation (infer/scoring.py) with every row on the router's slot.
3. Generation: every request's row gets its expert's slot (or the fallback's when the route is below
   `min_probability`), and one `generate` call answers the whole batch. Rows keep their slots
   through decoding. Per row: its own max_new_tokens (a stopping criterion), its own temperature /
   top_p / seed (a logits processor that samples that row and leaves greedy rows alone) and an
   optional `on_text` callback receiving the text as it grows (streaming).

One worker must own an Engine: requests are batched by the caller (`mole infer`, the server's
micro-batcher, the Python API); the engine holds model state (row slots, rope deltas) per call.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..adapter_info import check_same_base, read_adapter_info
from ..data.preprocess import load_images as decode_images
from ..data.records import Sample
from ..errors import UserError
from ..router_prompt import label_names, router_messages
from .limits import TEMPERATURE_RANGE, check_image_size, check_seed, check_text, special_tokens

MAX_LISTED = 20  # refused requests named one by one in a batch's error (then a count)
BASE = "base"  # the fallback (or forced) answer with no adapter
TOP_K = 3  # routes reported per result


@dataclass
class Request:
    """One request: a Sample (its images may be paths or PIL images) and how to answer it."""

    sample: Sample
    expert: str | None = None  # forced expert (or "base"); None = route
    max_new_tokens: int | None = None  # None = the answering expert's recorded max_new_tokens
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # sampling seed (temperature > 0); None = random
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of the output


@dataclass
class Result:
    """What the engine answered for one request."""

    id: str
    expert: str  # who answered: an expert name, or "base"
    probability: float | None  # the router's probability of its top expert (None when forced)
    top_k: list[tuple[str, float]]  # the router's best routes, best first ([] when forced)
    probs: dict[str, float] | None  # the whole routing distribution (None when forced)
    forced: bool
    fallback: str | None  # the fallback that answered because the route was below min_probability
    output: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)
    timings: dict[str, float] = field(default_factory=dict)  # route_s, generate_s of the request's batch
    routed: str | None = None  # the router's top expert (None when forced)

    def to_dict(self) -> dict:
        """JSON-ready dict (top_k as [name, p] pairs)."""
        d = asdict(self)
        d["top_k"] = [list(t) for t in self.top_k]
        return d


def check_fallback(min_probability: float | None, fallback: str | None, names: Sequence[str]):
    """Validated (min_probability, fallback): a threshold needs a fallback, a fallback must exist."""
    if min_probability is not None and not 0.0 <= float(min_probability) <= 1.0:
        raise UserError(f"min_probability must be between 0 and 1, got {min_probability}")
    if fallback is not None and fallback != BASE and fallback not in names:
        raise UserError(f"unknown fallback '{fallback}' (expected '{BASE}' or one of: {', '.join(names)})")
    if min_probability is not None and fallback is None:
        raise UserError(f"min_probability needs a fallback: '{BASE}' or an expert ({', '.join(names)})")
    return (None if min_probability is None else float(min_probability)), fallback


def encode_text(processor, messages: list[dict], image_inputs: dict | None) -> dict:
    """Token ids (1-D tensors) of a prompt whose images were processed beforehand.

    The same ids `processor(text, images)` gives (each image tag expanded to its grid's tokens by
    the processor's own replacement), without processing the images again.
    """
    import torch

    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if image_inputs is not None:
        grid = image_inputs["image_grid_thw"]
        reps = [
            processor.replace_image_token({"image_grid_thw": grid}, image_idx=i) for i in range(len(grid))
        ]
        text = processor.get_text_with_replacements([text], reps)[0][0]
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"][0]
    types = torch.tensor(processor.create_mm_token_type_ids([ids])[0], dtype=ids.dtype)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types}
    if image_inputs is not None:
        out.update(image_inputs)
    return out


class _Vision:
    """One pixel budget's processed images for a batch, and their vision-tower features (run once)."""

    def __init__(
        self,
        processor,
        images: list[list],
        model,
        rows: set[int] | None = None,
        sources: list[str] | None = None,
    ):
        """`images[i]`: request i's decoded images; only the requests in `rows` (default all) are
        processed. `sources[i]` names request i in the error of an image the processor refuses."""
        self.model = model
        self.offsets = [0]
        for i, ims in enumerate(images):
            self.offsets.append(self.offsets[-1] + (len(ims) if rows is None or i in rows else 0))
        flat = [im for i, ims in enumerate(images) if rows is None or i in rows for im in ims]
        try:
            self.inputs = processor.image_processor(images=flat, return_tensors="pt") if flat else None
        except ValueError as exc:
            picked = [(i, ims) for i, ims in enumerate(images) if rows is None or i in rows]
            raise _refused_image(processor, picked, sources, exc) from None
        self._features = None
        if self.inputs is not None:
            self.patch_offsets = [0]
            for n in self.inputs["image_grid_thw"].prod(-1).tolist():
                self.patch_offsets.append(self.patch_offsets[-1] + int(n))

    def request_inputs(self, i: int) -> dict | None:
        """Pixel values and grids of request i's images (views of the batch's), or None without images."""
        a, b = self.offsets[i], self.offsets[i + 1]
        if a == b:
            return None
        pv = self.inputs["pixel_values"][self.patch_offsets[a] : self.patch_offsets[b]]
        return {"pixel_values": pv, "image_grid_thw": self.inputs["image_grid_thw"][a:b]}

    def features(self):
        """The vision tower's output for every image of the batch (computed on first use)."""
        import torch

        if self._features is None:
            device = next(self.model.parameters()).device
            with torch.no_grad():
                self._features = self.model.model.get_image_features(
                    self.inputs["pixel_values"].to(device),
                    self.inputs["image_grid_thw"].to(device),
                    return_dict=True,
                )
        return self._features

    def image_ids(self, i: int) -> list[int]:
        return list(range(self.offsets[i], self.offsets[i + 1]))


def _refused_image(processor, picked: list[tuple[int, list]], sources, exc: ValueError) -> Exception:
    """The UserError naming the request and image the processor refuses (each tried alone), or `exc`."""
    for i, ims in picked:
        for j, im in enumerate(ims):
            try:
                processor.image_processor(images=[im], return_tensors="pt")
            except ValueError as one:
                who = sources[i] if sources else f"request {i + 1}"
                return UserError(
                    f"{who}: image {j + 1} ({im.size[0]}x{im.size[1]}) cannot be processed ({one})"
                )
    return exc


def gather_features(picks: list[tuple[_Vision, list[int]]]):
    """mm_encoder_outputs for rows whose images come from (budget, image indices) in row order."""
    picks = [(v, ids) for v, ids in picks if ids]
    if not picks:
        return None
    first = picks[0][0].features()
    pooled = tuple(v.features().pooler_output[i] for v, ids in picks for i in ids)
    deep = [
        tuple(v.features().deepstack_features[layer][i] for v, ids in picks for i in ids)
        for layer in range(len(first.deepstack_features))
    ]
    return {"image": type(first)(pooler_output=pooled, deepstack_features=deep)}


class Engine:
    """A deployment loaded for inference: router + experts stacked in one base (see module doc)."""

    def __init__(
        self,
        deployment: str,
        device: str = "auto",
        dtype: str = "auto",
        base_model: str | None = None,
        cache_dir: str | None = None,
        min_probability: float | None = None,
        fallback: str | None = None,
        model=None,
    ):
        """Load a deployment (folder or fsspec URL). `base_model` replaces the recorded base (a
        deployment moved to another machine); below `min_probability` the `fallback` answers (an
        expert name, or "base" for the base model with no adapter). `model`: the base already
        loaded (benchmarks at shapes with no weights on disk); it is modified in place."""
        from ..deploy import load_deployment
        from ..model.loading import load_base, load_processor
        from ..model.multi_lora import load_peft_adapter
        from .scoring import label_token_ids
        from .stacked_lora import StackedLora

        dep = load_deployment(deployment, cache_dir=cache_dir)
        self.label_map = dep["label_map"]
        self.names = label_names(self.label_map)
        self.min_probability, self.fallback = check_fallback(min_probability, fallback, self.names)
        router_info = read_adapter_info(dep["router"], "router")
        self.base_model = base_model or router_info["base_model"]
        infos = {}
        for name in self.names:
            info = read_adapter_info(dep["experts"][name], "expert")
            check_same_base(info, router_info, dep["experts"][name])
            infos[name] = info
        self.model = load_base(self.base_model, dtype, device) if model is None else model.eval()
        self.device = next(self.model.parameters()).device

        def adapter(path):
            try:
                return load_peft_adapter(path, self.device)
            except (ValueError, OSError, KeyError) as exc:
                raise UserError(f"{path}: cannot load this adapter ({exc})") from None

        slots = [adapter(dep["experts"][n]) for n in self.names] + [adapter(dep["router"]), None]
        self.slot = {name: i for i, name in enumerate(self.names)}
        self.router_slot, self.slot[BASE] = len(self.names), len(self.names) + 1
        self.lora = StackedLora(self.model, slots)
        self._processors: dict[tuple, Any] = {}

        def processor(info):
            key = (info["min_pixels"], info["max_pixels"])
            if key not in self._processors:
                self._processors[key] = load_processor(self.base_model, *key)
            return key

        self.router_budget = processor(router_info)
        self.budget = {name: processor(info) for name, info in infos.items()}
        self.budget[BASE] = self.router_budget
        self.max_new_tokens = {name: int(info["max_new_tokens"]) for name, info in infos.items()}
        self.max_new_tokens[BASE] = max(self.max_new_tokens.values())
        self.tokenizer = self._processors[self.router_budget].tokenizer
        self.special_tokens = special_tokens(self.tokenizer)
        self.label_ids = label_token_ids(self.tokenizer, self.names)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)

    # ------------------------------------------------------------------ checks

    def answerers(self) -> list[str]:
        """Names a request may force: every expert, and "base"."""
        return [*self.names, BASE] if BASE not in self.names else list(self.names)

    def check(self, req: Request) -> None:
        """Raise UserError when a request cannot be answered as asked (before any model work)."""
        where = req.sample.source or req.sample.id
        if req.expert is not None and req.expert not in self.slot:
            raise UserError(
                f"{where}: unknown expert '{req.expert}' (deployed: {', '.join(self.answerers())})"
            )
        if req.max_new_tokens is not None and (
            isinstance(req.max_new_tokens, bool)
            or not isinstance(req.max_new_tokens, int)
            or req.max_new_tokens < 1
        ):
            raise UserError(f"{where}: max_new_tokens must be a positive integer, got {req.max_new_tokens!r}")
        low, high = TEMPERATURE_RANGE
        if (
            isinstance(req.temperature, bool)
            or not isinstance(req.temperature, int | float)
            or not low <= req.temperature <= high
        ):
            raise UserError(
                f"{where}: temperature must be a number from {low:g} to {high:g}, got {req.temperature!r}"
            )
        if not isinstance(req.top_p, int | float) or not 0 < req.top_p <= 1:
            raise UserError(f"{where}: top_p must be in (0, 1], got {req.top_p!r}")
        check_seed(req.seed, where)
        for at, text in _texts(req.sample):
            check_text(text, self.special_tokens, f"{where}: {at}")
        for j, (width, height) in _image_sizes(req.sample):
            check_image_size(width, height, f"{where}: image {j + 1}")

    def check_all(self, requests: Sequence[Request]) -> None:
        """Check every request; one UserError naming each refused one (and how many of how many)."""
        errors = []
        for r in requests:
            try:
                self.check(r)
            except UserError as exc:
                errors.append(str(exc))
        if errors and len(requests) == 1:
            raise UserError(errors[0])
        if errors:
            listed = "\n  ".join(errors[:MAX_LISTED])
            more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
            raise UserError(
                f"{len(errors)} of {len(requests)} requests refused, none answered:\n  {listed}{more}"
            )

    # ------------------------------------------------------------------ routing

    def route(self, samples: Sequence[Sample], batch_size: int = 8):
        """Routing distribution [n, K] (label order) for samples."""
        import torch

        out = []
        for i in range(0, len(samples), batch_size):
            chunk = list(samples[i : i + batch_size])
            images = [decode_images(s) for s in chunk]
            sources = [s.source or s.id for s in chunk]
            vision = _Vision(self._processors[self.router_budget], images, self.model, None, sources)
            out.append(self._route(chunk, vision, list(range(len(chunk)))))
        return torch.cat(out) if out else torch.empty(0, len(self.names))

    def _route(self, samples: list[Sample], vision: _Vision, rows: list[int]):
        import torch

        from .scoring import score_encoded

        proc = self._processors[self.router_budget]
        prompts = [
            encode_text(
                proc,
                router_messages(samples[i].instruction, len(samples[i].images), self.names),
                vision.request_inputs(i),
            )
            for i in rows
        ]
        mm = gather_features([(vision, vision.image_ids(i)) for i in rows])
        with self.lora.rows_as([self.router_slot] * len(rows)):
            scores = score_encoded(self.model, prompts, self.label_ids, self.tokenizer.pad_token_id, mm)
        return torch.softmax(scores, dim=-1)

    # ------------------------------------------------------------------ answering

    def run(self, requests: Sequence[Request], batch_size: int = 8) -> list[Result]:
        """Route and answer every request; results in request order."""
        return list(self.iter_run(requests, batch_size))

    def iter_run(self, requests: Sequence[Request], batch_size: int = 8) -> Iterator[Result]:
        """Like run, yielding each batch's results (in order) as soon as that batch is answered."""
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        self.check_all(requests)
        for i in range(0, len(requests), batch_size):
            yield from self._run_batch(list(requests[i : i + batch_size]))

    def _run_batch(self, reqs: list[Request]) -> list[Result]:
        samples = [r.sample for r in reqs]
        images = [decode_images(s) for s in samples]
        routed_rows = [i for i, r in enumerate(reqs) if r.expert is None]
        # the router's pixel budget: the routed requests, and forced ones whose expert shares it
        at_router = {
            i for i, r in enumerate(reqs) if r.expert is None or self.budget[r.expert] == self.router_budget
        }
        sources = [s.source or s.id for s in samples]
        visions = {
            self.router_budget: _Vision(
                self._processors[self.router_budget], images, self.model, at_router, sources
            )
        }
        t0 = time.perf_counter()
        probs = self._route(samples, visions[self.router_budget], routed_rows) if routed_rows else None
        route_s = time.perf_counter() - t0
        decisions = self._decide(reqs, routed_rows, probs)
        t1 = time.perf_counter()
        texts, stats = self._generate(reqs, images, visions, [d["expert"] for d in decisions])
        generate_s = time.perf_counter() - t1
        timings = {"route_s": round(route_s, 6), "generate_s": round(generate_s, 6), "batch_size": len(reqs)}
        return [
            Result(
                id=s.id,
                output=text,
                timings=dict(timings),
                **d,
                **st,
            )
            for s, d, text, st in zip(samples, decisions, texts, stats, strict=True)
        ]

    def _decide(self, reqs: list[Request], routed_rows: list[int], probs) -> list[dict]:
        out = []
        row_of = {i: k for k, i in enumerate(routed_rows)}
        for i, r in enumerate(reqs):
            if r.expert is not None:
                out.append(
                    {
                        "expert": r.expert,
                        "probability": None,
                        "top_k": [],
                        "probs": None,
                        "forced": True,
                        "fallback": None,
                        "routed": None,
                    }
                )
                continue
            p = probs[row_of[i]]
            order = sorted(range(len(self.names)), key=lambda k: -float(p[k]))
            top = self.names[order[0]]
            prob = round(float(p[order[0]]), 6)
            low = self.min_probability is not None and float(p[order[0]]) < self.min_probability
            out.append(
                {
                    "expert": self.fallback if low else top,
                    "probability": prob,
                    "top_k": [(self.names[k], round(float(p[k]), 6)) for k in order[:TOP_K]],
                    "probs": {n: round(float(x), 6) for n, x in zip(self.names, p, strict=True)},
                    "forced": False,
                    "fallback": self.fallback if low else None,
                    "routed": top,
                }
            )
        return out

    def _generate(self, reqs: list[Request], images: list[list], visions: dict, experts: list[str]):
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        from ..data.preprocess import collate

        for budget in {self.budget[n] for n in experts} - set(visions):  # experts at another pixel budget
            rows_at = {i for i, n in enumerate(experts) if self.budget[n] == budget}
            sources = [r.sample.source or r.sample.id for r in reqs]
            visions[budget] = _Vision(self._processors[budget], images, self.model, rows_at, sources)
        rows = []
        picks = []
        for i, (r, name) in enumerate(zip(reqs, experts, strict=True)):
            budget = self.budget[name]
            vision = visions[budget]
            rows.append(
                encode_text(
                    self._processors[budget], r.sample.messages(with_answer=False), vision.request_inputs(i)
                )
            )
            picks.append((vision, vision.image_ids(i)))
        batch = {k: v.to(self.device) for k, v in collate(rows, self.tokenizer.pad_token_id, "left").items()}
        batch.pop("pixel_values", None)
        mm = gather_features(picks)
        if mm is not None:
            batch["mm_encoder_outputs"] = mm
        limits = [
            r.max_new_tokens or self.max_new_tokens[name] for r, name in zip(reqs, experts, strict=True)
        ]
        tracker = _RowTracker(self.tokenizer, self.eos_ids, batch["input_ids"].shape[1], limits, reqs)
        processors = LogitsProcessorList()
        if any(r.temperature > 0 for r in reqs):
            processors.append(_RowSampler(reqs, self.device))
        config = GenerationConfig(
            max_new_tokens=max(limits),
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        with torch.no_grad(), self.lora.rows_as([self.slot[n] for n in experts]):
            out = self.model.generate(
                **batch,
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([tracker]),
            )
        prompt_len = batch["attention_mask"].sum(-1).tolist()
        texts, stats = [], []
        for k in range(len(reqs)):
            text = tracker.final_text(k, out[k])
            texts.append(text)
            stats.append(
                {
                    "prompt_tokens": int(prompt_len[k]),
                    "completion_tokens": tracker.count[k],
                    "finish_reason": tracker.reason[k] or "length",
                }
            )
        return texts, stats


def _texts(sample: Sample) -> Iterator[tuple[str, str]]:
    """(where, text) of every text the model will read of a request: system prompt and turns."""
    if sample.system:
        yield "system prompt", sample.system
    for k, turn in enumerate(sample.conversation()):
        content = turn["content"]
        parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
        for text in parts:
            if text:
                yield f"turn {k + 1} ({turn['role']})", text


def _image_sizes(sample: Sample) -> Iterator[tuple[int, tuple[int, int]]]:
    """(index, (width, height)) of a request's images, read from the headers of image files; files PIL
    cannot open are left to decoding, which names them."""
    from PIL import Image

    for j, im in enumerate(sample.images):
        if isinstance(im, Image.Image):
            yield j, im.size
            continue
        try:
            with Image.open(im) as f:
                size = f.size
        except Exception:  # noqa: BLE001 - decode_images reports it with the file's name
            continue
        yield j, size


def _eos_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the model's generation eos ids, else the tokenizer's eos and pad."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not ids:
        ids = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


class _RowTracker:
    """Stopping criterion over a batch: per-row token limits, finish reasons and streamed text.

    `generate` calls it after every decoding step with the whole sequences; a row is done at its
    first end-of-turn token ("stop") or at its own limit ("length"). A row's streamed pieces add up
    to its final output: leading and trailing whitespace are held back (the output is stripped), and
    so is an incomplete multi-byte character.
    """

    def __init__(
        self, tokenizer, eos_ids: list[int], prompt_len: int, limits: list[int], reqs: list[Request]
    ):
        self.tokenizer = tokenizer
        self.eos = set(eos_ids)
        self.prompt_len = prompt_len
        self.limits = limits
        self.callbacks = [r.on_text for r in reqs]
        self.count = [0] * len(limits)
        self.reason: list[str | None] = [None] * len(limits)
        self.sent = [""] * len(limits)

    def _text(self, row_ids) -> str:
        return self.tokenizer.decode(row_ids, skip_special_tokens=True).strip()

    def _emit(self, k: int, text: str) -> None:
        cb = self.callbacks[k]
        if cb is None or not text.startswith(self.sent[k]) or len(text) == len(self.sent[k]):
            return
        piece = text[len(self.sent[k]) :]
        self.sent[k] = text
        try:
            cb(piece)
        except Exception as exc:  # a failing consumer (a closed stream) must not stop the other rows
            print(
                f"warning: streaming callback of row {k} failed ({exc}); its stream is dropped",
                file=sys.stderr,
            )
            self.callbacks[k] = None

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        for k in range(input_ids.shape[0]):
            if self.reason[k] is not None:
                done[k] = True
                continue
            if last[k] in self.eos:
                self.reason[k] = "stop"
            else:
                self.count[k] += 1
                if self.count[k] >= self.limits[k]:
                    self.reason[k] = "length"
            if self.reason[k] is not None:
                done[k] = True
            if self.callbacks[k] is not None:
                text = self._text(input_ids[k, self.prompt_len : self.prompt_len + self.count[k]])
                if self.reason[k] is None:
                    text = text.removesuffix("\ufffd")
                self._emit(k, text)
        return done

    def final_text(self, k: int, sequence) -> str:
        """Row k's output (and the last streamed piece, if any is pending)."""
        text = self._text(sequence[self.prompt_len : self.prompt_len + self.count[k]])
        self._emit(k, text)
        return text


class _RowSampler:
    """Logits processor: rows with temperature > 0 sample (top_p, own seeded generator); others stay greedy.

    Greedy decoding then picks the sampled token: the row's scores become 0 there and -inf elsewhere.
    """

    def __init__(self, reqs: list[Request], device):
        import torch

        self.rows = []
        for k, r in enumerate(reqs):
            if r.temperature > 0:
                gen = torch.Generator(device=device)
                if r.seed is None:
                    gen.seed()
                else:
                    gen.manual_seed(int(r.seed))
                self.rows.append((k, float(r.temperature), float(r.top_p), gen))

    def __call__(self, input_ids, scores):
        import torch

        for k, temperature, top_p, gen in self.rows:
            probs = torch.softmax(scores[k].float() / temperature, dim=-1)
            if top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = (sorted_p.cumsum(0) - sorted_p) < top_p  # the smallest prefix reaching top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            token = torch.multinomial(probs, 1, generator=gen)
            row = torch.full_like(scores[k], float("-inf"))
            row[token] = 0.0
            scores[k] = row
        return scores
