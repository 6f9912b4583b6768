"""Linear interpolation between networks, instability and L2 distance."""

import pytest
import torch
from torch import nn

from conftest import TensorBatches, blobs
from lottery.engine import evaluate
from lottery.errors import ConfigError
from lottery.methods.stability import (
    StabilityHparams, instability, interpolate_states, l2_distance, reestimate_batchnorm,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to OpenMP spinning when other processes
    share the cores (2 threads on a busy 2-core machine made these tests 15x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class BNMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _net(seed):
    torch.manual_seed(seed)
    net = BNMLP()
    with torch.no_grad():  # give the BN statistics distinct values
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.num_batches_tracked.fill_(10 * (seed + 1))
    return net


@pytest.fixture
def test_loader():
    x, y = blobs(n=200, seed=3)
    return TensorBatches(x, y, 64, shuffle=False)


def test_interpolation_end_points_midpoint_and_buffers():
    a, b = _net(0).state_dict(), _net(1).state_dict()
    at0, at1, mid = (interpolate_states(a, b, t) for t in (0.0, 1.0, 0.5))
    for k in a:
        assert torch.equal(at0[k], a[k]) and torch.equal(at1[k], b[k]), k
    # BN running statistics are interpolated like the weights
    for k in ("fc1.weight", "bn.running_mean", "bn.running_var", "bn.weight"):
        assert torch.allclose(mid[k], (a[k] + b[k]) / 2), k
    assert mid["bn.num_batches_tracked"].dtype == torch.int64
    assert int(mid["bn.num_batches_tracked"]) == 15
    # inputs untouched
    assert torch.equal(a["fc1.weight"], _net(0).state_dict()["fc1.weight"])


def test_interpolation_checks_masks_and_keys():
    a, b = _net(0).state_dict(), _net(1).state_dict()
    a["fc1.weight_mask"] = torch.ones(16, 20, dtype=torch.bool)
    b["fc1.weight_mask"] = torch.ones(16, 20, dtype=torch.bool)
    assert interpolate_states(a, b, 0.3)["fc1.weight_mask"].all()
    b["fc1.weight_mask"][0, 0] = False
    with pytest.raises(ConfigError, match="different masks"):
        interpolate_states(a, b, 0.3)
    del b["fc1.weight_mask"]
    with pytest.raises(ConfigError, match="different keys"):
        interpolate_states(a, b, 0.3)


def test_end_points_are_the_networks_own_errors(test_loader):
    na, nb = _net(0), _net(1)
    out = instability(BNMLP, na.state_dict(), nb.state_dict(), test_loader, points=7)
    assert out["alphas"][0] == 0.0 and out["alphas"][-1] == 1.0 and len(out["alphas"]) == 7
    assert len(out["errors"]) == 7
    assert out["error_a"] == pytest.approx(1 - evaluate(na, test_loader)["top1"])
    assert out["error_b"] == pytest.approx(1 - evaluate(nb, test_loader)["top1"])
    assert out["max_error"] == max(out["errors"])
    assert out["instability"] == pytest.approx(out["max_error"] - (out["error_a"] + out["error_b"]) / 2)
    assert out["instability"] >= 0


def test_identical_networks_have_zero_instability(test_loader):
    s = _net(2).state_dict()
    out = instability(BNMLP, s, {k: v.clone() for k, v in s.items()}, test_loader)
    assert len(out["errors"]) == 30
    assert out["instability"] == 0.0
    assert len(set(out["errors"])) == 1


def test_a_barrier_is_measured():
    """Two networks computing the same function with their hidden units swapped: the midpoint's hidden
    layer is zero and predicts one class for everything, a barrier of 50 points."""

    def tiny():
        return nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2))

    a = {"0.weight": torch.tensor([[1.0], [-1.0]]), "0.bias": torch.zeros(2),
         "2.weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "2.bias": torch.zeros(2)}
    b = {"0.weight": torch.tensor([[-1.0], [1.0]]), "0.bias": torch.zeros(2),
         "2.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "2.bias": torch.zeros(2)}
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    y = torch.tensor([0, 0, 1, 1])
    out = instability(tiny, a, b, [(x, y)], points=5)
    assert out["error_a"] == 0.0 and out["error_b"] == 0.0
    assert out["errors"][2] == 0.5  # alpha = 0.5
    assert out["instability"] == 0.5


def test_reestimate_batchnorm_recomputes_the_statistics_of_the_data():
    """The running statistics become the equal-weight average over the batches of the data's batch
    statistics (not a blend with the old ones), the weights are untouched, momentum and eval mode are
    restored; a network without BatchNorm is left alone."""
    net = _net(0)
    x, y = blobs(n=192, seed=5)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 192, 64)]
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "tracked" not in k}
    assert reestimate_batchnorm(net, batches, batches=2) == 2
    with torch.no_grad():
        h = [net.fc1(b[0]) for b in batches[:2]]
    want_mean = (h[0].mean(0) + h[1].mean(0)) / 2
    want_var = (h[0].var(0, unbiased=True) + h[1].var(0, unbiased=True)) / 2
    assert torch.allclose(net.bn.running_mean, want_mean, atol=1e-5)
    assert torch.allclose(net.bn.running_var, want_var, atol=1e-5)
    assert not net.training and net.bn.momentum == 0.1
    for k, v in weights.items():
        assert torch.equal(net.state_dict()[k], v), k
    plain = nn.Sequential(nn.Linear(20, 4))
    before = plain[0].weight.clone()
    assert reestimate_batchnorm(plain, batches, batches=2) == 0 and torch.equal(plain[0].weight, before)


def test_instability_with_reestimated_batchnorm_statistics(test_loader):
    """Two networks whose blended BN statistics are wrong for the data: with the statistics recomputed at
    every point the end points are the networks with their data's statistics, and the option refuses
    to run without the batches it needs."""
    x, y = blobs(n=192, seed=5)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 192, 64)]
    na, nb = _net(0), _net(1)
    plain = instability(BNMLP, na.state_dict(), nb.state_dict(), test_loader, points=5)
    fresh = instability(BNMLP, na.state_dict(), nb.state_dict(), test_loader, points=5, bn_loader=batches,
                        bn_batches=3)
    reestimate_batchnorm(na, batches, 3)
    assert fresh["error_a"] == pytest.approx(1 - evaluate(na, test_loader)["top1"])
    assert fresh["errors"] != plain["errors"]
    with pytest.raises(ConfigError, match="needs bn_loader"):
        instability(BNMLP, na.state_dict(), nb.state_dict(), test_loader, points=5, bn_batches=3)


def test_l2_distance():
    a, b = _net(0).state_dict(), _net(1).state_dict()
    names = ["fc1.weight", "fc2.weight"]
    expected = torch.sqrt(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in names))
    assert l2_distance(a, b, names) == pytest.approx(float(expected))
    assert l2_distance(a, a, names) == 0.0
    assert l2_distance(a, b) > l2_distance(a, b, names)  # default: every floating tensor
    with pytest.raises(ConfigError):
        l2_distance(a, b, ["nope.weight"])


def test_hparams_validation():
    assert StabilityHparams(rewind_points=("0it", "1ep")).points == 30
    for bad in (dict(rewind_points=()), dict(rewind_points=("2 epochs",)), dict(points=1),
                dict(copy_seeds=(1, 1)), dict(rewind_points=("1ep", "1ep"))):
        with pytest.raises(ConfigError):
            StabilityHparams(**bad)
