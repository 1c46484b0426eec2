import pytest
import torch

from codedsmooth.models import PreActResNet18, build_model


def test_preact_resnet18_has_the_standard_parameter_count():
    # Kuang Liu's CIFAR PreActResNet-18 has 11,171,146 parameters; He et al.'s pre-activation
    # design (used here, as in Wong et al.'s fast adversarial training) adds a final BN of 512
    # channels (weight + bias).
    model = PreActResNet18(num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 11_171_146 + 2 * 512


@pytest.mark.parametrize(
    "name,shape,kwargs",
    [("small_cnn", (1, 8, 8), {"image_size": 8, "in_channels": 1}), ("preact_resnet18", (3, 32, 32), {"width": 8})],
)
def test_split_composes_to_the_full_model(name, shape, kwargs):
    model = build_model(name, num_classes=10, **kwargs).eval()
    x = torch.rand(4, *shape)
    for target in model.stage_names[1:]:
        trunk, block = model.split(target)
        with torch.no_grad():
            torch.testing.assert_close(block(trunk(x)), model(x))
    trunk, block = model.split()
    assert model.default_target in model.stage_names


def test_unknown_names_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet9000")
    with pytest.raises(ValueError, match="unknown target block"):
        build_model("small_cnn").split("layer7")
