"""``codedsmooth attack``: load the attacker's checkpoint and data, pick the target, run, write report and plot."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from codedsmooth.core import SCOPES, CodingSpec, Scope
from codedsmooth.models import Checkpoint, default_checkpoint_path, load_checkpoint
from codedsmooth.train import as_float, load_dataset

from .evaluate import AttackConfig, run_attack
from .plot import plot_accuracy
from .targets import HttpTarget, InProcessTarget, RCIModel


def evaluation_data(ck: Checkpoint, samples: int, data_dir=None):
    """The first ``samples`` test items of the checkpoint's data set and a clean pool of training items."""
    name = ck.config.dataset
    data = load_dataset(name, data_dir, image_size=ck.input_shape[-1])
    if tuple(data.input_shape) != ck.input_shape:
        raise ValueError(f"data set {name} has input shape {data.input_shape}, checkpoint expects {ck.input_shape}")
    x = as_float(data.test_x[:samples])
    y = data.test_y[:samples]
    pool = as_float(data.train_x[:512])
    return x, y, pool


def make_target(ck: Checkpoint, url: str | None, spec: CodingSpec, clean_pool, seed: int, api_key: str | None = None):
    if url:
        return HttpTarget(url, api_key=api_key)
    return InProcessTarget(RCIModel(ck, spec, clean_pool, seed=seed + 100))


@dataclass
class TargetConfig:
    """What ``codedsmooth attack`` attacks and where the report goes."""

    checkpoint: str | None = field(default=None, metadata={"help": "the attacker's copy of the model; the in-process target when url is not given (default: the embedded checkpoint)"})
    url: str | None = field(default=None, metadata={"help": "attack a running server at this URL instead of an in-process target"})
    api_key: str | None = field(default=None, metadata={"help": "API key for --url, sent as Authorization: Bearer (default: env CODEDSMOOTH_API_KEY, which keeps it out of shell history)"})
    data_dir: str | None = field(default=None, metadata={"help": "local files of the checkpoint's data set when it does not ship with a package"})
    rci: bool = field(default=True, metadata={"help": "in-process target: RCI on/off"})
    rci_scope: Scope | None = field(default=None, metadata={"help": "in-process target: coding scope (default: the served default, request)", "choices": SCOPES})
    rci_group_size: int | None = field(default=None, metadata={"help": "in-process target: K (default: the checkpoint's)"})
    coded_points: int | None = field(default=None, metadata={"help": "in-process target: N (default: the checkpoint's final N)"})
    report: str | None = field(default=None, metadata={"help": "write the JSON report here"})
    plot: str | None = field(default=None, metadata={"help": "write a PNG plot of accuracy vs eps here"})


def attack_command(cfg: AttackConfig, args: TargetConfig) -> dict:
    cfg.validate()
    torch.manual_seed(cfg.seed)
    ck = load_checkpoint(args.checkpoint or default_checkpoint_path())
    x, y, pool = evaluation_data(ck, cfg.samples, args.data_dir)
    spec = ck.coding_spec(enabled=args.rci, scope=args.rci_scope, k=args.rci_group_size, n=args.coded_points)
    target = make_target(ck, args.url, spec, pool, cfg.seed, args.api_key)
    if args.url and target.info["name"] != ck.name:
        raise ValueError(f"server serves {target.info['name']!r} but the attacker's checkpoint is {ck.name!r}; the attacker needs the served model")
    report = run_attack(cfg, ck, target, x, y, pool)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot and "robust_accuracy" in report:
        lines = {f"{cfg.attack}/{cfg.threat} vs {target.name}": report["robust_accuracy"]}
        for check in report.get("sanity", []):
            if check["name"] == "identity permutation":
                lines["same attack, no RCI"] = check["reference"]
                lines["RCI fixed to identity"] = check["value"]
        plot_accuracy(lines, args.plot, f"{ck.name}: {cfg.attack} ({cfg.threat})")
    return report
