"""DDP training under torchrun with gloo on this machine's CPUs, resuming an interrupted run, and a busy host."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import running_server, wait_until
from safetensors.torch import load_file

from codedsmooth.models import build_model, load_checkpoint
from codedsmooth.train import as_float

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "codedsmooth.cli", "train", "--data", "digits", "--width", "4"]


def _train(args, tmp_path, name, torchrun=None):
    out = tmp_path / name
    cmd = CLI + args + ["--out", str(out)]
    if torchrun:  # torchrun started by hand, as a user may
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={torchrun}",
            "-m",
            "codedsmooth",
            "train",
            "--data",
            "digits",
            "--width",
            "4",
            *args,
            "--out",
            str(out),
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out, proc


def _weights(path):
    return {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith("model.")}


def test_two_process_gloo_run_writes_a_checkpoint_that_loads_and_serves(tmp_path, digits):
    out, proc = _train(
        ["--method", "coded", "--epochs", "2", "--nproc", "2", "--batch-size", "16", "--train-size", "320"],
        tmp_path,
        "ddp",
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1])["checkpoint"] == str(out)  # printed once, by rank 0
    assert len(proc.stdout.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # no resume state or temp dirs left behind
    ck = load_checkpoint(out)
    assert ck.config.training.model_dump()["processes"] == 2 and ck.config.coding.k == 16
    with running_server(out, max_delay_ms=1) as server:
        import httpx

        body = httpx.post(server.url + "/v1/predict", json={"inputs": as_float(digits.test_x[:3]).tolist()}).json()
    assert len(body["predictions"]) == 3


def test_one_erm_step_on_two_ranks_of_half_k_equals_one_rank_of_k(tmp_path):
    one, _ = _train(
        ["--method", "erm", "--epochs", "1", "--batch-size", "32", "--max-steps", "1", "--seed", "3"], tmp_path, "one"
    )
    two, _ = _train(
        ["--method", "erm", "--epochs", "1", "--batch-size", "16", "--max-steps", "1", "--seed", "3"],
        tmp_path,
        "two",
        torchrun=2,
    )
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # the step did move the weights: the runs agree after a real update, not just at initialisation
    torch.manual_seed(3)
    start = build_model("small_cnn", **load_checkpoint(one).config.arch_kwargs).state_dict()
    assert max(float((a["model." + k] - v).abs().max()) for k, v in start.items()) > 1e-4


def test_same_seed_same_run_on_two_ranks(tmp_path):
    args = [
        "--method",
        "mixup",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--nproc",
        "2",
        "--max-steps",
        "5",
        "--seed",
        "1",
    ]
    first, _ = _train(args, tmp_path, "a")
    second, _ = _train(args, tmp_path, "b")
    for key, value in _weights(first).items():
        assert torch.equal(value, _weights(second)[key]), key


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    small = ["--train-size", "320"]  # epochs of 10 steps: what is saved and resumed does not depend on their length
    args = CLI + ["--method", "mixup", "--epochs", "12", "--seed", "4", *small]
    full, _ = _train(["--method", "mixup", "--epochs", "12", "--seed", "4", *small], tmp_path, "full")
    out = tmp_path / "cut"
    proc = subprocess.Popen(
        args + ["--out", str(out)], stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    for line in proc.stderr:  # wait until epoch 3 is logged: the state after epoch 2 is on disk by then
        if "epoch 3/12" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    saved = sorted((tmp_path / "cut.resume").glob("epoch-*/state.json"))
    assert not out.exists() and saved  # (two only if the kill came between a rename and the clean-up)
    done = json.loads(saved[-1].read_text())["epoch"]
    assert 2 <= done < 12  # epoch 3 was logged, so the state after epoch 2 was on disk; maybe that after 3
    resumed, proc = _train(["--method", "mixup", "--epochs", "12", "--seed", "4", *small, "--resume"], tmp_path, "cut")
    assert f"resuming after epoch {done} of 12" in proc.stderr
    for key, value in _weights(full).items():
        torch.testing.assert_close(_weights(resumed)[key], value, rtol=0, atol=1e-6)
    history = load_checkpoint(resumed).config.history
    assert [h["epoch"] for h in history] == list(range(1, 13))
    bad = subprocess.run(
        CLI + ["--method", "erm", "--epochs", "12", "--resume", "--out", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "nothing to resume" in bad.stderr


def test_nproc_must_be_positive():
    bad = subprocess.run(CLI + ["--nproc", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nproc must be at least 1" in bad.stderr and "Traceback" not in bad.stderr


# ---- a busy host: CPU contention and a rank that dies --------------------------------------


@contextlib.contextmanager
def cpu_contention(processes: int = 3):
    """Busy-loop processes for the duration (more runnable threads than this machine has cores)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for p in busy:
            p.kill()
            p.wait()


def _rank_pid(root: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank under process ``root`` (read from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        kids = [c for c, p in parents.items() if p == pid]
        tree.update(kids)
        todo += kids
    for pid in tree:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return pid
    return None


def _busy_env():
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # threads as a user gets them


@pytest.mark.alone  # busy-loops on every core: nothing else may run beside it
def test_a_rank_killed_on_a_busy_host_resumes_from_the_last_saved_epoch(tmp_path):
    out = tmp_path / "busy"
    cmd = CLI + [
        "--method",
        "mixup",
        "--epochs",
        "12",  # room for the kill after epoch 2 is logged; the rest only has to run
        "--batch-size",
        "16",
        "--nproc",
        "2",
        "--seed",
        "2",
        "--train-size",
        "320",
        "--out",
        str(out),
    ]
    with cpu_contention():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_busy_env())
        seen = []
        for line in proc.stderr:  # "epoch 2/12" is logged after the state after epoch 1 is on disk
            seen.append(line)
            if "epoch 2/12" in line:
                break
        victim = wait_until(lambda: _rank_pid(proc.pid, 1), "rank 1's process", 30)
        os.kill(victim, signal.SIGKILL)
        stdout, rest = proc.communicate(timeout=600)
    stderr = "".join(seen) + rest
    assert proc.returncode == 0, stderr[-6000:]
    assert "a rank failed" in stderr and "resuming after epoch" in stderr, stderr[-6000:]
    assert json.loads(stdout.strip().splitlines()[-1])["checkpoint"] == str(out)
    ck = load_checkpoint(out)
    assert [h["epoch"] for h in ck.config.history] == list(range(1, 13))
    assert ck.config.training.model_dump()["processes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # the resume state is gone once done


@pytest.mark.alone  # busy-loops on every core: nothing else may run beside it
def test_a_run_that_dies_before_any_epoch_says_how_to_go_on(tmp_path):
    cmd = CLI + ["--method", "erm", "--epochs", "3", "--nproc", "2", "--out", str(tmp_path / "early")]
    with cpu_contention():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_busy_env())
        victim = wait_until(lambda: _rank_pid(proc.pid, 1), "rank 1's process", 120)
        os.kill(victim, signal.SIGKILL)  # long before its first epoch: it is still importing torch
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert (
        last
        == f"codedsmooth train: error: training on 2 processes failed (exit code {proc.returncode}; the failing rank's error is above); no epoch had finished: run the same command again"
    )
    assert "a rank failed" not in stderr  # no progress, so no second run
