"""The report's parts that are not attacks: balanced samples, the stage cache, checkpoint hashes and published weights."""

import hashlib
import json
import os
from collections import Counter

import pytest
import torch

from codedsmooth.probe.cache import StageCache
from codedsmooth.probe.cost import attacker_cost
from codedsmooth.probe.samples import balanced_order, balanced_sample, class_counts, describe
from codedsmooth.probe.weights import checkpoint_record, publish
from codedsmooth.train import load_dataset


def test_mnist_test_split_is_stored_by_class_and_samples_balance_it():
    y = load_dataset("mnist").test_y
    assert y[:100].unique().tolist() == [0]  # why the first images cannot be the sample
    order = balanced_order(y, seed=0)
    assert sorted(order.tolist()) == list(range(len(y)))  # a permutation of the whole split
    for per_class in (1, 5, 20, 50, 100):
        idx = balanced_sample(y, per_class, seed=0)
        counts = Counter(y[idx].tolist())
        assert counts == {c: per_class for c in range(10)}
        assert torch.equal(idx, order[: 10 * per_class])  # a smaller sample is a prefix of a larger one
        assert class_counts(y, idx) == {c: per_class for c in range(10)}
    assert describe(class_counts(y, balanced_sample(y, 20))) == "20 of each of the 10 classes"
    other = balanced_sample(y, 20, seed=1)
    assert set(other.tolist()) != set(balanced_sample(y, 20, seed=0).tolist())  # the seed draws the sample
    assert torch.equal(balanced_sample(y, 20, seed=1), other)  # and fixes it
    with pytest.raises(ValueError, match="per_class"):
        balanced_sample(y, 101)


def test_balanced_order_with_unequal_classes_is_balanced_up_to_the_smallest_class():
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    order = balanced_order(y, seed=3)
    assert sorted(order.tolist()) == list(range(12))
    for k in (1, 2, 3):
        assert Counter(y[order[: 3 * k]].tolist()) == {0: k, 1: k, 2: k}
    assert describe(class_counts(y, order[:5]), ["a", "b", "c"]) == "2 × a, 2 × b, 1 × c"


def test_stage_cache_runs_a_stage_once_per_inputs(tmp_path):
    calls = []

    def stage(v):
        calls.append(v)
        return {"x": torch.arange(3) * v, "log": [["a", 0.5]], "n": v}

    cache = StageCache(tmp_path)
    first = cache.run("white-box/m", {"eps": [0.1], "sample": torch.arange(4)}, lambda: stage(2))
    again = StageCache(tmp_path).run("white-box/m", {"sample": torch.arange(4), "eps": [0.1]}, lambda: stage(3))
    assert calls == [2] and torch.equal(again["x"], first["x"]) and again["log"] == [["a", 0.5]]
    other = StageCache(tmp_path).run(
        "white-box/m", {"eps": [0.1], "sample": torch.arange(5)}, lambda: stage(4)
    )  # other inputs: run again
    assert calls == [2, 4] and other["n"] == 4
    path = cache.path("white-box/m", {"eps": [0.1], "sample": torch.arange(4)})
    path.write_bytes(b"damaged")
    fresh = StageCache(tmp_path)
    assert (
        fresh.run("white-box/m", {"eps": [0.1], "sample": torch.arange(4)}, lambda: stage(5))["n"] == 5
        and fresh.reused == []
    )
    assert not list(tmp_path.rglob("*.tmp*"))  # results are written atomically


def test_checkpoint_hashes_and_published_copy(tiny_checkpoint, tmp_path):
    record = checkpoint_record(tiny_checkpoint)
    for name, rec in record.items():
        data = (tiny_checkpoint / name).read_bytes()
        assert rec == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    dest = publish(tiny_checkpoint, tmp_path / "weights" / "coded-seed0")
    assert checkpoint_record(dest) == record
    assert publish(dest, dest) == dest  # publishing in place is a no-op


def test_a_trained_checkpoint_records_the_threads_and_torch_it_was_trained_with(tiny_checkpoint):
    env = json.loads((tiny_checkpoint / "config.json").read_text())["training"]["environment"]
    assert (
        env["torch"] == torch.__version__ and env["torch_threads"] == 2 and env["cpu_count"] == os.cpu_count()
    )  # conftest trains with 2 threads


def _bb_row(method, server, budget, score_queries, sent, broken, n=10, attacker="adaptive Square"):
    return {
        "method": method,
        "server": server,
        "budget": budget,
        "score_queries": score_queries,
        "attacker": attacker,
        "queries_sent": sent,
        "confirmed_broken": broken,
        "n": n,
    }


def test_attacker_cost_is_arithmetic_on_the_largest_budgets_counts():
    blackbox = {
        "budgets": [100, 1000],
        "budgets_by_method": {"erm": [100, 1000], "pgd-at": [100]},
        "score_queries": 2,
        "rows": [
            _bb_row("erm", "plain", 100, 2, 900, 9),
            _bb_row("erm", "plain", 1000, 2, 2_345, 10),
            _bb_row("erm", "request", 1000, 1, 50, 1),
            _bb_row("erm", "request", 1000, 2, 7_001, 7),
            _bb_row("erm", "plain", 1, None, 10, 3, attacker="transfer from erm seed 1"),
            _bb_row("pgd-at", "plain", 100, 2, 1_000, 0),
        ],
    }
    rows = {(r["method"], r["server"]): r for r in attacker_cost(blackbox, quota=1_000, keys=[1, 3, 10])}
    assert sorted(rows) == [
        ("erm", "plain"),
        ("erm", "request"),
        ("pgd-at", "plain"),
    ]  # largest budget, main m, no transfer rows
    assert rows[("pgd-at", "plain")]["budget"] == 100 and rows[("pgd-at", "plain")]["queries_per_broken"] is None
    assert rows[("pgd-at", "plain")]["broken_per_window_per_key"] == 0.0
    for r in (rows[("erm", "plain")], rows[("erm", "request")]):
        assert r["queries_per_broken"] * r["broken"] == pytest.approx(r["queries_sent"])
        assert r["broken_per_window_per_key"] * r["queries_per_broken"] == pytest.approx(1_000)
        for k, windows in r["windows_for_sample"].items():  # the fewest windows whose quotas cover every query sent
            assert (windows - 1) * k * 1_000 < r["queries_sent"] <= windows * k * 1_000


def test_the_recorded_report_command_parses_back_to_the_same_config():
    from codedsmooth.cli import _config_from_args, _non_default_flags, build_parser
    from codedsmooth.probe.report import ReportConfig

    cfg = ReportConfig(
        methods=["erm", "pgd-at"],
        seeds=[0, 2],
        threads=1,
        runs="/tmp/a b",
        budgets=[50],
        quick=True,
        retrain=False,
        sample_seed=3,
    )
    flags = _non_default_flags(cfg, ReportConfig())
    assert "--retrain" not in flags and "--no-retrain" not in flags  # defaults are left out
    again = _config_from_args(ReportConfig, build_parser().parse_args(["report", *flags]))
    assert again == cfg


def test_fashion_mnist_takes_its_own_defaults_except_where_an_option_is_given():
    from codedsmooth.cli import _config_from_args, build_parser, report_flags
    from codedsmooth.probe.report import ReportConfig
    from codedsmooth.probe.report.config import DATA_DEFAULTS

    parse = lambda *argv: _config_from_args(ReportConfig, build_parser().parse_args(["report", *argv])).for_data()  # noqa: E731
    cfg = parse("--data", "fashion-mnist", "--epochs", "3", "--seeds", "4", "5")
    profile = DATA_DEFAULTS["fashion-mnist"]
    assert (cfg.epochs, cfg.seeds) == (3, [4, 5])  # given: kept
    assert {k: getattr(cfg, k) for k in profile if k != "epochs"} == {k: v for k, v in profile.items() if k != "epochs"}
    assert cfg.out != ReportConfig().out and cfg.runs != ReportConfig().runs  # its own files, never MNIST's
    assert parse(*report_flags(cfg)) == cfg  # the recorded command runs it again
    assert parse() == ReportConfig() and report_flags(ReportConfig()) == []  # MNIST as before


def test_size_findings_claim_an_effect_only_when_every_seed_agrees():
    from codedsmooth.probe.report.render import size_finding

    def tests(*pairs):
        return [{"seed": i, "diff": d, "p": p} for i, (d, p) in enumerate(pairs)]

    assert size_finding(tests((0.02, 0.01), (0.01, 0.04), (0.03, 0.001))).startswith("raises it by 2.0 points")
    assert size_finding(tests((-0.02, 0.01), (-0.04, 0.001))).startswith("lowers it by 3.0 points")
    # two of three seeds significant is not enough, nor is a large mean difference without significance
    assert size_finding(tests((0.02, 0.01), (0.01, 0.04), (0.03, 0.2))).startswith("no effect the tests support")
    assert size_finding(tests((0.2, 0.06), (0.2, 0.06))).startswith("no effect the tests support")
    assert "mean Δ +20.0 points" in size_finding(tests((0.2, 0.06), (0.2, 0.06)))


def test_size_study_names_collapsed_runs_and_says_which_tests_they_decide():
    from codedsmooth.probe.report.render import _training_sizes_section
    from codedsmooth.probe.report.sizes import size_tests

    def row(method, seed, correct, classes_predicted, worst=None):
        r = {
            "size": 100,
            "method": method,
            "seed": seed,
            "epochs": 40,
            "steps": 160,
            "sha256": "x",
            "training_seconds": 1.0,
            "clean": {
                "correct": correct.count("1"),
                "n": len(correct),
                "per_image": correct,
                "classes_predicted": classes_predicted,
            },
        }
        if worst is not None:
            r["worst"] = {
                "accuracy": worst.count("1") / len(worst),
                "interval": [0, 1],
                "n": len(worst),
                "per_image": worst,
                "cascade": [],
            }
        return r

    good, chance = "1" * 18 + "0" * 2, "1" * 2 + "0" * 18
    rows = [
        row("pgd-at", 0, good, 10, "1" * 5 + "0" * 5),
        row("pgd-at", 1, chance, 1, "0" * 10),
        row("coded-at", 0, good, 10, "1" * 5 + "0" * 5),
        row("coded-at", 1, good, 10, "1" * 5 + "0" * 5),
    ]
    st = {
        "eps": 0.3,
        "n_train": 400,
        "seeds": [0, 1],
        "methods": ["pgd-at", "coded-at"],
        "sizes": [100],
        "sample": list(range(10)),
        "sample_classes": {str(c): 1 for c in range(10)},
        "subset_classes": {"100": {str(c): 10 for c in range(10)}},
        "rows": rows,
        "tests": size_tests(rows),
    }
    text = "\n".join(_training_sizes_section({"sizes": st}))
    assert "**Collapsed runs.**" in text and "pgd-at on 100 images, seed 1 (1 class, 10.0 % clean)" in text
    assert (
        "pgd-at collapsed in seed 1 at 100: what those seeds' tests measure is a training failure of one side" in text
    )
    rows[1]["clean"]["classes_predicted"] = 10  # the same accuracy without a collapse: no such note
    assert "collapsed" not in "\n".join(_training_sizes_section({"sizes": st})).lower()


def test_results_md_re_renders_from_results_json_unchanged(tmp_path):
    """The typed pipeline reads the results file as written: docs/RESULTS.md comes back byte for byte from docs/RESULTS.json."""
    import shutil
    from pathlib import Path

    from codedsmooth.probe.report import ReportConfig, run_report

    docs = Path(__file__).resolve().parent.parent / "docs"
    shutil.copy(docs / "RESULTS.json", tmp_path / "RESULTS.json")
    out = run_report(ReportConfig(out=str(tmp_path / "RESULTS.md"), render_only=True), command="unused")
    assert out.read_text() == (docs / "RESULTS.md").read_text()
    assert {p.name for p in tmp_path.glob("*.png")} == {"RESULTS-eps.png", "RESULTS-eot.png", "RESULTS-examples.png"}


def test_paired_tests_keep_method_and_setting_without_parsing_labels():
    from codedsmooth.probe.report.results import PLAIN, PairedTest, SeedTest

    rci = PairedTest("coded-at", "request", "coded-at", PLAIN, "0.1", (SeedTest(0, 0.1, 3, 1, 0.6),))
    between = PairedTest("coded", PLAIN, "pgd-at", PLAIN, "0.3")
    assert (rci.a, rci.b, rci.to_dict()["setting"]) == ("coded-at, RCI request", "coded-at, no RCI", "request")
    assert (between.a, between.b, between.to_dict()["setting"]) == ("coded", "pgd-at", "no RCI")
    for row in (
        rci,
        between,
    ):  # through the results file and back, with a method whose name holds a comma-free prefix of another
        assert PairedTest.from_dict(row.to_dict(), ["coded", "coded-at", "pgd-at"]) == row


def test_train_only_trains_the_runs_models_and_the_size_studys_and_attacks_nothing(tmp_path):
    from codedsmooth.probe.report import ReportConfig, run_report

    cfg = ReportConfig(
        data="digits",
        train_only=True,
        methods=["erm", "coded"],
        seeds=[0],
        coded_seeds=[0],
        epochs=1,
        max_steps=3,
        width=4,
        blackbox_methods=["coded"],
        sizes=[200],
        size_methods=["erm"],
        size_seeds=[0],
        runs=str(tmp_path / "runs"),
        out=str(tmp_path / "RESULTS.md"),
    )
    assert run_report(cfg, command="unused") == tmp_path / "runs"
    trained = {p.parent.relative_to(tmp_path / "runs").as_posix() for p in (tmp_path / "runs").rglob("config.json")}
    # its models, coded's transfer surrogates (coded and erm, seed 1: both methods of this part), the size study's
    assert trained == {"erm-seed0", "coded-seed0", "coded-seed1", "erm-seed1", "sizes/erm-n200-seed0"}
    assert not (tmp_path / "runs" / "stages").exists() and not (tmp_path / "RESULTS.md").exists()
