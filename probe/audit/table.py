"""The committed audits as a Markdown table, generated from their cards (``docs/audits/*.json``).

``docs/robustness.md`` holds the table between ``<!-- audits:begin -->`` and ``<!-- audits:end -->``;
``tests/test_doc_numbers.py`` re-renders it from the cards and compares, so the page never quotes an audit
it does not hold. ``python -m codedsmooth.probe.audit.table --write`` rewrites the block after a re-run
(``docs/audits/run.sh``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codedsmooth.models.card import RobustnessCard, read_card

from ..blocks import generated_block

AUDITS = "docs/audits"
PAGE = "docs/robustness.md"
BEGIN, END = "<!-- audits:begin -->", "<!-- audits:end -->"
ORDER = ("default-rci-on", "default-rci-off", "default-labels", "mlserver", "erm-rci-off", "erm-rci-on")
WHAT = {  # what each committed audit was aimed at (docs/audits/run.sh starts it)
    "default-rci-on": "this server, the default (PGD-AT), RCI on",
    "default-rci-off": "this server, the default, RCI off",
    "default-labels": "this server, the default, RCI on, `--output labels`",
    "mlserver": "MLServer serving the default's weights",
    "erm-rci-off": "this server, a plain ERM model, RCI off",
    "erm-rci-on": "this server, a plain ERM model, RCI on",
}


def load_cards(directory: str | Path = AUDITS) -> dict[str, RobustnessCard]:
    """The audit cards of ``directory`` by file stem, in the table's order (known audits first)."""
    found: dict[str, RobustnessCard] = {}
    for p in sorted(Path(directory).glob("*.json")):
        card = read_card(p)
        if card is not None:
            found[p.stem] = card
    return {k: found[k] for k in sorted(found, key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k))}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _row(name: str, card: RobustnessCard) -> list[list[str]]:
    a = card.audit
    assert a is not None and card.clean_accuracy is not None
    n = len(card.samples["audit"])
    t = a.traffic
    head = [
        f"{name}: {WHAT.get(name, card.model.name)}",
        f"{round(card.clean_accuracy * n)}/{n}",
    ]
    rows = []
    for m in card.measurements:
        attack, _, rest = m.attack.partition(":")
        if attack.startswith("worst case"):
            attack = f"worst case ({rest.strip()})"
        q = m.queries_per_broken
        rows.append(
            [
                attack,
                f"{_pct(m.robust_accuracy)} [{_pct(m.interval[0])}, {_pct(m.interval[1])}]",
                f"{q.median:g} / {q.p90:g}" if q else "–",
                f"{m.queries:,}" if m.queries is not None else "–",
            ]
        )
    for u in a.unfinished:
        rows.append([u.attack.split(":")[0], f"{u.status}: {u.reason}", "–", f"{u.queries:,}"])
    traffic = f"{t.queries:,} queries, {t.status_429} × 429, {t.status_503} × 503, {t.wall_s / 60:.1f} min"
    out = []
    for i, r in enumerate(rows):
        out.append([*(head if i == 0 else ["", ""]), *r, traffic if i == 0 else ""])
    return out


def render_audits(cards: dict[str, RobustnessCard]) -> str:
    """The block, markers included: per audit, clean accuracy and per attack the robust accuracy with its Wilson
    interval, queries per broken image and queries sent, then the audit's traffic (429s and 503s met)."""
    eps = sorted({e for c in cards.values() for e in c.eps})
    sizes = sorted({len(c.samples["audit"]) for c in cards.values()})
    budgets = sorted({c.audit.budget for c in cards.values() if c.audit is not None})
    data = sorted({c.dataset for c in cards.values()})
    seeds = sorted({c.audit.seed for c in cards.values() if c.audit is not None})
    lines = [
        BEGIN,
        f"<!-- generated from {AUDITS}/*.json by `python -m codedsmooth.probe.audit.table --write`; do not edit -->",
        "",
        f"{', '.join(data)}, ε = {', '.join(f'{e:g}' for e in eps)}; {' or '.join(map(str, sizes))} test images "
        f"(class-balanced, seed {', '.join(map(str, seeds))}), a budget of {' or '.join(f'{b:,}' for b in budgets)} "
        "queries per image and attack.",
        "",
        "| audit | clean | attack | robust accuracy [95 % Wilson] | queries per broken image (median / p90) "
        "| queries | traffic |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, card in cards.items():
        lines += ["| " + " | ".join(r) + " |" for r in _row(name, card)]
    lines.append(END)
    return "\n".join(lines)


def page_block(page: str) -> str:
    """The page's current audits table, markers included; ValueError when the markers are missing."""
    return generated_block(page, BEGIN, END)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--audits", default=AUDITS, help=f"the audit cards' directory (default: {AUDITS})")
    ap.add_argument("--page", default=PAGE, help=f"the page with the marker comments (default: {PAGE})")
    ap.add_argument("--write", action="store_true", help="write the table into the page (default: print it)")
    args = ap.parse_args(argv)
    try:
        block = render_audits(load_cards(args.audits))
        if args.write:
            page = Path(args.page)
            text = page.read_text(encoding="utf-8")
            page.write_text(text.replace(page_block(text), block), encoding="utf-8")
        else:
            print(block)
    except (ValueError, OSError) as exc:
        print(f"codedsmooth.probe.audit.table: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
