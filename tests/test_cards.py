"""Robustness cards and label-only answers on real servers: the card's schema and the default's card, the card
routes and summaries (single checkpoint and repository), load errors for a broken card, and ``--output labels``
on v1, v2 and tritonclient."""

import json
import shutil
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
import torch
from helpers import running_server, write_card

from codedsmooth.models import CheckpointError, default_checkpoint_path, load_checkpoint
from codedsmooth.models.card import CARD_FILE, RobustnessCard, card_schema
from codedsmooth.probe.cards import report_card

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "card.schema.json").read_text())


def test_the_published_schema_is_the_card_models_schema():
    assert (ROOT / "docs" / "card.schema.json").read_text() == card_schema()


def test_the_default_checkpoint_ships_the_card_generated_from_the_report():
    committed = json.loads((default_checkpoint_path() / CARD_FILE).read_text())
    results = json.loads((ROOT / "docs" / "RESULTS.json").read_text())
    fresh = json.loads(report_card(results, date=committed["date"]).to_json())
    assert committed == fresh
    jsonschema.validate(committed, SCHEMA)
    # its numbers are the report's: the white-box worst case with RCI off at each ε, and the served default's
    model = results["models"][results["default_checkpoint"]["same_as"]]
    for setting, label in (("plain", "RCI off"), ("request", "RCI on, request scope (served default)")):
        for eps, row in model["settings"][setting].items():
            (m,) = [
                m
                for m in committed["measurements"]
                if m["setting"] == label
                and m["eps"] == float(eps)
                and m["threat"] == "white-box"
                and m["sample"] != "test split"
            ]
            assert (m["robust_accuracy"], m["interval"], m["n"]) == (row["accuracy"], row["interval"], row["n"])
    assert committed["model"]["sha256"] == results["default_checkpoint"]["sha256"]
    assert any(m["threat"] == "score-based" and m["queries_per_broken"] for m in committed["measurements"])


def test_the_card_ships_in_the_wheel():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["codedsmooth"]
    assert any(Path("default_checkpoint", CARD_FILE).match(pattern) for pattern in data)


@pytest.fixture(scope="module")
def carded(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("carded") / "tiny"
    shutil.copytree(tiny_checkpoint, out)
    return out, write_card(out, "tiny", accuracy=0.25)


@pytest.mark.parametrize(
    "text, problem",
    [("{nope", "not valid JSON"), ('{"source": "audit"}', "not a valid robustness card"), ("[]", "JSON object")],
)
def test_a_broken_card_is_a_load_error_naming_the_file(carded, tmp_path, text, problem):
    broken = tmp_path / "broken"
    shutil.copytree(carded[0], broken)
    (broken / CARD_FILE).write_text(text)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(broken)
    assert str(broken / CARD_FILE) in str(err.value) and problem in str(err.value)


def test_a_card_naming_an_unknown_sample_is_refused(carded):
    card = dict(carded[1], samples={"other": [1]})
    with pytest.raises(ValueError, match="names sample 's'"):
        RobustnessCard.model_validate(card)


def test_a_model_with_a_card_shows_it_on_every_route_and_one_without_says_so(carded, tiny_checkpoint):
    import tritonclient.http as httpclient

    path, card = carded
    with running_server(path, rci=False) as server:
        (info,) = httpx.get(server.url + "/v1/models").json()
        name = info["name"]
        r = httpx.get(f"{server.url}/v1/models/{name}/card")
        assert r.status_code == 200 and r.json() == card
        jsonschema.validate(r.json(), SCHEMA)
        assert info["card"] == {
            "available": True,
            "href": f"/v1/models/{name}/card",
            "source": "audit",
            "date": "2026-12-01",
            "worst_case": [
                {
                    "eps": 0.1,
                    "robust_accuracy": 1.0,
                    "interval": [0.4, 1.0],
                    "n": 3,
                    "attack": "square",
                    "setting": "RCI off",
                },
                {
                    "eps": 0.3,
                    "robust_accuracy": 0.25,
                    "interval": [0.1, 0.9],
                    "n": 3,
                    "attack": "square",
                    "setting": "RCI off",
                },
            ],
        }
        meta = httpx.get(f"{server.url}/v2/models/{name}").json()
        assert meta["parameters"]["card"] == card and meta["parameters"]["rci"]["enabled"] is False
        client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
        try:
            assert client.get_model_metadata(name)["parameters"]["card"] == card
        finally:
            client.close()
        r = httpx.get(f"{server.url}/v1/models/nope/card")
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    with running_server(tiny_checkpoint, rci=False) as server:
        (info,) = httpx.get(server.url + "/v1/models").json()
        name = info["name"]
        r = httpx.get(f"{server.url}/v1/models/{name}/card")
        assert r.status_code == 404 and r.json() == {"error": f"model {name!r} has no robustness card"}
        assert info["card"] == {"available": False, "note": f"model {name!r} has no robustness card"}
        assert httpx.get(f"{server.url}/v2/models/{name}").json()["parameters"]["card"] is None


def test_the_default_model_serves_its_card():
    with running_server(None, max_batch_size=4) as server:
        r = httpx.get(server.url + "/v1/models/mnist-small_cnn-pgd-at/card")
        assert r.status_code == 200
        assert r.json() == json.loads((default_checkpoint_path() / CARD_FILE).read_text())
        assert httpx.get(server.url + "/v2/models/mnist-small_cnn-pgd-at").json()["parameters"]["card"] == r.json()
        (info,) = httpx.get(server.url + "/v1/models").json()
        assert [w["eps"] for w in info["card"]["worst_case"]] == [0.1, 0.2, 0.3]


# ---- --output labels ----------------------------------------------------------------


def _plain_labels(checkpoint, x) -> list[int]:
    with torch.no_grad():
        return load_checkpoint(checkpoint).model(x).argmax(1).tolist()


def _v1(url, name, x):
    path = "/v1/predict" if name is None else f"/v1/models/{name}/predict"
    r = httpx.post(url + path, json={"inputs": x.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def _v2(url, name, x, outputs=None, binary=False):
    data = x.numpy().astype(np.float32)
    body = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data.reshape(-1).tolist()}]
    }
    if outputs is not None:
        body["outputs"] = [{"name": o, "parameters": {"binary_data": binary}} for o in outputs]
    return httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=30)


def _triton(url, name, x, outputs):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    try:
        meta = client.get_model_metadata(name)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy(), binary_data=True)
        result = client.infer(
            name, [inp], outputs=[httpclient.InferRequestedOutput(o, binary_data=True) for o in outputs]
        )
        return meta, {o: result.as_numpy(o) for o in outputs}
    finally:
        client.close()


def check_labels_only(url, name, classes, expected, x):
    """Every protocol answers the top-1 label (and index) of ``expected``, and nothing more."""
    for p in _v1(url, name, x):
        assert set(p) == {"label", "index"}
    assert [p["index"] for p in _v1(url, name, x)] == expected
    assert [p["label"] for p in _v1(url, name, x)] == [classes[i] for i in expected]
    r = _v2(url, name, x)
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    assert set(outs) == {"label", "index"}
    assert outs["label"] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [len(x)],
        "data": [classes[i] for i in expected],
    }
    assert outs["index"]["data"] == expected
    r = _v2(url, name, x, outputs=["probabilities"])
    assert r.status_code == 422 and "unknown output(s) ['probabilities']" in r.json()["error"]
    meta, got = _triton(url, name, x, ["label", "index"])
    assert [o["name"] for o in meta["outputs"]] == ["label", "index"]
    assert [v.decode() for v in got["label"]] == [classes[i] for i in expected] and got["index"].tolist() == expected


def check_scores(url, name, expected, x):
    preds = _v1(url, name, x)
    assert [p["index"] for p in preds] == expected and all(len(p["probabilities"]) == 10 for p in preds)
    meta, got = _triton(url, name, x, ["probabilities", "index"])
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "index"]
    assert got["probabilities"].argmax(1).tolist() == expected == got["index"].tolist()


def test_output_labels_answers_only_the_top_label_on_every_protocol(tiny_checkpoint, digits):
    x = digits.test_x[:6]
    expected = _plain_labels(tiny_checkpoint, x)
    with running_server(tiny_checkpoint, rci=False, output="labels") as server:
        (info,) = httpx.get(server.url + "/v1/models").json()
        assert info["output"] == "labels"
        check_labels_only(server.url, info["name"], info["classes"], expected, x)
        assert [p["index"] for p in _v1(server.url, None, x)] == expected
        r = _v2(server.url, info["name"], x, outputs=["label"], binary=True)  # the BYTES tensor in the binary extension
        n = int(r.headers["Inference-Header-Content-Length"])
        tail, labels = r.content[n:], []
        while tail:
            size = int.from_bytes(tail[:4], "little")
            labels.append(tail[4 : 4 + size].decode())
            tail = tail[4 + size :]
        assert labels == [info["classes"][i] for i in expected]


def test_a_repository_serves_one_model_labels_and_one_scores_with_and_without_a_card(
    tiny_checkpoint, carded, tmp_path, digits
):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_checkpoint, repo / "labels")
    shutil.copytree(carded[0], repo / "scores")
    (repo / "labels" / "serving.json").write_text(json.dumps({"output": "labels"}))
    x = digits.test_x[:6]
    expected = _plain_labels(tiny_checkpoint, x)
    with running_server(None, model_repository=repo, rci=False) as server:
        info = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()}
        assert (info["labels"]["output"], info["scores"]["output"]) == ("labels", "scores")
        check_labels_only(server.url, "labels", info["labels"]["classes"], expected, x)
        check_scores(server.url, "scores", expected, x)
        assert httpx.get(server.url + "/v1/models/scores/card").json() == carded[1]
        r = httpx.get(server.url + "/v1/models/labels/card")
        assert r.status_code == 404 and r.json()["error"] == "model 'labels' has no robustness card"
        assert info["labels"]["card"]["available"] is False and info["scores"]["card"]["available"] is True


def test_a_serving_json_with_a_bad_output_names_the_file(tiny_checkpoint, tmp_path):
    from codedsmooth.service.repository.files import RepositoryError, model_settings
    from codedsmooth.service.settings import ServeSettings

    shutil.copytree(tiny_checkpoint, tmp_path / "m")
    (tmp_path / "m" / "serving.json").write_text(json.dumps({"output": "logits"}))
    with pytest.raises(RepositoryError, match=r"serving\.json: output"):
        model_settings(ServeSettings(), tmp_path / "m")


def test_the_output_setting_comes_from_its_env_var(monkeypatch):
    from codedsmooth.service.settings import ServeSettings

    monkeypatch.setenv("CODEDSMOOTH_OUTPUT", "labels")
    assert ServeSettings().output == "labels"
    monkeypatch.setenv("CODEDSMOOTH_OUTPUT", "logits")
    with pytest.raises(ValueError, match="output"):
        ServeSettings()
