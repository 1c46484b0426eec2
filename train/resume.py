"""The state a training run resumes from: model, optimiser, schedule and random states after each finished epoch.

Rank 0 writes it beside the checkpoint (``out + '.resume'``, never inside it), one directory
per epoch renamed into place whole, so a kill at any moment leaves a complete state behind;
every rank reads it back. A run resumes only with the settings it was saved with.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Settings that must be the same for a run to continue another one.
RESUME_MUST_MATCH = (
    "data",
    "arch",
    "width",
    "method",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "mu",
    "n_start",
    "n_end",
    "target_block",
    "seed",
    "nproc",
    "trades_beta",
    "at_eps",
    "at_steps",
    "at_step_size",
    "at_warmup",
)


def resume_dir(out) -> Path:
    """Where the state after each finished epoch is kept (beside the checkpoint, never inside it)."""
    out = Path(out)
    return out.with_name(out.name + ".resume")


def last_saved_epoch(out) -> int | None:
    """The last finished epoch saved to resume from (``resume_dir(out)``), or None."""
    saved = sorted(resume_dir(out).glob("epoch-*/state.json"))
    return int(saved[-1].parent.name.removeprefix("epoch-")) if saved else None


def save_state(
    out, config: dict, epoch: int, history: list[dict], model, opt, sched, gens: dict[str, torch.Generator]
) -> None:
    """Rank 0: model, optimiser, schedule and random states after ``epoch`` epochs of the run ``config``, written atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for i, st in opt_state["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt.{i}.{name}"] = value.detach().cpu().contiguous()
    tensors.update({f"rng.{name}": g.get_state() for name, g in gens.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "epoch": epoch,
        "config": config,
        "history": history,
        "param_groups": opt_state["param_groups"],
        "scheduler": sched.state_dict(),
    }
    root = resume_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    # One directory per epoch, renamed into place whole; older ones go only once the new one
    # is there, so a kill at any moment leaves a complete state behind.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, default=float))
        os.replace(tmp, root / f"epoch-{epoch:05d}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.glob("epoch-*"):
        if old.name != f"epoch-{epoch:05d}":
            shutil.rmtree(old, ignore_errors=True)


def load_state(out, config: dict, model, opt, sched, gens: dict[str, torch.Generator]) -> tuple[int, list[dict]]:
    """Every rank reads the saved state (read-only) into the given objects; returns (epochs done, history)."""
    from safetensors.torch import load_file

    saved = sorted(d for d in resume_dir(out).glob("epoch-*") if (d / "state.json").exists())
    if not saved:
        raise FileNotFoundError(f"nothing to resume: no saved epoch under {resume_dir(out)}")
    where = saved[-1]
    meta = json.loads((where / "state.json").read_text())
    differ = {
        k: (meta["config"].get(k), config.get(k)) for k in RESUME_MUST_MATCH if meta["config"].get(k) != config.get(k)
    }
    if differ:
        raise ValueError(f"{where}: saved by a run with other settings {differ} (saved, now)")
    tensors = load_file(str(where / "state.safetensors"))
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    for name, g in gens.items():
        g.set_state(tensors[f"rng.{name}"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["epoch"]), meta["history"]
