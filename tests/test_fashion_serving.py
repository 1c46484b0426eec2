"""Fashion-MNIST from train to serve: the Debian package's files with no --data-dir, the class names served,
and a garment photo answered once examples/prepare_photo.py has prepared it as the docs say."""

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import running_server
from PIL import Image

from codedsmooth.train import load_dataset
from codedsmooth.train.data import FASHION_MNIST_ENV, FASHION_MNIST_SYSTEM_DIR

ROOT = Path(__file__).resolve().parents[1]
# The published Fashion-MNIST model the photo is sent to (docs/fashion/RESULTS.md, "Checkpoints").
PUBLISHED = ROOT / "docs" / "fashion" / "runs" / "erm-seed0"
# Zalando's label names, in label order (fashion-mnist's README).
GARMENTS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_SYSTEM_DIR.is_dir(),
    reason="Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist",
)


def test_train_on_the_package_files_then_serve_the_garment_names(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != FASHION_MNIST_ENV}
    out = tmp_path / "f"
    subprocess.run(
        [sys.executable, "-m", "codedsmooth", "train", "--data", "fashion-mnist", "--out", str(out)]
        + ["--epochs", "1", "--max-steps", "20", "--width", "4"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    with running_server(out, rci=False) as srv:
        models = httpx.get(srv.url + "/v1/models").json()
    assert models[0]["classes"] == GARMENTS and models[0]["input_shape"] == [1, 28, 28]


def _photo(image: np.ndarray, gen: np.random.Generator) -> bytes:
    """What a phone gives: the garment dark on a light, uneven table, larger, off-centre, in colour, with noise."""
    big = Image.fromarray(255 - image).resize((140, 140), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (220, 190), 235)
    canvas.paste(big, (50, 25))
    noisy = np.clip(np.asarray(canvas, dtype=np.float64) + gen.normal(0, 4, (190, 220)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.mark.skipif(not PUBLISHED.is_dir(), reason=f"{PUBLISHED} is not in this checkout")
def test_a_garment_photo_prepared_as_documented_is_classified_like_the_test_image(tmp_path):
    data = load_dataset("fashion-mnist")
    picks = [int((data.test_y == c).nonzero()[0]) for c in range(10)]  # the first test image of each class
    gen = np.random.default_rng(0)
    photos = []
    for i in picks:
        path = tmp_path / f"photo{i}.jpg"
        path.write_bytes(_photo(data.test_x[i, 0].numpy(), gen))
        photos.append(path)
    prepared_dir = tmp_path / "prepared"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "prepare_photo.py"),
            *map(str, photos),
            "--out-dir",
            str(prepared_dir),
        ],
        check=True,
        capture_output=True,
    )
    with running_server(PUBLISHED, rci=False) as srv:
        originals = httpx.post(
            srv.url + "/v1/predict", json={"inputs": (data.test_x[picks].float() / 255).tolist()}
        ).json()["predictions"]

        def classify(path: Path) -> dict:
            files = {"files": (path.name, path.read_bytes(), "image/png")}
            r = httpx.post(srv.url + "/v1/predict/image", files=files)
            assert r.status_code == 200, r.text
            return r.json()["predictions"][0]

        prepared = [classify(prepared_dir / f"photo{i}.png") for i in picks]
        raw = classify(photos[0])
    agree = sum(p["label"] == o["label"] for p, o in zip(prepared, originals))
    assert agree >= 8, [(p["label"], o["label"]) for p, o in zip(prepared, originals)]
    assert not any(p.get("warnings") for p in prepared)
    assert raw.get("warnings"), "a light-background photo sent as it is should be answered with a warning"
