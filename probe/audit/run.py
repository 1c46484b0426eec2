"""``codedsmooth audit``: a query-only robustness audit of any prediction endpoint, with no weights.

Steps: read the endpoint's metadata; draw the class-balanced sample (``probe.samples``); measure clean accuracy
on it (stopping with a diagnosis when it is near chance: the requests do not match the endpoint); run each
attack of ``--attack`` on the images it gets right, a chunk of images at a time, every chunk's per-image
results saved at once (``--resume``); write the card. The attacks are the registry's own classes
(``probe.attacks``: Square, and RayS as ``decision``), so ``attack`` and ``audit`` run one implementation.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from codedsmooth.models import Checkpoint
from codedsmooth.models.card import (
    CARD_FILE,
    AuditRun,
    CardError,
    Endpoint as CardEndpoint,
    Measurement,
    Queries,
    RobustnessCard,
    Traffic as CardTraffic,
    Unfinished,
    read_card,
)

from ..attacks import ATTACKS
from ..endpoint import (
    LAYOUTS,
    OUTPUT_KINDS,
    PROTOCOLS,
    Endpoint,
    EndpointOptions,
    EndpointRefused,
    QueryCapReached,
    Traffic,
)
from ..samples import balanced_order
from ..stats import wilson
from ..weights import sha256
from .state import AuditState
from .transfer import SurrogateTransfer

AUDIT_ATTACKS: dict[str, Any] = {  # the audit's name -> its class: the registry's own (probe.attacks.ATTACKS)
    "square": ATTACKS["square"],
    "decision": ATTACKS["rays"],
    "transfer": SurrogateTransfer,  # the report's transfer source, from --surrogate
}
AUDIT_DATA = ("mnist", "fashion-mnist", "imagefolder", "digits")
RANDOM_ATOL = 1e-4  # answers closer than this are the same (a batch's float rounding differs with its size)


@dataclass
class AuditConfig:
    """One audit; ``codedsmooth audit`` takes its options and defaults from these fields."""

    url: str | None = field(
        default=None, metadata={"help": "the endpoint's base URL (required), e.g. http://127.0.0.1:8000"}
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "the model's name at the endpoint (default: the first of GET /v1/models; a v2 endpoint without it needs the name)"
        },
    )
    protocol: str = field(
        default="auto",
        metadata={
            "help": "v2 (Open Inference Protocol), v1 (this server's), or auto: v2 when GET /v2/models/NAME answers",
            "choices": PROTOCOLS,
        },
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "API key, sent as Authorization: Bearer (default: env CODEDSMOOTH_API_KEY, which keeps it out of shell history and the card)"
        },
    )
    data: str = field(
        default="mnist",
        metadata={"help": "the data set the endpoint classifies (its test split is sampled)", "choices": AUDIT_DATA},
    )
    data_dir: str | None = field(default=None, metadata={"help": "local files of the data set (imagefolder: its root)"})
    images: int = field(
        default=20, metadata={"help": "images audited: a class-balanced sample of the test split, by index"}
    )
    eps: float = field(default=0.3, metadata={"help": "L∞ radius in pixel units [0, 1]"})
    attack: list[str] = field(
        default_factory=lambda: ["square", "decision"],
        metadata={
            "help": "square: adaptive Square (needs scores); decision: RayS, label-only, majority votes; "
            "transfer: APGD-CE adversarials of --surrogate, sent and confirmed (added when --surrogate is given)",
            "choices": tuple(AUDIT_ATTACKS),
        },
    )
    surrogate: str | None = field(
        default=None,
        metadata={
            "help": "a local checkpoint for the same data (not the endpoint's weights): its white-box adversarials are "
            "the transfer attack, each sent to the endpoint and confirmed"
        },
    )
    budget: int = field(default=500, metadata={"help": "queries per image per attack, confirmations included"})
    max_queries: int | None = field(
        default=None, metadata={"help": "hard cap on the audit's total queries, over resumed runs too (default: none)"}
    )
    votes: int | None = field(
        default=None,
        metadata={
            "help": "queries per candidate: Square's robust statistic, RayS's majority vote (default: 1 against a deterministic endpoint, 3 against a randomized one)"
        },
    )
    confirm: int = field(
        default=4, metadata={"help": "fresh queries that must all miss the label before an image counts as broken"}
    )
    clean_draws: int = field(
        default=2,
        metadata={"help": "queries per image of the clean pass (two answers that differ show a randomized endpoint)"},
    )
    pixel_scale: float = field(default=1.0, metadata={"help": "pixels are sent in [0, SCALE]: 1 or 255"})
    layout: str = field(
        default="auto",
        metadata={"help": "NCHW, NHWC, flat, or auto: from the metadata's input shape", "choices": LAYOUTS},
    )
    class_order: list[int] | None = field(
        default=None,
        metadata={
            "help": "the data set's class of each of the endpoint's outputs, in output order (default: the same order)"
        },
    )
    output: str = field(
        default="auto",
        metadata={
            "help": "what the endpoint answers: logits, probabilities, label, or auto (from the answer)",
            "choices": OUTPUT_KINDS,
        },
    )
    output_name: str | None = field(
        default=None,
        metadata={"help": "v2: the output to read (default: the first score output, else the first label output)"},
    )
    concurrency: int = field(default=8, metadata={"help": "requests in flight"})
    binary: bool = field(
        default=False,
        metadata={
            "help": "v2: send and read binary tensors (the binary data extension of Triton and this server; not MLServer): "
            "the same answers, far less parsing per query"
        },
    )
    chunk: int = field(
        default=5, metadata={"help": "images attacked together; each chunk's results are saved as it ends"}
    )
    min_clean_accuracy: float | None = field(
        default=None, metadata={"help": "stop before the attacks below this clean accuracy (default: twice chance)"}
    )
    card: str = field(
        default="audit-card.json", metadata={"help": "the card's JSON; its Markdown goes beside it (.md)"}
    )
    plot: str | None = field(default=None, metadata={"help": "also write a PNG bar plot of the accuracies here"})
    write_card: str | None = field(
        default=None,
        metadata={
            "help": "also write the card, validated, as this checkpoint directory's robustness.json (served at GET /v1/models/{name}/card)"
        },
    )
    state: str | None = field(
        default=None, metadata={"help": "the resumable state file (default: the card's path + .state.json)"}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "continue an interrupted audit from its state file; nothing finished is queried again"},
    )
    seed: int = field(default=0, metadata={"help": "sample and attack seed"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar with ETA (stderr)"})

    def validate(self) -> None:
        if not self.url:
            raise ValueError("--url is required: the endpoint to audit")
        if not 0 <= self.eps <= 1:
            raise ValueError(f"eps must lie in [0, 1] (pixels in [0, 1]), got {self.eps}")
        if self.surrogate and "transfer" not in self.attack:
            self.attack = [*self.attack, "transfer"]
        if "transfer" in self.attack and not self.surrogate:
            raise ValueError(
                "--attack transfer needs --surrogate CHECKPOINT: the local model whose adversarials transfer"
            )
        unknown = [a for a in self.attack if a not in AUDIT_ATTACKS]
        if unknown or not self.attack:
            raise ValueError(f"unknown attack(s) {unknown}; known: {list(AUDIT_ATTACKS)}")
        counts = {
            "images": self.images,
            "budget": self.budget,
            "clean_draws": self.clean_draws,
            "chunk": self.chunk,
            "concurrency": self.concurrency,
        }
        bad = {k: v for k, v in counts.items() if v < 1}
        if self.votes is not None and self.votes < 1:
            bad["votes"] = self.votes
        if self.confirm < 0:
            bad["confirm"] = self.confirm
        if bad:
            raise ValueError(f"these must be positive: {bad}")

    def endpoint_options(self) -> EndpointOptions:
        assert self.url is not None
        return EndpointOptions(
            url=self.url,
            model=self.model,
            protocol=self.protocol,
            api_key=self.api_key,
            pixel_scale=self.pixel_scale,
            layout=self.layout,
            class_order=self.class_order,
            output=self.output,
            output_name=self.output_name,
            concurrency=self.concurrency,
            max_queries=self.max_queries,
            binary=self.binary,
        )

    def settings(self) -> dict[str, Any]:
        """What changes an answer: the state file's key (not the cap, the card's path or the concurrency)."""
        skip = {
            "api_key",
            "max_queries",
            "concurrency",
            "binary",
            "card",
            "plot",
            "write_card",
            "state",
            "resume",
            "progress",
            "min_clean_accuracy",
        }
        return {k: v for k, v in asdict(self).items() if k not in skip}


def _data(cfg: AuditConfig, endpoint: Endpoint) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    from codedsmooth.train import as_float, load_dataset

    shape = [s for s in endpoint.meta.shape if s > 0]
    size = shape[-1] if len(shape) >= 2 else (shape[-2] if len(shape) == 3 else 32)
    data = load_dataset(cfg.data, cfg.data_dir, image_size=size)
    order = balanced_order(data.test_y, cfg.seed)
    if cfg.images > len(order):
        raise ValueError(f"--images {cfg.images}: the {cfg.data} test split has {len(order)}")
    idx = order[: cfg.images]
    x, y = as_float(data.test_x[idx]), data.test_y[idx].long()
    want = math.prod(endpoint.meta.shape) if endpoint.meta.shape and all(s > 0 for s in endpoint.meta.shape) else None
    if want is not None and want != math.prod(x.shape[1:]):
        raise ValueError(
            f"the endpoint's input {endpoint.meta.input_name} has shape {endpoint.meta.shape} ({want} values), "
            f"the {cfg.data} images {list(x.shape[1:])} ({math.prod(x.shape[1:])}): audit it with the data set it classifies"
        )
    return idx, x, y, list(data.classes)


def _mismatch(endpoint: Endpoint, cfg: AuditConfig, x: torch.Tensor) -> str:
    layout = endpoint.layout(tuple(x.shape[1:]))
    return (
        f"the requests likely do not match what the endpoint expects: check --pixel-scale (sent pixels in [0, {cfg.pixel_scale:g}]), "
        f"--layout (sent {layout}, input shape {list(endpoint.encode(x[:1].numpy()).shape[1:])}), --class-order "
        f"({'as given' if cfg.class_order else 'the data set order'}) and --output ({cfg.output})"
    )


def _diagnose(pred: torch.Tensor, y: torch.Tensor, classes: int) -> str:
    """A hint from the clean answers: one class for everything suggests scale or layout; a consistent relabelling, the class order."""
    top = int(torch.bincount(pred, minlength=classes).max())
    if top >= 0.8 * len(pred):
        return "almost every image gets the same label: the pixel scale or layout is the likely mismatch"
    mapping = {}
    for c in y.unique().tolist():
        mapping[c] = int(torch.mode(pred[y == c]).values)
    consistent = sum(int((pred[y == c] == m).sum()) for c, m in mapping.items())
    if consistent >= 0.8 * len(pred) and len(set(mapping.values())) == len(mapping):
        order = ", ".join(f"{m}→{c}" for c, m in sorted(mapping.items()))
        return f"the answers are a consistent relabelling of the true classes (output→class {order}): the class order is the likely mismatch"
    return "the answers look unrelated to the images"


def _clean(cfg: AuditConfig, endpoint: Endpoint, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    try:
        draws = [endpoint.predict_proba(x) for _ in range(cfg.clean_draws)]
    except EndpointRefused as exc:
        raise ValueError(f"the endpoint refused the audit's request ({exc}); {_mismatch(endpoint, cfg, x)}") from None
    correct = torch.stack([(d.argmax(1) == y) for d in draws]).long().sum(0)
    randomized = any(not torch.allclose(draws[0], d, rtol=0, atol=RANDOM_ATOL) for d in draws[1:])
    return {
        "correct": [bool(2 * c >= cfg.clean_draws) for c in correct.tolist()],
        "labels": draws[0].argmax(1).tolist(),
        "randomized": randomized,
        "returns_scores": bool(endpoint.returns_scores),
    }


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="image", disable=not enabled, dynamic_ncols=True)


def _attack(
    cfg: AuditConfig,
    name: str,
    endpoint: Endpoint,
    state: AuditState,
    path: Path,
    x: torch.Tensor,
    y: torch.Tensor,
    todo: list[int],
    votes: int,
    surrogate: Checkpoint | None = None,
) -> str | None:
    """Attack images ``todo`` (positions in the sample) chunk by chunk; returns why it stopped early, if it did."""
    cls = AUDIT_ATTACKS[name]
    extra = {"surrogate": surrogate} if name == "transfer" else {}
    done = state.attacks.setdefault(name, {})
    left = [i for i in todo if str(i) not in done]
    bar = _progress(len(todo), name, cfg.progress)
    bar.update(len(todo) - len(left))
    try:
        for start in range(0, len(left), cfg.chunk):
            part = left[start : start + cfg.chunk]
            sent = endpoint.queries
            try:
                out = cls.query_only(
                    endpoint, x[part], y[part], cfg.eps, cfg.budget, votes, cfg.confirm, cfg.seed + part[0], **extra
                )
            except QueryCapReached as exc:
                return str(exc)
            for j, i in enumerate(part):
                done[str(i)] = {"broken": bool(out.broken[j]), "queries": int(out.queries[j])}
            state.traffic = endpoint.traffic.as_dict()
            state.save(path)
            bar.update(len(part))
            bar.set_postfix(queries=endpoint.queries - sent, refresh=False)
    finally:
        bar.close()
    return None


def _queries(values: list[int]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.median()), float(torch.quantile(t, 0.9))


def audit_command(cfg: AuditConfig, command: str = "codedsmooth audit") -> RobustnessCard:
    """Run the audit (resuming where the state file says) and write the card; returns it."""
    cfg.validate()
    card_path = Path(cfg.card)
    if cfg.write_card:
        _checkpoint_dir(Path(cfg.write_card))  # refused before any query, not after the audit
    state_path = Path(cfg.state) if cfg.state else card_path.with_name(card_path.name + ".state.json")
    settings = cfg.settings()
    state = AuditState.open(state_path, settings, cfg.resume)
    started = time.monotonic()
    surrogate = _surrogate(cfg)  # refused before any query, as --write-card is
    endpoint = Endpoint(cfg.endpoint_options(), Traffic.from_dict(state.traffic) if state.traffic else None)
    try:
        idx, x, y, classes = _data(cfg, endpoint)
        if surrogate is not None and tuple(surrogate.input_shape) != tuple(x.shape[1:]):
            raise ValueError(
                f"--surrogate {cfg.surrogate}: it takes inputs of shape {list(surrogate.input_shape)}, "
                f"the {cfg.data} images are {list(x.shape[1:])}"
            )
        if state.clean is None:
            state.clean = _clean(cfg, endpoint, x, y)
            state.traffic = endpoint.traffic.as_dict()
            state.save(state_path)
        clean = state.clean
        correct = torch.tensor(clean["correct"])
        n_classes = endpoint.n_classes or len(classes)
        floor = cfg.min_clean_accuracy if cfg.min_clean_accuracy is not None else 2.0 / n_classes
        accuracy = float(correct.float().mean())
        if accuracy < floor:
            hint = _diagnose(torch.tensor(clean["labels"]), y, n_classes)
            raise ValueError(
                f"clean accuracy {100 * accuracy:.0f} % on {len(y)} images is near chance ({100 / n_classes:.0f} %; the audit needs {100 * floor:.0f} %): "
                f"{hint}; {_mismatch(endpoint, cfg, x)}"
            )
        votes = cfg.votes or (3 if clean["randomized"] else 1)
        todo = correct.nonzero().flatten().tolist()
        stopped: dict[str, str] = {}
        for name in cfg.attack:
            cls = AUDIT_ATTACKS[name]
            if getattr(cls, "access", "labels") == "scores" and not clean["returns_scores"]:
                continue
            if name in stopped or stopped:
                continue
            why = _attack(cfg, name, endpoint, state, state_path, x, y, todo, votes, surrogate)
            if why:
                stopped[name] = why
        state.wall_s += time.monotonic() - started
        state.traffic = endpoint.traffic.as_dict()
        state.save(state_path)
        named = (
            (surrogate.name, surrogate.sha256 or sha256(surrogate.path / "model.safetensors")) if surrogate else None
        )
        layout = endpoint.layout(tuple(x.shape[1:]))
        card = build_card(cfg, endpoint, state, idx, y, votes, stopped, command, layout, named)
    finally:
        endpoint.close()
    write_card(card, card_path, cfg.plot)
    if cfg.write_card:
        write_checkpoint_card(card, Path(cfg.write_card))
    return card


def _surrogate(cfg: AuditConfig) -> Checkpoint | None:
    """The transfer attack's local model (``--surrogate``), loaded and validated."""
    if not cfg.surrogate:
        return None
    from codedsmooth.models import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(cfg.surrogate)
    except (CheckpointError, FileNotFoundError, OSError) as exc:
        raise ValueError(f"--surrogate {cfg.surrogate}: {exc}") from None


def _checkpoint_dir(path: Path) -> Path:
    missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
    if missing:
        raise ValueError(f"--write-card {path}: not a checkpoint directory (no {' or '.join(missing)})")
    return path


def write_checkpoint_card(card: RobustnessCard, directory: Path) -> Path:
    """Write ``card`` as the checkpoint's ``robustness.json``, read back and validated as the server loads it.

    A card whose endpoint exposed a checkpoint SHA-256 goes only into the checkpoint with that
    ``model.safetensors``: a card describes the weights it measured, not whatever directory is named.
    The file is written beside and renamed, so a server never loads half a card.
    """
    _checkpoint_dir(directory)
    if card.model.sha256 is not None:
        found = sha256(directory / "model.safetensors")
        if found != card.model.sha256:
            raise ValueError(
                f"--write-card {directory}: its model.safetensors has SHA-256 {found}, the audited endpoint "
                f"serves {card.model.sha256}: the card describes other weights"
            )
    target = directory / CARD_FILE
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(card.to_json(), encoding="utf-8")
    try:
        if read_card(tmp) != card:
            raise ValueError(f"{tmp}: the card read back differs from the card written")
    except (CardError, ValueError):
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return target


SETTING = {
    True: "as served at the endpoint (randomized answers)",
    False: "as served at the endpoint (deterministic answers)",
}
THREAT = {"scores": "score-based", "labels": "decision-based"}


def _sha256(value: str | None) -> str | None:
    """The endpoint's checkpoint SHA-256 where it is one (a card records only a well-formed digest)."""
    return value.lower() if value and re.fullmatch(r"[0-9a-fA-F]{64}", value) else None


def build_card(
    cfg: AuditConfig,
    endpoint: Endpoint,
    state: AuditState,
    idx: torch.Tensor,
    y: torch.Tensor,
    votes: int,
    stopped: dict[str, str],
    command: str,
    layout: str,
    surrogate: tuple[str, str] | None = None,
) -> RobustnessCard:
    """The audit as a robustness card (``source: audit``): a measurement per complete attack (and the per-image
    worst case of several), the rest in ``audit.unfinished`` with the reason."""
    assert state.clean is not None
    clean = state.clean
    n = len(y)
    correct = [bool(c) for c in clean["correct"]]
    setting = SETTING[bool(clean["randomized"])]
    rows: list[Measurement] = []
    unfinished: list[Unfinished] = []
    robust_all, complete_names, accesses = list(correct), [], set()
    for name in cfg.attack:
        cls = AUDIT_ATTACKS[name]
        access = getattr(cls, "access", "labels")
        label = f"{name}: {cls.__name__}, {cfg.budget:,} queries per image over HTTP"
        if name == "transfer" and surrogate is not None:
            label = (
                f"transfer: APGD-CE {cls.steps} steps on surrogate {surrogate[0]} (SHA-256 {surrogate[1][:12]}), "
                f"each adversarial sent and confirmed by {max(cfg.confirm, 1)} queries over HTTP"
            )
        threat = getattr(cls, "threat", None) or THREAT[access]
        if access == "scores" and not clean["returns_scores"]:
            unfinished.append(
                Unfinished(
                    attack=label,
                    threat=threat,
                    eps=cfg.eps,
                    status="skipped",
                    reason="the endpoint answers labels only; a score-based attack cannot run",
                )
            )
            continue
        done = state.attacks.get(name, {})
        attacked = [i for i in range(n) if correct[i]]
        finished = [i for i in attacked if str(i) in done]
        broken = [i for i in finished if done[str(i)]["broken"]]
        total = sum(done[str(i)]["queries"] for i in finished)
        if len(finished) < len(attacked):
            reason = (
                stopped.get(name) or f"{len(attacked) - len(finished)} images not attacked yet: run again with --resume"
            )
            unfinished.append(
                Unfinished(
                    attack=label,
                    threat=threat,
                    eps=cfg.eps,
                    status="incomplete",
                    reason=reason,
                    attacked=len(finished),
                    broken=len(broken),
                    queries=total,
                )
            )
            continue
        robust = sum(1 for i in attacked if not done[str(i)]["broken"])
        median, p90 = _queries([done[str(i)]["queries"] for i in broken])
        p = wilson(robust, n)
        rows.append(
            Measurement(
                attack=label,
                threat=threat,
                setting=setting,
                eps=cfg.eps,
                sample="audit",
                n=n,
                robust_accuracy=p.value,
                interval=(p.low, p.high),
                queries_per_broken=Queries(median=median, p90=p90) if median is not None and p90 is not None else None,
                queries=total,
            )
        )
        robust_all = [r and not done[str(i)]["broken"] for i, r in enumerate(robust_all)]
        complete_names.append(name)
        accesses.add(access)
    if len(rows) > 1:  # an image counts robust only when every complete attack missed it
        p = wilson(sum(robust_all), n)
        rows.append(
            Measurement(
                attack="worst case per image of: " + ", ".join(complete_names),
                threat="score-based" if "scores" in accesses else "decision-based",
                setting=setting,
                eps=cfg.eps,
                sample="audit",
                n=n,
                robust_accuracy=p.value,
                interval=(p.low, p.high),
                queries=sum(m.queries or 0 for m in rows),
            )
        )
    t = endpoint.traffic
    wall = state.wall_s
    rate = t.queries / wall if wall > 0 else None
    meta = endpoint.meta
    notes = [
        "query-only audit: no weights were used; indices are into the data set's test split (a class-balanced sample)",
        f"an image counts robust when it is right clean and the attack did not break it, out of all {n}",
        f"votes per candidate: {votes}; confirmations per break: {cfg.confirm}",
    ]
    if not clean["returns_scores"]:
        notes.append("label-only endpoint: the decision attack only")
    if surrogate is not None:
        notes.append(
            f"transfer surrogate: {surrogate[0]}, model.safetensors SHA-256 {surrogate[1]} (a local model; "
            "its adversarials cost no query, only their confirmations)"
        )
    return RobustnessCard(
        source="audit",
        model=CardEndpoint(
            name=meta.name,
            version=meta.version,
            sha256=_sha256(meta.sha256),
            url=endpoint.url,
            protocol="v2" if meta.protocol == "v2" else "v1",
            randomized=bool(clean["randomized"]),
        ),
        dataset=cfg.data,
        eps=[cfg.eps],
        samples={"audit": [int(i) for i in idx]},
        measurements=rows,
        clean_accuracy=sum(correct) / n,
        rate_limited=t.status.get(429, 0) + t.status.get(503, 0),
        output="scores" if clean["returns_scores"] else "labels",
        audit=AuditRun(
            input=f"{meta.input_name} {meta.datatype} {meta.shape}",
            pixel_scale=cfg.pixel_scale,
            layout=layout,
            class_order=cfg.class_order,
            output=cfg.output,
            seed=cfg.seed,
            budget=cfg.budget,
            votes=votes,
            confirm=cfg.confirm,
            traffic=CardTraffic(
                queries=t.queries,
                requests=t.requests,
                status_429=t.status.get(429, 0),
                status_503=t.status.get(503, 0),
                waited_s=round(t.waited_s, 3),
                wall_s=round(wall, 3),
                queries_per_second=rate,
                days_per_million_queries=(1e6 / rate / 86400) if rate else None,
            ),
            unfinished=unfinished,
        ),
        notes=notes,
        command=command,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def write_card(card: RobustnessCard, path: Path, plot: str | None = None) -> None:
    from .render import card_markdown, plot_card

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(card.to_json(), encoding="utf-8")
    path.with_suffix(".md").write_text(card_markdown(card), encoding="utf-8")
    if plot:
        plot_card(card, plot)
