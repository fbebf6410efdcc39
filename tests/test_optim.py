"""Optimizers, parameter groups and schedules: checked against their formulas on fixed numbers."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from smallscale.config import validate
from smallscale.errors import UserError
from smallscale.optim import (
    MuonWithAdamW,
    OptimConfig,
    ScheduleConfig,
    build_optimizer,
    lr_at,
    param_groups,
    set_lr,
)


class ScaleNorm(nn.Module):
    """A custom norm: recognised by its class name ending in 'Norm'."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> MLP (biased) -> ScaleNorm -> RMSNorm -> head, head tied or not.

    The head is registered before the embedding so that a tied weight is first met as a Linear.
    """

    def __init__(self, vocab: int = 50, dim: int = 16, tied: bool = True) -> None:
        super().__init__()
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(8, dim)
        self.ln = nn.LayerNorm(dim)
        self.fc_in = nn.Linear(dim, 3 * dim)
        self.fc_out = nn.Linear(3 * dim, dim, bias=False)
        self.scale_norm = ScaleNorm(dim)
        self.ln_f = nn.RMSNorm(dim)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        x = x + self.fc_out(torch.relu(self.fc_in(self.ln(x))))
        return self.lm_head(self.ln_f(self.scale_norm(x)))


def ids(params: list[torch.Tensor]) -> set[int]:
    return {id(p) for p in params}


# --- parameter groups -------------------------------------------------------------------------


def test_every_parameter_appears_exactly_once_with_tied_weights():
    model = TinyLM(tied=True)
    groups = param_groups(model, OptimConfig())
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len(ids(listed)) == len(list(model.parameters())) == 9
    assert ids(listed) == ids(list(model.parameters()))


def test_embeddings_norms_and_biases_get_no_weight_decay():
    model = TinyLM(tied=True)
    decay, no_decay = param_groups(model, OptimConfig())
    assert (decay["name"], decay["weight_decay"]) == ("decay", 0.1)
    assert (no_decay["name"], no_decay["weight_decay"]) == ("no_decay", 0.0)
    assert ids(decay["params"]) == ids([model.fc_in.weight, model.fc_out.weight])
    # the tied head/embedding weight is an embedding, though the Linear holding it comes first
    assert ids(no_decay["params"]) == ids(
        [model.wte.weight, model.wpe.weight, model.ln.weight, model.ln.bias, model.fc_in.bias,
         model.scale_norm.gain, model.ln_f.weight]
    )


def test_config_flags_put_embeddings_norms_and_biases_back_under_decay():
    model = TinyLM(tied=False)
    decay, no_decay = param_groups(model, OptimConfig(decay_embeddings=True))
    assert ids([model.wte.weight, model.wpe.weight, model.lm_head.weight]) <= ids(decay["params"])
    assert id(model.ln.bias) in ids(no_decay["params"])
    decay, no_decay = param_groups(model, OptimConfig(decay_norms_and_biases=True))
    assert ids(no_decay["params"]) == ids([model.wte.weight, model.wpe.weight])


def test_built_adamw_carries_the_groups_and_their_weight_decay():
    model = TinyLM()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["name"], g["weight_decay"], g["lr"], g["betas"]) for g in opt.param_groups] == [
        ("decay", 0.05, 1e-3, (0.9, 0.95)),
        ("no_decay", 0.0, 1e-3, (0.9, 0.95)),
    ]


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = TinyLM(tied=False)
    opt = build_optimizer(model, OptimConfig(name="muon"))
    assert isinstance(opt, MuonWithAdamW)
    muon, decay, no_decay = opt.param_groups
    assert [g["name"] for g in opt.param_groups] == ["muon", "decay", "no_decay"]
    assert ids(muon["params"]) == ids([model.fc_in.weight, model.fc_out.weight])
    assert ids(decay["params"]) == ids([model.lm_head.weight])
    assert model.wte.weight in no_decay["params"]
    assert muon["adjust_lr_fn"] == "match_rms_adamw" and muon["momentum"] == 0.95


def test_muon_finds_an_untied_head_by_its_vocab_sized_output():
    class Unnamed(nn.Module):  # the head is not called lm_head; a hidden layer is as wide as wpe
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(50, 16), nn.Embedding(48, 16)
            self.hidden = nn.Linear(16, 48)
            self.proj = nn.Linear(48, 16)
            self.out = nn.Linear(16, 50, bias=False)

    model = Unnamed()
    muon, decay, _ = build_optimizer(model, OptimConfig(name="muon")).param_groups
    assert ids(muon["params"]) == ids([model.hidden.weight, model.proj.weight])
    assert ids(decay["params"]) == ids([model.out.weight])


def test_set_lr_respects_lr_scale():
    model = TinyLM()
    opt = build_optimizer(model, OptimConfig())
    opt.param_groups[1]["lr_scale"] = 0.5
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 1e-3]


# --- config validation ------------------------------------------------------------------------


def test_resolved_fills_in_per_optimizer_defaults():
    lion = OptimConfig(name="lion").resolved()
    assert (lion.lr, lion.betas, lion.weight_decay, lion.eps) == (3e-4, (0.9, 0.99), 0.3, None)
    lamb = OptimConfig(name="lamb", lr=1e-2).resolved()
    assert (lamb.lr, lamb.betas, lamb.eps, lamb.weight_decay) == (1e-2, (0.9, 0.999), 1e-6, 0.01)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "lion", "eps": 1e-8}, "optim.eps is not used by 'lion'"),
        ({"name": "adamw", "momentum": 0.9}, "optim.momentum is not used by 'adamw'"),
        ({"lr": -1.0}, "optim.lr must be a positive number"),
        ({"betas": [0.9, 1.0]}, "optim.betas must both lie in [0, 1)"),
        ({"name": "nadam"}, "invalid value for 'name'"),
    ],
)
def test_bad_optimizer_settings_are_user_errors(data, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate(OptimConfig, data, source="optim")


def test_wsd_warmup_and_decay_must_fit_in_the_budget():
    with pytest.raises(UserError, match="exceed 1"):
        validate(ScheduleConfig, {"kind": "wsd", "warmup_fraction": 0.5, "decay_fraction": 0.6})


# --- Lion and LAMB against their formulas ---------------------------------------------------------


def single_weight(values: list[list[float]]) -> nn.Module:
    model = nn.Linear(len(values[0]), len(values), bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(values))
    return model


def test_one_lion_step_is_exactly_the_formula():
    lr, wd, (b1, b2) = 0.1, 0.5, (0.9, 0.99)
    model = single_weight([[1.0, -2.0, 0.5], [0.25, 3.0, -1.5]])
    opt = build_optimizer(model, OptimConfig(name="lion", lr=lr, weight_decay=wd, betas=(b1, b2)))
    w = model.weight.detach().clone()
    g = torch.tensor([[0.3, -0.2, 0.0], [-1.0, 0.5, 2.0]])
    model.weight.grad = g.clone()
    opt.step()

    m = torch.zeros_like(w)
    c = b1 * m + (1 - b1) * g
    expected_w = w * (1 - lr * wd) - lr * torch.sign(c)
    expected_m = b2 * m + (1 - b2) * g
    assert torch.equal(model.weight.detach(), expected_w)
    assert torch.equal(opt.state[model.weight]["exp_avg"], expected_m)


def test_second_lion_step_interpolates_momentum_before_the_sign():
    # Step 2's gradient points against step 1's momentum in column 0, but β1 m outweighs (1-β1) g
    # there, so the sign follows the momentum: plain sign(g) would be wrong.
    lr, wd, (b1, b2) = 0.1, 0.0, (0.5, 0.99)
    model = single_weight([[1.0, 1.0]])
    opt = build_optimizer(model, OptimConfig(name="lion", lr=lr, weight_decay=wd, betas=(b1, b2)))
    g1, g2 = torch.tensor([[100.0, 1.0]]), torch.tensor([[-0.5, 1.0]])
    for g in (g1, g2):
        model.weight.grad = g.clone()
        opt.step()
    m1 = (1 - b2) * g1  # 1.0 and 0.01
    c2 = b1 * m1 + (1 - b1) * g2  # 0.25 and 0.505
    expected = torch.tensor([[1.0, 1.0]]) - lr * torch.sign((1 - b1) * g1) - lr * torch.sign(c2)
    assert torch.sign(c2)[0, 0] == 1 and torch.sign(g2)[0, 0] == -1
    assert torch.equal(model.weight.detach(), expected)


def lamb_by_hand(w, m, v, g, t, lr, b1, b2, eps, wd):
    """You et al. 2020, Algorithm 2, in float64."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    u = m_hat / (v_hat.sqrt() + eps) + wd * w
    w_norm, u_norm = w.norm().item(), u.norm().item()
    ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
    return w - lr * ratio * u, m, v, ratio


def test_lamb_steps_match_algorithm_2_including_a_zero_norm_tensor():
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.999), 1e-6, 0.01
    model = nn.Linear(3, 2)
    with torch.no_grad():
        # ‖W‖ ≈ 11.8, above the clamp of 10 that pytorch_optimizer's Lamb would apply
        model.weight.copy_(torch.tensor([[5.0, -4.0, 3.0], [2.0, 6.0, -7.0]]))
        model.bias.zero_()  # ‖b‖ = 0: trust ratio 1 on the first step
    opt = build_optimizer(model, OptimConfig(name="lamb", lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd))
    grads = [
        (torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.75]]), torch.tensor([0.3, -0.6])),
        (torch.tensor([[-0.2, 0.4, 1.0], [0.1, -3.0, 0.5]]), torch.tensor([-0.1, 0.9])),
    ]
    ref_state = {  # (w, m, v) per tensor, in float64
        name: (p.detach().double().clone(), *[torch.zeros(p.shape, dtype=torch.float64)] * 2)
        for name, p in model.named_parameters()
    }
    for t, (gw, gb) in enumerate(grads, start=1):
        model.weight.grad, model.bias.grad = gw.clone(), gb.clone()
        opt.step()
        ratios = {}
        for name, g, decay in (("weight", gw, wd), ("bias", gb, 0.0)):
            w, m, v = ref_state[name]
            w, m, v, ratios[name] = lamb_by_hand(w, m, v, g.double(), t, lr, b1, b2, eps, decay)
            ref_state[name] = (w, m, v)
        if t == 1:
            assert ratios["bias"] == 1.0
        else:
            assert ratios["bias"] != 1.0  # both norms are non-zero now
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.detach().double(), ref_state[name][0], rtol=1e-6, atol=1e-7)


def test_lamb_leaves_a_tensor_with_zero_gradient_and_zero_weight_unchanged():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.bias.zero_()
    opt = build_optimizer(model, OptimConfig(name="lamb"))
    model.weight.grad = torch.ones(2, 2)
    model.bias.grad = torch.zeros(2)  # ‖u‖ = 0 and ‖w‖ = 0: ratio 1, update 0, no NaN
    opt.step()
    assert torch.equal(model.bias.detach(), torch.zeros(2))
    assert torch.isfinite(model.weight).all()


# --- schedules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "tokens", "expected"),
    [
        ("cosine", 0, 0.0),
        ("cosine", 50, 0.5),
        ("cosine", 100, 1.0),
        ("cosine", 550, 0.1 + 0.9 * 0.5),  # halfway through the cosine
        ("cosine", 1000, 0.1),
        ("cosine", 5000, 0.1),  # past the budget: stays at the floor
        ("wsd", 50, 0.5),
        ("wsd", 100, 1.0),
        ("wsd", 800, 1.0),  # decay starts at 1000 - 0.2 * 1000
        ("wsd", 900, 0.1 + 0.9 * (1 - math.sqrt(0.5))),
        ("wsd", 1000, 0.1),
        ("constant", 0, 0.0),
        ("constant", 50, 0.5),
        ("constant", 100, 1.0),
        ("constant", 1000, 1.0),
    ],
)
def test_schedule_values(kind, tokens, expected):
    cfg = ScheduleConfig(kind=kind, warmup_fraction=0.1)
    assert lr_at(tokens, 1000, 1.0, cfg) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_wsd_linear_decay_and_absolute_warmup_tokens():
    cfg = ScheduleConfig(kind="wsd", warmup_tokens=10, decay_shape="linear", min_lr_ratio=0.0)
    assert lr_at(5, 1000, 2.0, cfg) == pytest.approx(1.0)
    assert lr_at(900, 1000, 2.0, cfg) == pytest.approx(1.0)
    assert lr_at(950, 1000, 2.0, cfg) == pytest.approx(0.5)


def test_warmup_longer_than_the_budget_is_a_user_error():
    with pytest.raises(UserError, match="warmup_tokens=2000"):
        lr_at(0, 1000, 1.0, ScheduleConfig(warmup_tokens=2000))


# --- training behaviour -------------------------------------------------------------------------

# lrs that move a 3-layer MLP within 60 steps; the defaults are tuned for LM pretraining.
TRAIN_CFGS = {
    "adamw": OptimConfig(name="adamw", lr=1e-2),
    "lion": OptimConfig(name="lion", lr=3e-3),
    "lamb": OptimConfig(name="lamb", lr=1e-2),
    "sgd": OptimConfig(name="sgd", lr=0.05),
    "muon": OptimConfig(name="muon", lr=3e-2),
}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )


def regression_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    w_true = torch.randn(8, 1, generator=gen)
    batches = []
    for _ in range(n):
        x = torch.randn(32, 8, generator=gen)
        batches.append((x, x @ w_true))
    return batches


def train(model, opt, base_lr, batches, start=0, total=None):
    """Steps over `batches` with a cosine schedule, so resume also covers the lr at each step."""
    total = total or len(batches)
    schedule = ScheduleConfig(kind="cosine", warmup_fraction=0.1)
    for step, (x, y) in enumerate(batches, start=start):
        set_lr(opt, lr_at(step + 1, total, base_lr, schedule))
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(TRAIN_CFGS))
def test_each_optimizer_makes_the_loss_fall(name):
    model = mlp()
    opt = build_optimizer(model, TRAIN_CFGS[name])
    eval_x, eval_y = regression_batches(61)[-1]
    before = nn.functional.mse_loss(model(eval_x), eval_y).item()
    train(model, opt, TRAIN_CFGS[name].lr, regression_batches(60))
    after = nn.functional.mse_loss(model(eval_x), eval_y).item()
    assert after < 0.3 * before, (before, after)


@pytest.mark.parametrize("name", sorted(TRAIN_CFGS))
def test_state_dict_round_trip_resumes_bitwise(name):
    cfg, batches = TRAIN_CFGS[name], regression_batches(8)
    straight = mlp()
    train(straight, build_optimizer(straight, cfg), cfg.lr, batches)

    first = mlp()
    opt = build_optimizer(first, cfg)
    train(first, opt, cfg.lr, batches[:4], total=8)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = mlp(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt = build_optimizer(resumed, cfg)
    opt.load_state_dict(saved["optim"])
    train(resumed, opt, cfg.lr, batches[4:], start=4, total=8)

    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
