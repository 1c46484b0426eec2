"""Data sets: the IDX reader against files written here, MNIST's embedded split, Fashion-MNIST from IDX."""

import hashlib

import numpy as np
import pytest
import torch
from helpers import write_idx

from codedsmooth.train import data as data_module, load_dataset
from codedsmooth.train.data import FASHION_MNIST_ENV, FASHION_MNIST_SYSTEM_DIR, IDX_FILES, IdxError, read_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 50, (3, 5, 4)) if np.dtype(dtype).kind == "f" else rng.integers(0, 120, (3, 5, 4))).astype(
        dtype
    )
    path = tmp_path / f"a-idx3{suffix}"
    write_idx(path, arr)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (3, 5, 4)
    np.testing.assert_array_equal(back, arr)


def test_idx_header_is_the_standard_one(tmp_path):
    write_idx(tmp_path / "l", np.array([7, 2, 1], dtype=np.uint8))
    assert (tmp_path / "l").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1])  # magic 0x00000801, n = 3


def test_corrupt_idx_files_give_clear_errors(tmp_path):
    good = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in (2, 3, 3)) + bytes(18)
    cases = {
        "magic": (b"\x01\x00" + good[2:], "bad IDX magic number 0x01000803"),
        "type": (bytes([0, 0, 0x42, 3]) + good[4:], "bad IDX magic number"),
        "short-data": (good[:-1], r"dimensions \(2, 3, 3\) of uint8 need 18 data bytes, the file has 17"),
        "long-data": (good + b"\x00", "the file has 19"),
        "short-header": (good[:9], "header declares 3 dimensions but the file has only 9 bytes"),
        "tiny": (b"\x00\x00", "too short for an IDX header"),
        "gzip": (b"\x1f\x8b" + b"not really gzip", "corrupt gzip stream"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(IdxError, match=message) as info:
            read_idx(path)
        assert str(path) in str(info.value)
    with pytest.raises(IdxError, match="cannot read"):
        read_idx(tmp_path / "absent")


def _write_fake_mnist(root, n_train=30, n_test=20, gz=True, size=28, label_max=9):
    rng = np.random.default_rng(1)
    suffix = ".gz" if gz else ""
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, size, size)).astype(np.uint8),
        "train_y": (np.arange(n_train) % (label_max + 1)).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, size, size)).astype(np.uint8),
        "test_y": (np.arange(n_test) % (label_max + 1)).astype(np.uint8),
    }
    for key, stem in IDX_FILES.items():
        write_idx(root / f"{stem}{suffix}", arrays[key])
    return arrays


@pytest.mark.parametrize("name,gz", [("mnist", True), ("mnist", False), ("fashion-mnist", True)])
def test_idx_data_sets_from_a_data_dir(tmp_path, name, gz):
    arrays = _write_fake_mnist(tmp_path, gz=gz)
    data = load_dataset(name, tmp_path)
    assert data.name == name and data.input_shape == (1, 28, 28) and len(data.classes) == 10
    assert data.train_x.dtype == torch.uint8
    np.testing.assert_array_equal(data.train_x[:, 0].numpy(), arrays["train_x"])
    np.testing.assert_array_equal(data.test_y.numpy(), arrays["test_y"].astype(np.int64))
    if name == "fashion-mnist":
        assert data.classes[9] == "Ankle boot"


def test_idx_data_sets_also_read_torchvisions_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_fake_mnist(raw, gz=False)
    assert len(load_dataset("fashion-mnist", tmp_path).train_x) == 30


def test_idx_data_set_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="data set mnist needs data_dir|data_dir .* is not a directory"):
        load_dataset("mnist", tmp_path / "none")
    _write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("mnist", tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    arrays = _write_fake_mnist(other)
    write_idx(other / "t10k-labels-idx1-ubyte.gz", arrays["test_y"][:-1])
    with pytest.raises(IdxError, match="20 images but 19 labels"):
        load_dataset("mnist", other)
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_fake_mnist(bad, label_max=11)
    with pytest.raises(IdxError, match="found label 11"):
        load_dataset("mnist", bad)


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


def _hashes(x):
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in x}


def test_embedded_mnist_split_is_stratified_deterministic_and_disjoint(mnist):
    assert mnist.name == "mnist" and mnist.input_shape == (1, 28, 28) and mnist.classes == [str(i) for i in range(10)]
    assert len(mnist.train_x) == 4000 and len(mnist.test_x) == 1000
    assert torch.bincount(mnist.train_y, minlength=10).tolist() == [400] * 10
    assert torch.bincount(mnist.test_y, minlength=10).tolist() == [100] * 10
    again = load_dataset("mnist")
    assert torch.equal(again.train_x, mnist.train_x) and torch.equal(again.test_y, mnist.test_y)
    train_h, test_h = _hashes(mnist.train_x), _hashes(mnist.test_x)
    assert len(train_h) + len(test_h) >= 4990  # (almost) no duplicate images at all
    assert not train_h & test_h


def test_embedded_mnist_images_are_real_digits(mnist):
    x = mnist.train_x.float() / 255
    assert mnist.train_x.dtype == torch.uint8
    assert 0.10 < float(x.mean()) < 0.16  # MNIST's mean pixel is 0.13; noise would be 0.5
    assert float((mnist.train_x == 0).float().mean()) > 0.7  # mostly black background
    assert float(x[:, :, :3].mean()) < 0.01  # empty top rows, the digit is centred
    # a nearest-class-mean classifier on raw pixels gets about 80 % on MNIST, chance is 10 %
    centroids = torch.stack([x[mnist.train_y == c].flatten(1).mean(0) for c in range(10)])
    xt = mnist.test_x.float().flatten(1) / 255
    pred = torch.cdist(xt, centroids).argmin(1)
    assert float((pred == mnist.test_y).float().mean()) > 0.7


def test_training_subset_is_stratified_nested_and_leaves_the_test_split():
    from collections import Counter

    from codedsmooth.train.data import training_subset

    data = load_dataset("mnist")
    full = Counter(data.train_y.tolist())
    rows = {tuple(r.tolist()): i for i, r in enumerate(data.train_x.flatten(1))}  # pixels → index in the training split
    picked = {}
    for size in (500, 1000, 1234):
        sub = training_subset(data, size)
        assert (
            len(sub.train_y) == size and torch.equal(sub.test_x, data.test_x) and torch.equal(sub.test_y, data.test_y)
        )
        counts = Counter(sub.train_y.tolist())
        # each class's count is its share of size, rounded by at most one
        assert all(abs(counts[c] - size * full[c] / len(data.train_y)) < 1 for c in full), counts
        picked[size] = {rows[tuple(r.tolist())] for r in sub.train_x.flatten(1)}
        assert all(data.train_y[i] == sub.train_y[j] for j, i in enumerate(sorted(picked[size])))
    assert picked[500] < picked[1000] < picked[1234]
    assert torch.equal(training_subset(data, 500).train_x, training_subset(data, 500).train_x)
    assert training_subset(data, len(data.train_y)) is data
    with pytest.raises(ValueError, match="train_size"):
        training_subset(data, len(data.train_y) + 1)


def test_fashion_mnist_is_searched_in_data_dir_then_the_env_variable_then_the_package_folder(tmp_path, monkeypatch):
    given, env, system = (tmp_path / d for d in ("given", "env", "system"))
    for root, n_train in ((given, 10), (env, 20), (system, 30)):
        root.mkdir()
        _write_fake_mnist(root, n_train=n_train)
    monkeypatch.setattr(data_module, "FASHION_MNIST_SYSTEM_DIR", system)
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    assert len(load_dataset("fashion-mnist").train_x) == 30
    monkeypatch.setenv(FASHION_MNIST_ENV, str(env))
    assert len(load_dataset("fashion-mnist").train_x) == 20
    assert len(load_dataset("fashion-mnist", given).train_x) == 10
    # the first place given is used: an empty one is an error naming the package and --data-dir, not a fall-back
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(FASHION_MNIST_ENV, str(empty))
    with pytest.raises(
        ValueError,
        match=r"missing train-images-idx3-ubyte\[\.gz\] in .*empty \(\$CODEDSMOOTH_FASHION_MNIST_DIR\); install the files with `apt-get install -y dataset-fashion-mnist` or point --data-dir",
    ):
        load_dataset("fashion-mnist")
    monkeypatch.delenv(FASHION_MNIST_ENV)
    monkeypatch.setattr(data_module, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    with pytest.raises(
        ValueError,
        match=r"no folder .*not-installed \(the default folder\); install the files with `apt-get install -y dataset-fashion-mnist`",
    ):
        load_dataset("fashion-mnist")


def test_cli_without_fashion_mnist_says_how_to_get_it_in_one_line(tmp_path, monkeypatch, capsys):
    from codedsmooth.cli import main

    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    assert main(["train", "--data", "fashion-mnist", "--epochs", "1", "--out", str(tmp_path / "ck")]) != 0
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "apt-get install -y dataset-fashion-mnist" in err
        and "--data-dir" in err
        and "Traceback" not in err
    )
    assert not (tmp_path / "ck").exists()


@pytest.mark.skipif(
    not FASHION_MNIST_SYSTEM_DIR.is_dir(),
    reason="Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist",
)
def test_fashion_mnist_from_the_debian_package_without_data_dir(monkeypatch):
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    data = load_dataset("fashion-mnist")
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_y).tolist() == [6000] * 10 and torch.bincount(data.test_y).tolist() == [1000] * 10
    assert data.classes[0] == "T-shirt/top" and data.train_x.dtype == torch.uint8
