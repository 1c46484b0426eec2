"""Checkpoint I/O: ``model.safetensors`` (weights + trusted filler pool) and ``config.json``.

Weights never go through pickle. Saving writes a temporary directory and
renames it into place, so a crash never leaves a half-written checkpoint.
Loading validates everything and raises ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from codedsmooth.core import CodingSpec, TrainedCoding, hoist_affine_prefix

from .architectures import StagedModel, build_model
from .card import CARD_FILE, CardError, RobustnessCard, read_card
from .config import FORMAT_VERSION, CheckpointConfig
from .regular_files import NotRegularFile, descriptor_path, open_regular, read_regular

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FILLER_KEY = "filler.inputs"
MODEL_PREFIX = "model."
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    path: Path
    config: CheckpointConfig
    model: StagedModel
    filler: torch.Tensor  # (m, *input_shape) trusted clean inputs, float32 in [0, 1]
    card: RobustnessCard | None = None  # robustness.json beside config.json, validated at load (None: there is none)
    sha256: str | None = None  # of model.safetensors, hashed at load: clients and audits can name the exact weights

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.config.input_shape)

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    @property
    def target_block(self) -> str:
        return self.config.coding.target_block

    @cached_property
    def background(self) -> tuple[float, ...]:
        """Pixel value per channel, in [0, 1], that transparent areas of an uploaded image are composited onto.

        ``background`` in config.json; for checkpoints written before it existed, derived from the
        trusted filler as ``save_checkpoint`` does (black for MNIST-style data).
        """
        if self.config.background is not None:
            return tuple(float(v) for v in self.config.background)
        return border_background(self.filler)

    def coded_split(self) -> tuple[nn.Sequential, nn.Sequential]:
        """(trunk, coded block) as RCI runs them: the target block's leading affine layers go to the trunk."""
        return hoist_affine_prefix(*self.model.split(self.target_block))

    @property
    def trained_coding(self) -> TrainedCoding:
        return self.config.coding.trained()

    def coding_spec(
        self,
        enabled: bool = True,
        scope: str | None = None,
        k: int | None = None,
        n: int | None = None,
        decode_tolerance: float | None = None,
    ) -> CodingSpec:
        """The spec a server resolves for this checkpoint and these overrides (None: the default)."""
        return CodingSpec.resolve(
            self.trained_coding, enabled=enabled, scope=scope, k=k, n=n, decode_tolerance=decode_tolerance
        )


def border_background(images: torch.Tensor) -> tuple[float, ...]:
    """The median of the border pixels of ``images`` (n, C, H, W), per channel, rounded to 1/255:
    the background of the data the model was trained on (0 for MNIST-style white-on-black digits)."""
    x = images.detach().float().cpu()
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (n, C, 2W + 2H)
    median = border.transpose(0, 1).reshape(x.shape[1], -1).median(dim=1).values.clamp(0, 1)
    return tuple(round(float(v) * 255) / 255 for v in median)


def save_checkpoint(
    out_dir: str | os.PathLike[str], model: StagedModel, config: dict[str, Any], filler: torch.Tensor
) -> Path:
    """Write ``out_dir`` atomically (temp dir + rename); replaces an existing checkpoint.

    ``config`` without a ``background`` gets the one of the filler's data (``border_background``).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {"background": list(border_background(filler)), **config}
    config = CheckpointConfig.model_validate({"format_version": FORMAT_VERSION, **config}).model_dump(mode="json")
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


def _resolve(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{p}: pickle checkpoints are refused; use {WEIGHTS_FILE} (safetensors)")
        if p.suffix == ".json":
            raise CheckpointError(
                f"{p}: this is a JSON file, not the weights; give the checkpoint directory ({p.parent}), which holds {WEIGHTS_FILE} and {CONFIG_FILE}"
            )
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


def _problems(exc: ValidationError) -> str:
    """pydantic's errors as 'field.path: what is wrong' (model-level checks name their fields themselves)."""
    parts = []
    for e in exc.errors()[:5]:
        msg = e["msg"].removeprefix("Value error, ")
        loc = ".".join(map(str, e["loc"]))
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def read_config(config_path: Path) -> CheckpointConfig:
    if not config_path.exists():
        raise CheckpointError(f"{config_path}: missing")
    try:
        raw = json.loads(read_regular(config_path).decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    except NotRegularFile as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        return CheckpointConfig.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{config_path}: {_problems(exc)}") from None


def _header_shapes(weights_path: Path, opened: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor names → (shape, dtype) from the safetensors header (of ``opened``: the file as opened), without reading the data."""
    try:
        with safe_open(opened, framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc}); pickle is refused") from None


def _check_filler(weights_path: Path, filler: torch.Tensor | None, config: CheckpointConfig) -> torch.Tensor:
    """Trusted filler must be real inputs: the right shape, finite and inside [0, 1]."""
    if filler is None:
        raise CheckpointError(f"{weights_path}: trusted filler pool {FILLER_KEY!r} missing")
    if tuple(filler.shape[1:]) != tuple(config.input_shape) or filler.shape[0] < 1:
        raise CheckpointError(
            f"{weights_path}: filler pool shape {tuple(filler.shape)} does not match input_shape {config.input_shape}"
        )
    if not filler.is_floating_point():
        raise CheckpointError(
            f"{weights_path}: filler pool has dtype {filler.dtype}; expected floating point pixels in [0, 1]"
        )
    filler = filler.float()
    if not bool(torch.isfinite(filler).all()):
        raise CheckpointError(f"{weights_path}: filler pool holds NaN or Inf")
    if float(filler.min()) < 0.0 or float(filler.max()) > 1.0:
        raise CheckpointError(
            f"{weights_path}: filler pool values span [{float(filler.min()):g}, {float(filler.max()):g}]; inputs are pixels in [0, 1]"
        )
    return filler


def _file_sha256(f: BinaryIO) -> str:
    """SHA-256 of the opened weights file as it is on disk (the digest ``report`` publishes and ``sha256sum`` prints)."""
    h = hashlib.sha256()
    f.seek(0)
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate a checkpoint directory (or its ``model.safetensors``); model in eval mode.

    Order matters: the config is validated, then the model is built on the meta
    device (no memory) and its tensor shapes compared with the file's header,
    and only then are weights read and the model materialised. Every file is
    opened only as a regular file (``.regular_files``: a FIFO or device is named,
    never waited on), and the weights are read and hashed through one descriptor.
    """
    weights_path, config_path = _resolve(path)
    config = read_config(config_path)
    try:
        card = read_card(config_path.parent / CARD_FILE)
    except CardError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        weights = open_regular(weights_path)
    except NotRegularFile as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:
        raise CheckpointError(f"{weights_path}: cannot read it ({exc.strerror or exc})") from None
    with weights:
        model, filler = _load_weights(weights_path, descriptor_path(weights, weights_path), config, config_path)
        sha256 = _file_sha256(weights)
    model.to(device)
    return Checkpoint(Path(path), config, model, filler.to(device), card, sha256)


def _load_weights(
    weights_path: Path, opened: str, config: CheckpointConfig, config_path: Path
) -> tuple[StagedModel, torch.Tensor]:
    """The model (eval mode, on the CPU) and its filler pool from the weights file ``opened`` (named ``weights_path``)."""
    header = _header_shapes(weights_path, opened)
    try:
        with torch.device("meta"):
            skeleton = build_model(config.arch, **config.arch_kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{config_path}: cannot build {config.arch!r} from arch_kwargs: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    stored = {k[len(MODEL_PREFIX) :]: shape for k, (shape, _) in header.items() if k.startswith(MODEL_PREFIX)}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: tensors do not match {config.arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, shape in expected.items():
        if stored[key] != shape:
            raise CheckpointError(f"{weights_path}: tensor {key!r} has shape {stored[key]}, expected {shape}")
    try:
        skeleton.split(config.coding.target_block)
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: coding.target_block: {exc}") from None
    try:
        tensors = load_file(opened)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc}); pickle is refused") from None
    model = build_model(config.arch, **config.arch_kwargs)
    state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise CheckpointError(f"{weights_path}: tensors {bad[:5]} hold NaN or Inf")
    model.load_state_dict(state)
    filler = _check_filler(weights_path, tensors.get(FILLER_KEY), config)
    model.eval()
    try:
        with torch.no_grad():
            probe = model(filler[:1])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{config_path}: {config.arch} cannot run on input_shape {config.input_shape}: {str(exc).splitlines()[0]}"
        ) from None
    if probe.shape != (1, len(config.classes)):
        raise CheckpointError(
            f"{config_path}: model outputs {tuple(probe.shape[1:])} values but {len(config.classes)} classes are named"
        )
    return model, filler


def default_checkpoint_path() -> Path:
    """The checkpoint shipped inside the package (digits, small CNN, coded-smoothing)."""
    import codedsmooth

    return Path(codedsmooth.__file__).resolve().parent / "default_checkpoint"
