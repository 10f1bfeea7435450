import math

import pytest
import torch
from torch import nn

from open_clip_po.averaging import BMA, EMA, beta_pdf, bma_weight
from open_clip_po.checkpoint import average_entry, load_average


def test_beta_pdf_matches_closed_form():
    # Beta(2,2) pdf = 6 x (1-x); Beta(1,1) = 1
    for x in (0.1, 0.5, 0.8):
        assert beta_pdf(x, 2.0) == pytest.approx(6 * x * (1 - x))
        assert beta_pdf(x, 1.0) == pytest.approx(1.0)
    # gamma < 1 favours both ends over the middle (the paper's 0.7)
    assert bma_weight(0, 10, 0.7) > bma_weight(5, 10, 0.7) < bma_weight(10, 10, 0.7)


def _run(averager_cls, thetas, **kw):
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(thetas[0])
    avg = averager_cls(model, **kw)
    for theta in thetas[1:]:
        with torch.no_grad():
            model.weight.copy_(theta)
        avg.update(model)
    return avg


def test_bma_is_the_beta_weighted_mean_of_all_iterates():
    torch.manual_seed(0)
    thetas = [torch.randn(1, 2, dtype=torch.float64).float() for _ in range(6)]
    total, gamma = 5, 0.7
    avg = _run(BMA, thetas, total_steps=total, gamma=gamma)
    weights = [bma_weight(t, total, gamma) for t in range(6)]
    expected = sum(w * th for w, th in zip(weights, thetas)) / sum(weights)
    torch.testing.assert_close(avg.average["weight"], expected)
    assert avg.weight_sum == pytest.approx(sum(weights))


def test_ema_follows_its_recursion():
    thetas = [torch.full((1, 2), float(v)) for v in (0.0, 1.0, 2.0)]
    avg = _run(EMA, thetas, decay=0.5)
    # 0 -> 0.5*0 + 0.5*1 = 0.5 -> 0.5*0.5 + 0.5*2 = 1.25
    torch.testing.assert_close(avg.average["weight"], torch.full((1, 2), 1.25))


def test_checkpoint_entry_round_trip_restores_average_and_counters():
    torch.manual_seed(1)
    thetas = [torch.randn(1, 2) for _ in range(4)]
    avg = _run(BMA, thetas, total_steps=6, gamma=0.7)
    model = nn.Linear(2, 1, bias=False)
    entry = average_entry(avg, model.state_dict())
    assert entry["kind"] == "bma" and entry["state"]["num_updates"] == 3
    fresh = BMA(model, total_steps=6, gamma=0.7)
    load_average(fresh, entry)
    torch.testing.assert_close(fresh.average["weight"], avg.average["weight"])
    assert fresh.weight_sum == pytest.approx(avg.weight_sum) and fresh.num_updates == 3
    with pytest.raises(ValueError, match="holds bma weights"):
        load_average(EMA(model), entry)


def test_copy_to_puts_the_average_into_the_model():
    avg = _run(EMA, [torch.zeros(1, 2), torch.ones(1, 2)], decay=0.75)
    model = nn.Linear(2, 1, bias=False)
    avg.copy_to(model)
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 2), 0.25))


def test_bad_settings_are_refused():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="at least one training step"):
        BMA(model, total_steps=0)
    with pytest.raises(ValueError, match="ema-decay"):
        EMA(model, decay=1.0)
    assert math.isfinite(bma_weight(0, 1, 0.7))
