"""The package layers, checked by the real ``lint-imports`` against the contracts in pyproject.toml.

lint-imports (grimp) reads the root package's own folder, while setuptools maps the subpackages
from core/, models/, … (package-dir); codedsmooth/ holds a relative symlink to each, so the
checkout itself is one package tree and ``lint-imports`` runs as it is in the repository root.
The deliberate break is made in a copy of that tree.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="the layer check needs the dev extra (import-linter)")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
SUBPACKAGES = ("core", "models", "train", "service", "probe")


def _package_tree(dest: Path) -> Path:
    """A copy of the package as one folder (the subpackages' symlinks followed): codedsmooth/{cli.py, …, core/, …}."""
    shutil.copytree(
        ROOT / "codedsmooth", dest / "codedsmooth", ignore=shutil.ignore_patterns("__pycache__", "default_checkpoint")
    )
    return dest


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "lint-imports"
    command = (
        [str(script)]
        if script.exists()
        else [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
        ]
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    return subprocess.run(
        [*command, "--config", str(PYPROJECT), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_checkout_is_one_package_tree():
    for name in SUBPACKAGES:
        link = ROOT / "codedsmooth" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), name


def test_the_layer_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, f"lint-imports found a broken layer contract:\n{result.stdout}\n{result.stderr}"
    assert "7 kept, 0 broken" in result.stdout, result.stdout


def test_a_service_module_importing_train_breaks_a_contract_and_names_the_chain(tmp_path):
    tree = _package_tree(tmp_path)
    errors = tree / "codedsmooth" / "service" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom codedsmooth.train import trainer  # noqa: E402,F401\n")
    result = _lint_imports(tree)
    print(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "service never imports train or probe BROKEN" in result.stdout
    assert "codedsmooth.service.errors -> codedsmooth.train" in result.stdout


@pytest.mark.parametrize(
    "module, line, contract, chain",
    [
        (
            "service/api/v1.py",
            "from codedsmooth.service.http import connections",
            "service rooms are layered BROKEN",
            "codedsmooth.service.api.v1 -> codedsmooth.service.http.connections",
        ),
        (
            "service/access/keys.py",
            "from codedsmooth.service.access import control",
            "no import circles inside any package BROKEN",
            "- .keys -> .control",
        ),
        (
            "core/spline.py",
            "from codedsmooth.core import spec",
            "no import circles inside any package BROKEN",
            "- .spline -> .spec",
        ),
    ],
    ids=["api-imports-http", "circle-inside-access", "circle-inside-core"],
)
def test_a_break_inside_a_package_is_caught(tmp_path, module, line, contract, chain):
    """Contracts inside the packages: an API module importing the connection layer, and a circle inside one package."""
    tree = _package_tree(tmp_path)
    path = tree / "codedsmooth" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa: E402,F401\n")
    result = _lint_imports(tree)
    print(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert contract in result.stdout and chain in result.stdout
