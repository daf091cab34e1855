"""The LeNet builder: shapes, parameter counts (against hand counts of d2l's models), options."""
import pytest
import torch
from torch import nn

from bnviz.models import NORM_KINDS, PRESETS, LeNetSpec, build_lenet, norm_layers, preset
from bnviz.norms import BatchNorm, D2LBatchNorm


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def lin(fin, fout, bias=True):
    return fin * fout + (fout if bias else 0)


def test_d2l_plain_lenet_parameter_count():
    # d2l LeNet: conv(1,6,5,pad 2) -> conv(6,16,5) -> 400 -> 120 -> 84 -> 10
    expected = conv(1, 6, 5) + conv(6, 16, 5) + lin(400, 120) + lin(120, 84) + lin(84, 10)
    assert expected == 61706
    assert n_params(build_lenet("lenet")) == expected


@pytest.mark.parametrize("name", ["lenet-bn", "lenet-bn-scratch", "lenet-bn-maxpool"])
def test_d2l_lenet_bn_parameter_count(name):
    base = conv(1, 6, 5) + conv(6, 16, 5) + lin(256, 120) + lin(120, 84) + lin(84, 10)
    bn = 2 * (6 + 16 + 120 + 84)
    assert n_params(build_lenet(name)) == base + bn == 44878


def test_presets_match_the_book():
    assert PRESETS["lenet"].padding == 2 and PRESETS["lenet"].pool == "avg" and PRESETS["lenet"].norm == "none"
    assert PRESETS["lenet-bn"].padding == 0 and PRESETS["lenet-bn"].pool == "avg"
    assert PRESETS["lenet-bn-maxpool"].pool == "max"
    m = build_lenet("lenet-bn-maxpool")
    assert isinstance(m.pool1, nn.MaxPool2d) and isinstance(m.norm_conv1, nn.BatchNorm2d)
    assert isinstance(m.norm_fc1, nn.BatchNorm1d)
    assert isinstance(build_lenet("lenet-bn-scratch").norm_conv2, BatchNorm)


@pytest.mark.parametrize("norm", NORM_KINDS)
@pytest.mark.parametrize("pool", ["avg", "max", "none"])
@pytest.mark.parametrize("padding", [0, 2])
def test_every_combination_gives_logits(norm, pool, padding):
    spec = LeNetSpec(norm=norm, pool=pool, padding=padding)
    model = build_lenet(spec)
    x = torch.rand(3, 1, 28, 28)
    out = model(x)
    assert out.shape == (3, 10)
    out.sum().backward()
    expected_norms = 0 if norm == "none" else 4
    assert len(norm_layers(model)) == expected_norms


def test_bias_removed_only_in_front_of_norms():
    m = build_lenet(LeNetSpec(norm="torch", bias=False, norm_layers=("conv1", "fc1")))
    assert m.conv1.bias is None and m.fc1.bias is None
    assert m.conv2.bias is not None and m.fc2.bias is not None and m.out.bias is not None
    full = build_lenet(LeNetSpec(norm="torch"))
    assert n_params(full) - n_params(m) == 6 + 120 + 2 * (16 + 84)


def test_norm_position_and_dropout():
    m = build_lenet(LeNetSpec(norm="torch", norm_position="after", dropout=0.5, activation="relu"))
    names = [n for n, _ in m.named_children()]
    assert names.index("act_conv1") < names.index("norm_conv1")
    assert "dropout_fc1" in names and "dropout_fc2" in names
    assert isinstance(m.act_fc1, nn.ReLU)
    before = [n for n, _ in build_lenet(LeNetSpec(norm="torch")).named_children()]
    assert before.index("norm_conv1") < before.index("act_conv1")


def test_smaller_net_options():
    m = build_lenet(LeNetSpec(norm="torch", pool="none", hidden=(84,)))
    assert not any(isinstance(x, (nn.AvgPool2d, nn.MaxPool2d)) for x in m.modules())
    assert m.fc2.in_features == 16 * 20 * 20 and not hasattr(m, "fc1")
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_norm_layer_kinds():
    assert isinstance(build_lenet(LeNetSpec(norm="group", groups=3)).norm_conv1, nn.GroupNorm)
    assert build_lenet(LeNetSpec(norm="group", groups=3)).norm_conv1.num_groups == 3
    assert isinstance(build_lenet(LeNetSpec(norm="layer")).norm_conv2, nn.LayerNorm)
    assert isinstance(build_lenet(LeNetSpec(norm="instance")).norm_conv1, nn.InstanceNorm2d)
    assert isinstance(build_lenet(LeNetSpec(norm="d2l")).norm_fc1, D2LBatchNorm)
    assert build_lenet(LeNetSpec(norm="torch", affine=False)).norm_conv1.weight is None


@pytest.mark.parametrize("field,value", [("norm", "batch"), ("pool", "min"), ("padding", 1),
                                         ("activation", "tanh"), ("dropout", 1.0),
                                         ("norm_position", "middle"), ("norm_layers", ("conv3",)),
                                         ("hidden", ()), ("groups", 4)])
def test_bad_spec_names_valid_values(field, value):
    kwargs = {field: value}
    if field == "groups":
        kwargs["norm"] = "group"
    with pytest.raises(ValueError, match=f"LeNetSpec.{field}=.*valid"):
        LeNetSpec(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset.*lenet-bn"):
        preset("resnet")


def test_spec_dict_round_trip_and_label():
    spec = LeNetSpec(norm="scratch", pool="max", dropout=0.2, norm_layers=("conv1",))
    assert LeNetSpec.from_dict(spec.to_dict()) == spec
    assert "scratch" in spec.label() and "max pool" in spec.label() and "dropout 0.2" in spec.label()


# ----------------------------------------------------------------------------- init_weights
# (weight initialisation schemes: issue 10, item 1)

from bnviz.models import INITS, init_weights  # noqa: E402


def test_init_d2l_is_xavier_uniform_on_conv_and_linear_weights():
    torch.manual_seed(0)
    model = init_weights(build_lenet("lenet"), "d2l")
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 5
    for layer in layers:
        w = layer.weight.detach()
        fan_in = w.shape[1] * w[0, 0].numel()
        fan_out = w.shape[0] * w[0, 0].numel()
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert w.abs().max() <= bound + 1e-7
        var = 2 / (fan_in + fan_out)
        tol = 0.35 if w.numel() < 1000 else 0.1  # conv1 has only 150 weights
        assert abs(w.var().item() / var - 1) < tol, (layer, w.var().item(), var)


def test_init_d2l_leaves_biases_and_is_deterministic():
    torch.manual_seed(3)
    plain = build_lenet("lenet-bn")
    torch.manual_seed(3)
    a = init_weights(build_lenet("lenet-bn"), "d2l")
    torch.manual_seed(3)
    b = init_weights(build_lenet("lenet-bn"), "d2l")
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), plain.parameters()):
        assert torch.equal(p, q), name
        if not name.endswith(".weight") or name.startswith("norm_"):
            assert torch.equal(p, r), name  # biases and BN parameters untouched
    assert not torch.equal(a.conv1.weight, plain.conv1.weight)


def test_init_pytorch_leaves_the_default_init():
    torch.manual_seed(7)
    plain = build_lenet("lenet")
    torch.manual_seed(7)
    model = init_weights(build_lenet("lenet"), "pytorch")
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    assert INITS == ("d2l", "pytorch")


def test_init_bad_scheme_names_valid_ones():
    with pytest.raises(ValueError, match="'d2l', 'pytorch'"):
        init_weights(build_lenet("lenet"), "kaiming")


def test_init_d2l_with_a_generator():
    a = init_weights(build_lenet("lenet"), "d2l", generator=torch.Generator().manual_seed(1))
    b = init_weights(build_lenet("lenet"), "d2l", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.fc1.weight, b.fc1.weight) and torch.equal(a.conv1.weight, b.conv1.weight)


def test_configure_norms_sets_momentum_and_eps_on_every_norm_that_has_them():
    """The one place a run's BN momentum and eps reach the layers: checked module by module
    against the types (the d2l-book layer keeps its own momentum: another convention)."""
    from bnviz.models import configure_norms

    for norm in ("torch", "scratch", "ghost", "lite-center", "layer", "group", "instance", "d2l"):
        model = build_lenet(preset("lenet-bn", norm=norm))
        assert configure_norms(model, 0.3, 1e-3) is model
        for name, m in model.named_modules():
            if not name.startswith("norm_"):
                continue
            assert m.eps == 1e-3, (norm, name)
            if isinstance(m, D2LBatchNorm):
                assert m.momentum == 0.1, name  # the book's default, untouched
            elif isinstance(m, (nn.modules.batchnorm._NormBase, BatchNorm)):
                assert m.momentum == 0.3, (norm, name)
    cumulative = configure_norms(build_lenet("lenet-bn-scratch"), None, 1e-5)
    assert all(m.momentum is None for m in norm_layers(cumulative).values())


# ----------------------------------------------------------------------------- the small ResNet (chapter 08)


def test_resnet_bn_parameter_count_by_hand():
    from bnviz.models import resnet_bn

    stem = 1 * 8 * 9 + 2 * 8                                         # conv 3×3, BN γ β
    block1 = 2 * (8 * 8 * 9 + 2 * 8)                                 # two conv 3×3 + BN, identity shortcut
    block2 = 8 * 16 * 9 + 2 * 16 + 16 * 16 * 9 + 2 * 16 + 8 * 16 + 2 * 16  # + 1×1 projection and its BN
    fc = 16 * 10 + 10
    model = resnet_bn()
    assert sum(p.numel() for p in model.parameters()) == stem + block1 + block2 + fc
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert resnet_bn(channels=(4, 8, 8), blocks=(2, 1, 1), stem_stride=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_zero_init_last_makes_every_block_the_identity():
    """Goyal et al.: γ = 0 in each block's last BN, so a block outputs relu(shortcut(x)); with an
    identity shortcut and a non-negative input (it follows a ReLU) that is x itself."""
    from bnviz.models import residual_blocks, resnet_bn

    torch.manual_seed(0)
    model = resnet_bn(channels=(4, 8), blocks=(2, 1), zero_init_last=True)
    blocks = residual_blocks(model)
    assert len(blocks) == 3
    zero = [name for name, m in norm_layers(model).items() if not m.weight.detach().any()]
    assert sorted(zero) == sorted(f"{n}.bn2" for n, m in model.named_children() if m in blocks)
    x = torch.relu(torch.randn(5, 4, 14, 14))
    for block in blocks:
        block.train()
        want = x if isinstance(block.shortcut, nn.Identity) else torch.relu(block.shortcut(x))
        torch.testing.assert_close(block(x), want)
        x = torch.relu(torch.randn(5, block.conv2.out_channels, *want.shape[2:]))
    default = resnet_bn(channels=(4, 8), blocks=(2, 1))
    assert all(m.weight.detach().eq(1).all() for m in norm_layers(default).values())


def test_resnet_bn_takes_another_norm_and_same_seed_same_model():
    import functools

    from bnviz.models import resnet_bn
    from bnviz.norms import BatchRenorm

    model = resnet_bn(norm=functools.partial(BatchRenorm, rmax=2.0, dmax=1.0))
    kinds = {type(m) for m in norm_layers(model).values()}
    assert kinds == {BatchRenorm} and len(norm_layers(model)) == 1 + 2 + 3
    torch.manual_seed(7)
    a = resnet_bn()
    torch.manual_seed(7)
    b = resnet_bn()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kwargs,match", [
    ({"channels": ()}, "channels=\\(\\) is not valid"),
    ({"channels": (8, 0)}, "channels="),
    ({"blocks": (1,)}, "blocks=\\(1,\\) is not valid; valid: one positive int per stage \\(2 stages\\)"),
    ({"stem_stride": 3}, "stem_stride=3 is not valid; valid: 1 or 2"),
])
def test_resnet_bn_bad_arguments(kwargs, match):
    from bnviz.models import resnet_bn

    with pytest.raises(ValueError, match=match):
        resnet_bn(**kwargs)
