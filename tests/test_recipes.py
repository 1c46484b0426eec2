"""Every fenced ``bash`` and ``python`` block of README.md and docs/*.md, run as written, in order, in a
fresh temporary directory per page: the recipes a newcomer copies must run.

The conventions the docs follow (a new block must too):

- A page's blocks run in order in one fresh temporary directory, set up as a checkout after the
  README's first command: ``docs/`` (the published weights) and ``.venv`` (the environment running
  the tests) are linked into it, and the CLI is on ``PATH``.
- ``127.0.0.1:8000`` in a block is the server's address, replaced by a free port. A block that
  starts ``codedsmooth serve`` itself (in the background, waiting on ``/health/ready``, stopping it
  with ``kill %1``) runs with ``CODEDSMOOTH_PORT`` and ``CODEDSMOOTH_METRICS_PORT`` set to free
  ports. A block marked ``<!-- recipe: server -->`` on the line before its fence needs the server of
  the README's first command already running: the test serves the default checkpoint once per page.
- ``bash`` blocks run with ``bash -e -o pipefail`` and then ``wait`` (a failing line fails the
  recipe; a server left running hangs it); ``python`` blocks run each in a fresh interpreter, so
  each must be self-contained. Other blocks (``json``, ``text``, untagged) are file contents.
- ``<!-- recipe: docker -->`` / ``<!-- recipe: ray -->``: needs a Docker daemon (and the network to
  build) / Ray Serve; not run here (tests/test_docker.py and the tests/test_ray_*.py files run
  those paths). ``<!-- recipe: skip: REASON -->``: not run, for the reason given (minutes of
  training or attacks, network installs, lists of alternative commands); tests/test_docs.py still
  parses each of their ``codedsmooth`` commands with the real CLI.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ServerProcess

from codedsmooth.service.launcher import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!-- recipe: (server|docker|ray|skip: (?P<reason>\S[^\n]*?)) -->")
RUN = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
ADDRESS = "127.0.0.1:8000"
BLOCK_TIMEOUT_S = 180


@dataclass(frozen=True)
class Recipe:
    page: str
    line: int  # of the opening fence
    kind: str  # "bash" or "python"
    body: str
    mark: str | None  # None (run), "server" (run with the page's server), "docker", "ray", "skip"
    reason: str = ""


def recipes(path: Path) -> list[Recipe]:
    """The page's bash and python blocks with the marker on the line before each fence; a malformed marker is an error."""
    body = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(body):
        kind = RUN.get(m.group(1))
        before = body[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = body.count("\n", 0, m.start()) + 1
        if "<!-- recipe" in before:
            marker = MARKER.fullmatch(before.strip())
            assert marker, (
                f"{path.name}:{line - 1}: malformed marker {before!r}; use <!-- recipe: server|docker|ray|skip: REASON -->"
            )
            assert kind, (
                f"{path.name}:{line}: a recipe marker on a {m.group(1) or 'untagged'} block, which is never run"
            )
            mark = marker.group(1).split(":")[0]
            out.append(Recipe(path.name, line, kind, m.group(2), mark, marker.group("reason") or ""))
        elif kind:
            out.append(Recipe(path.name, line, kind, m.group(2), None))
    return out


def test_markers_parse_and_a_skip_needs_a_reason(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "a\n<!-- recipe: skip: too long -->\n```bash\nsleep 1d\n```\n\n<!-- recipe: server -->\n```python\nprint(1)\n```\n```json\n{}\n```\n"
    )
    assert [(r.kind, r.mark, r.reason, r.line) for r in recipes(page)] == [
        ("bash", "skip", "too long", 3),
        ("python", "server", "", 8),
    ]
    for bad in ("<!-- recipe: skip -->", "<!-- recipe: skip:  -->", "<!-- recipe: sever -->"):
        page.write_text(f"{bad}\n```bash\ntrue\n```\n")
        with pytest.raises(AssertionError, match="malformed marker"):
            recipes(page)
    page.write_text("<!-- recipe: server -->\n```json\n{}\n```\n")
    with pytest.raises(AssertionError, match="never run"):
        recipes(page)


def checkout(tmp_path: Path) -> Path:
    """A fresh directory that looks like a checkout after the README's first command."""
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "docs").symlink_to(ROOT / "docs")
    (work / ".venv").symlink_to(Path(sys.prefix))
    return work


def run(recipe: Recipe, work: Path, server_url: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEDSMOOTH_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if server_url is None:
        port = free_port()
        env.update(CODEDSMOOTH_PORT=str(port), CODEDSMOOTH_METRICS_PORT=str(free_port()), CODEDSMOOTH_THREADS="2")
        address = f"127.0.0.1:{port}"
    else:
        address = server_url.removeprefix("http://")
    body = recipe.body.replace(ADDRESS, address)
    args = (
        ["bash", "-e", "-o", "pipefail", "-c", body + "\nwait\n"]
        if recipe.kind == "bash"
        else [sys.executable, "-c", body]
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        output = "(timed out)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the block left behind
        except ProcessLookupError:
            pass
        proc.wait()
    print(
        f"{recipe.page}:{recipe.line}: {recipe.kind} block, exit {proc.returncode} in {time.monotonic() - start:.1f}s"
    )  # pytest -s: where the time goes
    assert proc.returncode == 0, (
        f"{recipe.page}:{recipe.line}: the {recipe.kind} block failed (exit {proc.returncode}):\n{body}\n--- output ---\n{output[-3000:]}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_pages_recipes_run_as_written(page, tmp_path):
    blocks = recipes(page)
    runnable = [r for r in blocks if r.mark in (None, "server")]
    if not runnable:
        pytest.skip(
            "; ".join(f"line {r.line}: {r.mark}{': ' + r.reason if r.reason else ''}" for r in blocks)
            or "no bash or python blocks"
        )
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the recipes use it")
    work = checkout(tmp_path)
    server = None
    try:
        for recipe in runnable:
            if recipe.mark == "server" and server is None:
                server = ServerProcess(None)  # the default checkpoint, as the README's first command serves it
                server.wait_ready()
            run(recipe, work, server.url if recipe.mark == "server" else None)
    finally:
        if server is not None:
            server.terminate()
