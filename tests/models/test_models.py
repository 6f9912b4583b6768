"""Tests of the model registry and every registered model (parametrised over ``model_names()``)."""

from __future__ import annotations

import copy
import fnmatch
import math

import pytest
import torch
from torch import nn

import lottery.models as models
from lottery.errors import ConfigError, LotteryError, UnknownNameError
from lottery.models import ModelSpec, build_model, get_model_spec, model_names, register_model

EXPECTED_MODELS = {
    "lenet_300_100",
    "conv2",
    "conv4",
    "conv6",
    "vgg11",
    "vgg16",
    "vgg19",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet18",
    "resnet50",
}

# Exact parameter counts (weights, biases and BatchNorm affine parameters; buffers excluded).
PARAM_COUNTS = {
    "lenet_300_100": 266_610,  # 784*300+300 + 300*100+100 + 100*10+10
    "conv2": 4_301_642,  # Frankle & Carbin (2019), Figure 2: 4.3M
    "conv4": 2_425_930,  # 2.4M
    "conv6": 2_262_602,  # 2.3M
    "vgg11": 9_228_362,
    "vgg16": 14_724_042,  # open_lth VGG-16: ~14.7M
    "vgg19": 20_035_018,  # Frankle & Carbin (2019): 20.0M
    # With 1x1-conv projection shortcuts (open_lth); the paper's zero-padding shortcuts give 269,722,
    # published as 0.27M.
    "resnet20": 272_474,
    "resnet32": 466_906,  # published 0.46M
    "resnet56": 855_770,  # published 0.85M
    "resnet18": 11_689_512,  # identical to torchvision.models.resnet18()
    "resnet50": 25_557_032,  # identical to torchvision.models.resnet50()
}

ALL = model_names()


def shape_for(name: str) -> tuple[int, int, int]:
    """The input shape a model is exercised on in these tests.

    ImageNet-sized defaults (3x224x224) are reduced to 3x64x64: a ResNet-50 forward and backward
    pass at 224x224 costs seconds on a 2-core CPU, and the adaptive average pool makes the result
    size-agnostic anyway (64x64 still leaves 2x2 maps in the last stage, so BatchNorm sees >1 value).
    """
    c, h, w = get_model_spec(name).input_shape
    if h * w > 64 * 64:
        return (c, 64, 64)
    return (c, h, w)



def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seeded_build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    kwargs.setdefault("input_shape", shape_for(name))
    return build_model(name, **kwargs)


# ----------------------------------------------------------------------------- registry


def test_all_expected_models_registered():
    assert EXPECTED_MODELS <= set(ALL)
    assert ALL == sorted(ALL)


def test_package_reexports():
    for attr in ("build_model", "get_model_spec", "model_names", "ModelSpec", "register_model"):
        assert hasattr(models, attr)
    spec = get_model_spec("resnet20")
    assert isinstance(spec, ModelSpec)
    assert spec.name == "resnet20"
    assert spec.description  # taken from the builder's docstring


def test_unknown_name_lists_known_models():
    with pytest.raises(UnknownNameError) as info:
        build_model("resnet21")
    message = str(info.value)
    assert "resnet21" in message
    for name in ALL:
        assert name in message
    assert isinstance(info.value, LotteryError) and isinstance(info.value, KeyError)
    with pytest.raises(UnknownNameError):
        get_model_spec("nope")


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="twice"):

        @register_model("resnet20", input_shape=(3, 32, 32))
        def again(*, input_shape, num_classes):  # pragma: no cover - never called
            raise AssertionError


@pytest.mark.parametrize("name", ALL)
def test_spec_defaults(name):
    spec = get_model_spec(name)
    assert len(spec.input_shape) == 3 and all(isinstance(s, int) and s > 0 for s in spec.input_shape)
    assert spec.num_classes >= 2
    assert isinstance(spec.prune_ignore, tuple)


# ----------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_reaches_every_parameter(name):
    model = seeded_build(name)
    spec = get_model_spec(name)
    x = torch.randn(2, *shape_for(name))
    logits = model(x)
    assert logits.shape == (2, spec.num_classes)
    assert torch.isfinite(logits).all()
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"{name}: gradient of {pname} is all zero"


@pytest.mark.parametrize("name", ALL)
def test_default_shape_is_used_when_none_given(name):
    spec = get_model_spec(name)
    model = build_model(name)
    assert tuple(model.input_shape) == spec.input_shape
    assert model.num_classes == spec.num_classes


@pytest.mark.parametrize("name", ALL)
def test_deepcopy_gives_equal_outputs(name):
    model = seeded_build(name).eval()
    clone = copy.deepcopy(model)
    x = torch.randn(2, *shape_for(name))
    with torch.no_grad():
        torch.testing.assert_close(model(x), clone(x), rtol=0, atol=0)
    # The copy is independent: changing it leaves the original alone.
    first = next(clone.parameters())
    with torch.no_grad():
        first.add_(1.0)
    assert not torch.equal(first, next(model.parameters()))


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_weights(name):
    a = seeded_build(name, seed=123).state_dict()
    b = seeded_build(name, seed=123).state_dict()
    c = seeded_build(name, seed=124).state_dict()
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[key], c[key]) for key in a)


@pytest.mark.parametrize("name", ALL)
def test_other_channels_and_classes(name):
    """Every model takes a single-channel input and any class count."""
    _, h, w = shape_for(name)
    model = seeded_build(name, input_shape=(1, h, w), num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, h, w)).shape == (3, 7)


@pytest.mark.parametrize("name", ALL)
def test_prunable_layers_are_real_modules(name):
    """Every parameter lives in an nn.Conv2d, nn.Linear or BatchNorm module (the pruning code
    finds prunable weights by module type), and the model has both kinds it needs."""
    model = build_model(name, input_shape=shape_for(name))
    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    for module in model.modules():
        if not isinstance(module, kinds):
            assert not list(module.parameters(recurse=False)), type(module)
    assert any(isinstance(m, nn.Linear) for m in model.modules())


@pytest.mark.parametrize("name", ALL)
def test_prune_ignore_names_real_parameters(name):
    spec = get_model_spec(name)
    names = [n for n, _ in build_model(name, input_shape=shape_for(name)).named_parameters()]
    for pattern in spec.prune_ignore:
        assert fnmatch.filter(names, pattern), f"{name}: prune_ignore {pattern!r} matches nothing"


@pytest.mark.parametrize("name", ALL)
def test_initialisation(name):
    model = seeded_build(name)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
        elif isinstance(module, nn.Conv2d):
            if module.bias is not None:
                assert torch.equal(module.bias, torch.zeros_like(module.bias))
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            expected = math.sqrt(2.0 / fan_out)  # Kaiming normal, fan_out, ReLU
            if module.weight.numel() >= 1000:
                assert module.weight.std().item() == pytest.approx(expected, rel=0.15)


@pytest.mark.parametrize("name", ALL)
def test_unknown_option_rejected(name):
    with pytest.raises(ConfigError, match="not_an_option"):
        build_model(name, input_shape=shape_for(name), not_an_option=1)


# ----------------------------------------------------------------------------- counts and shapes


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts(name):
    assert n_params(build_model(name)) == PARAM_COUNTS[name]


def test_resnet20_is_the_published_size():
    assert abs(PARAM_COUNTS["resnet20"] - 270_000) / 270_000 < 0.02


@pytest.mark.parametrize(
    "name, shape",
    [
        ("conv2", (1, 28, 28)),
        ("conv4", (1, 28, 28)),
        ("conv6", (1, 28, 28)),
        ("resnet20", (1, 28, 28)),
        ("resnet56", (1, 28, 28)),
        ("vgg11", (1, 28, 28)),
        ("vgg16", (3, 16, 16)),  # smallest size its four max-pools allow
        ("lenet_300_100", (3, 32, 32)),
        ("conv4", (3, 48, 40)),  # non-square
        ("resnet18", (1, 32, 32)),
        ("resnet20", (3, 64, 64)),
    ],
)
def test_other_input_shapes(name, shape):
    model = seeded_build(name, input_shape=shape).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, get_model_spec(name).num_classes)


def test_convnet_flatten_size_follows_input():
    assert build_model("conv4").fc_layers[0].in_features == 128 * 8 * 8
    assert build_model("conv4", input_shape=(1, 28, 28)).fc_layers[0].in_features == 128 * 7 * 7
    assert build_model("conv6", input_shape=(1, 28, 28)).fc_layers[0].in_features == 256 * 3 * 3
    assert build_model("lenet_300_100", input_shape=(3, 32, 32)).fc_layers[0].in_features == 3072


@pytest.mark.parametrize("name, shape", [("vgg11", (3, 8, 8)), ("conv6", (3, 4, 4))])
def test_too_small_input_is_a_config_error(name, shape):
    with pytest.raises(ConfigError, match="too small"):
        build_model(name, input_shape=shape)


@pytest.mark.parametrize("shape", [(32, 32), (3, 0, 32), "abc"])
def test_malformed_input_shape_is_a_config_error(shape):
    with pytest.raises(ConfigError, match="input_shape"):
        build_model("resnet20", input_shape=shape)


@pytest.mark.parametrize("num_classes", [2.5, 0, -3, "ten"])
def test_bad_num_classes_is_a_config_error(num_classes):
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("conv2", num_classes=num_classes)


def test_convnet_width_scales_the_convolutions_only():
    narrow = build_model("conv4", input_shape=(1, 28, 28), width=0.125)
    assert [m.out_channels for m in narrow.features if isinstance(m, nn.Conv2d)] == [8, 8, 16, 16]
    assert narrow.fc_layers[0].in_features == 16 * 7 * 7 and narrow.fc_layers[0].out_features == 256
    assert n_params(narrow) == 273_474
    assert [m.out_channels for m in build_model("conv2", width=0.01).features if isinstance(m, nn.Conv2d)] == [1, 1]
    assert n_params(build_model("conv4", width=1)) == n_params(build_model("conv4"))
    with torch.no_grad():
        assert narrow.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    for bad in (0, -0.5, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ConfigError, match="width"):
            build_model("conv4", width=bad)


def test_model_hparams_width_is_a_number_and_integral_values_keep_their_run_folder():
    from lottery.hparams import ModelHparams, hparams_hash

    assert ModelHparams(model="conv4", width=0.25).width == 0.25
    two = ModelHparams(model="resnet20", width=2.0)
    assert two.width == 2 and isinstance(two.width, int)
    assert hparams_hash(two) == hparams_hash(ModelHparams(model="resnet20", width=2))


# ----------------------------------------------------------------------------- ResNet specifics


def test_cifar_resnet_width():
    wide = build_model("resnet20", width=2)
    assert wide.conv1.out_channels == 32
    assert wide.layer3[0].conv1.out_channels == 128
    assert wide.fc.in_features == 128
    assert n_params(wide) == 1_084_586
    with torch.no_grad():
        assert wide.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    for bad in (0, -1, "2", True):
        with pytest.raises(ConfigError, match="width"):
            build_model("resnet20", width=bad)


def test_cifar_resnet_fractional_width_scales_the_convolutions_only():
    quarter = build_model("resnet20", input_shape=(1, 28, 28), width=0.25)
    assert [quarter.conv1.out_channels, quarter.layer2[0].conv1.out_channels,
            quarter.layer3[0].conv1.out_channels] == [4, 8, 16]
    assert quarter.fc.in_features == 16 and quarter.fc.out_features == 10
    half = build_model("resnet20", input_shape=(1, 28, 28), width=0.5)
    assert half.layer3[2].conv2.out_channels == 32
    assert build_model("resnet20", width=0.01).conv1.out_channels == 1  # rounded, at least one channel
    with torch.no_grad():
        assert quarter.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_cifar_resnet_layer_names():
    names = {n for n, _ in build_model("resnet20").named_parameters()}
    for expected in (
        "conv1.weight",
        "bn1.weight",
        "layer1.0.conv1.weight",
        "layer1.0.bn1.bias",
        "layer1.2.conv2.weight",
        "layer2.0.shortcut.0.weight",  # projection conv where the shape changes
        "layer2.0.shortcut.1.weight",  # and its BatchNorm
        "layer3.2.conv2.weight",
        "fc.weight",
        "fc.bias",
    ):
        assert expected in names, expected
    assert not any(n.startswith("layer1.0.shortcut") for n in names)  # identity there
    assert not any(n.startswith("layer4") for n in names)
    conv_count = sum(isinstance(m, nn.Conv2d) for m in build_model("resnet20").modules())
    assert conv_count == 19 + 2  # 19 3x3 convs + 2 projection shortcuts


def test_cifar_resnet_depths():
    for name, blocks in (("resnet20", 3), ("resnet32", 5), ("resnet56", 9)):
        model = build_model(name)
        assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [blocks] * 3


def test_imagenet_resnet_torchvision_names_and_shapes():
    r18 = dict(build_model("resnet18").named_parameters())
    assert r18["conv1.weight"].shape == (64, 3, 7, 7)
    assert r18["layer1.0.conv1.weight"].shape == (64, 64, 3, 3)
    assert r18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert r18["layer2.0.downsample.1.weight"].shape == (128,)
    assert r18["layer4.1.bn2.bias"].shape == (512,)
    assert r18["fc.weight"].shape == (1000, 512)
    assert "layer1.0.downsample.0.weight" not in r18

    r50 = dict(build_model("resnet50").named_parameters())
    assert r50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert r50["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # stride on the 3x3 (v1.5)
    assert build_model("resnet50").layer2[0].conv2.stride == (2, 2)
    assert r50["layer3.5.conv3.weight"].shape == (1024, 256, 1, 1)
    assert r50["fc.weight"].shape == (1000, 2048)
    # torchvision's state dict keys include the BatchNorm buffers under the same names.
    keys = build_model("resnet18").state_dict().keys()
    assert {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"} <= set(keys)


def test_imagenet_resnet_zero_init_residual():
    model = build_model("resnet18", input_shape=(3, 64, 64), zero_init_residual=True)
    assert torch.equal(model.layer1[0].bn2.weight, torch.zeros(64))
    assert torch.equal(model.bn1.weight, torch.ones(64))


# ----------------------------------------------------------------------------- output layers


@pytest.mark.parametrize("name", ["lenet_300_100", "conv2", "conv4", "conv6", "vgg11", "vgg16", "vgg19"])
def test_output_layer_kept_dense(name):
    spec = get_model_spec(name)
    assert "fc.weight" in spec.prune_ignore
    model = build_model(name)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == spec.num_classes


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56", "resnet18", "resnet50"])
def test_resnets_prune_everything(name):
    assert get_model_spec(name).prune_ignore == ()


def test_vgg_single_output_linear():
    model = build_model("vgg16")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [model.fc]
    assert model.fc.in_features == 512
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13


def test_train_and_eval_modes_differ_only_through_batchnorm():
    model = seeded_build("conv2")  # no BatchNorm: train and eval agree
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), model.eval()(x))
