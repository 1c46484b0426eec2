"""``codedsmooth keys add / list / remove`` (the CLI's ``main``, its stdout and stderr apart), and a real
``codedsmooth serve --api-keys-file`` that refuses a removed client's key from its next reload.

``KEY=$(codedsmooth keys add …)`` must capture the key alone, so stdout is checked to be exactly one
key line; ``keys list`` must never print a whole digest (a key's hash is a guessing target), so its
whole output is searched for every digest of the file.
"""

import hashlib
import stat
import subprocess
import sys

import httpx
import pytest
from helpers import LoggedServer, metric, wait_for_metric

from codedsmooth.cli import main
from codedsmooth.service.access.keys import add_key


def keys(capsys, *args) -> subprocess.CompletedProcess:
    """``codedsmooth keys ARGS`` in this process (a child process would spend seconds importing torch for the parser)."""
    capsys.readouterr()
    code = main(["keys", *args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def added(capsys, path, name, *options) -> str:
    r = keys(capsys, "add", name, "--file", str(path), *options)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_keys_add_puts_only_the_key_on_stdout(tmp_path, capsys):
    r = keys(capsys, "add", "alice", "--file", str(tmp_path / "keys.txt"))
    assert r.returncode == 0, r.stderr
    assert (
        len(r.stdout.splitlines()) == 1 and len(r.stdout.strip()) == 43
    )  # what $(…) captures: the key and nothing else
    assert "alice" in r.stderr and r.stdout.strip() not in r.stderr
    assert (tmp_path / "keys.txt").read_text().split() == [
        "alice",
        hashlib.sha256(r.stdout.strip().encode()).hexdigest(),
    ]


def test_keys_list_shows_names_and_options_never_a_whole_digest(tmp_path, capsys):
    path = tmp_path / "keys.txt"
    k = {
        name: added(capsys, path, name, *opts)
        for name, opts in [("alice", ()), ("batch-job", ("--rate", "200", "--quota", "none")), ("ops", ("--manage",))]
    }
    r = keys(capsys, "list", "--file", str(path))
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert [row[0] for row in rows] == ["alice", "batch-job", "ops"]  # the file's order
    assert [row[2:] for row in rows] == [[], ["rate=200", "quota=none"], ["manage=yes"]]
    for row, key in zip(rows, k.values()):
        digest = hashlib.sha256(key.encode()).hexdigest()
        assert row[1] == digest[:8] + "..."
        assert digest[:9] not in r.stdout + r.stderr and key not in r.stdout + r.stderr


def test_keys_remove_refuses_an_unknown_name_or_a_missing_file_and_changes_nothing(tmp_path, capsys):
    path = tmp_path / "keys.txt"
    added(capsys, path, "alice")
    before = path.read_text()
    r = keys(capsys, "remove", "bob", "--file", str(path))
    assert r.returncode == 2 and r.stdout == ""
    assert (
        r.stderr.strip()
        == f"codedsmooth keys: error: {path}: no client 'bob' (codedsmooth keys list --file {path} shows the clients)"
    )
    assert path.read_text() == before
    r = keys(capsys, "remove", "alice", "--file", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "missing.txt does not exist" in r.stderr and "Traceback" not in r.stderr
    r = keys(capsys, "list", "--file", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "missing.txt does not exist" in r.stderr


def test_keys_remove_keeps_the_other_lines_comments_and_mode(tmp_path, capsys):
    path = tmp_path / "keys.txt"
    added(capsys, path, "alice")
    with path.open("a") as f:
        f.write("# the batch clients\n\n")
    added(capsys, path, "batch-job", "--quota", "none")
    added(capsys, path, "ops")
    lines = path.read_text().splitlines(keepends=True)
    r = keys(capsys, "remove", "batch-job", "--file", str(path))
    assert r.returncode == 0 and r.stdout == "" and "removed client 'batch-job'" in r.stderr
    assert path.read_text() == "".join(line for line in lines if not line.startswith("batch-job "))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.txt"]  # no temporary file left


@pytest.fixture(scope="module")
def keyed_server(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    k = {name: add_key(path, name) for name in ("alice", "bob")}
    srv = LoggedServer(tiny_checkpoint, api_keys_file=path, rci=False, log_level="info")
    try:
        srv.wait_ready()
        yield srv, path, k
    finally:
        srv.terminate()


def test_a_running_server_refuses_a_removed_client_from_its_next_reload(keyed_server, digits, capsys):
    srv, path, k = keyed_server

    def post(key):
        return httpx.post(
            srv.url + "/v1/predict",
            json={"inputs": digits.test_x[:1].tolist()},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    assert post(k["alice"]).status_code == 200 and post(k["bob"]).status_code == 200
    reloads = metric(srv, "codedsmooth_api_keys_reloads_total", result="ok")
    r = keys(capsys, "remove", "bob", "--file", str(path))
    assert r.returncode == 0, r.stderr
    wait_for_metric(srv, "codedsmooth_api_keys_reloads_total", lambda v: v == reloads + 1, 30, result="ok")
    srv.wait_line(f"reloaded {path}: 1 clients")
    r = post(k["bob"])
    assert r.status_code == 401 and r.json() == {"error": "unknown API key"}
    assert post(k["alice"]).status_code == 200
    assert metric(srv, "codedsmooth_api_keys_clients") == 1


def test_the_keys_commands_start_without_torch(tmp_path):
    """``KEY=$(codedsmooth keys add …)`` in a script should not wait seconds for torch: the keys parser stands alone."""
    path = tmp_path / "keys.txt"
    code = f"import sys; from codedsmooth.cli import main; assert main(['--log-level', 'warning', 'keys', 'add', 'a', '--file', {str(path)!r}]) == 0; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) == 43 and path.read_text().startswith("a ")
