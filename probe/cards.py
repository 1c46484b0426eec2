"""Robustness cards from the report: the served default's ``robustness.json`` generated from ``docs/RESULTS.json``.

The card quotes the report's numbers as they are (no re-computation but the query quantiles over the
broken images, taken as the report takes them), so a test can regenerate it and compare it with the
committed file. ``python -m codedsmooth.probe.cards`` writes the card and the published JSON Schema.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from codedsmooth.models import CARD_FILE, RobustnessCard, default_checkpoint_path
from codedsmooth.models.card import Endpoint, Measurement, Queries, card_schema

RESULTS_FILE = Path("docs") / "RESULTS.json"
SCHEMA_FILE = Path("docs") / "card.schema.json"
# The report's serving settings, as a client of the served model would name them, and the sample each was run on.
SETTINGS = {"plain": "RCI off", "request": "RCI on, request scope (served default)", "batch": "RCI on, batch scope"}
WHITE_BOX_SAMPLE = {"plain": "white-box", "request": "rci", "batch": "rci"}
BLACK_BOX_SERVERS = ("plain", "request")  # the noise baseline serves the weights differently: not this model's card


def _interval(values: list[float]) -> tuple[float, float]:
    low, high = values
    return float(low), float(high)


def _white_box(row: dict[str, Any], setting: str, eps: str) -> Measurement:
    steps = [name for name, _ in row["cascade"] if name != "start"]
    return Measurement(
        attack="worst case per image of: " + ", ".join(steps),
        threat="white-box",
        setting=SETTINGS[setting],
        eps=float(eps),
        sample=WHITE_BOX_SAMPLE[setting],
        n=row["n"],
        robust_accuracy=row["accuracy"],
        interval=_interval(row["interval"]),
        draws=row["draws"],
    )


def _black_box(row: dict[str, Any], eps: float) -> Measurement:
    queries = np.asarray(row["queries"], dtype=np.float64)
    broken = np.asarray(row["score"]) < 1  # as the report counts a broken image: wrong on some draw
    square = row["budget"] > 1
    per_broken = (
        Queries(median=float(np.quantile(queries[broken], 0.5)), p90=float(np.quantile(queries[broken], 0.9)))
        if square and broken.any()
        else None
    )
    attack = f"{row['attacker']}, {row['budget']:,} queries over HTTP" if square else f"{row['attacker']}, over HTTP"
    return Measurement(
        attack=attack,
        threat="score-based" if square else "transfer",
        setting=SETTINGS[row["server"]],
        eps=eps,
        sample="black-box",
        n=row["n"],
        robust_accuracy=row["accuracy"],
        interval=_interval(row["interval"]),
        draws=row["draws"],
        queries_per_broken=per_broken,
        queries=int(queries.sum()),
    )


def _full_split(row: dict[str, Any], eps: float, n: int) -> Measurement:
    steps = [name for name, _ in row["rest_cascade"] if name != "start"]
    return Measurement(
        attack="worst case per image of: " + ", ".join(steps),
        threat="white-box",
        setting=SETTINGS["plain"],
        eps=eps,
        sample="test split",
        n=n,
        robust_accuracy=row["accuracy"],
        interval=_interval(row["interval"]),
        draws=row["draws"],
    )


def report_card(results: dict[str, Any], date: str, key: str | None = None) -> RobustnessCard:
    """The card of the report's model ``key`` (default: the model the report chose to serve, ``served.key``, or else
    the one the embedded default checkpoint is, ``default_checkpoint.same_as``)."""
    default = results.get("default_checkpoint") or {}
    key = key or (results.get("served") or {}).get("key") or default["same_as"]
    model = results["models"][key]
    name = model["name"]
    rows: list[Measurement] = []
    for setting, by_eps in model["settings"].items():
        rows += [_white_box(row, setting, eps) for eps, row in by_eps.items()]
    samples = {s: list(results["samples"][s]) for s in sorted({m.sample for m in rows})}
    blackbox = results.get("blackbox") or {}
    bb_rows = [r for r in blackbox.get("rows", []) if r["model"] == name and r["server"] in BLACK_BOX_SERVERS]
    rows += [_black_box(r, float(blackbox["eps"])) for r in bb_rows]
    if bb_rows:
        samples["black-box"] = list(results["samples"]["black-box"])
    full = (results.get("full_split") or {}).get("rows", {}).get(key)
    if full is not None:
        n = results["full_split"]["n"]
        rows.append(_full_split(full, float(results["full_split"]["eps"]), n))
        samples["test split"] = list(range(n))
    sha = results["checkpoints"][key]["files"]["model.safetensors"]["sha256"]
    notes = [
        "indices are into the test split as `codedsmooth report` loads the data set; 'test split' is all of it",
        "RCI rows: accuracy expected over the server's random draws (draws per image given)",
        "429s: the report's servers ran without API keys or limits",
    ]
    if default.get("same_as") == key:
        notes.append(f"the embedded default checkpoint is this model (SHA-256 {default['sha256']})")
    return RobustnessCard(
        source="report",
        model=Endpoint(name=name, sha256=sha),
        dataset=results["config"]["data"],
        eps=sorted({m.eps for m in rows}),
        samples=samples,
        measurements=rows,
        clean_accuracy=model["clean_full"]["correct"] / model["clean_full"]["n"],
        rate_limited=0,
        notes=notes,
        command=results["command"],
        date=date,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m codedsmooth.probe.cards",
        description="Write the embedded default checkpoint's robustness card from the report, and the card's JSON Schema.",
    )
    parser.add_argument("--results", default=str(RESULTS_FILE), help="the report's results (default: %(default)s)")
    parser.add_argument(
        "--out",
        default=str(default_checkpoint_path() / CARD_FILE),
        help="where to write the card (default: the embedded default checkpoint's)",
    )
    parser.add_argument(
        "--date",
        default=None,
        help="the date the report's numbers were measured (default: the results' own `date`; results written before the report recorded it need it given, e.g. the day `git log` shows they were committed)",
    )
    parser.add_argument(
        "--schema", default=str(SCHEMA_FILE), help="where to write the card's JSON Schema (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        results = json.loads(Path(args.results).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: {args.results}: {exc}", file=sys.stderr)
        return 2
    date = args.date or results.get("date")
    if not date:
        print(f"error: {args.results} records no date: give --date", file=sys.stderr)
        return 2
    Path(args.out).write_text(report_card(results, date).to_json(), encoding="utf-8")
    Path(args.schema).write_text(card_schema(), encoding="utf-8")
    print(f"wrote {args.out} and {args.schema}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
