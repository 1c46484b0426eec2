"""The card as Markdown (a table per attack, generated from the numbers) and as a small bar plot."""

from __future__ import annotations

from .card import AuditCard, Interval


def _pct(i: Interval | None) -> str:
    return "—" if i is None else f"{100 * i.value:.1f} % [{100 * i.low:.1f}, {100 * i.high:.1f}]"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:g}"


def card_markdown(card: AuditCard) -> str:
    e, t = card.endpoint, card.traffic
    lines = [
        f"# Robustness audit: {e.model}",
        "",
        f"Endpoint {e.url} ({e.protocol}; version {e.version or 'not given'}; checkpoint SHA-256 {e.checkpoint_sha256 or 'not exposed'}), "
        f"answering {e.returns}{', randomized' if e.randomized else ''}. Query-only: no weights were used.",
        "",
        f"L∞ ε = {card.eps:g} on {card.clean_accuracy.n} images of the {card.sample.data} test split (class-balanced, seed {card.sample.seed}; "
        f"indices in the JSON card). Clean accuracy {_pct(card.clean_accuracy)}.",
        "",
        "| attack | access | status | robust accuracy [95 % Wilson] | broken / attacked | queries per broken image (median, p90) | queries |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in card.attacks:
        q = a.queries_per_broken_image
        lines.append(
            f"| {a.name} | {a.access} | {a.status}{': ' + a.reason if a.reason else ''} | {_pct(a.robust_accuracy)} | {a.broken} / {a.attacked} | "
            f"{_num(q.median) if q else '—'}, {_num(q.p90) if q else '—'} | {q.total if q else 0} |"
        )
    lines += [
        "",
        f"Worst case over the complete attacks: {_pct(card.worst_case)}.",
        "",
        f"Traffic: {t.queries} queries in {t.requests} requests over {t.wall_s:.1f} s; {t.status_429} × 429 and {t.status_503} × 503 met, "
        f"{t.waited_s:.1f} s waited on Retry-After; observed rate {_num(round(t.queries_per_second, 1) if t.queries_per_second else None)} queries/s"
        + (f" ({t.days_per_million_queries:.3g} days per million queries)." if t.days_per_million_queries else "."),
        "",
        f"Command: `{card.command}` · {card.date}",
    ]
    lines += [f"- {n}" for n in card.notes] if card.notes else []
    return "\n".join(lines) + "\n"


def plot_card(card: AuditCard, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("clean", card.clean_accuracy)] + [
        (a.name, a.robust_accuracy) for a in card.attacks if a.robust_accuracy is not None
    ]
    fig, ax = plt.subplots(figsize=(4 + len(bars), 3))
    values = [100 * b.value for _, b in bars]
    errors = [[100 * (b.value - b.low) for _, b in bars], [100 * (b.high - b.value) for _, b in bars]]
    ax.bar([n for n, _ in bars], values, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{card.endpoint.model}, ε = {card.eps:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
