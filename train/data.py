"""Data sets as in-memory tensors: the embedded digits set, CIFAR-10/100 and ImageFolder.

Images are kept as raw pixels (uint8 or float in [0, 1]); models normalise
internally with the mean/std computed here from the training split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
SPLIT_SEED = 0


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


def _require_dir(data_dir: str | Path | None, name: str) -> Path:
    if data_dir is None:
        raise ValueError(f"--data {name} needs --data-dir pointing at the local files (nothing is downloaded)")
    path = Path(data_dir)
    if not path.is_dir():
        raise ValueError(f"--data-dir {path} is not a directory")
    return path


def load_cifar_split(name: str, data_dir) -> DataSplit:
    """CIFAR-10/100 from the python-format batches under ``data_dir`` (no download)."""
    from torchvision import datasets

    root = _require_dir(data_dir, name)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as exc:
        raise ValueError(f"{name} files not found under {root}: {exc}") from None

    def pack(ds):
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return x, torch.tensor(ds.targets, dtype=torch.int64)

    trx, try_ = pack(train)
    tex, tey = pack(test)
    return DataSplit(name, list(train.classes), trx, try_, tex, tey)


def load_imagefolder_split(data_dir, image_size: int = 32, test_fraction: float = 0.25, seed: int = SPLIT_SEED) -> DataSplit:
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
    if name == "digits":
        return load_digits_split()
    if name in ("cifar10", "cifar100"):
        return load_cifar_split(name, data_dir)
    if name == "imagefolder":
        return load_imagefolder_split(data_dir, image_size=image_size)
    raise ValueError(f"unknown data set {name!r}; choose one of {list(DATASETS)}")
