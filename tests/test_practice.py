"""bnviz.practice (chapter 08): decay groups, frozen BN, the Batch Renorm warm-up, shifted tasks and
run_arms, each checked against what it must do to the parameters, buffers and numbers."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bnviz import Config
from bnviz.models import norm_layers, resnet_bn
from bnviz.norms import BatchRenorm
from bnviz.practice import (Arm, DecayGroups, FreezeBN, RenormWarmup, param_groups, run_arms, shift_baselines,
                            shifted)
from bnviz.stats import bn_layers, shift_images


def small():
    return resnet_bn(channels=(4, 8), blocks=(1, 1))


def test_param_groups_split_every_parameter_once():
    model = small()
    decay, no_decay = param_groups(model, 5e-3)
    assert decay["weight_decay"] == 5e-3 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    norm_ids = {id(p) for m in norm_layers(model).values() for p in m.parameters()}
    conv_linear = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {id(p) for p in decay["params"]} == conv_linear
    assert norm_ids | {id(model.fc.bias)} == {id(p) for p in no_decay["params"]}
    with pytest.raises(ValueError, match="weight_decay=-1 is not valid"):
        param_groups(model, -1)


def test_decay_groups_shrink_only_conv_and_linear_weights():
    """One SGD step with zero gradients: decayed parameters shrink by (1 - lr·wd), the others stay."""
    model = small()
    with torch.no_grad():
        for m in norm_layers(model).values():
            m.weight.fill_(1.5)
            m.bias.fill_(0.5)
    trainer = SimpleNamespace(config=Config(lr=0.5, weight_decay=0.1), model=model, device=torch.device("cpu"))
    DecayGroups().on_fit_start(trainer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    trainer.opt.step()
    decayed = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for n, p in model.named_parameters():
        owner, kind = n.rsplit(".", 1)
        factor = 1 - 0.5 * 0.1 if owner in decayed and kind == "weight" else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, msg=n)


def test_freeze_bn_keeps_the_running_statistics_and_trains_gamma(tiny_data):
    cfg = Config(dataset="synthetic", batch_size=64, epochs=1, lr=0.1, snapshot_every=4, train_size=256)
    data = tiny_data.subset(256, 128)
    arms = {"updated": Arm(lambda s: small()), "frozen": Arm(lambda s: small(), callbacks=lambda: (FreezeBN(),))}
    p = run_arms(cfg, arms, seeds=(0,), data=data, precise_bn=None, progress=False)
    torch.manual_seed(0)
    start = small()
    for arm, moved in (("frozen", False), ("updated", True)):
        model = p.models[(arm, 0)]
        for name, m in bn_layers(model).items():
            m0 = dict(start.named_modules())[name]
            assert torch.equal(m.running_mean, m0.running_mean) != moved, (arm, name)
            assert not torch.equal(m.weight, m0.weight), (arm, name)  # γ learns in both
        assert all(int(m.num_batches_tracked) == (4 if moved else 0) for m in bn_layers(model).values())


def test_renorm_warmup_relaxes_the_limits_linearly():
    w = RenormWarmup(rmax=3.0, dmax=5.0, steps=10)
    assert w.limits(0) == (1.0, 0.0) and w.limits(5) == (2.0, 2.5) and w.limits(10) == w.limits(99) == (3.0, 5.0)
    assert RenormWarmup(2.0, 1.0, steps=0).limits(0) == (2.0, 1.0)
    model = resnet_bn(channels=(4, 8), norm=BatchRenorm)
    trainer = SimpleNamespace(model=model, step_count=5)
    w.before_step(trainer)
    layers = [m for m in model.modules() if isinstance(m, BatchRenorm)]
    assert layers and all(float(m.rmax) == 2.0 and float(m.dmax) == 2.5 for m in layers)
    with pytest.raises(ValueError, match="rmax=0.9 is not valid"):
        RenormWarmup(rmax=0.9)
    with pytest.raises(ValueError, match="steps=-1 is not valid"):
        RenormWarmup(steps=-1)


def test_shifted_task_and_its_baselines(tiny_data):
    task = shifted(tiny_data, brightness=0.3, contrast=0.5, train=slice(100, 200))
    assert torch.equal(task.train_x, shift_images(tiny_data.train_x[100:200], 0.3, 0.5))
    assert torch.equal(task.train_y, tiny_data.train_y[100:200]) and torch.equal(task.test_y, tiny_data.test_y)
    assert torch.equal(task.test_x, shift_images(tiny_data.test_x, 0.3, 0.5)) and task.label == tiny_data.label
    with pytest.raises(ValueError, match="selects no training example"):
        shifted(tiny_data, train=slice(10, 10))
    torch.manual_seed(0)
    model = small()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    (row,) = shift_baselines({("base", 0): model}, task, images=100)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model is not changed
    model.eval()
    with torch.no_grad():
        want = (model(task.test_x.float() / 255).argmax(1) == task.test_y).float().mean().item()
    assert row["as_is"] == pytest.approx(want)
    assert 0.0 <= row["adabn"] <= 1.0


def test_run_arms_comparison_and_seeds(tiny_data):
    cfg = Config(dataset="synthetic", batch_size=64, epochs=2, lr=0.1, snapshot_every=4)
    data = tiny_data.subset(128, 128)
    arms = {"a": Arm(lambda s: small()), "b": Arm(lambda s: small(), {"lr": 0.05})}
    p = run_arms(cfg, arms, seeds=(3, 1), data=data, progress=False)
    cmp = p.comparison
    assert cmp.variants == ["a", "b"] and cmp.seeds == (3, 1) and cmp.reference == "a"
    assert [r.history.config.seed for r in cmp.runs_of("b")] == [3, 1]
    assert [r.history.config.lr for r in cmp.runs_of("b")] == [0.05, 0.05]
    assert all(s.precise_test_acc is not None for r in cmp.runs for s in r.history.epochs)
    torch.manual_seed(3)
    a3 = small()
    torch.manual_seed(1)
    a1 = small()
    assert not torch.equal(a3.stem.weight, a1.stem.weight)
    assert cmp.contrast("a", "b").n_pairs == 2
    with pytest.raises(ValueError, match="reference 'c' is not among the arms"):
        run_arms(cfg, arms, seeds=(0,), data=data, reference="c")
    with pytest.raises(ValueError, match="seeds must be distinct"):
        run_arms(cfg, arms, seeds=(0, 0), data=data)


def test_precise_eval_recomputes_batch_renorm_as_batch_norm(tiny_data):
    """Independent reference: the same weights and buffers in a BN ResNet (nn.BatchNorm2d), whose
    PreciseBN accuracy is the course's usual one. Without renorm_as_bn the pass would correct each
    batch towards the half-built statistics and give another number."""
    import functools

    from bnviz.practice import PreciseEval, renorm_as_bn
    from bnviz.precise import precise_bn_accuracy

    torch.manual_seed(0)
    brn = resnet_bn(channels=(4, 8), norm=functools.partial(BatchRenorm, rmax=3.0, dmax=5.0))
    with torch.no_grad():  # weights and running statistics far from the init, as after training
        for m in brn.modules():
            if isinstance(m, BatchRenorm):
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_()
                m.running_mean.normal_(0, 3)
                m.running_var.uniform_(0.1, 10)
    bn = resnet_bn(channels=(4, 8))
    bn.load_state_dict({k: v for k, v in brn.state_dict().items() if not k.endswith(("rmax", "dmax"))})
    want = precise_bn_accuracy(bn, tiny_data, images=256)
    with renorm_as_bn(brn):
        got = precise_bn_accuracy(brn, tiny_data, images=256)
    assert got == want
    assert all(float(m.rmax) == 3.0 and float(m.dmax) == 5.0 for m in brn.modules() if isinstance(m, BatchRenorm))
    s = SimpleNamespace(kind="epoch", precise_test_acc=None, saturated=None)
    PreciseEval(256).on_snapshot(SimpleNamespace(model=brn, data=tiny_data), s)
    assert s.precise_test_acc == want
    bn_out = bn.eval()(tiny_data.test_x[:8].float() / 255)
    torch.testing.assert_close(brn.eval()(tiny_data.test_x[:8].float() / 255), bn_out)  # eval: the same network
