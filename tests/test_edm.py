"""EDM's preconditioning on the discrete schedule, fractional timesteps, Karras spacing and the Heun sampler,
against closed forms."""

import math

import pytest
import torch

from diffusion.errors import ConfigError
from diffusion.module import DiffusionModel
from diffusion.objective import EDMObjective, Objective
from diffusion.samplers import (
    get_sampler,
    heun_sample,
    karras_timesteps,
    make_timesteps,
    network_calls,
    sampler_timesteps,
)
from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNet


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("linear", 1000)


def _ab(schedule, t, ndim):
    """alpha_bar at integer or fractional t, from sigma: 1 / (1 + sigma^2)."""
    return (1 + schedule.sigma_at(t) ** 2).reciprocal().view(-1, *[1] * (ndim - 1))


class GaussianDenoiser:
    """The exact eps-predictor for data ~ N(0, std^2 I), at integer or fractional timesteps."""

    def __init__(self, schedule, std):
        self.s, self.std = schedule, std

    def __call__(self, x, t):
        ab = _ab(self.s, t, x.ndim)
        return (1 - ab).sqrt() * x / (ab * self.std**2 + 1 - ab)


class PointDenoiser:
    def __init__(self, schedule, target):
        self.s, self.target = schedule, target

    def __call__(self, x, t):
        ab = _ab(self.s, t, x.ndim)
        return (x - ab.sqrt() * self.target) / (1 - ab).sqrt()


def gaussian_heun_solution(schedule, std, x_T, timesteps):
    """The exact probability-flow ODE for N(0, std^2) data in the VE form only rescales x, keeping it
    N(0, std^2 + sigma^2): from sigma_max to the last sigma, then the last step returns D = E[x_0 | x] there."""
    s0, s1 = (float(schedule.sigma_at(torch.tensor([float(t)]))) for t in (timesteps[0], timesteps[-1]))
    x0 = x_T.double() * math.sqrt(1 + s0**2)
    x1 = x0 * math.sqrt(std**2 + s1**2) / math.sqrt(std**2 + s0**2)
    return (x1 * std**2 / (std**2 + s1**2)).float()


def _rel_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


# --- the schedule's noise levels -------------------------------------------------------------------------
def test_sigma_is_the_ve_noise_level_and_interpolates_in_log_space(schedule):
    t = torch.arange(1000)
    ab = torch.tensor(schedule.alpha_bar_f64, dtype=torch.float64)  # 1 - alpha_bar loses digits in fp32
    assert torch.allclose(schedule.sigma_at(t).double(), ((1 - ab) / ab).sqrt(), rtol=1e-5)
    # An integer-valued float timestep reads the same values; a fractional one lies between its neighbours.
    assert torch.allclose(schedule.sigma_at(t.float()), schedule.sigma_at(t), rtol=1e-6)
    mid = schedule.sigma_at(torch.tensor([10.5]))
    lo, hi = schedule.sigma_at(torch.tensor([10, 11]))
    assert float(mid) == pytest.approx(math.sqrt(float(lo) * float(hi)), rel=1e-5)  # geometric mean
    # t_at_sigma inverts sigma_at, and clamps outside the schedule's range.
    frac = torch.tensor([0.0, 3.25, 499.5, 998.75, 999.0])
    assert torch.allclose(schedule.t_at_sigma(schedule.sigma_at(frac)), frac, atol=2e-3)
    assert schedule.t_at_sigma(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]


def test_coefficients_at_fractional_timesteps_match_the_tables(schedule):
    t = torch.tensor([0, 7, 300, 999])
    x0, eps = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    for tt in (t, t.float()):
        x_t = schedule.q_sample(x0, tt, eps)
        assert torch.allclose(x_t, schedule.q_sample(x0, t, eps), atol=1e-5)
        assert torch.allclose(schedule.predict_x0_from_eps(x_t, tt, eps), x0, atol=2e-3)
        assert torch.allclose(schedule.predict_eps_from_x0(x_t, tt, x0), eps, atol=2e-3)
    # At a fractional t, x_t = a x0 + s eps with a^2 + s^2 = 1 and the conversions invert each other.
    tf = torch.tensor([0.5, 12.3, 640.7])
    x0, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    x_t = schedule.q_sample(x0, tf, eps)
    a, s = schedule._coef("sqrt_alpha_bar", tf, 1), schedule._coef("sqrt_one_minus_alpha_bar", tf, 1)
    assert torch.allclose(a**2 + s**2, torch.ones(3), atol=1e-6)
    v = schedule.v_target(x0, tf, eps)
    assert torch.allclose(schedule.predict_eps_from_v(x_t, tf, v), eps, atol=1e-4)


# --- the EDM objective -----------------------------------------------------------------------------------
def test_edm_with_unit_sigma_data_is_v_prediction(schedule):
    """c_skip = alpha_bar, c_out = sqrt(1 - alpha_bar), c_in x = x_t when sigma_data = 1: F = -v."""
    edm = EDMObjective(sigma_data=1.0)
    x0, eps = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.tensor([0, 50, 400, 950])
    x_t = schedule.q_sample(x0, t, eps)
    v = schedule.v_target(x0, t, eps)
    assert torch.allclose(edm.net_input(x_t, t), x_t, atol=1e-5)
    assert torch.allclose(edm.eps_from_output(x_t, t, -v), eps, atol=1e-3)
    assert torch.allclose(edm.eps_from_output(x_t, t, -v), Objective(prediction="v").eps_from_output(x_t, t, v), atol=1e-3)


@pytest.mark.parametrize("sigma_data", [0.5, 0.96])
def test_edm_loss_is_the_weighted_denoising_error(sigma_data):
    """loss = lambda(sigma) ||D - x0||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2, and 0 for the ideal F;
    the samplers' eps is (x - D) / sigma on the VE point x = x_t / sqrt(alpha_bar)."""
    edm = EDMObjective(sigma_data=sigma_data)
    x0, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    t = torch.tensor([2.5, 100.0, 700.25])
    out = torch.randn(3, 1, 4, 4)
    per_image, t_logged = edm.loss(lambda x, tt, y: out, x0, t=t, noise=noise)
    sigma = edm.schedule.sigma_at(t).view(-1, 1, 1, 1)
    x = x0 + sigma * noise
    x_t = x / (1 + sigma**2).sqrt()
    D = edm.denoised(x_t, t, out)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    assert torch.allclose(per_image, (weight * (D - x0) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4)
    assert t_logged.tolist() == [2, 100, 700]
    # The network sees c_in x, and the ideal F (its effective target) gives D = x0, loss 0, eps = noise.
    c_skip, c_out, c_in = edm.preconditioning(sigma)
    seen = {}
    edm.loss(lambda x, tt, y: seen.setdefault("x", x), x0, t=t, noise=noise)
    assert torch.allclose(seen["x"], c_in * x, atol=1e-5)
    assert torch.allclose(edm.net_input(x_t, t), c_in * x, atol=1e-4)
    ideal = (x0 - c_skip * x) / c_out
    assert edm.loss(lambda x, tt, y: ideal, x0, t=t, noise=noise)[0].abs().max() < 1e-8
    assert torch.allclose(edm.eps_from_output(x_t, t, ideal), noise, atol=1e-3)


def test_edm_draws_log_normal_noise_levels():
    edm = EDMObjective(sigma_data=0.5, p_mean=-0.8, p_std=0.9)
    torch.manual_seed(0)
    t = edm.sample_timesteps(50_000, torch.device("cpu"))
    assert t.is_floating_point() and t.min() >= 0 and t.max() <= 999
    log_sigma = edm.schedule.sigma_at(t).log()
    assert log_sigma.mean().item() == pytest.approx(-0.8, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(0.9, abs=0.02)


def test_stratified_draws_take_one_noise_level_from_each_slice_of_the_log_normal():
    from torch.distributions import Normal

    edm = EDMObjective(sigma_data=0.5, p_mean=-0.6, p_std=1.2, stratified=True)
    n = 256
    torch.manual_seed(0)
    t = edm.sample_timesteps(n, torch.device("cpu"))
    assert t.is_floating_point() and t.shape == (n,)
    z = (edm.schedule.sigma_at(t).log() - edm.p_mean) / edm.p_std
    u = Normal(0.0, 1.0).cdf(z.double()).sort().values
    # The clamp to the schedule's noise range only moves the outermost slices (sigma_max ~157 is z 4.7 here).
    i = torch.arange(n, dtype=torch.float64)
    inner = slice(1, n - 1)
    assert (u[inner] >= i[inner] / n - 1e-3).all() and (u[inner] <= (i[inner] + 1) / n + 1e-3).all()
    assert not torch.equal(t, t.sort().values)  # shuffled: the batch's order does not follow the noise level
    # Independent draws from the same distribution do not fill the slices.
    torch.manual_seed(0)
    iid = EDMObjective(sigma_data=0.5, p_mean=-0.6, p_std=1.2).sample_timesteps(n, torch.device("cpu"))
    u_iid = Normal(0.0, 1.0).cdf((edm.schedule.sigma_at(iid).double().log() + 0.6) / 1.2).sort().values
    assert ((u_iid < i / n - 1e-3) | (u_iid > (i + 1) / n + 1e-3)).any()


def test_soft_min_snr_weights_the_denoising_error_by_one_over_sigma2_plus_sd2():
    sd = 0.62
    soft, edm = EDMObjective(sigma_data=sd, weighting="soft_min_snr"), EDMObjective(sigma_data=sd)
    x0, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    t = torch.tensor([2.5, 100.0, 700.25])
    out = torch.randn(3, 1, 4, 4)
    per_image, _ = soft.loss(lambda x, tt, y: out, x0, t=t, noise=noise)
    sigma = soft.schedule.sigma_at(t).view(-1, 1, 1, 1)
    D = soft.denoised((x0 + sigma * noise) / (1 + sigma**2).sqrt(), t, out)
    assert torch.allclose(per_image, ((D - x0) ** 2 / (sigma**2 + sd**2)).mean(dim=(1, 2, 3)), rtol=1e-4)
    # k-diffusion's form: EDM's loss times (sigma sd)^2 / (sigma^2 + sd^2)^2, at most 1/4 (at sigma = sd).
    factor = (sigma * sd) ** 2 / (sigma**2 + sd**2) ** 2
    assert torch.allclose(per_image, edm.loss(lambda x, tt, y: out, x0, t=t, noise=noise)[0] * factor.flatten(), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"sigma_data": 0.0}, "sigma_data must be positive"), ({"sigma_data": -1}, "sigma_data must be positive"),
     ({"p_std": 0.0}, "p_std must be positive"), ({"p_std": -0.5}, "p_std must be positive"),
     ({"weighting": "min_snr"}, "weighting must be one of edm, soft_min_snr, got 'min_snr'")],
)
def test_edm_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        EDMObjective(**kwargs)
    assert "\n" not in str(info.value)


def _tiny_model(objective):
    net = UNet(base_channels=8, channel_mults=[1], num_res_blocks=1, attention_resolutions=[], image_size=8)
    return DiffusionModel(net=net, objective=objective)


def test_edm_model_samples_with_every_sampler_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = _tiny_model(EDMObjective(num_timesteps=100, sigma_data=0.9, p_mean=-1.0))
    outs = {name: model.sample(2, sampler=name, steps=steps, seed=1)
            for name, steps in [("ddpm", 100), ("ddim", 10), ("dpmpp2m_karras", 10), ("heun", 5)]}
    for out in outs.values():
        assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    # The checkpoint records the objective's class and settings: loading it alone samples the same.
    from lightning.pytorch import Trainer

    trainer = Trainer(logger=False, enable_checkpointing=False, max_steps=0, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "edm.ckpt")
    loaded = DiffusionModel.load_from_checkpoint(tmp_path / "edm.ckpt", net=model.net)
    assert isinstance(loaded.objective, EDMObjective)
    assert (loaded.objective.sigma_data, loaded.objective.p_mean) == (0.9, -1.0)
    assert torch.equal(loaded.sample(2, sampler="heun", steps=5, seed=1), outs["heun"])


def test_edm_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = _tiny_model(EDMObjective(sigma_data=0.8))
    x0 = (torch.rand(16, 1, 8, 8) > 0.7).float() * 2 - 1
    opt = torch.optim.Adam(model.net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    t = model.objective.schedule.t_at_sigma((torch.randn(16, generator=gen) * 1.2 - 1.2).exp())
    noise = torch.randn(x0.shape, generator=gen)
    losses = []
    for _ in range(60):
        loss = model.objective.loss(model.net, x0, t=t, noise=noise)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


# --- Karras spacing and Heun ----------------------------------------------------------------------------
def test_karras_timesteps_follow_eq5(schedule):
    ts = karras_timesteps(schedule, 18)
    assert ts.dtype == torch.float64 and ts[0] == 999 and ts[-1] == 0 and (ts[:-1] > ts[1:]).all()
    sigmas = schedule.sigma_at(ts).double()
    rho, hi, lo = 7.0, schedule.sigma_max, schedule.sigma_min
    expected = (hi ** (1 / rho) + torch.linspace(0, 1, 18, dtype=torch.float64) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    assert torch.allclose(sigmas, expected, rtol=2e-3)
    assert karras_timesteps(schedule, 1).tolist() == [999.0]
    with pytest.raises(ConfigError, match="rho must be positive"):
        karras_timesteps(schedule, 5, rho=0)


def test_sampler_timesteps_and_network_calls(schedule):
    assert torch.equal(sampler_timesteps(schedule, "ddim", 10), make_timesteps(1000, 10))
    assert torch.equal(sampler_timesteps(schedule, "heun", 10), karras_timesteps(schedule, 10))
    assert network_calls("heun", 18) == 35 and network_calls("ddim", 50) == 50 and network_calls("ddpm", 1000) == 1000


def test_heun_converges_to_the_gaussian_ode_solution_at_second_order(schedule):
    x_T = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    den = GaussianDenoiser(schedule, 0.5)
    errors = []
    for n in (20, 40, 80, 320):
        ts = karras_timesteps(schedule, n)
        exact = gaussian_heun_solution(schedule, 0.5, x_T, ts)
        errors.append(_rel_err(heun_sample(den, schedule, x_T, ts, clip_x0=False), exact))
    # Karras's rho = 7 grid takes large steps in log sigma at this range (157 to 0.01): 5% at 20 steps here.
    assert errors[0] < 0.06 and errors[3] < 5e-4, errors
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3, errors


def test_heun_recovers_a_point_mass_and_is_deterministic(schedule):
    target = torch.rand(1, 1, 5, 5) * 1.6 - 0.8
    x_T = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    ts = karras_timesteps(schedule, 8)
    runs = [get_sampler("heun")(PointDenoiser(schedule, target), schedule, x_T, ts, g)
            for g in (None, torch.Generator().manual_seed(0))]
    assert torch.allclose(runs[0], target.expand_as(runs[0]), atol=1e-3)
    assert torch.equal(runs[0], runs[1])


def test_heun_counts_its_network_calls(schedule):
    calls = []

    def den(x, t):
        calls.append(t[0].item())
        return torch.zeros_like(x)

    heun_sample(den, schedule, torch.randn(1, 1, 2, 2), karras_timesteps(schedule, 6))
    assert len(calls) == network_calls("heun", 6) == 11


def test_ddpm_refuses_fractional_timesteps(schedule):
    with pytest.raises(ConfigError, match="DDPM takes the schedule's integer timesteps"):
        get_sampler("ddpm")(lambda x, t: x, schedule, torch.randn(1, 1, 2, 2), torch.arange(999, -1, -1).double())


@pytest.mark.parametrize("name", ["ddim", "dpmpp2m"])
def test_integer_valued_float_timesteps_sample_as_integers(schedule, name):
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    den = GaussianDenoiser(schedule, 0.5)
    ts = make_timesteps(1000, 12)
    a = get_sampler(name)(den, schedule, x_T, ts, clip_x0=False)
    b = get_sampler(name)(den, schedule, x_T, ts.double(), clip_x0=False)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["ddim_karras", "dpmpp2m_karras"])
def test_karras_spaced_solvers_converge_to_the_ode_solution(schedule, name):
    """DDIM and DPM-Solver++(2M) on Karras's fractional timesteps solve the same ODE as Heun: with many steps
    they reach its exact solution (from t = T-1 to the last timestep, then E[x_0 | x_t] there)."""
    x_T = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    den = GaussianDenoiser(schedule, 0.5)
    errors = []
    for n in (25, 400):
        ts = sampler_timesteps(schedule, name, n)
        exact = gaussian_heun_solution(schedule, 0.5, x_T, ts)
        errors.append(_rel_err(get_sampler(name)(den, schedule, x_T, ts, clip_x0=False), exact))
    if name == "ddim_karras":  # first order: 16 times the steps, about a sixteenth of the error
        assert errors[1] < 0.01 and errors[1] < errors[0] / 10, errors
    else:  # second order in lambda: close already at 25 steps
        assert errors[0] < 0.05 and errors[1] < 1e-3, errors
