import torch
from PIL import Image

from mole_trainer.data.formats import Sample
from mole_trainer.eval.consistency import consistency_report, perturbed


def make_samples(tmp_path, n=4):
    out = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), (10 * i, 100, 200)).save(p)
        out.append(Sample(id=f"r{i}", images=[p], instruction=f"do thing {i}", answer="", source="t"))
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
    assert report["perturbations"] == {"jpeg": 1.0, "resize": 0.0, "brightness": 1.0, "punctuation": 1.0}
    assert report["perturbation_mean"] == 0.75


def test_router_prompt_ignores_whitespace():
    from mole_trainer.router_prompt import router_messages

    names = ["a1", "b2"]
    assert router_messages("Click  on\nthe 3rd ", 1, names) == router_messages("Click on the 3rd", 1, names)
