"""Built-in architectures: parameter counts, key names and forward semantics of the origin code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_ops import UnknownArchitectureError, models
from sparse_ops.models.cifar_resnet import ZeroPadShortcut

# Trainable parameters with 10 classes (1000 for ImageNet ResNets): published figures
# (ResNet-20 ≈ 0.27M, ResNet-56 ≈ 0.85M, CIFAR ResNet-18 ≈ 11.17M, torchvision's
# ImageNet totals), open_lth's own model tests, and hand arithmetic over the origin
# layer shapes (res32s/44s/110s: 0.46M/0.66M/1.7M in He et al. 2016), to the parameter.
PARAMS = {
    "res20s": 269_722,
    "res32s": 464_154,
    "res44s": 658_586,
    "res56s": 853_018,
    "res110s": 1_727_962,
    "res18": 11_173_962,
    "res50": 23_520_842,
    "vgg16_bn": 14_728_266,
    "wrn32": 1_860_522,
    "mobilenet": 3_217_226,
    "cifar_resnet_20": 272_474,
    "cifar_resnet_32": 466_906,
    "cifar_resnet_44": 661_338,
    "cifar_resnet_56": 855_770,
    "cifar_resnet_110": 1_730_714,
    "cifar_vgg_11": 9_231_114,
    "cifar_vgg_13": 9_416_010,
    "cifar_vgg_16": 14_728_266,
    "cifar_vgg_19": 20_040_522,
    "imagenet_resnet_18": 11_689_512,
    "imagenet_resnet_26": 19_066_920,
    "imagenet_resnet_34": 21_797_672,
    "imagenet_resnet_50": 25_557_032,
    "resnet18": 11_689_512,
    "resnet26": 19_066_920,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


def _classes(name: str) -> int:
    return 1000 if models.info(name).input_size[1] == 224 else 10


def test_every_canonical_name_has_a_reference_count():
    assert set(models.names()) == set(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count(name):
    assert models.parameter_count(name, _classes(name)) == PARAMS[name]


def test_parameter_count_with_width_suffix():
    # open_lth's test value for cifar_resnet_14_128.
    assert models.parameter_count("cifar_resnet_14_128") == 11_093_130


@pytest.mark.parametrize("name", models.names())
def test_forward_small_input(name):
    model = models.create(name).eval()
    # ImageNet networks run at 64×64 to keep CPU time low; the head is global.
    size = 64 if models.info(name).input_size[1] == 224 else 32
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_forward_batch_one_and_classes():
    model = models.create("res20s", num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)


# state_dict entry counts (parameters + buffers, num_batches_tracked included) as the
# origin code's models produce them.
KEY_COUNTS = {
    "res20s": 118,
    "res56s": 334,
    "res18": 124,
    "res50": 322,
    "vgg16_bn": 95,
    "wrn32": 202,
    "mobilenet": 166,
    "cifar_resnet_20": 128,
    "cifar_resnet_56": 344,
    "cifar_vgg_16": 93,
}


@pytest.mark.parametrize("name", sorted(KEY_COUNTS))
def test_state_dict_size(name):
    assert len(models.state_shapes(name)) == KEY_COUNTS[name]


@pytest.mark.parametrize(
    ("name", "key", "shape"),
    [
        ("res20s", "normalize.mean", (3,)),
        ("res20s", "conv1.weight", (16, 3, 3, 3)),
        ("res20s", "layer2.0.conv1.weight", (32, 16, 3, 3)),
        ("res20s", "layer3.2.bn2.running_var", (64,)),
        ("res20s", "fc.weight", (10, 64)),
        ("res56s", "layer3.8.conv2.weight", (64, 64, 3, 3)),
        ("res18", "layer2.0.downsample.0.weight", (128, 64, 1, 1)),
        ("res18", "conv1.weight", (64, 3, 3, 3)),
        ("res50", "layer1.0.downsample.0.weight", (256, 64, 1, 1)),
        ("res50", "layer4.2.conv3.weight", (2048, 512, 1, 1)),
        ("res50", "fc.weight", (10, 2048)),
        ("vgg16_bn", "features.0.weight", (64, 3, 3, 3)),
        ("vgg16_bn", "features.0.bias", (64,)),
        ("vgg16_bn", "features.1.running_mean", (64,)),
        ("vgg16_bn", "features.40.weight", (512, 512, 3, 3)),
        ("vgg16_bn", "classifier.weight", (10, 512)),
        ("wrn32", "bn.weight", (32,)),
        ("wrn32", "layer2.0.downsample.0.weight", (64, 32, 1, 1)),
        ("wrn32", "layer2.0.bn3.weight", (64,)),
        ("wrn32", "layer3.4.conv2.weight", (128, 128, 3, 3)),
        ("wrn32", "linear.weight", (10, 128)),
        ("mobilenet", "layers.0.conv1.weight", (32, 1, 3, 3)),
        ("mobilenet", "layers.12.conv2.weight", (1024, 1024, 1, 1)),
        ("mobilenet", "linear.weight", (10, 1024)),
        ("cifar_resnet_20", "conv.weight", (16, 3, 3, 3)),
        ("cifar_resnet_20", "blocks.3.shortcut.0.weight", (32, 16, 1, 1)),
        ("cifar_resnet_20", "blocks.6.shortcut.1.running_mean", (64,)),
        ("cifar_resnet_20", "blocks.8.conv2.weight", (64, 64, 3, 3)),
        ("cifar_resnet_20_64", "fc.weight", (10, 256)),
        ("cifar_vgg_16", "layers.0.conv.weight", (64, 3, 3, 3)),
        ("cifar_vgg_16", "layers.16.conv.bias", (512,)),
        ("cifar_vgg_16", "layers.16.bn.num_batches_tracked", ()),
        ("cifar_vgg_11_32", "layers.10.conv.weight", (256, 256, 3, 3)),
        ("imagenet_resnet_18", "model.conv1.weight", (64, 3, 7, 7)),
        ("imagenet_resnet_50", "model.layer4.0.downsample.0.weight", (2048, 1024, 1, 1)),
        ("resnet18", "layer4.1.bn2.bias", (512,)),
        ("resnet26", "layer3.3.conv2.weight", (256, 256, 3, 3)),
    ],
)
def test_key_names_and_shapes(name, key, shape):
    shapes = models.state_shapes(name)
    assert key in shapes, f"{key} missing from {name}"
    assert shapes[key] == shape


@pytest.mark.parametrize(
    ("name", "absent"),
    [
        ("res20s", "layer2.0.shortcut.0.weight"),  # option A has no parameters
        ("cifar_resnet_20", "blocks.1.shortcut.0.weight"),  # identity shortcut
        ("cifar_vgg_16", "layers.2.conv.weight"),  # index 2 is a max-pool
        ("vgg16_bn", "features.6.weight"),  # index 6 is a max-pool
        ("wrn32", "layer1.0.bn3.weight"),  # no downsample in stage 1
        ("res18", "layer1.0.downsample.0.weight"),
    ],
)
def test_keys_that_must_not_exist(name, absent):
    assert absent not in models.state_shapes(name)


def _cifar_vgg_conv_indices(depth: int) -> list[int]:
    return sorted(
        int(k.split(".")[1])
        for k in models.state_shapes(f"cifar_vgg_{depth}")
        if k.endswith("conv.weight")
    )


def test_open_lth_vgg_indices_count_pools():
    assert _cifar_vgg_conv_indices(11) == [0, 2, 4, 5, 7, 8, 10, 11]
    assert _cifar_vgg_conv_indices(16) == [0, 1, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16]


def test_structure_lth_vgg_conv_indices():
    convs = sorted(
        int(k.split(".")[1])
        for k, s in models.state_shapes("vgg16_bn").items()
        if k.startswith("features.") and len(s) == 4
    )
    assert convs == [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]


def test_res_s_ignores_normalize_but_res18_applies_it():
    x = torch.rand(2, 3, 32, 32)
    for name, applied in [
        ("res20s", False),
        ("res18", True),
        ("vgg16_bn", True),
        ("wrn32", True),
        ("mobilenet", False),
    ]:
        model = models.create(name).eval()
        with torch.no_grad():
            before = model(x)
            model.normalize.mean.fill_(0.9)
            after = model(x)
        assert (not torch.equal(before, after)) == applied, name


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    y = ZeroPadShortcut(2)(x)
    assert y.shape == (2, 8, 2, 2)
    torch.testing.assert_close(y[:, 2:6], x[:, :, ::2, ::2])
    assert not y[:, :2].any() and not y[:, 6:].any()


def test_structure_lth_bottleneck_strides_on_3x3():
    model = models.create("res50")
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)


def test_stems():
    assert models.create("res18").conv1.kernel_size == (3, 3)
    assert isinstance(models.create("res18").maxpool, nn.Identity)
    assert models.create("resnet18").conv1.kernel_size == (7, 7)
    assert isinstance(models.create("resnet18").maxpool, nn.MaxPool2d)


def test_mobilenet_depthwise():
    conv = models.create("mobilenet").layers[1].conv1
    assert conv.groups == 64 and conv.stride == (2, 2)


@pytest.mark.parametrize(
    ("name", "hint"),
    [("res20", "res20s"), ("resnet_18", "resnet18"), ("vgg16bn", "vgg16_bn"), ("mobilenetv1", "")],
)
def test_unknown_architecture_names_close_matches(name, hint):
    with pytest.raises(UnknownArchitectureError, match="unknown architecture") as err:
        models.create(name)
    assert hint in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name", ["res21s", "cifar_resnet_21", "cifar_vgg_12", "resnet19", "cifar_resnet_20_0"]
)
def test_invalid_depths_and_widths_are_unknown(name):
    with pytest.raises(UnknownArchitectureError):
        models.info(name)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        models.create("res20s", num_classes=0)


def test_meta_build_allocates_nothing():
    with torch.device("meta"):
        model = models.create("resnet152")
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("resnet20", "res20s, cifar_resnet_20"),
        ("vgg16", "vgg16_bn, cifar_vgg_16"),
        ("mobilenetv1", "mobilenet"),
    ],
)
def test_unknown_names_suggest_the_same_depth_first(name, first):
    with pytest.raises(UnknownArchitectureError, match=f"did you mean {first}"):
        models.info(name)
