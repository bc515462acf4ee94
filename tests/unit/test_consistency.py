from dataclasses import replace

import torch
from PIL import Image

from mole_trainer.data.records import Sample
from mole_trainer.eval.consistency import consistency_report, perturbed


def make_samples(tmp_path, n=4):
    out = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), (10 * i, 100, 200)).save(p)
        out.append(Sample(id=f"r{i}", images=[p], instruction=f"Do thing {i}", answer="", source="t"))
    return out


def test_perturbations_keep_the_request_and_change_the_input(tmp_path):
    s = make_samples(tmp_path, 1)[0]
    for name in ("jpeg", "resize", "brightness"):
        q = perturbed(s, name, tmp_path)
        assert q.instruction == s.instruction and q.images[0] != s.images[0]
        with Image.open(q.images[0]) as im:
            im.load()
            assert im.size[0] <= 40
    p = perturbed(s, "punctuation", tmp_path)
    assert p.images == s.images and p.instruction == s.instruction + "."
    assert perturbed(p, "punctuation", tmp_path).instruction == s.instruction
    assert perturbed(s, "lower-case", tmp_path).instruction == "do thing 0"
    assert perturbed(p, "polite-prefix", tmp_path).instruction == "Please do thing 0."
    q = replace(s, instruction="Which bar is highest?")
    assert perturbed(q, "polite-prefix", tmp_path).instruction == "Could you tell me which bar is highest?"
    assert perturbed(replace(s, instruction="OCR this."), "polite-prefix", tmp_path).instruction == (
        "Please OCR this."
    )


def test_rates_count_unchanged_routes(tmp_path):
    samples = make_samples(tmp_path)

    def route(batch, bs):
        # a router that reads the image size: downscaled images go to expert 1, the rest to expert 0
        out = torch.zeros(len(batch), 2)
        for i, s in enumerate(batch):
            with Image.open(s.images[0]) as im:
                out[i, int(im.size[0] < 40)] = 1.0
        return out

    report = consistency_report(route, samples, [0, 0, 0, 0], batch_size=2)
    assert report["batch_invariance"] == 1.0
    assert report["perturbations"] == {
        "jpeg": 1.0,
        "resize": 0.0,
        "brightness": 1.0,
        "punctuation": 1.0,
        "lower-case": 1.0,
        "polite-prefix": 1.0,
    }
    assert report["perturbation_mean"] == round(5 / 6, 4)


def test_text_perturbations_are_measured(tmp_path):
    samples = make_samples(tmp_path)

    def route(batch, bs):
        # a router keyed on the text's surface: lower-case first letter -> 1, more than three words -> 2
        out = torch.zeros(len(batch), 3)
        for i, s in enumerate(batch):
            words = s.instruction.split()
            out[i, 2 if len(words) > 3 else int(s.instruction[:1].islower())] = 1.0
        return out

    rates = consistency_report(route, samples, [0, 0, 0, 0], batch_size=2)["perturbations"]
    assert (rates["punctuation"], rates["lower-case"], rates["polite-prefix"]) == (1.0, 0.0, 0.0)
    assert rates["jpeg"] == rates["resize"] == rates["brightness"] == 1.0


def test_router_prompt_ignores_whitespace_and_case():
    from mole_trainer.router_prompt import router_messages

    names = ["a1", "b2"]
    assert router_messages("Click  on\nthe 3rd ", 1, names) == router_messages("Click on the 3rd", 1, names)
    assert router_messages("CLICK on The 3rd", 1, names) == router_messages("click on the 3rd", 1, names)
    # punctuation and words still reach the router
    assert router_messages("Click on the 3rd.", 1, names) != router_messages("Click on the 3rd", 1, names)
