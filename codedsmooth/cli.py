"""The ``codedsmooth`` command line: train, serve, attack, bench, report."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _config_from_args(config_cls, args):
    """A config dataclass from the parsed options that share its field names."""
    fields = config_cls.__dataclass_fields__
    return config_cls(**{k: v for k, v in vars(args).items() if k in fields})


def _add_train(sub) -> None:
    from codedsmooth.train.data import DATASETS

    p = sub.add_parser("train", help="train a classifier (erm, mixup or coded-smoothing) and write a checkpoint")
    p.add_argument("--data", choices=DATASETS, default="digits", help="data set; digits ships with scikit-learn (default: digits)")
    p.add_argument("--data-dir", default=None, help="local files for cifar10/cifar100/imagefolder (nothing is downloaded)")
    p.add_argument("--image-size", type=int, default=32, help="imagefolder: resize images to this square size (default: 32)")
    p.add_argument("--arch", default=None, help="small_cnn or preact_resnet18 (default: small_cnn below 32×32, else preact_resnet18)")
    p.add_argument("--width", type=int, default=None, help="channel width of the architecture (default: its own)")
    p.add_argument("--method", choices=("erm", "mixup", "coded"), default="coded", help="training method (default: coded)")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default: 30)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size = K, the number of data points per code (default: 32)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle SGD schedule (default: 0.05)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (default: 5e-4)")
    p.add_argument("--mu", type=float, default=1.0, help="weight of the coded loss (default: 1.0)")
    p.add_argument("--n-start", type=int, default=None, help="coded points N in the first epoch (default: K)")
    p.add_argument("--n-end", type=int, default=None, help="coded points N in the last epoch (default: ceil(1.5 K))")
    p.add_argument("--target-block", default=None, help="stage where the coded block starts (default: head for small_cnn, layer4 for preact_resnet18)")
    p.add_argument("--mixup-alpha", type=float, default=1.0, help="Beta(alpha, alpha) of mixup (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--filler-size", type=int, default=64, help="clean training inputs stored as the trusted filler pool (default: 64)")
    p.add_argument("--out", default="runs/checkpoint", help="checkpoint directory to write (default: runs/checkpoint)")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from codedsmooth.train.trainer import TrainConfig, train

    cfg = _config_from_args(TrainConfig, args)
    result = train(cfg)
    print(json.dumps({"checkpoint": str(result.checkpoint), "test_accuracy": result.test_accuracy, "mean_epoch_seconds": round(result.mean_epoch_seconds, 4)}))
    return 0


def _add_serve(sub) -> None:
    from codedsmooth.service.settings import ServeSettings

    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP with randomized coded inference",
        description="Every option is also read from the env var CODEDSMOOTH_<NAME> (flags win).",
    )
    for name, field in ServeSettings.model_fields.items():
        if name == "log_level":  # the global --log-level covers it
            continue
        flag = "--" + name.replace("_", "-")
        env = f"CODEDSMOOTH_{name.upper()}"
        default = "none" if field.default is None else field.default
        helptext = f"{field.description} (env {env}; default: {default})"
        annotation = str(field.annotation)
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif "Literal" in annotation:
            p.add_argument(flag, choices=list(field.annotation.__args__), default=None, help=helptext)
        else:
            kind = int if "int" in annotation else float if "float" in annotation else str
            p.add_argument(flag, type=kind, default=None, help=helptext)
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from pydantic import ValidationError

    from codedsmooth.service.server import run_server
    from codedsmooth.service.settings import ServeSettings

    given = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    if args.log_level is not None:
        given["log_level"] = args.log_level.lower()
    try:
        settings = ServeSettings(**given)
    except ValidationError as exc:
        lines = [f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()]
        raise ValueError("; ".join(lines)) from None
    from codedsmooth.models import resolve_device

    resolve_device(settings.device)  # --device cuda without CUDA: a clear error, not a failed start-up
    if settings.checkpoint is not None:
        from concurrent.futures import ThreadPoolExecutor

        from codedsmooth.models import load_checkpoint

        # Fail fast with the file and the problem, before binding. Not on the main thread: torch
        # kernels run there would slow the server's model thread (see codedsmooth.service.engine).
        with ThreadPoolExecutor(1) as pool:
            pool.submit(load_checkpoint, settings.checkpoint).result()
    if settings.replicas is not None:
        try:
            from codedsmooth.service.ray_serve import run_ray_serve  # imports ray: only with --replicas
        except ImportError as exc:
            raise ValueError(f"--replicas needs Ray Serve ({exc}): pip install -e '.[ray]'") from None

        return run_ray_serve(settings)
    return run_server(settings)


def _add_attack(sub) -> None:
    p = sub.add_parser("attack", help="attack a checkpoint in-process or a running server, with a JSON report and a plot")
    p.add_argument("--checkpoint", default=None, help="the attacker's copy of the model; the in-process target when --url is not given (default: the embedded checkpoint)")
    p.add_argument("--url", default=None, help="attack a running server at this URL instead of an in-process target")
    p.add_argument("--data-dir", default=None, help="local files of the checkpoint's data set when it is not digits")
    p.add_argument("--attack", choices=("fgsm", "pgd", "eot-pgd", "square", "cotenant"), default="pgd", help="attack (default: pgd)")
    p.add_argument("--threat", choices=("transfer", "adaptive", "blackbox"), default="adaptive",
                   help="transfer: gradients of the model without RCI; adaptive: gradients through RCI (EOT for eot-pgd and fgsm); blackbox: queries only (default: adaptive)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.1], help="L∞ radius in pixel units [0, 1]; several values for a sweep (default: 0.1)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps; co-tenant optimisation steps (default: 20)")
    p.add_argument("--eot-samples", type=int, default=8, help="RCI draws averaged per gradient in EOT (default: 8)")
    p.add_argument("--samples", type=int, default=200, help="test items attacked (default: 200)")
    p.add_argument("--queries", type=int, default=300, help="black-box query budget per item (default: 300)")
    p.add_argument("--repeats", type=int, default=1, help="black-box: queries averaged per candidate against RCI's randomness (default: 1)")
    p.add_argument("--rci", action=argparse.BooleanOptionalAction, default=True, help="in-process target: RCI on/off (default: on)")
    p.add_argument("--rci-scope", choices=("request", "batch"), default="request", help="in-process target: coding scope (default: request)")
    p.add_argument("--rci-group-size", type=int, default=None, help="in-process target: K (default: the checkpoint's)")
    p.add_argument("--coded-points", type=int, default=None, help="in-process target: N (default: ceil(1.5 K))")
    p.add_argument("--no-sanity", action="store_true", help="skip the sanity checks (identity permutation, PGD <= FGSM, large eps)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--plot", default=None, help="write a PNG plot of accuracy vs eps here")
    p.set_defaults(func=_run_attack)


def _run_attack(args) -> int:
    from codedsmooth.probe.runner import attack_command

    report = attack_command(args)
    summary = {k: report[k] for k in ("target", "clean_accuracy", "robust_accuracy", "cotenant") if k in report}
    if "sanity" in report:
        summary["sanity"] = {c["name"]: c["passed"] for c in report["sanity"]}
    print(json.dumps(summary, indent=2))
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="train (or reuse) erm, mixup and coded on digits, attack them every way, write docs/RESULTS.md")
    p.add_argument("--out", default="docs/RESULTS.md", help="markdown report; a .png plot and a .json with all numbers go beside it (default: docs/RESULTS.md)")
    p.add_argument("--runs", default="runs/report", help="where the three checkpoints are kept and reused (default: runs/report)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs per method (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="training and attack seed (default: 0)")
    p.add_argument("--samples", type=int, default=200, help="test images attacked (default: 200)")
    p.add_argument("--eps", type=float, default=0.1, help="L∞ radius of the main table (default: 0.1)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (default: 20)")
    p.add_argument("--eot-samples", type=int, default=8, help="EOT draws per gradient (default: 8)")
    p.add_argument("--blackbox-samples", type=int, default=100, help="images attacked over HTTP (default: 100)")
    p.add_argument("--queries", type=int, default=200, help="black-box queries per image (default: 200)")
    p.add_argument("--retrain", action="store_true", help="train again even when checkpoints exist")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from codedsmooth.probe.report import ReportConfig, run_report

    cfg = _config_from_args(ReportConfig, args)
    command = "codedsmooth report" + ("" if args.out == "docs/RESULTS.md" else f" --out {args.out}")
    print(run_report(cfg, command))
    return 0


BENCHMARKS = {"rci": "rci_forward.py", "training": "training_methods.py", "server": "server_throughput.py"}


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark from benchmarks/ (needs the source checkout)",
                       description="rci: RCI vs plain forward; training: erm/mixup/coded accuracy and epoch time; server: server vs in-process throughput, latency, RCI scopes. Options after the name go to the script (try: bench server --help).")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codedsmooth", description=__doc__)
    parser.add_argument("--log-level", default=None, help="logging level: debug, info, warning, error (default: info)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_serve(sub)
    _add_attack(sub)
    _add_report(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=(args.log_level or "info").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise for the attack client
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError) as exc:
        print(f"codedsmooth {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
