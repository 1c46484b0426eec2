import json
import shutil

import pytest
import torch

from codedsmooth.models import CheckpointError, default_checkpoint_path, load_checkpoint, save_checkpoint
from codedsmooth.models.config import ADVERSARIAL_METHODS
from codedsmooth.train import evaluate, load_dataset


@pytest.fixture()
def ckpt_copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def test_roundtrip_gives_identical_outputs(ckpt_copy, tmp_path):
    ck = load_checkpoint(ckpt_copy)
    x = torch.rand(5, *ck.input_shape)
    out = save_checkpoint(tmp_path / "again", ck.model, ck.config.model_dump(mode="json"), ck.filler)
    ck2 = load_checkpoint(out)
    with torch.no_grad():
        torch.testing.assert_close(ck2.model(x), ck.model(x), rtol=0, atol=0)
    torch.testing.assert_close(ck2.filler, ck.filler)
    assert ck.filler.shape[1:] == ck.input_shape
    # loading the weights file directly works too
    assert load_checkpoint(ckpt_copy / "model.safetensors").name == ck.name


def test_save_replaces_atomically_and_leaves_no_temp(ckpt_copy):
    ck = load_checkpoint(ckpt_copy)
    cfg = ck.config.model_dump(mode="json")
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
    with pytest.raises(CheckpointError, match=r"config\.json: classes: Field required"):
        load_checkpoint(ckpt_copy)
    cfg["coding"]["target_block"] = "nope"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="target_block"):
        load_checkpoint(ckpt_copy)


def test_nonexistent_path():
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint("/nonexistent/ckpt")


def test_default_checkpoint_is_adversarially_trained_and_its_accuracy_is_reproducible():
    ck = load_checkpoint(default_checkpoint_path())
    assert ck.config.method in ADVERSARIAL_METHODS and ck.config.dataset == "mnist"
    assert ck.trained_coding.coded_points == "chebyshev-gauss"  # no exact slots in the shipped model
    data = load_dataset(ck.config.dataset)
    acc = evaluate(ck.model, data.test_x, data.test_y, "cpu")
    assert acc == pytest.approx(ck.config.test_accuracy, abs=1e-9)
    assert acc > 0.9


def _edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def _set(*path):
    *keys, value = path

    def edit(cfg):
        node = cfg
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return edit


def _filler(fn):
    def edit(tensors):
        tensors["filler.inputs"] = fn(tensors["filler.inputs"])

    return edit


# (what is broken, which file the error must name, a phrase of the message, how to break it)
BROKEN = [
    ("huge width", "config.json", "width must be an integer in", _set("arch_kwargs", "width", 100000), None),
    ("large width", "config.json", "width must be an integer in", _set("arch_kwargs", "width", 1200), None),
    ("width as string", "config.json", "width must be an integer", _set("arch_kwargs", "width", "8"), None),
    ("unknown arch kwarg", "config.json", "takes no", _set("arch_kwargs", "depth", 3), None),
    ("input shape vs channels", "config.json", "in_channels", _set("input_shape", [3, 8, 8]), None),
    ("input shape vs image size", "config.json", "image_size", _set("input_shape", [1, 16, 16]), None),
    ("huge input shape", "config.json", "input_shape", _set("input_shape", [1, 100000, 100000]), None),
    ("input shape rank", "config.json", "input_shape", _set("input_shape", [8, 8]), None),
    ("integer class names", "config.json", "classes", _set("classes", list(range(10))), None),
    ("duplicate class names", "config.json", "distinct", _set("classes", ["a"] * 10), None),
    ("classes vs outputs", "config.json", "num_classes", _set("classes", [str(i) for i in range(11)]), None),
    ("huge k", "config.json", "coding.k", _set("coding", "k", 10**6), None),
    ("string k", "config.json", "coding.k", _set("coding", "k", "abc"), None),
    ("n below k", "config.json", "must be >= k", _set("coding", "n", 3), None),
    ("unknown point kind", "config.json", "coded_points", _set("coding", "coded_points", "random"), None),
    ("unknown method", "config.json", "training.method", _set("training", "method", "magic"), None),
    ("NaN mean", "config.json", "mean must list", _set("arch_kwargs", "mean", [float("nan")]), None),
    ("zero std", "config.json", "std must be positive", _set("arch_kwargs", "std", [0.0]), None),
    ("format version", "config.json", "format_version", _set("format_version", 2), None),
    ("name with a slash", "config.json", "name", _set("name", "a/b"), None),
    ("NaN filler", "model.safetensors", "NaN or Inf", None, _filler(lambda f: f * float("nan"))),
    ("scaled filler", "model.safetensors", "inputs are pixels in \\[0, 1\\]", None, _filler(lambda f: f * 1e6)),
    ("integer filler", "model.safetensors", "dtype", None, _filler(lambda f: (f * 255).to(torch.uint8))),
    ("filler shape", "model.safetensors", "filler pool shape", None, _filler(lambda f: f[:, :, :4].contiguous())),
    (
        "NaN weights",
        "model.safetensors",
        "NaN or Inf",
        None,
        lambda t: t.__setitem__("model.stages.head.1.weight", t["model.stages.head.1.weight"] * float("nan")),
    ),
]


@pytest.mark.parametrize("what,file,phrase,edit_config,edit_tensors", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_checkpoints_are_refused_naming_the_file(ckpt_copy, what, file, phrase, edit_config, edit_tensors):
    if edit_config:
        _edit_config(ckpt_copy, edit_config)
    if edit_tensors:
        _edit_tensors(ckpt_copy, edit_tensors)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt_copy)
    message = str(err.value)
    assert message.startswith(str(ckpt_copy / file)), message
    assert __import__("re").search(phrase, message), message


def test_float64_filler_loads_as_float32(ckpt_copy):
    _edit_tensors(ckpt_copy, _filler(lambda f: f.double()))
    ck = load_checkpoint(ckpt_copy)
    assert ck.filler.dtype == torch.float32


def test_legacy_lobatto_checkpoint_keeps_its_points(ckpt_copy):
    _edit_config(ckpt_copy, lambda cfg: cfg["coding"].pop("coded_points"))
    assert load_checkpoint(ckpt_copy).trained_coding.coded_points == "chebyshev-lobatto"
