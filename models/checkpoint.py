"""Checkpoint I/O: ``model.safetensors`` (weights + trusted filler pool) and ``config.json``.

Weights never go through pickle. Saving writes a temporary directory and
renames it into place, so a crash never leaves a half-written checkpoint.
Loading validates everything and raises ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .architectures import ARCHITECTURES, StagedModel, build_model

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FILLER_KEY = "filler.inputs"
MODEL_PREFIX = "model."
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
REQUIRED_KEYS = ("format_version", "name", "arch", "arch_kwargs", "input_shape", "classes", "normalization", "training", "coding", "dataset")
METHODS = ("erm", "mixup", "coded", "pgd-at")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    path: Path
    config: dict
    model: StagedModel
    filler: torch.Tensor  # (m, *input_shape) trusted clean inputs

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.config["input_shape"])

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def target_block(self) -> str:
        return self.config["coding"]["target_block"]


def save_checkpoint(out_dir, model: StagedModel, config: dict, filler: torch.Tensor) -> Path:
    """Write ``out_dir`` atomically (temp dir + rename); replaces an existing checkpoint."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, **config}
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"checkpoint config lacks {missing}")
    tensors = {MODEL_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors[FILLER_KEY] = filler.detach().cpu().float().contiguous()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "codedsmooth": str(FORMAT_VERSION)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _apply_umask(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _apply_umask(directory: Path) -> None:
    """mkdtemp makes 0700 dirs; give the checkpoint the usual umask-derived modes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~mask)


def _resolve(path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{p}: pickle checkpoints are refused; use {WEIGHTS_FILE} (safetensors)")
        return p, p.parent / CONFIG_FILE
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found")
    weights = p / WEIGHTS_FILE
    if not weights.exists():
        pickles = sorted(q.name for q in p.iterdir() if q.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{weights}: missing; found pickle file(s) {pickles}, which are refused")
        raise CheckpointError(f"{weights}: missing")
    return weights, p / CONFIG_FILE


def read_config(config_path: Path) -> dict:
    if not config_path.exists():
        raise CheckpointError(f"{config_path}: missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{config_path}: missing keys {missing}")
    if config["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {config['format_version']!r}, expected {FORMAT_VERSION}")
    if config["arch"] not in ARCHITECTURES:
        raise CheckpointError(f"{config_path}: unknown architecture {config['arch']!r}; known: {sorted(ARCHITECTURES)}")
    shape = config["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise CheckpointError(f"{config_path}: input_shape must be [C, H, W] of positive ints, got {shape!r}")
    classes = config["classes"]
    if not (isinstance(classes, list) and len(classes) >= 2):
        raise CheckpointError(f"{config_path}: classes must list at least 2 names")
    method = config["training"].get("method")
    if method not in METHODS:
        raise CheckpointError(f"{config_path}: training.method {method!r} not in {list(METHODS)}")
    for key in ("k", "n", "target_block"):
        if key not in config["coding"]:
            raise CheckpointError(f"{config_path}: coding.{key} missing")
    return config


def load_checkpoint(path, device="cpu") -> Checkpoint:
    """Load and validate a checkpoint directory (or its ``model.safetensors``); model in eval mode."""
    weights_path, config_path = _resolve(path)
    config = read_config(config_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc}); pickle is refused") from None
    try:
        model = build_model(config["arch"], **config["arch_kwargs"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: cannot build {config['arch']!r} from arch_kwargs: {exc}") from None
    state = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights_path}: tensors do not match {config['arch']}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{weights_path}: tensor {key!r} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    model.load_state_dict(state)
    try:
        model.split(config["coding"]["target_block"])
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: coding.target_block: {exc}") from None
    filler = tensors.get(FILLER_KEY)
    if filler is None:
        raise CheckpointError(f"{weights_path}: trusted filler pool {FILLER_KEY!r} missing")
    if tuple(filler.shape[1:]) != tuple(config["input_shape"]) or filler.shape[0] < 1:
        raise CheckpointError(f"{weights_path}: filler pool shape {tuple(filler.shape)} does not match input_shape {config['input_shape']}")
    with torch.no_grad():
        probe = model(torch.zeros(1, *config["input_shape"]))
    if probe.shape != (1, len(config["classes"])):
        raise CheckpointError(f"{config_path}: model outputs {tuple(probe.shape[1:])} values but {len(config['classes'])} classes are named")
    model.to(device).eval()
    return Checkpoint(Path(path), config, model, filler.to(device))


def default_checkpoint_path() -> Path:
    """The checkpoint shipped inside the package (digits, small CNN, coded-smoothing)."""
    import codedsmooth

    return Path(codedsmooth.__file__).resolve().parent / "default_checkpoint"
