"""The ``codedsmooth`` command line: train, serve, keys, attack, audit, bench, report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import typing
from typing import Any

if typing.TYPE_CHECKING:
    from pydantic_core import ErrorDetails


def _config_from_args(config_cls, args):
    """A config dataclass from the parsed options that share its field names."""
    fields = config_cls.__dataclass_fields__
    return config_cls(**{k: v for k, v in vars(args).items() if k in fields})


def _add_config_options(p: argparse.ArgumentParser, config_cls, skip: tuple[str, ...] = ()) -> None:
    """One option per field of a config dataclass: its name, default, help and choices come from the field."""
    import dataclasses

    for f in dataclasses.fields(config_cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        shown = " ".join(map(str, default)) if isinstance(default, list) else ("none" if default is None else default)
        helptext = f.metadata["help"]
        kw: dict[str, Any] = {
            "default": default,
            "help": helptext if "(default:" in helptext else f"{helptext} (default: {shown})",
        }
        annotation = str(f.type)
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        if annotation == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        kind = float if "float" in annotation else int if "int" in annotation else str
        if annotation.startswith("list"):
            kw["nargs"] = "+"
        p.add_argument(flag, type=kind, **kw)


def _add_train(sub) -> None:
    from codedsmooth.train.trainer import TrainConfig

    p = sub.add_parser(
        "train", allow_abbrev=False, help="train a classifier by one of the methods of --method and write a checkpoint"
    )
    _add_config_options(p, TrainConfig)
    p.set_defaults(func=_run_train)


def _without_option(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _run_train(args) -> int:
    import os

    from codedsmooth.train import distributed
    from codedsmooth.train.resume import last_saved_epoch, resume_dir
    from codedsmooth.train.trainer import TrainConfig, train

    cfg = _config_from_args(TrainConfig, args)
    cfg.validate()
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet under torchrun: start it
        code = distributed.launch(
            cfg.nproc, _without_option(args.argv, "--nproc"), saved_epoch=lambda: last_saved_epoch(cfg.out)
        )
        if code != 0:
            done = last_saved_epoch(cfg.out)
            how = (
                f"epochs 1-{done} of {cfg.epochs} are saved in {resume_dir(cfg.out)}: run the same command with --resume to continue from there"
                if done
                else "no epoch had finished: run the same command again"
            )
            print(
                f"codedsmooth train: error: training on {cfg.nproc} processes failed (exit code {code}; the failing rank's error is above); {how}",
                file=sys.stderr,
            )
        return code
    result = train(cfg)
    if distributed.from_environment().main:
        print(
            json.dumps(
                {
                    "checkpoint": str(result.checkpoint),
                    "test_accuracy": result.test_accuracy,
                    "mean_epoch_seconds": round(result.mean_epoch_seconds, 4),
                }
            )
        )
    return 0


def _add_serve(sub) -> None:
    from codedsmooth.service.settings import ServeSettings

    p = sub.add_parser(
        "serve",
        allow_abbrev=False,
        help="serve a checkpoint (or a repository of them) over HTTP with randomized coded inference",
        description="Every option is also read from the env var CODEDSMOOTH_<NAME> (flags win).",
    )
    for name, field in ServeSettings.model_fields.items():
        if name == "log_level":  # the global --log-level covers it
            continue
        flag = "--" + name.replace("_", "-")
        env = f"CODEDSMOOTH_{name.upper()}"
        default = "none" if field.default is None else field.default
        description = field.description or ""
        helptext = (
            f"{description} (env {env})"
            if "(default:" in description
            else f"{description} (env {env}; default: {default})"
        )
        annotation = str(field.annotation)
        literal = next(
            (
                a
                for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
                if typing.get_origin(a) is typing.Literal
            ),
            None,
        )
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif literal is not None:
            p.add_argument(flag, choices=list(literal.__args__), default=None, help=helptext)
        else:
            kind = int if "int" in annotation else float if "float" in annotation else str
            p.add_argument(flag, type=kind, default=None, help=helptext)
    p.set_defaults(func=_run_serve)


def _settings_problem(error: ErrorDetails, given: dict) -> str:
    """One settings error, named where the value came from: the flag, or else the ``CODEDSMOOTH_*`` env var."""
    import os

    from codedsmooth.service.errors import quoted

    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # a check across settings: its message names them
        return message
    name = str(error["loc"][0])
    env = f"CODEDSMOOTH_{name.upper()}"
    if name not in given and env in os.environ:
        return f"env {env}={quoted(os.environ[env])}: {message}"
    return f"--{name.replace('_', '-')}: {message}"


def _run_serve(args) -> int:
    from pydantic import ValidationError

    from codedsmooth.service.http.server import bind_public_socket, run_server
    from codedsmooth.service.settings import ServeSettings

    given = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    if args.log_level is not None:
        given["log_level"] = args.log_level.lower()
    try:
        settings = ServeSettings(**given)
    except ValidationError as exc:
        raise ValueError("; ".join(_settings_problem(e, given) for e in exc.errors())) from None
    from codedsmooth.models import resolve_device

    resolve_device(settings.device)
    if settings.api_keys_file is not None:
        from codedsmooth.service.access.keys import read_keys

        read_keys(
            settings.api_keys_file
        )  # a missing file or a bad line: one error naming the file and line, before anything starts  # --device cuda without CUDA: a clear error, not a failed start-up
        from codedsmooth.service.access.quota_state import check_quota_state

        check_quota_state(
            settings.quota_state, settings.api_keys_file
        )  # where the quota counters are kept can be written
    # A busy port fails now, in one line, not after the model has loaded (Ray Serve binds its own).
    listener = bind_public_socket(settings.host, settings.port) if settings.replicas is None else None
    if settings.checkpoint is not None or settings.model_repository is not None:
        from concurrent.futures import ThreadPoolExecutor

        from codedsmooth.models import load_checkpoint
        from codedsmooth.service.repository.files import check_repository

        # Fail fast with the file and the problem, before serving. Not on the main thread: torch
        # kernels run there would slow the server's model thread (see codedsmooth.service.engine).
        with ThreadPoolExecutor(1) as pool:
            if settings.model_repository is not None:
                pool.submit(check_repository, settings).result()
            else:
                assert settings.checkpoint is not None  # the settings give one checkpoint or a repository
                pool.submit(load_checkpoint, settings.checkpoint).result()
    if settings.replicas is not None:
        try:
            from codedsmooth.service.ray.serve import run_ray_serve  # imports ray: only with --replicas
        except ImportError as exc:
            raise ValueError(f"--replicas needs Ray Serve ({exc}): pip install -e '.[ray]'") from None

        return run_ray_serve(settings)
    return run_server(settings, listener=listener)


def _add_keys(sub) -> None:
    p = sub.add_parser("keys", allow_abbrev=False, help="manage the API keys file of serve --api-keys-file")
    actions = p.add_subparsers(dest="keys_command", required=True)
    add = actions.add_parser(
        "add",
        allow_abbrev=False,
        help="make a key for a new client: print it once, append its SHA-256 to the file",
        description="Prints the new key on stdout, once: it is stored nowhere (the file keeps its SHA-256). A running server picks the new line up within a second or two.",
    )
    add.add_argument("name", help="the client's name (1-64 characters of A-Z a-z 0-9 _ . -), in logs and metric labels")
    add.add_argument("--file", required=True, help="the keys file (created with mode 0600 when missing)")
    add.add_argument(
        "--rate",
        default=None,
        help="items per second for this client instead of serve --rate-limit ('none': no rate limit)",
    )
    add.add_argument(
        "--quota",
        default=None,
        help="items per quota window for this client instead of serve --quota ('none': no quota)",
    )
    add.add_argument(
        "--manage",
        action="store_true",
        help="this client may load and unload models (serve --model-control explicit); others get 403 there",
    )
    add.set_defaults(func=_run_keys_add)
    show = actions.add_parser(
        "list",
        allow_abbrev=False,
        help="list the clients of the file: name, the first 8 hex digits of the key's SHA-256, options",
        description="One client a line, in the file's order. The digest is cut to a short prefix (enough to tell two lines apart, never the whole hash).",
    )
    show.add_argument("--file", required=True, help="the keys file")
    show.set_defaults(func=_run_keys_list)
    remove = actions.add_parser(
        "remove",
        allow_abbrev=False,
        help="remove a client's line from the file; a running server refuses its key from its next reload",
        description="Rewrites the file without the client's line (comments and other lines kept, mode kept) by an atomic rename; a running server reloads it within a second or two.",
    )
    remove.add_argument("name", help="the client's name, as keys list shows it")
    remove.add_argument("--file", required=True, help="the keys file")
    remove.set_defaults(func=_run_keys_remove)


def _run_keys_add(args) -> int:
    from codedsmooth.service.access.keys import add_key

    key = add_key(args.file, args.name, rate=args.rate, quota=args.quota, manage=args.manage)
    print(key)
    print(f"added client {args.name!r} to {args.file}; the key above is shown once and stored nowhere", file=sys.stderr)
    return 0


DIGEST_SHOWN = 8  # hex digits of a key's SHA-256 that keys list shows: tells lines apart, never the whole hash


def _run_keys_list(args) -> int:
    from codedsmooth.service.access.keys import format_line, read_keys

    table = read_keys(args.file)
    for client in table.clients.values():  # the file's order
        name, digest, *options = format_line(client).split(" ")
        print(" ".join([f"{name:<16}", digest[:DIGEST_SHOWN] + "...", *options]).rstrip())
    print(f"{len(table.clients)} clients in {args.file}", file=sys.stderr)
    return 0


def _run_keys_remove(args) -> int:
    import os
    import stat
    from pathlib import Path

    from codedsmooth.service.access.keys import KeysFileError, parse_line, read_keys

    path = Path(args.file)
    if args.name not in read_keys(path).names:  # also refuses a missing or broken file, naming it
        raise KeysFileError(f"{path}: no client {args.name!r} (codedsmooth keys list --file {path} shows the clients)")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [
        line
        for n, line in enumerate(lines, 1)
        if getattr(parse_line(line, f"{path}, line {n}"), "name", None) != args.name
    ]
    # a new file renamed over the old one: a server never reads half a file, and sees a new inode
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IMODE(path.stat().st_mode))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    print(
        f"removed client {args.name!r} from {path}; a running server refuses its key from its next reload",
        file=sys.stderr,
    )
    return 0


def _add_attack(sub) -> None:
    from codedsmooth.probe.evaluate import AttackConfig
    from codedsmooth.probe.runner import TargetConfig

    p = sub.add_parser(
        "attack",
        allow_abbrev=False,
        help="attack a checkpoint in-process or a running server, with a JSON report and a plot",
    )
    _add_config_options(p, TargetConfig)
    _add_config_options(p, AttackConfig)
    p.set_defaults(func=_run_attack)


def _run_attack(args) -> int:
    from codedsmooth.probe.checks import failure_lines
    from codedsmooth.probe.evaluate import AttackConfig
    from codedsmooth.probe.runner import TargetConfig, attack_command
    from codedsmooth.service.errors import ServiceError

    try:
        report = attack_command(_config_from_args(AttackConfig, args), _config_from_args(TargetConfig, args))
    except ServiceError as exc:  # the server stopped answering during the attack
        raise ConnectionError(str(exc)) from None
    copy = report.get("attacker_copy")
    if copy and args.checkpoint is None:
        print(
            f"codedsmooth attack: warning: no --checkpoint, so the attacker's copy of the model is the embedded default checkpoint ({copy['name']}); "
            f"checked against the server: same name and classes, {100 * copy['agreement']:.0f} % agreement on {copy['items']} clean items",
            file=sys.stderr,
        )
    summary = {
        k: report[k]
        for k in ("target", "clean_accuracy", "draws", "robust_accuracy", "queries_per_image", "cotenant")
        if k in report
    }
    if "sanity" in report:
        summary["sanity"] = [
            {"name": c["name"], "eps": c["eps"], "passed": c["passed"], "numbers": c["value"]} for c in report["sanity"]
        ]
    print(json.dumps(summary, indent=2))
    for line in failure_lines(report.get("sanity", [])):
        print(f"codedsmooth attack: {line}", file=sys.stderr)
    return 0


def _add_audit(sub) -> None:
    from codedsmooth.probe.audit import AuditConfig

    p = sub.add_parser(
        "audit",
        allow_abbrev=False,
        help="audit any prediction endpoint (Open Inference Protocol v2, or this server's v1) with query-only attacks, no weights; write a robustness card",
    )
    _add_config_options(p, AuditConfig)
    p.set_defaults(func=_run_audit)


def _redacted(argv: list[str]) -> list[str]:
    """``argv`` without the value of ``--api-key`` (the card records the command)."""
    out, hide = [], False
    for a in argv:
        out.append("***" if hide else ("--api-key=***" if a.startswith("--api-key=") else a))
        hide = a == "--api-key"
    return out


def _run_audit(args) -> int:
    from codedsmooth.probe.audit import AuditConfig, audit_command

    cfg = _config_from_args(AuditConfig, args)
    card = audit_command(
        cfg, shlex.join(["codedsmooth", "audit", *_redacted(args.argv[args.argv.index("audit") + 1 :])])
    )
    traffic = card.audit.traffic if card.audit else None
    summary = {
        "card": cfg.card,
        "clean_accuracy": card.clean_accuracy,
        "attacks": {m.attack: m.robust_accuracy for m in card.measurements}
        | {u.attack: u.status for u in (card.audit.unfinished if card.audit else [])},
        "queries": traffic.queries if traffic else None,
        "status_429": traffic.status_429 if traffic else None,
        "status_503": traffic.status_503 if traffic else None,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _add_report(sub) -> None:
    from codedsmooth.probe.report import ReportConfig

    p = sub.add_parser(
        "report",
        allow_abbrev=False,
        help="train (or reuse) erm, mixup, coded and pgd-at on MNIST over several seeds, attack them plain and through RCI, write docs/RESULTS.md (--data fashion-mnist: docs/fashion/RESULTS.md)",
    )
    _add_config_options(p, ReportConfig)
    p.set_defaults(func=_run_report)


def _non_default_flags(cfg, defaults) -> list[str]:
    """The command-line flags that give ``cfg`` from ``defaults`` (a dataclass config)."""
    flags: list[str] = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if value == getattr(defaults, f.name):
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def report_flags(cfg) -> list[str]:
    """The flags that give a report config (its data set's defaults applied): what to type to run it again."""
    from codedsmooth.probe.report import ReportConfig

    data = [] if cfg.data == ReportConfig.data else ["--data", cfg.data]
    return data + _non_default_flags(cfg, ReportConfig(data=cfg.data).for_data())


def _run_report(args) -> int:
    from codedsmooth.probe.report import QUICK_NOTE, ReportConfig, run_report

    cfg = _config_from_args(ReportConfig, args).for_data()
    command = shlex.join(["codedsmooth", "report", *report_flags(cfg)])
    out = run_report(cfg, command)
    if cfg.quick:
        print(f"codedsmooth report: {QUICK_NOTE}", file=sys.stderr)
    print(out)
    return 0


BENCHMARKS = {
    "rci": "rci_forward.py",
    "training": "training_methods.py",
    "server": "server_throughput.py",
    "sparse": "sparse_decode.py",
    "ddp": "ddp_training.py",
    "access": "access_limits.py",
    "repository": "repository_flood.py",
}


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        allow_abbrev=False,
        help="run a benchmark from benchmarks/ (needs the source checkout)",
        description="rci: RCI vs plain forward; training: erm/mixup/coded accuracy and epoch time; server: server vs in-process throughput, latency, RCI scopes; sparse: sparse decode error and speed; ddp: epoch time on several processes; access: what API keys and limits add per request (in-process and Ray actor) and whether the rate holds; repository: one model's latency while another model of the repository is flooded. Options after the name go to the script (try: bench server --help).",
    )
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="options for the script")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    import runpy
    from pathlib import Path

    import codedsmooth

    script = Path(codedsmooth.__file__).resolve().parent.parent / "benchmarks" / BENCHMARKS[args.name]
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: benchmarks ship with the source checkout (pip install -e .)")
    sys.argv = [str(script), *args.script_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; ``only``: just that subcommand (``keys`` alone needs no torch, so ``KEY=$(codedsmooth keys add …)`` is instant)."""
    # allow_abbrev=False everywhere: "--epoch 1" is an error, never silently "--epochs 1"
    parser = argparse.ArgumentParser(prog="codedsmooth", description=__doc__, allow_abbrev=False)
    parser.add_argument("--log-level", default=None, help="logging level: debug, info, warning, error (default: info)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add in (
        ("train", _add_train),
        ("serve", _add_serve),
        ("keys", _add_keys),
        ("attack", _add_attack),
        ("audit", _add_audit),
        ("report", _add_report),
        ("bench", _add_bench),
    ):
        if only in (None, name):
            add(sub)
    return parser


def _light_subcommand(argv: list[str]) -> str | None:
    """``"keys"`` when ``argv`` runs it (the other subcommands' parsers import torch for their config classes), else None."""
    tokens = list(argv)
    while tokens and tokens[0].startswith("--log-level"):
        tokens = tokens[1:] if "=" in tokens[0] else tokens[2:]
    return "keys" if tokens[:1] == ["keys"] else None


def main(argv: list[str] | None = None) -> int:
    args_given = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_light_subcommand(args_given))
    args = parser.parse_args(argv)
    args.argv = args_given
    logging.basicConfig(
        level=(args.log_level or "info").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise for the attack client
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError) as exc:
        print(f"codedsmooth {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
