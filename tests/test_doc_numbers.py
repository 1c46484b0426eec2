"""Every numeric claim in README.md and docs/*.md is generated or matched against its source.

A claim is a number with a decimal point, or one followed by % or ×, in prose or tables (code, inline
code, link targets and comments are not prose). It passes when it lies

- in a generated block: ``<!-- NAME:begin -->`` … ``<!-- NAME:end -->`` whose renderer is checked
  below (the README's RCI cost/benefit table), or in docs/RESULTS.md, which the report renders
  whole and which is checked by re-rendering it;
- in a region an existing test checks phrase by phrase: ``<!-- checked-by: TEST -->`` …
  ``<!-- /checked-by -->``, TEST a test function of tests/test_docs.py;
- in a region marked as not checked, with its reason: ``<!-- unchecked: REASON -->`` …
  ``<!-- /unchecked -->`` (recorded measurements whose output was not kept, other people's results);
- or when it equals, at the precision it is written with, a number of a source: docs/RESULTS.json
  or a committed benchmark run under benchmarks/results/, or a committed audit's card under docs/audits/
  (as written, as a percentage of a fraction, or a mean or sd over a method's seeds).

Excluded by rule: integers without a unit (counts, sizes, ports, steps), thresholds (after ≥, ≤, <, >,
"at least", "at most"), coefficients of a formula (1.5K, 2.5·ε), versions (a number right after a
capitalised name or "HTTP/", or with two dots), a confidence level ("95 % Wilson"), a goal ("0.5× goal"),
and sizes and counts written with × ("28×28", "60 × 200").
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from codedsmooth.probe.audit.table import AUDITS, load_cards, page_block, render_audits
from codedsmooth.probe.costs import BENCH, RESULTS, readme_block, render_costs

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *(p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "RESULTS.md")]
SOURCES = [
    ROOT / RESULTS,
    *sorted((ROOT / "benchmarks" / "results").glob("*.json")),
    *sorted((ROOT / AUDITS).glob("*.json")),  # the audits' cards (their per-image state lies under state/)
]
FENCE = re.compile(r"^```[^\n]*\n.*?^```", re.MULTILINE | re.DOTALL)
RENDERED = {"rci-costs", "audits"}  # generated blocks, each checked by a test below
GENERATED = re.compile(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", re.DOTALL)
UNCHECKED = re.compile(r"<!-- unchecked:(.*?)-->.*?<!-- /unchecked -->", re.DOTALL)
CHECKED_BY = re.compile(r"<!-- checked-by: (\w+) -->.*?<!-- /checked-by -->", re.DOTALL)
NUMBER = re.compile(
    r"(?<![\w.])(\d[\d,]*(?:\.\d+)?(?:e-?\d+)?)(?![\w]|\.\d)(\s?(?:%|×(?!\s?\d)))?"
)  # "28×28", "60 × 200": sizes and counts, not ratios
THRESHOLD = re.compile(r"(?:[≥≤<>]|at least|at most|more than|less than)\s?~?$")
VERSION = re.compile(r"(?:\b[A-Z][\w-]*(?: Serve)? |HTTP/|arXiv )$")


def docs_test_names() -> set[str]:
    tree = ast.parse((ROOT / "tests" / "test_docs.py").read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def prose(markdown: str) -> str:
    """The page without what the matcher does not read: code, comments, link targets, generated and marked regions."""
    tests = docs_test_names()
    for name in GENERATED.findall(markdown):
        assert name in RENDERED, f"generated block {name!r} has no renderer checked by a test"
    for reason in UNCHECKED.findall(markdown):
        assert reason.strip(), "an unchecked region must say why"
    for name in CHECKED_BY.findall(markdown):
        assert name in tests, f"checked-by names {name!r}, which is not a test in tests/test_docs.py"
    body = GENERATED.sub("", markdown)
    body = UNCHECKED.sub("", body)
    body = CHECKED_BY.sub("", body)
    body = FENCE.sub("", body)
    body = re.sub(r"<!--.*?-->", "", body, flags=re.DOTALL)
    body = re.sub(r"`[^`\n]*`", "", body)
    return re.sub(r"\]\([^)]*\)", "]", body)


def claims(markdown: str) -> list[tuple[str, str, str]]:
    """(number, unit, context) for each numeric claim the rules do not exclude."""
    body = prose(markdown)
    out = []
    for m in NUMBER.finditer(body):
        token, unit = m.group(1), (m.group(2) or "").strip()
        if not unit:  # the first number of a range takes the range's unit: "3.5–4.7×"
            rest = re.match(r"\s?[–-]\s?\d[\d,]*(?:\.\d+)?(\s?(?:%|×))", body[m.end() :])
            unit = rest.group(1).strip() if rest else ""
        before, after = body[max(0, m.start() - 12) : m.start()], body[m.end() : m.end() + 8]
        if "." not in token and not unit:
            continue
        if (
            THRESHOLD.search(before)
            or VERSION.search(before)
            or re.match(r"(?:K\b|·)", after)
            or re.match(r"\s?(?:Wilson|confidence|goal)", after)
        ):
            continue
        if unit == "%" and re.search(r"%\s*(Wilson|confidence)", body[m.start() : m.end() + 14]):
            continue
        out.append((token, unit, body[max(0, m.start() - 60) : m.end() + 20].replace("\n", " ")))
    return out


RATIO_KEY = re.compile(r"_vs_|ratio")  # the keys whose values are ratios: only they back a claim in ×


def _leaves(obj, out: list[tuple[str, float]], key: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _leaves(v, out, str(k))
    elif isinstance(obj, list):
        if len(obj) <= 64:  # per-image records are not quoted, and they would match anything
            for v in obj:
                _leaves(v, out, key)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out.append((key, float(obj)))


def _seed_aggregates(results: dict) -> list[tuple[str, float]]:
    """Mean and sd over a method's seeds of each accuracy the report gives per model (the docs quote them as 'mean ± sd')."""
    by_method: dict[tuple, list[float]] = {}
    for key, model in results.get("models", {}).items():
        method = key.split("/seed")[0]
        for setting, per_eps in model.get("settings", {}).items():
            for eps, cell in per_eps.items():
                by_method.setdefault((method, setting, eps), []).append(cell["accuracy"])
    out = []
    for values in by_method.values():
        if len(values) >= 2:
            out += [("accuracy", statistics.mean(values)), ("accuracy", statistics.stdev(values))]
    return out


@pytest.fixture(scope="module")
def source_values() -> list[tuple[str, float]]:
    values: list[tuple[str, float]] = []
    for path in SOURCES:
        data = json.loads(path.read_text(encoding="utf-8"))
        _leaves(data, values)
        if path.name == "RESULTS.json":
            values += _seed_aggregates(data)
    return values


def matches(token: str, unit: str, values: list[tuple[str, float]]) -> bool:
    """Whether a source number, as written or as a percentage of a fraction, rounds to the claim at its precision (× claims: only ratios)."""
    x = float(token.replace(",", ""))
    if "e" in token:
        tol = abs(x) * 0.05 + 1e-12  # 9.9e-4: two significant figures
    else:
        decimals = len(token.split(".")[1]) if "." in token else 0
        tol = 0.5 * 10**-decimals + 1e-9
    for key, v in values:
        if unit == "×":
            if RATIO_KEY.search(key) and abs(v - x) <= tol:
                return True
            continue
        if 0 <= v <= 1 and abs(100 * v - x) <= tol:
            return True
        if unit != "%" and abs(v - x) <= tol:
            return True
    return False


def unverified(page: Path, values: list[tuple[str, float]]) -> list[str]:
    return [
        f"{page.relative_to(ROOT)}: {token}{unit!s} in “…{ctx}…”"
        for token, unit, ctx in claims(page.read_text(encoding="utf-8"))
        if not matches(token, unit, values)
    ]


def test_every_numeric_claim_is_generated_or_matched_against_its_source(source_values):
    bad = [line for page in PAGES for line in unverified(page, source_values)]
    assert not bad, (
        "numbers in the docs that no source gives (fix them, or mark the region <!-- unchecked: why -->):\n"
        + "\n".join(bad)
    )


def test_the_matcher_reads_the_docs_and_catches_a_wrong_number(source_values):
    """The claim finder sees the pages' numbers, and a figure no source gives is reported."""
    found = sum(len(claims(p.read_text(encoding="utf-8"))) for p in PAGES)
    assert found >= 50, f"only {found} numeric claims found: the matcher is not reading the docs"
    page = "RCI costs 0.14× the throughput; sparse decode is 3.5–4.7× faster. Clean accuracy 97.70 %."
    wrong = [(t, u) for t, u, _ in claims(page) if not matches(t, u, source_values)]
    assert ("3.5", "×") in wrong and ("4.7", "×") in wrong and ("0.14", "×") in wrong, wrong
    assert ("97.70", "%") not in wrong  # the default's clean accuracy is a source number
    assert claims("serve on port 8000 with K = 32, N ≥ 1.5K, p < 0.05, Python 3.11, 95 % Wilson intervals") == []


def test_marked_regions_must_say_why_and_name_real_tests():
    with pytest.raises(AssertionError):
        prose("<!-- unchecked: -->1.5 %<!-- /unchecked -->")
    with pytest.raises(AssertionError):
        prose("<!-- checked-by: test_that_does_not_exist -->1.5 %<!-- /checked-by -->")
    with pytest.raises(AssertionError):
        prose("<!-- made-up:begin -->1.5 %<!-- made-up:end -->")


def test_readme_cost_table_is_the_rendered_one():
    results = json.loads((ROOT / RESULTS).read_text(encoding="utf-8"))
    bench = json.loads((ROOT / BENCH).read_text(encoding="utf-8"))
    assert readme_block(README.read_text(encoding="utf-8")) == render_costs(results, bench), (
        "README's RCI cost table is stale: run `python -m codedsmooth.probe.costs --write`"
    )


def test_cost_table_command_writes_the_block(tmp_path):
    """The documented command, run as a user runs it, rewrites a README's block from the two JSON files."""
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- rci-costs:begin -->\nold\n<!-- rci-costs:end -->\n\nrest\n", encoding="utf-8")
    args = [
        sys.executable,
        "-m",
        "codedsmooth.probe.costs",
        "--write",
        "--readme",
        str(readme),
        "--results",
        str(ROOT / RESULTS),
        "--bench",
        str(ROOT / BENCH),
    ]
    subprocess.run(args, check=True, cwd=ROOT, timeout=120)
    results = json.loads((ROOT / RESULTS).read_text(encoding="utf-8"))
    bench = json.loads((ROOT / BENCH).read_text(encoding="utf-8"))
    written = readme.read_text(encoding="utf-8")
    assert written.startswith("# x\n\n") and written.endswith("\n\nrest\n") and "old" not in written
    assert readme_block(written) == render_costs(results, bench, str(ROOT / RESULTS), str(ROOT / BENCH))
    bad = subprocess.run(
        [*args[:-1], str(tmp_path / "missing.json")], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "missing.json" in bad.stderr and "Traceback" not in bad.stderr


def test_results_md_is_the_rendering_of_results_json(tmp_path):
    """docs/RESULTS.md is generated whole: `codedsmooth report --render-only` on a copy of RESULTS.json writes the same text."""
    shutil.copy(ROOT / RESULTS, tmp_path / "RESULTS.json")
    subprocess.run(
        [sys.executable, "-m", "codedsmooth", "report", "--render-only", "--out", str(tmp_path / "RESULTS.md")],
        check=True,
        cwd=ROOT,
        timeout=300,
        capture_output=True,
    )
    assert (tmp_path / "RESULTS.md").read_text(encoding="utf-8") == (ROOT / "docs" / "RESULTS.md").read_text(
        encoding="utf-8"
    )


def test_robustness_audit_table_is_the_rendered_one():
    """docs/robustness.md's audit table is the rendering of the committed audit cards (docs/audits/*.json)."""
    cards = load_cards(ROOT / AUDITS)
    assert set(cards) == {
        "default-rci-on",
        "default-rci-off",
        "default-labels",
        "mlserver",
        "erm-rci-off",
        "erm-rci-on",
    }
    page = (ROOT / "docs" / "robustness.md").read_text(encoding="utf-8")
    assert page_block(page) == render_audits(cards), (
        "robustness.md's audit table is stale: run `python -m codedsmooth.probe.audit.table --write`"
    )


def test_the_audit_prose_quotes_the_cards_and_a_wrong_figure_is_caught(source_values):
    """The label-only validation's prose in robustness.md is matched against the audit cards: its figures are
    among the cards' numbers, and a figure the cards do not give is reported."""
    page = (ROOT / "docs" / "robustness.md").read_text(encoding="utf-8")
    section = page.split("### Audits of this server and of MLServer")[1].split("\n## ")[0]
    audit_values: list[tuple[str, float]] = []
    for path in sorted((ROOT / AUDITS).glob("*.json")):
        _leaves(json.loads(path.read_text(encoding="utf-8")), audit_values)
    found = claims(section)
    assert len(found) >= 4, found
    assert [c for c in found if not matches(c[0], c[1], audit_values)] == []
    assert [t for t, u, _ in claims("RayS leaves 41.3 % of the images") if not matches(t, u, audit_values)]
