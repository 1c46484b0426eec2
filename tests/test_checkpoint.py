import json
import shutil

import pytest
import torch

from codedsmooth.models import CheckpointError, default_checkpoint_path, load_checkpoint, save_checkpoint
from codedsmooth.train import evaluate


@pytest.fixture()
def ckpt_copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def test_roundtrip_gives_identical_outputs(ckpt_copy, tmp_path):
    ck = load_checkpoint(ckpt_copy)
    x = torch.rand(5, *ck.input_shape)
    out = save_checkpoint(tmp_path / "again", ck.model, {k: v for k, v in ck.config.items() if k != "format_version"}, ck.filler)
    ck2 = load_checkpoint(out)
    with torch.no_grad():
        torch.testing.assert_close(ck2.model(x), ck.model(x), rtol=0, atol=0)
    torch.testing.assert_close(ck2.filler, ck.filler)
    assert ck.filler.shape[1:] == ck.input_shape
    # loading the weights file directly works too
    assert load_checkpoint(ckpt_copy / "model.safetensors").name == ck.name


def test_save_replaces_atomically_and_leaves_no_temp(ckpt_copy):
    ck = load_checkpoint(ckpt_copy)
    cfg = {k: v for k, v in ck.config.items() if k != "format_version"}
    cfg["test_accuracy"] = 0.123
    save_checkpoint(ckpt_copy, ck.model, cfg, ck.filler)
    assert json.loads((ckpt_copy / "config.json").read_text())["test_accuracy"] == 0.123
    assert [p.name for p in ckpt_copy.parent.iterdir()] == ["ck"]


def test_missing_weights_file_is_named(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(ckpt_copy)


def test_pickle_is_refused(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, ckpt_copy / "model.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(ckpt_copy)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(ckpt_copy / "model.pt")
    # a pickle disguised under the safetensors name is refused too
    shutil.move(ckpt_copy / "model.pt", ckpt_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(ckpt_copy)


def test_wrong_shapes_and_unknown_arch_are_named(ckpt_copy):
    cfg_path = ckpt_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["arch_kwargs"]["width"] = 4
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* has shape"):
        load_checkpoint(ckpt_copy)
    cfg["arch"] = "vgg99"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture 'vgg99'"):
        load_checkpoint(ckpt_copy)
    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(ckpt_copy)
    cfg_path.unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(ckpt_copy)


def test_missing_config_keys_and_bad_target_block(ckpt_copy):
    cfg_path = ckpt_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    broken = dict(cfg)
    del broken["classes"]
    cfg_path.write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match=r"missing keys \['classes'\]"):
        load_checkpoint(ckpt_copy)
    cfg["coding"]["target_block"] = "nope"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="target_block"):
        load_checkpoint(ckpt_copy)


def test_nonexistent_path():
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint("/nonexistent/ckpt")


def test_default_checkpoint_is_coded_and_its_accuracy_is_reproducible(digits):
    ck = load_checkpoint(default_checkpoint_path())
    assert ck.config["training"]["method"] == "coded"
    acc = evaluate(ck.model, digits.test_x, digits.test_y, "cpu")
    assert acc == pytest.approx(ck.config["test_accuracy"], abs=1e-9)
    assert acc > 0.9
