"""The README and docs/ against the software: links, commands, the two commands, facts and numbers, the client examples.

Each check reads the source of the fact (the CLI parser, the data loader, the default checkpoint,
docs/RESULTS.json, the service's metric names) and compares the text with it, so a doc that drifts fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import ServerProcess

from codedsmooth.cli import build_parser
from codedsmooth.models import default_checkpoint_path
from codedsmooth.train import load_dataset

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
REDIRECTS = {">", ">>", "<", "2>", "2>&1"}
NUMBER_WORDS = ["zeros", "ones", "twos", "threes", "fours", "fives", "sixes", "sevens", "eights", "nines"]


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def flat(s: str) -> str:
    """Whitespace runs as one space, so a phrase matches across line breaks."""
    return re.sub(r"\s+", " ", s)


def code_blocks(path: Path, lang: str | None = None) -> list[str]:
    return [body for kind, body in FENCE.findall(text(path)) if lang is None or kind == lang]


def section(path: Path, heading: str) -> str:
    """The text under a ``## heading`` up to the next heading of the same or a higher level."""
    body = text(path)
    m = re.search(rf"^(#+) {re.escape(heading)}\s*$", body, re.M)
    assert m, f"{path.name}: no heading {heading!r}"
    level = len(m.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(body, m.end())
    return body[m.end() : end.start() if end else len(body)]


# --- links ---------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    body = FENCE.sub("", text(path))
    seen: Counter = Counter()
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*#*\s*$", body, re.M):
        s = slug(heading)
        out.add(s if not seen[s] else f"{s}-{seen[s]}")
        seen[s] += 1
    return out


def links(path: Path) -> list[str]:
    body = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text(path)))  # not inside code
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", body)


def test_every_relative_link_and_anchor_resolves():
    checked = 0
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            assert dest.exists(), f"{page.relative_to(ROOT)}: link {target!r}: {dest} does not exist"
            if anchor:
                assert anchor in anchors(dest), (
                    f"{page.relative_to(ROOT)}: link {target!r}: no heading with anchor #{anchor} in {dest.name}"
                )
            checked += 1
    assert checked >= 30, f"only {checked} links found: the link check is not reading the docs"


def test_slug_matches_githubs_rule():
    assert slug("Clean accuracy (%)") == "clean-accuracy-"
    assert slug("How robust is the default checkpoint?") == "how-robust-is-the-default-checkpoint"
    assert slug("Planner and apply") == "planner-and-apply"


# --- commands ------------------------------------------------------------------------------------


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a bash snippet as token lists (a trailing backslash joins lines; redirections dropped)."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current, skip_next = [], False
        for token in lexer:
            if skip_next:
                skip_next = False
            elif token in REDIRECTS:
                skip_next = True
            elif token in SHELL_OPERATORS:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def cli_arguments(tokens: list[str]) -> list[str] | None:
    """The arguments a command passes to the codedsmooth CLI, or None if it does not run it."""
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    if Path(tokens[0]).name == "codedsmooth":
        return tokens[1:]
    for i, t in enumerate(tokens[:-1]):
        if t == "-m" and tokens[i + 1] in ("codedsmooth", "codedsmooth.cli"):
            return tokens[i + 2 :]
    return None


def documented_cli_calls() -> list[tuple[str, list[str]]]:
    calls = []
    for page in PAGES:
        for block in code_blocks(page, "bash"):
            for tokens in shell_commands(block):
                args = cli_arguments(tokens)
                if args is not None:
                    calls.append((page.relative_to(ROOT).as_posix(), args))
    return calls


def strict_parser() -> argparse.ArgumentParser:
    """The CLI's parser without prefix matching, so a misspelt ``--sample`` is not read as ``--samples``."""
    parser = build_parser()
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.allow_abbrev = False
    return parser


def parse(args: list[str]) -> argparse.Namespace | None:
    """``args`` through the real CLI parser; None for --help (which exits 0); a parse error fails with argparse's message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return strict_parser().parse_args(args)
        except SystemExit as exc:
            if exc.code == 0:
                return None
            raise AssertionError(f"codedsmooth {shlex.join(args)}: {err.getvalue().strip()}") from None


def test_shell_command_splitting():
    calls = shell_commands(
        "A=1 codedsmooth serve --no-rci & curl -s x | cut -c1 # comment\ntorchrun -m codedsmooth train --out r > log"
    )
    assert [cli_arguments(c) for c in calls] == [["serve", "--no-rci"], None, None, ["train", "--out", "r"]]
    assert cli_arguments(["docker", "run", "--rm", "codedsmooth"]) is None


def test_every_documented_command_parses_with_the_real_cli():
    calls = documented_cli_calls()
    failures = []
    for page, args in calls:
        try:
            parse(args)
        except AssertionError as exc:
            failures.append(f"{page}: {exc}")
    assert not failures, "\n".join(failures)
    assert {args[0] for _, args in calls} >= {"train", "serve", "attack", "report"}
    assert len(calls) >= 30, f"only {len(calls)} codedsmooth commands found in bash blocks"


def test_inline_codedsmooth_spans_name_real_subcommands_and_flags():
    """`codedsmooth attack --url` in prose: a real subcommand and real flags (values may be left out)."""
    parser = strict_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    top = {s for a in parser._actions for s in a.option_strings}
    checked = 0
    for page in PAGES:
        for span in re.findall(r"`(codedsmooth [^`]+)`", FENCE.sub("", text(page))):
            tokens = span.split()[1:]
            while tokens and tokens[0] in top:  # global options before the subcommand
                tokens = tokens[2:]
            if tokens == ["…"]:
                continue
            assert tokens and tokens[0] in subs, f"{page.name}: `{span}`: no such subcommand"
            sub, rest = subs[tokens[0]], tokens[1:]
            nested = next((a for a in sub._actions if isinstance(a, argparse._SubParsersAction)), None)
            if nested is not None:  # `codedsmooth keys add …`
                assert rest and rest[0] in nested.choices, (
                    f"{page.name}: `{span}`: {tokens[0]} needs one of {sorted(nested.choices)}"
                )
                sub, rest = nested.choices[rest[0]], rest[1:]
            known = {s for a in sub._actions for s in a.option_strings}
            for flag in (t for t in rest if t.startswith("--")):
                assert flag in known, f"{page.name}: `{span}`: {tokens[0]} has no option {flag}"
            checked += 1
    assert checked >= 15


def test_a_wrong_flag_is_caught():
    with pytest.raises(AssertionError, match="unrecognized arguments"):
        parse(["serve", "--no-such-flag"])
    with pytest.raises(AssertionError, match="unrecognized arguments"):
        parse(["attack", "--sample", "100"])  # a prefix of --samples


# --- the README ----------------------------------------------------------------------------------


def test_readme_is_short():
    lines = text(README).count("\n")
    assert lines < 200, f"README.md has {lines} lines"


def test_the_two_commands_are_what_ci_runs():
    blocks = [body.strip() for _, body in FENCE.findall(section(README, "The two commands"))]
    assert len(blocks) == 2, blocks
    main, tests = blocks
    ci_lines = [line.strip() for line in text(ROOT / ".ci" / "run").splitlines()]
    assert tests in ci_lines, f".ci/run does not run the README's test command verbatim:\n{tests}"
    assert main == re.sub(
        r"\.venv/bin/python -m pytest( -\S+(?: [^-\s]\S*)?)*$", ".venv/bin/codedsmooth serve", tests
    ).replace("-e '.[dev]'", "-e .")  # the same install; pytest's options (parallel workers) belong to the tests only


def test_readme_links_every_docs_page():
    linked = {Path(t.partition("#")[0]).name for t in links(README)}
    missing = {p.name for p in DOCS} - linked
    assert not missing, f"docs pages not linked from README.md: {missing}"


# --- serving page against the serve command ------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def table_rows(markdown: str) -> list[list[str]]:
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[-| ]+\|", line.strip()):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[1:]  # without the header


def test_serving_options_table_lists_exactly_the_serve_options_with_their_defaults():
    options = {s: a for a in serve_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    documented = {}
    for row in table_rows(section(DOCS[0].parent / "serving.md", "Options")):
        flags = re.findall(r"`(--[a-z0-9-]+)`", row[0])
        defaults = [d.strip() for d in row[1].split(" / ")]
        for i, flag in enumerate(flags):
            documented[flag] = defaults[i] if len(defaults) == len(flags) else row[1]
    assert set(documented) == set(options), (
        f"missing: {set(options) - set(documented)}; not options: {set(documented) - set(options)}"
    )
    compared = 0
    for flag, cell in documented.items():
        shown = re.search(r"default: ([^)]+)\)\s*$", options[flag].help or "")
        number = re.match(r"^(\d+(?:\.\d+)?(?:e-?\d+)?)(?: (KiB|MiB))?(?:\s|$)", cell)
        if shown and number:
            value = float(number.group(1)) * {None: 1, "KiB": 1024, "MiB": 1024**2}[number.group(2)]
            assert value == float(shown.group(1)), f"{flag}: docs say {cell}, serve --help says {shown.group(1)}"
            compared += 1
    assert compared >= 15, f"only {compared} numeric defaults compared"


def test_documented_env_vars_are_serve_settings_or_the_clients_key():
    from codedsmooth.service.client import API_KEY_ENV
    from codedsmooth.train.data import FASHION_MNIST_ENV

    serve_flags = {s for a in serve_parser()._actions for s in a.option_strings}
    others = {
        API_KEY_ENV.removeprefix("CODEDSMOOTH_"),
        FASHION_MNIST_ENV.removeprefix("CODEDSMOOTH_"),
    }  # the client's key, the data set's folder
    for page in PAGES:
        for name in set(re.findall(r"CODEDSMOOTH_([A-Z][A-Z_]*)", text(page))) - others:
            assert "--" + name.lower().replace("_", "-") in serve_flags, (
                f"{page.name}: CODEDSMOOTH_{name} is no serve setting"
            )


def test_metrics_table_matches_the_metrics_the_service_registers():
    source = "".join(
        p.read_text() for d in __import__("codedsmooth.service", fromlist=["x"]).__path__ for p in Path(d).rglob("*.py")
    )
    registered = set(re.findall(r"[\"'](codedsmooth_[a-z_]+)[\"']", source))
    documented = {
        re.match(r"`(codedsmooth_[a-z_]+)", row[0]).group(1)
        for row in table_rows(section(ROOT / "docs" / "serving.md", "Metrics"))
    }
    assert registered and documented == registered, (
        f"undocumented: {registered - documented}; not registered: {documented - registered}"
    )


# --- facts about the data ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


def classes_phrase(labels) -> str:
    counts = Counter(int(v) for v in labels)
    names = [NUMBER_WORDS[c] for c in sorted(counts)]
    if len(names) == 1:
        return f"all {names[0]}"
    each = set(counts.values())
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed}, {each.pop()} each" if len(each) == 1 else listed


def test_embedded_mnist_counts_in_the_docs(mnist):
    train = Counter(mnist.train_y.tolist())
    test = Counter(mnist.test_y.tolist())
    total = Counter(mnist.train_y.tolist() + mnist.test_y.tolist())
    assert len(set(total.values())) == len(set(test.values())) == 1
    per_class, test_per_class = total[0], test[0]
    n_train, n_test = sum(train.values()), sum(test.values())
    page = flat(text(ROOT / "docs" / "training.md"))
    assert f"the {n_train + n_test:,} real MNIST digits (28×28, {per_class} per class)" in page
    assert f"into {n_train:,} training and {n_test:,} test images ({test_per_class} per class)" in page
    assert tuple(mnist.input_shape) == (1, 28, 28)
    assert f"the {n_train:,} embedded MNIST training digits" in page
    assert (
        f"test accuracy {100 * json.loads((default_checkpoint_path() / 'config.json').read_text())['test_accuracy']:.2f} % on the {n_test:,}-image MNIST test split"
        in page
    )


def test_digits_counts_in_the_docs():
    d = load_dataset("digits")
    n, n_test = len(d.train_y) + len(d.test_y), len(d.test_y)
    page = flat(text(ROOT / "docs" / "training.md"))
    assert (
        f"scikit-learn's {n:,} {d.input_shape[1]}×{d.input_shape[2]} digits, split 75/25 ({n_test} test images)" in page
    )
    assert f"on the {n_test}-image digits test split" in page


def test_which_images_are_attacked_is_generated_from_the_data(mnist):
    from codedsmooth.probe.report import ReportConfig

    page = flat(section(ROOT / "docs" / "robustness.md", "Which images are attacked"))
    results = json.loads((ROOT / "docs" / "RESULTS.json").read_text())
    if "samples" in results:  # recorded samples: each covers every class in equal shares
        for name, idx in results["samples"].items():
            counts = Counter(mnist.test_y[idx].tolist())
            assert sorted(counts) == list(range(10)) and len(set(counts.values())) == 1, (name, counts)
    else:  # older results attacked the first images of the split: the page says which classes those are
        cfg = results["config"]
        sizes = {cfg["images"], cfg["rci_images"], cfg["square_images"], cfg["curve_images"], cfg["cotenant_victims"]}
        for n in sorted(sizes, reverse=True):
            phrase = f"the first {n} test images are {classes_phrase(mnist.test_y[:n])}"
            assert phrase in page, f"robustness.md should say: {phrase}"
    defaults = ReportConfig()
    per_class = {
        "white-box": defaults.images_per_class,
        "rci": defaults.rci_per_class,
        "black-box": defaults.blackbox_per_class,
        "eot-curve": defaults.curve_per_class,
        "cotenant": defaults.cotenant_per_class,
    }
    for name, k in per_class.items():  # what the report draws, as its defaults say
        assert f"*{name}* sample ({k} per class" in page, f"robustness.md should describe the {name} sample"
    assert classes_phrase(mnist.test_y) == f"{', '.join(NUMBER_WORDS[:-1])} and nines, 100 each"
    assert "`--samples 1000` to attack every class" in page and len(mnist.test_y) == 1000


def test_input_convention_white_digit_on_black(mnist):
    x = mnist.test_x.float() / 255
    frame = x.clone()
    frame[..., 3:-3, 3:-3] = float("nan")
    assert (
        float(frame.nanmean()) < 0.01 and float(x.mean()) < 0.2 and float(x.amax()) == 1.0
    )  # dark background, light ink
    assert "a **white digit on a black background**" in flat(text(README))
    assert "[1, 28, 28]" in text(README) and "pixels in [0, 1]" in flat(text(README))


# --- the default checkpoint ----------------------------------------------------------------------


def test_default_checkpoint_facts_match_its_config():
    config = json.loads((default_checkpoint_path() / "config.json").read_text())
    assert f"`{config['name']}`" in text(README)
    assert f'client.infer("{config["name"]}"' in text(README)
    block = code_blocks(ROOT / "docs" / "training.md", "bash")
    cmd = next(
        args
        for b in block
        for c in shell_commands(b)
        if (args := cli_arguments(c)) and "codedsmooth/default_checkpoint" in args
    )
    args = parse(cmd)
    t = config["training"]
    assert (args.method, args.epochs, args.seed, args.batch_size, args.lr) == (
        t["method"],
        t["epochs"],
        t["seed"],
        t["batch_size"],
        t["lr"],
    )
    assert (args.width, args.data) == (config["arch_kwargs"]["width"], config["dataset"])
    coding = config["coding"]
    page = flat(text(ROOT / "docs" / "training.md"))
    assert (
        f"served with RCI at K = {coding['k']}, N = {coding['n']} on Gauss coded points" in page
        and coding["coded_points"] == "chebyshev-gauss"
    )
    at = t["adversarial_training"]
    assert f"PGD adversarial training (ε = {at['eps']:g}, {at['steps']} steps)" in page
    assert f"in {sum(h['seconds'] for h in config['history']) / 60:.0f} min of recorded training time" in page


# --- numbers quoted from docs/RESULTS.json -------------------------------------------------------


@pytest.fixture(scope="module")
def results():
    return json.loads((ROOT / "docs" / "RESULTS.json").read_text())


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def worst(results, method, setting, eps, sd=False) -> str:
    accs = [
        100 * m["settings"][setting][eps]["accuracy"]
        for key, m in results["models"].items()
        if key.startswith(method + "/")
    ]
    mean = f"{statistics.mean(accs):.1f}"
    return f"{mean} ± {statistics.stdev(accs):.1f}" if sd else mean


def test_published_weights_are_the_attacked_ones(results):
    from codedsmooth.probe.weights import checkpoint_record

    for key, ck in results["checkpoints"].items():
        assert checkpoint_record(ROOT / "docs" / ck["published"]) == ck["files"], key


def test_the_default_checkpoint_is_the_reports_most_robust_model_with_97_percent_clean(results):
    from codedsmooth.probe.weights import sha256

    d = results["default_checkpoint"]
    assert d["sha256"] == sha256(default_checkpoint_path() / "model.safetensors")  # the report measured this very file
    last = f"{results['config']['eps'][-1]:g}"
    whole = results["full_split"]["rows"]

    def clean(k):
        return results["models"][k]["clean_full"]["correct"] / results["models"][k]["clean_full"]["n"]

    def worst_case(k):  # on the whole split where it ran, else on the white-box sample
        return whole[k]["accuracy"] if k in whole else results["models"][k]["settings"]["plain"][last]["accuracy"]

    best = max((k for k in results["models"] if clean(k) >= 0.97), key=worst_case)
    assert d["same_as"] == best and results["checkpoints"][best]["files"]["model.safetensors"]["sha256"] == d["sha256"]
    assert d["plain"] == pytest.approx(clean(best))


def test_default_checkpoint_numbers_in_the_docs(results):
    d = results["default_checkpoint"]
    row = results["full_split"]["rows"][d["same_as"]]
    curve = results["models"][d["same_as"]]["curve_extra"]
    big = max(curve, key=float)
    readme, rob = flat(text(README)), flat(text(ROOT / "docs" / "robustness.md"))
    method, seed = d["same_as"].split("/seed")
    for page in (readme, rob):
        assert f"{pct(row['accuracy'])} % [{pct(row['interval'][0])}, {pct(row['interval'][1])}]" in page
        assert f"{100 * d['plain']:.2f} % " in page and f"{100 * d['rci']:.2f} % served with RCI" in page
    assert (
        f"at ε = {big} it keeps {pct(curve[big]['accuracy'])} %" in readme
        and f"at ε = {big} it keeps {pct(curve[big]['accuracy'])} % on the white-box sample" in rob
    )
    assert (
        f"(`{d['name']}`) is the report's {method} seed {seed} model" in rob
        and f"checkpoint (`{d['name']}`) is adversarially trained" in readme
    )
    assert f"({100 * d['rci']:.2f} % expected against {100 * d['plain']:.2f} % on the default checkpoint" in flat(
        text(ROOT / "docs" / "rci.md")
    )
    assert f"({100 * d['rci']:.2f} % expected over {d['draws']} draws with RCI" in flat(
        text(ROOT / "docs" / "training.md")
    )


def test_rci_cost_and_benefit_on_the_default(results):
    d = results["default_checkpoint"]
    st = results["models"][d["same_as"]]["settings"]
    method = d["same_as"].split("/seed")[0]
    tests = [t for q in results["paired"] if q["a"].startswith(f"{method}, RCI") for t in q["tests"]]
    assert tests and all(t["p"] >= 0.05 for t in tests)
    rob = flat(text(ROOT / "docs" / "robustness.md"))
    n = st["request"]["0.3"]["n"]
    plain_same_images = sum(st["plain"]["0.3"]["score"][:n]) / n  # the RCI sample is the first n of the white-box one
    assert (
        f"on the {n} images of the RCI sample is {pct(plain_same_images)} % without RCI, {pct(st['request']['0.3']['accuracy'])} % with RCI in request scope and "
        f"{pct(st['batch']['0.3']['accuracy'])} % in batch scope against the EOT suite (no McNemar test of {method} with RCI against without is "
        f"significant, {len(tests)} tests"
    ) in rob
    assert (
        "[cost/benefit table](../README.md#what-rci-costs-and-buys)" in rob
    )  # the throughput cost is the README's generated table, not a figure of its own


def test_robustness_findings_match_results_json(results):
    readme, rob = flat(text(README)), flat(text(ROOT / "docs" / "robustness.md"))
    w = lambda *a, **k: worst(results, *a, **k)  # noqa: E731
    others = {w(m, "plain", "0.3") for m in ("erm", "mixup", "coded")}
    assert len(others) == 1
    other = others.pop()
    assert (
        f"pgd-at keeps {w('pgd-at', 'plain', '0.3')} % without RCI (mean over seeds); erm, mixup and coded keep {other} %"
        in rob
    )
    assert f"erm, mixup and coded-smoothing models keep {other} % at ε = 0.3" in readme
    assert (
        f"at ε = 0.1 coded keeps {w('coded', 'plain', '0.1', sd=True)} % against ERM's {w('erm', 'plain', '0.1', sd=True)} % (mixup: {w('mixup', 'plain', '0.1')} %)"
        in rob
    )
    seeds = " / ".join(
        f"{100 * m['settings']['plain']['0.1']['accuracy']:.1f}"
        for k, m in results["models"].items()
        if k.startswith("coded/")
    )
    assert f"The coded seeds spread widely: {seeds} % at ε = 0.1" in rob
    for eps in ("0.1", "0.2"):  # "less robust than ERM, lower in every seed at ε = 0.1 and 0.2"
        tests = next(
            q["tests"]
            for q in results["paired"]
            if (q["a"], q["b"], q["eps"], q["setting"]) == ("coded", "erm", eps, "no RCI")
        )
        assert all(t["p"] < 0.05 and t["diff"] < 0 for t in tests), eps
    assert "makes the model less robust than ERM on this data, lower in every seed at ε = 0.1 and 0.2" in rob
    n_coded = sum(k.startswith("coded/") for k in results["models"])
    assert (
        f"({n_coded} seeds for coded," in rob and f"Coded models are trained and attacked with {n_coded} seeds" in rob
    )


def test_rci_finding_matches_the_paired_tests(results):
    rob = flat(text(ROOT / "docs" / "robustness.md"))
    for scope, phrase in (
        ("request", "in request scope, {k} are significant at p < 0.05"),
        ("batch", "in batch scope {k} of {n}"),
    ):
        tests = [t for q in results["paired"] if q["setting"] == scope for t in q["tests"]]
        k = sum(t["p"] < 0.05 for t in tests)
        assert phrase.format(k=k, n=len(tests)) in rob, scope
        assert k <= len(tests) // 10, (
            f"{scope}: {k} of {len(tests)} significant; the claim 'RCI does not make a model more robust' needs rereading"
        )
        assert all(t["diff"] <= 0 for t in tests if t["p"] < 0.05), f"{scope}: RCI significantly better somewhere"
    tests = [t for q in results["paired"] if q["setting"] == "request" for t in q["tests"]]
    assert f"Of {len(tests)} method × ε × seed McNemar tests" in rob


def test_blackbox_findings_match_results_json(results):
    b = results["blackbox"]
    rob = flat(text(ROOT / "docs" / "robustness.md"))
    index = {(x["method"], x["attacker"], x["budget"], x["score_queries"], x["server"]): x for x in b["rows"]}
    top = max(b["budgets_by_method"]["erm"])
    erm = {s: index[("erm", "adaptive Square", top, b["score_queries"], s)] for s in b["servers"]}
    assert (
        f"leaves {pct(erm['plain']['accuracy'])} % against the plain server, {pct(erm['request']['accuracy'])} % against RCI and "
        f"{pct(erm['noise']['accuracy'])} % against input noise"
    ) in rob
    assert (
        f"median queries per image {erm['plain']['queries_median']:,.0f}, {erm['request']['queries_median']:,.0f} and {erm['noise']['queries_median']:,.0f}"
        in rob
    )
    assert (
        f"the white-box attack through RCI leaves {pct(erm['request']['whitebox_accuracy'])} % on the same images"
        in rob
    )
    method = results["default_checkpoint"]["same_as"].split("/seed")[0]
    t = max(b["budgets_by_method"][method])
    row = {s: index[(method, "adaptive Square", t, b["score_queries"], s)] for s in b["servers"]}
    assert (
        f"three servers leave {pct(row['plain']['accuracy'])}, {pct(row['request']['accuracy'])} and {pct(row['noise']['accuracy'])} %"
        in rob
    )
    paired = {(p["method"], p["attacker"], p["budget"], p["score_queries"], p["server"]): p for p in b["paired"]}
    ps = {s: paired[(method, "adaptive Square", t, b["score_queries"], s)] for s in ("request", "noise")}
    assert all(p["p"] >= 0.05 for p in ps.values())  # "on the default it changes nothing measurable"
    assert (
        f"({pct(row['plain']['accuracy'])} / {pct(row['request']['accuracy'])} / {pct(row['noise']['accuracy'])} % on plain / RCI / noise servers, "
        f"sign tests p = {ps['request']['p']:.2g} and {ps['noise']['p']:.2g})"
    ) in flat(text(README))
    assert f"p = {ps['request']['p']:.2g} for RCI, {ps['noise']['p']:.2g} for noise" in rob
    for m in b["budgets_by_method"]:  # "lowers a query attacker's success on the non-robust models"
        if m != method:
            for s in ("request", "noise"):
                p = paired[(m, "adaptive Square", max(b["budgets_by_method"][m]), b["score_queries"], s)]
                assert p["p"] < 0.05 and p["diff"] > 0, (m, s)
    wins = [
        m
        for m in b["budgets_by_method"]
        if index[(m, "adaptive Square", max(b["budgets_by_method"][m]), b["score_queries"], "noise")]["accuracy"]
        >= index[(m, "adaptive Square", max(b["budgets_by_method"][m]), b["score_queries"], "request")]["accuracy"]
    ]
    assert f"for {len(wins)} of {len(b['budgets_by_method'])} methods" in rob


def test_cotenant_numbers_match_results_json(results):
    c = results["cotenant"]
    equal = next(v for v in c.values() if v["scope"] == "batch" and v["n"] == v["k"])
    default = next(v for v in c.values() if v["scope"] == "batch" and v["n"] != v["k"])
    assert all(v["flip_rate"] == 0 for v in c.values() if v["scope"] == "request")
    for page in (README, ROOT / "docs" / "serving.md", ROOT / "docs" / "robustness.md"):
        assert f"flipped {pct(equal['flip_rate'])} % of a victim" in flat(
            text(page)
        ) or f"flipped {pct(equal['flip_rate'])} % of the victims" in flat(text(page)), page.name
    for page in (ROOT / "docs" / "serving.md", ROOT / "docs" / "robustness.md"):
        assert f"1.5K) {pct(default['flip_rate'])} %" in flat(
            text(page)
        ) or f"at N = 1.5K {pct(default['flip_rate'])} %" in flat(text(page)), page.name


def test_report_run_time_and_sample_sizes_in_the_docs(results):
    rob = flat(text(ROOT / "docs" / "robustness.md"))
    compute = sum(results["stages"].values()) / 60
    assert (
        f"add up to {compute:.0f} min of compute at one torch thread each; run as two parts side by side on 2 CPU cores, that is about {compute / 2:.0f} min"
        in rob
    )
    assert (
        f"({len(results['training_seconds'])} models, {sum(results['training_seconds'].values()) / 60:.0f} min of training through the CLI as recorded"
        in rob
    )
    n = {k: len(v) for k, v in results["samples"].items()}
    assert (
        f"attacked {n['white-box']} per model without RCI, {n['rci']} through RCI and {n['black-box']} over HTTP" in rob
    )


# --- the client examples, run against a real server ----------------------------------------------


@pytest.mark.slow
def test_readme_client_examples_work_against_a_real_server(tmp_path, mnist):
    """The README's curl and Python examples, as written, against the default checkpoint on a free port."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the README's curl examples cannot run")
    part = section(README, "Predict from a client")
    tour = section(README, "A ten-minute tour")
    make_png = next(
        line
        for block in code_blocks_of(tour, "bash")
        for line in block.splitlines()
        if line.startswith("python") and "digit.png" in line
    )
    index = int(re.search(r"test_x\[(\d+), 0\]", make_png).group(1))
    label = mnist.classes[int(mnist.test_y[index])]
    assert f'"label":"{label}"' in tour
    name = json.loads((default_checkpoint_path() / "config.json").read_text())["name"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = ServerProcess(None)  # the default checkpoint; it loads while the PNG is written
    try:
        subprocess.run(make_png, shell=True, cwd=tmp_path, env=env, check=True, timeout=60)
        server.wait_ready()
        host = server.url.removeprefix("http://")
        swap = lambda s: s.replace("http://127.0.0.1:8000", server.url).replace('"127.0.0.1:8000"', f'"{host}"')  # noqa: E731
        for block in FENCE.findall(part):
            if block[0] != "bash":
                continue
            for line in block[1].strip().splitlines():
                out = subprocess.run(
                    swap(line), shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
                )
                assert out.returncode == 0, out.stderr
                body = json.loads(out.stdout)
                if isinstance(body, list):  # /v1/models
                    assert [m["name"] for m in body] == [name]
                else:
                    assert body["model"] == name and body["predictions"][0]["label"] == label
        namespace: dict = {}
        printed = io.StringIO()
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            with contextlib.redirect_stdout(printed):
                for block in code_blocks_of(part, "python"):
                    exec(compile(swap(block), "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
        finally:
            os.chdir(cwd)
    finally:
        server.terminate()
    lines = printed.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{label} ") and "'enabled': True" in lines[0]
    assert lines[1] == f"[{mnist.classes.index(label)}]"


def code_blocks_of(markdown: str, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(markdown) if kind == lang]


def test_docs_name_packages_not_moving_files():
    """Docs describe packages by their job; paths into the packages (other than the checkpoint folder) go stale when modules move."""
    package_dirs = ("core/", "models/", "train/", "service/", "probe/")
    for page in [README, *(p for p in DOCS if not p.name.startswith("RESULTS"))]:
        for ref in re.findall(r"`([a-z_]+/[a-z_]+\.py)`", text(page)):
            assert not ref.startswith(package_dirs), f"{page.name} names the module file {ref}"


def test_every_docs_page_the_cli_help_names_exists():
    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    named = {
        (p.prog, m)
        for p in parsers(build_parser())
        for a in p._actions
        for m in re.findall(r"docs/[\w.-]+\.md", a.help or "")
    }
    missing = [(prog, page) for prog, page in named if not (ROOT / page).is_file()]
    assert not missing, f"--help names docs pages that do not exist: {missing}"


def test_the_keys_file_example_parses_as_the_server_reads_it():
    from codedsmooth.service.access.keys import parse_keys
    from codedsmooth.service.access.overrides import INHERIT, LimitOverride

    block = next(
        body for lang, body in FENCE.findall(text(ROOT / "docs" / "serving.md")) if "sha256 of the key" in body
    )
    table = parse_keys(block, "serving.md")
    clients = {c.name: c for c in table.clients.values()}
    assert (clients["alice"].limits, clients["alice"].manage) == (LimitOverride(INHERIT, INHERIT), False)
    assert clients["batch-job"].limits == LimitOverride(rate=200.0, quota=None)
    assert [name for name, c in clients.items() if c.manage] == ["ops"]
    assert clients["ops"].per_model == (("erm", LimitOverride(quota=None)),)


def test_the_attackers_quota_defaults_in_the_docs():
    from codedsmooth.probe.report import ReportConfig

    cfg = ReportConfig()
    keys = cfg.colluding_keys
    assert cfg.attacker_quota_window_s == 86400
    phrase = f"(`--attacker-quota`, {cfg.attacker_quota:,} items a day by default, for {', '.join(map(str, keys[:-1]))} and {keys[-1]} colluding keys"
    assert phrase in flat(text(ROOT / "docs" / "robustness.md"))


def test_the_reports_seeds_budgets_and_weights_as_robustness_md_states_them(results):
    rob = flat(text(ROOT / "docs" / "robustness.md"))
    seeds: dict[str, list[str]] = {}
    for key in results["models"]:
        method, seed = key.split("/seed")
        seeds.setdefault(method, []).append(seed)
    assert seeds["erm"] == seeds["mixup"] == seeds["pgd-at"]
    others = seeds["erm"]
    assert (
        f"erm, mixup and pgd-at with seeds {', '.join(others[:-1])} and {others[-1]} and coded with seeds {seeds['coded'][0]} to {seeds['coded'][-1]}"
        in rob
    )
    assert seeds["coded"] == [str(s) for s in range(int(seeds["coded"][0]), int(seeds["coded"][-1]) + 1)]
    assert f"the other methods with {len(others)}" in rob
    b = results["blackbox"]
    assert f"with {' and '.join(f'{q:,}' for q in b['budgets'])} queries per image" in rob
    assert (
        all(q == [1000] for m, q in b["budgets_by_method"].items() if m == "pgd-at")
        and "against adversarially trained models 1,000" in rob
    )
    assert results["full_split"]["n"] == 1000 and set(results["full_split"]["rows"]) == {
        k for k in results["models"] if k.startswith("pgd-at/")
    }
    sizes = [ck["files"]["model.safetensors"]["bytes"] / 1e6 for ck in results["checkpoints"].values()]
    assert "about 1.8 MB per model" in rob and all(1.75 <= s < 1.85 for s in sizes), sizes


def test_size_study_as_robustness_md_states_it(results):
    """The study's headline in robustness.md, recomputed from the per-seed tests and rows in RESULTS.json."""
    from codedsmooth.probe.report.sizes import collapsed

    st = results["sizes"]
    rob = flat(text(ROOT / "docs" / "robustness.md"))
    tests = {(t["size"], t["a"], t["b"], t["measure"]): t["tests"] for t in st["tests"]}
    classes = len(next(iter(st["subset_classes"].values())))

    def sig(ts):
        return sum(1 for t in ts if t["p"] < 0.05)

    erm = {n: tests[(n, "coded", "erm", "clean")] for n in (500, 1000, 4000)}
    assert all(sig(ts) < len(ts) for ts in erm.values())  # "no size passes the report's rule"
    mean = {n: 100 * sum(t["diff"] for t in ts) / len(ts) for n, ts in erm.items()}
    assert (
        f"coded − erm is {mean[500]:+.1f} points at 500 (significant in {sig(erm[500])} of 3 seeds), {mean[1000]:+.1f} at 1,000 ({sig(erm[1000])} of 3) and "
        f"{mean[4000]:+.1f} at 4,000 ({sig(erm[4000])} of 3)"
    ).replace("+", "") in rob.replace("+", "")
    small = [r for r in st["rows"] if r["size"] < st["n_train"]]
    failed = {m: sum(collapsed(r, classes) for r in small if r["method"] == m) for m in ("pgd-at", "coded-at")}
    runs = {m: sum(1 for r in small if r["method"] == m) for m in failed}
    assert f"pgd-at collapsed to a single predicted class in {failed['pgd-at']} of its {runs['pgd-at']} runs" in rob
    assert (
        failed["coded-at"] == 0
        and f"coded-at in none of its {sum(1 for r in st['rows'] if r['method'] == 'coded-at')} runs" in rob
    )
    seed0 = {n: next(t for t in tests[(n, "coded-at", "pgd-at", "worst")] if t["seed"] == 0) for n in (500, 1000)}
    assert all(not collapsed(r, classes) for r in small if r["method"] == "pgd-at" and r["seed"] == 0)
    assert f"{100 * seed0[500]['diff']:.1f} points at 500, {100 * seed0[1000]['diff']:.1f} at 1,000" in rob
    big = {
        m: [r["worst"]["accuracy"] for r in st["rows"] if r["size"] == st["n_train"] and r["method"] == m]
        for m in ("coded-at", "pgd-at")
    }
    sd = lambda v: statistics.stdev(v)  # noqa: E731
    assert (
        f"coded-at keeps {pct(statistics.mean(big['coded-at']))} ± {100 * sd(big['coded-at']):.1f} % worst case against pgd-at's "
        f"{pct(statistics.mean(big['pgd-at']))} ± {100 * sd(big['pgd-at']):.1f} % on the study's {len(st['sample'])} images, significant in "
        f"{sig(tests[(st['n_train'], 'coded-at', 'pgd-at', 'worst')])} of 3 seeds"
    ) in rob
