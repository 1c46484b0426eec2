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
from .samples import SAMPLE_SEED, balanced_order
from .targets import HttpTarget, InProcessTarget, RCIModel


def evaluation_data(ck: Checkpoint, samples: int, data_dir=None, seed: int = SAMPLE_SEED):
    """``samples`` test items of the checkpoint's data set, class-stratified (a prefix of the seeded
    balanced order: every class in equal shares when ``samples`` is a multiple of the classes), and a
    clean pool of training items."""
    name = ck.config.dataset
    data = load_dataset(name, data_dir, image_size=ck.input_shape[-1])
    if tuple(data.input_shape) != ck.input_shape:
        raise ValueError(f"data set {name} has input shape {data.input_shape}, checkpoint expects {ck.input_shape}")
    idx = balanced_order(data.test_y, seed)[:samples]
    x = as_float(data.test_x[idx])
    y = data.test_y[idx]
    pool = as_float(data.train_x[:512])
    return x, y, pool


def make_target(
    ck: Checkpoint,
    url: str | None,
    spec: CodingSpec,
    clean_pool,
    seed: int,
    api_key: str | None = None,
    model: str | None = None,
):
    if url:
        return HttpTarget(url, api_key=api_key, model=model)
    return InProcessTarget(RCIModel(ck, spec, clean_pool, seed=seed + 100))


@dataclass
class TargetConfig:
    """What ``codedsmooth attack`` attacks and where the report goes."""

    checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "the attacker's copy of the model; the in-process target when url is not given (default: the embedded checkpoint; with --url it must be the served model, which is checked)"
        },
    )
    url: str | None = field(
        default=None, metadata={"help": "attack a running server at this URL instead of an in-process target"}
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "with --url: the model of a repository server (serve --model-repository) to attack, by its name there; the served answers must agree with --checkpoint's (default: the server's first model, whose name must be the checkpoint's)"
        },
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "API key for --url, sent as Authorization: Bearer (default: env CODEDSMOOTH_API_KEY, which keeps it out of shell history)"
        },
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "local files of the checkpoint's data set when it does not ship with a package"}
    )
    rci: bool = field(default=True, metadata={"help": "in-process target: RCI on/off"})
    rci_scope: Scope | None = field(
        default=None,
        metadata={"help": "in-process target: coding scope (default: the served default, request)", "choices": SCOPES},
    )
    rci_group_size: int | None = field(
        default=None, metadata={"help": "in-process target: K (default: the checkpoint's)"}
    )
    coded_points: int | None = field(
        default=None, metadata={"help": "in-process target: N (default: the checkpoint's final N)"}
    )
    report: str | None = field(default=None, metadata={"help": "write the JSON report here"})
    plot: str | None = field(default=None, metadata={"help": "write a PNG plot of accuracy vs eps here"})


AGREEMENT_ITEMS = 32  # clean items on which the served model and the attacker's copy must agree
AGREEMENT = 0.9


def check_served_model(ck: Checkpoint, target: HttpTarget, x: torch.Tensor, given: bool, named: bool = False) -> dict:
    """The served model against the attacker's copy: name, classes, and agreement on clean answers.

    Without a ``--checkpoint`` the copy is the embedded checkpoint; a server of another model fails
    here instead of silently describing the wrong model. A repository model chosen by ``--model``
    (``named``) has the operator's name, not the checkpoint's: its answers must agree all the same.
    """
    info = target.info
    source = "--checkpoint" if given else "the embedded default checkpoint (no --checkpoint given)"
    if not named and info["name"] != ck.name:
        raise ValueError(
            f"the server serves {info['name']!r} but the attacker's copy, {source}, is {ck.name!r}: pass --checkpoint with the served model"
        )
    if list(info.get("classes", ck.config.classes)) != list(ck.config.classes):
        raise ValueError(f"the server's classes {info['classes']} differ from those of the attacker's copy ({source})")
    items = x[:AGREEMENT_ITEMS]
    with torch.no_grad():
        mine = ck.model.eval()(items).argmax(1)
    served = target.predict_proba(items).argmax(1)
    agreement = float((mine == served).float().mean())
    if agreement < AGREEMENT:
        raise ValueError(
            f"the server's answers agree with the attacker's copy ({source}) on only {100 * agreement:.0f} % of {len(items)} clean items: "
            "it serves other weights under the same name; pass --checkpoint with the served weights"
        )
    return {"copy": source, "name": ck.name, "served_as": info["name"], "agreement": agreement, "items": len(items)}


def attack_command(cfg: AttackConfig, args: TargetConfig) -> dict:
    cfg.validate()
    if args.plot and not cfg.attack_class.per_eps:
        raise ValueError(
            f"--plot draws accuracy against ε; the {cfg.attack} attack has no ε (its results are in the JSON report): drop --plot"
        )
    torch.manual_seed(cfg.seed)
    ck = load_checkpoint(args.checkpoint or default_checkpoint_path())
    x, y, pool = evaluation_data(ck, cfg.samples, args.data_dir)
    spec = ck.coding_spec(enabled=args.rci, scope=args.rci_scope, k=args.rci_group_size, n=args.coded_points)
    if args.model and not args.url:
        raise ValueError("--model names a model of the server at --url: give --url too")
    target = make_target(ck, args.url, spec, pool, cfg.seed, args.api_key, args.model)
    identity = (
        check_served_model(ck, target, x, args.checkpoint is not None, named=args.model is not None)
        if args.url
        else None
    )
    report = run_attack(cfg, ck, target, x, y, pool)
    if identity:
        report["attacker_copy"] = identity
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot and "robust_accuracy" in report:
        lines = {f"{cfg.attack}/{cfg.threat} vs {target.name}": report["robust_accuracy"]}
        for c in report.get("sanity", []):
            if c["name"] == "identity permutation":
                lines.setdefault("same attack, no RCI", {})[f"{c['eps']:g}"] = c["reference"]
                lines.setdefault("RCI fixed to identity", {})[f"{c['eps']:g}"] = c["measured"]
        plot_accuracy(lines, args.plot, f"{ck.name}: {cfg.attack} ({cfg.threat})")
    return report
