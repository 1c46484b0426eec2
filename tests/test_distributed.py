"""DDP training under torchrun with gloo on this machine's CPUs, and resuming an interrupted run."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import running_server
from safetensors.torch import load_file

from codedsmooth.models import build_model, load_checkpoint
from codedsmooth.train import as_float

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "codedsmooth.cli", "train", "--data", "digits", "--width", "4"]


def _train(args, tmp_path, name, torchrun=None):
    out = tmp_path / name
    cmd = CLI + args + ["--out", str(out)]
    if torchrun:  # torchrun started by hand, as a user may
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}", "-m", "codedsmooth", "train",
               "--data", "digits", "--width", "4", *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out, proc


def _weights(path):
    return {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith("model.")}


def test_two_process_gloo_run_writes_a_checkpoint_that_loads_and_serves(tmp_path, digits):
    out, proc = _train(["--method", "coded", "--epochs", "2", "--nproc", "2", "--batch-size", "16"], tmp_path, "ddp")
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
    one, _ = _train(["--method", "erm", "--epochs", "1", "--batch-size", "32", "--max-steps", "1", "--seed", "3"], tmp_path, "one")
    two, _ = _train(["--method", "erm", "--epochs", "1", "--batch-size", "16", "--max-steps", "1", "--seed", "3"], tmp_path, "two", torchrun=2)
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # the step did move the weights: the runs agree after a real update, not just at initialisation
    torch.manual_seed(3)
    start = build_model("small_cnn", **load_checkpoint(one).config.arch_kwargs).state_dict()
    assert max(float((a["model." + k] - v).abs().max()) for k, v in start.items()) > 1e-4


def test_same_seed_same_run_on_two_ranks(tmp_path):
    args = ["--method", "mixup", "--epochs", "1", "--batch-size", "16", "--nproc", "2", "--max-steps", "5", "--seed", "1"]
    first, _ = _train(args, tmp_path, "a")
    second, _ = _train(args, tmp_path, "b")
    for key, value in _weights(first).items():
        assert torch.equal(value, _weights(second)[key]), key


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    args = CLI + ["--method", "mixup", "--epochs", "12", "--seed", "4"]
    full, _ = _train(["--method", "mixup", "--epochs", "12", "--seed", "4"], tmp_path, "full")
    out = tmp_path / "cut"
    proc = subprocess.Popen(args + ["--out", str(out)], stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stderr:  # wait until epoch 3 is logged: the state after epoch 2 is on disk by then
        if "epoch 3/12" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    saved = sorted((tmp_path / "cut.resume").glob("epoch-*/state.json"))
    assert not out.exists() and saved  # (two only if the kill came between a rename and the clean-up)
    done = json.loads(saved[-1].read_text())["epoch"]
    assert 2 <= done < 12  # epoch 3 was logged, so the state after epoch 2 was on disk; maybe that after 3
    resumed, proc = _train(["--method", "mixup", "--epochs", "12", "--seed", "4", "--resume"], tmp_path, "cut")
    assert f"resuming after epoch {done} of 12" in proc.stderr
    for key, value in _weights(full).items():
        torch.testing.assert_close(_weights(resumed)[key], value, rtol=0, atol=1e-6)
    history = load_checkpoint(resumed).config.history
    assert [h["epoch"] for h in history] == list(range(1, 13))
    bad = subprocess.run(CLI + ["--method", "erm", "--epochs", "12", "--resume", "--out", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nothing to resume" in bad.stderr


def test_nproc_must_be_positive():
    bad = subprocess.run(CLI + ["--nproc", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nproc must be at least 1" in bad.stderr and "Traceback" not in bad.stderr
