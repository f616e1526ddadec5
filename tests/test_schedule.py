import math

import pytest
import torch

from diffusion.errors import ConfigError
from diffusion.schedule import PREDICTIONS, NoiseSchedule, cosine_betas, sigmoid_betas


def test_linear_schedule_endpoints_and_alpha_bar():
    s = NoiseSchedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(s.alpha_bar, torch.cumprod(1 - s.betas.double(), 0).float())
    # The DDPM paper: alpha_bar_T ~ 4e-5, so x_T is essentially pure noise.
    assert s.alpha_bar[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_cosine_schedule_follows_cos_squared_and_clips_betas():
    T, s_ = 1000, 0.008
    s = NoiseSchedule("cosine", T)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2
    for t in (0, 100, 500, 900):
        assert s.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert cosine_betas(T).max().item() == pytest.approx(0.999)
    assert bool((s.betas <= 0.999).all())


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_moments_match_closed_form(kind):
    s = NoiseSchedule(kind, 1000)
    x0 = torch.tensor([-0.8, 0.3, 1.0])
    n = 200_000
    for t in (0, 10, 250, 999):
        tt = torch.full((n,), t)
        xt = s.q_sample(x0.expand(n, 3).reshape(n, 3, 1, 1), tt, torch.randn(n, 3, 1, 1)).reshape(n, 3)
        ab = s.alpha_bar[t].double()
        assert torch.allclose(xt.double().mean(0), ab.sqrt() * x0.double(), atol=5 * (1 / n) ** 0.5)
        assert torch.allclose(xt.double().var(0), (1 - ab).expand(3), rtol=0.02, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(kind):
    """q(x_{t-1}|x_t,x_0) from the product of q(x_{t-1}|x_0) and q(x_t|x_{t-1}), in float64."""
    s = NoiseSchedule(kind, 1000)
    betas = s.betas.double()
    ab = torch.cumprod(1 - betas, 0)
    t = torch.tensor([1, 2, 50, 500, 999])
    x0, xt = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    mean, var, log_var = s.posterior_mean_variance(x0, xt, t)
    ab_prev, alpha, beta = ab[t - 1], 1 - betas[t], betas[t]
    precision = 1 / (1 - ab_prev) + alpha / beta
    exp_var = (1 / precision).view(-1, 1, 1, 1)
    exp_mean = exp_var * (
        (ab_prev.sqrt() / (1 - ab_prev)).view(-1, 1, 1, 1) * x0.double()
        + (alpha.sqrt() / beta).view(-1, 1, 1, 1) * xt.double()
    )
    assert torch.allclose(var.double().expand_as(exp_mean), exp_var.expand_as(exp_mean), rtol=1e-5)
    assert torch.allclose(mean.double(), exp_mean, rtol=1e-4, atol=1e-5)
    assert torch.allclose(log_var.double(), exp_var.log(), rtol=1e-5)


def test_posterior_at_t0_is_x0_and_log_variance_is_clipped():
    s = NoiseSchedule()
    x0, xt = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    mean, var, log_var = s.posterior_mean_variance(x0, xt, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(mean, x0, atol=1e-6)
    assert float(var.max()) == 0.0
    assert torch.isfinite(log_var).all() and log_var[0].item() == pytest.approx(s.posterior_variance[1].log().item())


def test_eps_x0_conversions_round_trip():
    s = NoiseSchedule("cosine")
    x0, eps = torch.rand(8, 3, 4, 4) * 2 - 1, torch.randn(8, 3, 4, 4)
    t = torch.randint(0, 1000, (8,))
    xt = s.q_sample(x0, t, eps)
    assert torch.allclose(s.predict_x0_from_eps(xt, t, eps), x0, atol=1e-3)
    assert torch.allclose(s.predict_eps_from_x0(xt, t, x0), eps, atol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_eps_x0_v_conversions_round_trip(kind):
    """From x_t and any one of eps, x0, v, the other two follow exactly (float64 to see the algebra alone)."""
    s = NoiseSchedule(kind)
    ab = torch.tensor(s.alpha_bar_f64, dtype=torch.float64)
    for name, value in {"alpha_bar": ab, "sqrt_alpha_bar": ab.sqrt(), "sqrt_one_minus_alpha_bar": (1 - ab).sqrt(),
                        "sqrt_recip_alpha_bar": (1 / ab).sqrt(), "sqrt_recipm1_alpha_bar": (1 / ab - 1).sqrt()}.items():
        s._buffers[name] = value
    x0, eps = torch.rand(16, 3, 4, 4, dtype=torch.float64) * 2 - 1, torch.randn(16, 3, 4, 4, dtype=torch.float64)
    t = torch.cat([torch.tensor([0, 1, 998, 999]), torch.randint(0, 1000, (12,))])
    xt = s.q_sample(x0, t, eps)
    truth = {"eps": eps, "x0": x0, "v": s.v_target(x0, t, eps)}
    # v = sqrt(ab) eps - sqrt(1 - ab) x0, Salimans & Ho 2022, eq. (its definition); |v| has unit variance like eps.
    ab = s.alpha_bar[t].view(-1, 1, 1, 1)
    assert torch.allclose(truth["v"], ab.sqrt() * eps - (1 - ab).sqrt() * x0)
    for prediction in PREDICTIONS:
        out = s.target(prediction, x0, t, eps)
        assert torch.equal(out, truth[prediction])
        assert torch.allclose(s.eps_from_output(prediction, xt, t, out), eps, atol=1e-9, rtol=0) or prediction == "x0"
        assert torch.allclose(s.x0_from_output(prediction, xt, t, out), x0, atol=1e-9, rtol=0) or prediction == "eps"
    # eps from an x0 prediction divides by sqrt(1/ab - 1), tiny at t=0; x0 from eps divides by sqrt(ab), tiny at
    # t=T-1: exact away from those ends, as the algebra says.
    mid = (t > 0) & (t < 999)
    assert torch.allclose(s.eps_from_output("x0", xt, t, x0)[mid], eps[mid], atol=1e-8)
    assert torch.allclose(s.x0_from_output("eps", xt, t, eps)[mid], x0[mid], atol=1e-8)
    with pytest.raises(ConfigError, match="Unknown prediction"):
        s.target("score", x0, t, eps)


def test_sigmoid_schedule_follows_its_formula_and_snr_is_alpha_bar_ratio():
    T = 1000
    s = NoiseSchedule("sigmoid", T)
    sig = lambda z: 1 / (1 + math.exp(-z))
    f = lambda t: (sig(3) - sig(6 * t / T - 3)) / (sig(3) - sig(-3))  # Chen 2023, start -3, end 3, tau 1
    for t in (0, 250, 500, 900):
        assert s.alpha_bar[t].item() == pytest.approx(f(t + 1), rel=1e-5)
    assert bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all()) and sigmoid_betas(T).max().item() == pytest.approx(0.999)
    for kind in ("linear", "cosine", "sigmoid"):
        s = NoiseSchedule(kind, T)
        t = torch.arange(T)
        ab = torch.tensor(s.alpha_bar_f64, dtype=torch.float64)
        assert torch.allclose(s.snr_at(t).double(), ab / (1 - ab), rtol=1e-6)


def test_buffers_stay_fp32_and_out_of_checkpoints():
    s = NoiseSchedule()
    s.to(torch.bfloat16)
    s.half()
    assert all(b.dtype == torch.float32 for b in s.buffers())
    assert s.state_dict() == {}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="quadratic"), "Unknown noise schedule"),
        (dict(beta_start=0.02, beta_end=1e-4), "beta_start < beta_end"),
        (dict(num_timesteps=1), "at least 2"),
        (dict(kind="sigmoid", sigmoid_start=3.0, sigmoid_end=-3.0), "start < end"),
    ],
)
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        NoiseSchedule(**kwargs)
