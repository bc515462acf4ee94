"""The Modal web endpoint without credentials: `web.local()` builds the served app from a deployment on
the checkpoints Volume stand-in (MOLE_MODAL_ROOT); GPU type, concurrency and replicas come from the config."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil

import pytest

pytest.importorskip("modal")
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally:UserWarning")

from mole_trainer.cloud import modal_app as m  # noqa: E402
from mole_trainer.errors import UserError  # noqa: E402
from tests.modal_spy import define_app  # noqa: E402


def test_serve_config_comes_from_the_file_at_deploy_and_from_the_image_in_the_container(
    tmp_path, monkeypatch
):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("deployment: deploy-v2\ngpu: H100\nconcurrency: 64\nmax_containers: 9\nmax_batch: 16\n")
    monkeypatch.delenv(m.SERVE_SETTINGS_ENV, raising=False)
    monkeypatch.setenv(m.SERVE_CONFIG_ENV, str(cfg))
    settings = m.serve_config()
    assert (settings.deployment, settings.concurrency, settings.max_batch) == ("deploy-v2", 64, 16)
    assert m.serve_function_options(settings) == {"gpu": "H100", "min_containers": 0, "max_containers": 9}
    # in a container: the settings the app was deployed with, whatever file is around
    monkeypatch.setenv(m.SERVE_SETTINGS_ENV, json.dumps({**settings.__dict__, "gpu": "A10G"}))
    assert m.serve_config().gpu == "A10G" and m.serve_config().concurrency == 64
    cfg.write_text("concurency: 3\n")
    monkeypatch.delenv(m.SERVE_SETTINGS_ENV)
    with pytest.raises(UserError, match="unknown key 'concurency' \\(did you mean 'concurrency'"):
        m.serve_config()


def test_the_endpoint_function_is_defined_from_the_settings(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("gpu: H100\nconcurrency: 48\nmin_containers: 1\nmax_containers: 9\n")
    env = {k: v for k, v in os.environ.items() if k not in (m.SERVE_SETTINGS_ENV, m.MODAL_CONFIG_ENV)}
    got = define_app({**env, m.SERVE_CONFIG_ENV: str(cfg)})  # as `modal deploy` defines the app
    web = got["functions"]["web"]
    assert web == {
        "gpu": "H100",
        "timeout": 10 * 60,
        "retries": None,
        "min_containers": 1,
        "max_containers": 9,
        "scaledown_window": 5 * 60,
    }
    assert got["concurrent"] == [{"max_inputs": 48}]
    # the containers serve what was deployed: the settings travel in the image's environment
    deployed = json.loads(got["env"][m.SERVE_SETTINGS_ENV])
    assert (deployed["gpu"], deployed["concurrency"], deployed["max_containers"]) == ("H100", 48, 9)


@pytest.mark.slow
def test_web_serves_the_deployment_on_the_checkpoints_volume(tiny_deployment, tmp_path, monkeypatch):
    pytest.importorskip("httpx2")  # starlette's TestClient (installed with openai, dev extra)
    from PIL import Image
    from starlette.testclient import TestClient

    monkeypatch.setenv(m.LOCAL_ROOT_ENV, str(tmp_path))
    shutil.copytree(tiny_deployment["deployment"], tmp_path / m.CHECKPOINTS / m.DEPLOY_DIR)
    monkeypatch.setattr(m, "SERVE", m.SERVE.__class__(device="cpu", max_tokens=4))
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {
        "model": "mole",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "Read the text."}]}],
        "max_tokens": 3,
    }  # fmt: skip
    with TestClient(m.web.local()) as client:
        assert [x["id"] for x in client.get("/v1/models").json()["data"]] == [
            "mole",
            *tiny_deployment["names"],
        ]
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["mole"]["expert"] in tiny_deployment["names"]
        assert resp.json()["usage"]["completion_tokens"] <= 3
        refused = client.post("/v1/chat/completions", json={**body, "max_tokens": 5})  # over the config's 4
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
