"""The audit's card as Markdown (a table per attack, generated from the numbers) and as a small bar plot."""

from __future__ import annotations

from codedsmooth.models.card import RobustnessCard

from ..stats import wilson


def _pct(value: float, interval: tuple[float, float]) -> str:
    return f"{100 * value:.1f} % [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:g}"


def _clean(card: RobustnessCard) -> tuple[float, tuple[float, float]] | None:
    """Clean accuracy with its Wilson interval, over the audit's sample."""
    if card.clean_accuracy is None or "audit" not in card.samples:
        return None
    n = len(card.samples["audit"])
    p = wilson(round(card.clean_accuracy * n), n)
    return p.value, (p.low, p.high)


def card_markdown(card: RobustnessCard) -> str:
    m, a = card.model, card.audit
    clean = _clean(card)
    n = len(card.samples.get("audit", []))
    lines = [
        f"# Robustness audit: {m.name}",
        "",
        f"Endpoint {m.url} ({m.protocol}; version {m.version or 'not given'}; checkpoint SHA-256 {m.sha256 or 'not exposed'}), "
        f"answering {card.output}{', randomized' if m.randomized else ''}. Query-only: no weights were used.",
        "",
        f"L∞ ε = {', '.join(f'{e:g}' for e in card.eps)} on {n} images of the {card.dataset} test split (class-balanced"
        + (f", seed {a.seed}" if a else "")
        + f"; indices in the JSON card). Clean accuracy {_pct(*clean) if clean else '—'}.",
        "",
        "| attack | threat | status | robust accuracy [95 % Wilson] | queries per broken image (median, p90) | queries |",
        "|---|---|---|---|---|---|",
    ]
    for r in card.measurements:
        q = r.queries_per_broken
        lines.append(
            f"| {r.attack} | {r.threat} | complete | {_pct(r.robust_accuracy, r.interval)} | "
            f"{_num(q.median) if q else '—'}, {_num(q.p90) if q else '—'} | {r.queries if r.queries is not None else '—'} |"
        )
    for u in a.unfinished if a else []:
        lines.append(
            f"| {u.attack} | {u.threat} | {u.status}: {u.reason} | — ({u.broken} broken of {u.attacked} attacked) | — | {u.queries} |"
        )
    if a:
        t = a.traffic
        rate = _num(round(t.queries_per_second, 1) if t.queries_per_second else None)
        lines += [
            "",
            f"Traffic: {t.queries} queries in {t.requests} requests over {t.wall_s:.1f} s; {t.status_429} × 429 and {t.status_503} × 503 met, "
            f"{t.waited_s:.1f} s waited on Retry-After; observed rate {rate} queries/s"
            + (f" ({t.days_per_million_queries:.3g} days per million queries)." if t.days_per_million_queries else "."),
        ]
    lines += ["", f"Command: `{card.command}` · {card.date}"]
    lines += [f"- {note}" for note in card.notes]
    return "\n".join(lines) + "\n"


def plot_card(card: RobustnessCard, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = _clean(card)
    bars = ([("clean", *clean)] if clean else []) + [
        (r.attack.split(":")[0], r.robust_accuracy, r.interval) for r in card.measurements
    ]
    fig, ax = plt.subplots(figsize=(4 + len(bars), 3))
    values = [100 * v for _, v, _ in bars]
    errors = [[100 * (v - i[0]) for _, v, i in bars], [100 * (i[1] - v) for _, v, i in bars]]
    ax.bar([name for name, _, _ in bars], values, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{card.model.name}, ε = {', '.join(f'{e:g}' for e in card.eps)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
