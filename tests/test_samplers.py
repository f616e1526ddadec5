import pytest
import torch

from diffusion.errors import ConfigError
import math

from diffusion.samplers import (
    SAMPLERS,
    SamplerSpec,
    ddim_sample,
    ddpm_sample,
    dpmpp2m_sample,
    get_sampler,
    make_timesteps,
    parse_samplers,
    slerp,
)
from diffusion.generate import interpolation_noise
from diffusion.module import DiffusionModel
from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNet


class GaussianDenoiser:
    """The exact eps-predictor for data ~ N(0, std^2 I): E[eps | x_t] = sqrt(1-ab) x_t / (ab std^2 + 1 - ab)."""

    def __init__(self, schedule: NoiseSchedule, std: float) -> None:
        self.s, self.std = schedule, std

    def __call__(self, x, t):
        ab = self.s.alpha_bar[t].view(-1, *[1] * (x.ndim - 1))
        return (1 - ab).sqrt() * x / (ab * self.std**2 + 1 - ab)


class PointDenoiser:
    """The exact eps-predictor for data that is always the image x*."""

    def __init__(self, schedule: NoiseSchedule, target: torch.Tensor) -> None:
        self.s, self.target = schedule, target

    def __call__(self, x, t):
        ab = self.s.alpha_bar[t].view(-1, *[1] * (x.ndim - 1))
        return (x - ab.sqrt() * self.target) / (1 - ab).sqrt()


def wobbly_denoiser(x, t):
    """An arbitrary smooth, timestep-dependent function standing in for a network."""
    return torch.tanh(x * (1 + t.view(-1, 1, 1, 1) / 1000)) * 0.9 + 0.1 * torch.sin(3 * x)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("linear", 1000)


def test_make_timesteps():
    assert make_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    trailing = make_timesteps(1000, 50)
    assert trailing[0] == 999 and trailing[-1] == 19 and len(trailing) == 50
    assert make_timesteps(1000, 50, "leading").tolist() == list(range(980, -1, -20))
    linspace = make_timesteps(1000, 10, "linspace")
    assert linspace[0] == 999 and linspace[-1] == 0 and len(linspace) == 10
    for spacing in ("trailing", "leading", "linspace"):
        for steps in (1, 7, 10, 25, 333, 1000):
            ts = make_timesteps(1000, steps, spacing)
            assert len(ts) == steps and bool((ts[:-1] > ts[1:]).all()) and 0 <= ts.min() and ts.max() <= 999


def test_ddim_eta1_step_equals_ddpm_step(schedule):
    """One DDIM step with eta=1 from t to t-1 is DDPM's ancestral step with beta-tilde: same mean, same std."""
    x = torch.randn(4, 1, 6, 6)
    for t in (999, 500, 37, 1):
        for clip in (False, True):
            g1, g2 = torch.Generator().manual_seed(t), torch.Generator().manual_seed(t)
            ts = torch.tensor([t, t - 1])
            # Both samplers end with a noiseless step; compare after exactly one noisy step by stopping there.
            ddim = _one_step(ddim_sample, schedule, x, ts, g1, clip_x0=clip, eta=1.0)
            ddpm = _ddpm_one_step(schedule, x, t, g2, clip)
            assert torch.allclose(ddim, ddpm, atol=1e-5), (t, clip, (ddim - ddpm).abs().max())


def _one_step(sampler, schedule, x, ts, generator, **kw):
    out = {}

    def spy(x_t, t):
        if "x" not in out and int(t[0]) == int(ts[1]):
            out["x"] = x_t.clone()
        return wobbly_denoiser(x_t, t)

    sampler(spy, schedule, x, ts, generator, **kw)
    return out["x"]


def _ddpm_one_step(schedule, x, t, generator, clip):
    tt = torch.full((x.shape[0],), t)
    x0 = schedule.predict_x0_from_eps(x, tt, wobbly_denoiser(x, tt))
    if clip:
        x0 = x0.clamp(-1, 1)
    mean, _, log_var = schedule.posterior_mean_variance(x0, x, tt)
    return mean + (0.5 * log_var).exp() * torch.randn(x.shape, generator=generator)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta1_over_all_steps_equals_ddpm(schedule, clip):
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ddpm = ddpm_sample(wobbly_denoiser, schedule, x_T, None, torch.Generator().manual_seed(7), clip_x0=clip)
    ddim = ddim_sample(
        wobbly_denoiser, schedule, x_T, make_timesteps(1000, 1000), torch.Generator().manual_seed(7), clip_x0=clip, eta=1.0
    )
    assert (ddpm - ddim).abs().max() <= 5e-5 * ddpm.abs().max(), (ddpm - ddim).abs().max()  # vs |x| ~130: fp32 ~6e-6, 0.1%-off beta >2e-4


@pytest.mark.parametrize(
    "name, steps", [("ddpm", 1000), ("ddim", 50), ("ddim", 10), ("dpmpp2m", 10), ("dpmpp2m", 1)]
)
def test_samplers_recover_a_point_mass(schedule, name, steps):
    target = torch.rand(1, 1, 5, 5) * 1.6 - 0.8
    x_T = torch.randn(4, 1, 5, 5)
    out = get_sampler(name)(PointDenoiser(schedule, target), schedule, x_T, make_timesteps(1000, steps), torch.Generator().manual_seed(0))
    assert torch.allclose(out, target.expand_as(out), atol=1e-3)


@pytest.mark.parametrize(
    "name, steps, kw", [("ddpm", 1000, {}), ("ddim", 1000, {}), ("ddim", 1000, {"eta": 0.5}), ("dpmpp2m", 50, {})]
)
def test_samplers_reproduce_gaussian_data(schedule, name, steps, kw):
    """With the exact denoiser for N(0, 0.5^2), samples must have std 0.5 (no clipping: it would bias them)."""
    x_T = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    den = GaussianDenoiser(schedule, 0.5)
    out = get_sampler(name)(den, schedule, x_T, make_timesteps(1000, steps), torch.Generator().manual_seed(4), clip_x0=False, **kw)
    assert out.mean().abs().item() < 0.02
    assert out.std().item() == pytest.approx(0.5, rel=0.03)


def test_ddim_converges_to_the_data_std_as_steps_grow(schedule):
    """Few-step DDIM shrinks the variance (its known discretisation error); the error must fall with steps."""
    x_T = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    den = GaussianDenoiser(schedule, 0.5)
    errors = [
        abs(ddim_sample(den, schedule, x_T, make_timesteps(1000, n), clip_x0=False).std().item() - 0.5)
        for n in (10, 50, 200, 1000)
    ]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.005


def test_ddpm_beta_variance_option_adds_more_noise(schedule):
    x_T = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    den = GaussianDenoiser(schedule, 0.5)
    tilde = ddpm_sample(den, schedule, x_T, None, torch.Generator().manual_seed(4), clip_x0=False)
    beta = ddpm_sample(den, schedule, x_T, None, torch.Generator().manual_seed(4), clip_x0=False, variance="beta")
    assert beta.std() > tilde.std()


def test_seeds_make_samples_reproducible(schedule):
    x_T = torch.randn(2, 1, 4, 4)
    run = lambda seed, sampler, **kw: sampler(wobbly_denoiser, schedule, x_T, make_timesteps(1000, 1000), torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(0, ddpm_sample), run(0, ddpm_sample))
    assert not torch.allclose(run(0, ddpm_sample), run(1, ddpm_sample))
    # eta=0 is deterministic: the generator does not matter.
    assert torch.equal(run(0, ddim_sample), run(1, ddim_sample))


@pytest.mark.parametrize("sampler", [ddim_sample, dpmpp2m_sample])
def test_clipping_keeps_predicted_x0_in_range(schedule, sampler):
    def wild(x, t):
        return -10 * torch.ones_like(x)  # implies x0 far outside [-1, 1]

    out = sampler(wild, schedule, torch.randn(2, 1, 3, 3), make_timesteps(1000, 5), None, clip_x0=True)
    assert out.abs().max() <= 1.0 + 1e-5


def test_bad_sampler_input(schedule):
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ConfigError, match="consecutive"):
        ddpm_sample(wobbly_denoiser, schedule, x, make_timesteps(1000, 50))
    with pytest.raises(ConfigError, match="strictly decreasing"):
        ddim_sample(wobbly_denoiser, schedule, x, torch.tensor([10, 20]))
    with pytest.raises(ConfigError, match=r"\[0, 999\]"):
        ddim_sample(wobbly_denoiser, schedule, x, torch.tensor([1000, 20]))
    with pytest.raises(ConfigError, match="eta"):
        ddim_sample(wobbly_denoiser, schedule, x, make_timesteps(1000, 5), eta=-1)
    with pytest.raises(ConfigError, match="Unknown sampler"):
        get_sampler("euler")
    with pytest.raises(ConfigError, match="steps must be between"):
        make_timesteps(1000, 0)
    with pytest.raises(ConfigError, match="spacing"):
        make_timesteps(1000, 10, "random")
    assert set(SAMPLERS) == {"ddpm", "ddpm_small", "ddpm_large", "ddim", "dpmpp2m", "heun", "edm_sde", "restart", "ddim_karras", "dpmpp2m_karras",
                             "consistency", "consistency_karras"}


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_model_refuses_zero_steps_as_it_refuses_too_many(sampler):
    # 0 is a number of steps, not "not given" (None): it must not turn into the default.
    net = UNet(base_channels=8, channel_mults=(1,), num_res_blocks=1, attention_resolutions=[], num_heads=1)
    model = DiffusionModel(net)
    for steps in (0, 5000):
        with pytest.raises(ConfigError, match=f"steps must be between 1 and the schedule's 1000 timesteps, got {steps}\\."):
            model.sample(1, sampler=sampler, steps=steps)


# --- DPM-Solver++(2M) ---------------------------------------------------------------------------------


def gaussian_ode_solution(schedule, std, x_T, timesteps):
    """What an exact ODE solver gives on ``timesteps`` for N(0, std^2) data: the probability-flow ODE only
    rescales x_t (to keep it N(0, ab std^2 + 1 - ab)) from the first timestep to the last one, and the final
    step to x_0 then returns E[x_0 | x_t] there, as every sampler here does."""
    ab = schedule.alpha_bar_f64
    t0, t1 = int(timesteps[0]), int(timesteps[-1])
    var = lambda t: ab[t] * std**2 + 1 - ab[t]
    return (x_T.double() * math.sqrt(ab[t1]) * std**2 / math.sqrt(var(t1) * var(t0))).float()


def _rel_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_dpmpp2m_converges_to_the_ddim_ode_solution(schedule):
    ts = make_timesteps(1000, 1000)
    x_T = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    den = GaussianDenoiser(schedule, 0.5)
    exact = gaussian_ode_solution(schedule, 0.5, x_T, ts)
    ddim = ddim_sample(den, schedule, x_T, ts, clip_x0=False)
    dpm = dpmpp2m_sample(den, schedule, x_T, ts, clip_x0=False)
    assert _rel_err(ddim, exact) < 5e-3  # DDIM's own first-order error at 1000 steps
    assert _rel_err(dpm, exact) < 5e-4 and _rel_err(dpm, ddim) < 5e-3
    # A network-like denoiser, with the clipping that sampling uses by default.
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ddim = ddim_sample(wobbly_denoiser, schedule, x_T, ts)
    assert (dpmpp2m_sample(wobbly_denoiser, schedule, x_T, ts) - ddim).abs().max() < 5e-3
    assert (dpmpp2m_sample(wobbly_denoiser, schedule, x_T, make_timesteps(1000, 20)) - ddim).abs().max() < 0.03


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [10, 15, 20])
def test_dpmpp2m_beats_ddim_with_few_steps(kind, steps):
    schedule = NoiseSchedule(kind, 1000)
    ts = make_timesteps(1000, steps)
    x_T = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    den = GaussianDenoiser(schedule, 0.5)
    exact = gaussian_ode_solution(schedule, 0.5, x_T, ts)
    ddim = _rel_err(ddim_sample(den, schedule, x_T, ts, clip_x0=False), exact)
    dpm = _rel_err(dpmpp2m_sample(den, schedule, x_T, ts, clip_x0=False), exact)
    assert dpm < ddim / 3, (ddim, dpm)


def test_dpmpp2m_is_second_order(schedule):
    """Doubling the steps divides the error by about 4 (by 2 for first-order DDIM, the check's control).
    On ``linspace`` grids, whose steps shrink uniformly, and past the few-step regime where the 2M
    extrapolation's error has not yet settled to its asymptotic form."""
    x_T = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    den = GaussianDenoiser(schedule, 0.5)

    def errors(sampler):
        grids = [make_timesteps(1000, n, "linspace") for n in (40, 80, 160)]
        exact = gaussian_ode_solution(schedule, 0.5, x_T, grids[0])  # all grids run from 999 to 0
        return [_rel_err(sampler(den, schedule, x_T, ts, clip_x0=False), exact) for ts in grids]

    dpm, ddim = errors(dpmpp2m_sample), errors(ddim_sample)
    assert dpm[1] < dpm[0] / 3 and dpm[2] < dpm[1] / 3, dpm
    assert not ddim[1] < ddim[0] / 3 and ddim[1] < ddim[0] / 1.5, ddim


def test_dpmpp2m_first_step_is_ddim(schedule):
    """With two timesteps there is no previous prediction to extrapolate from: one DDIM step, then x_0."""
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    for ts in ([999, 500], [600, 20], [5, 0]):
        for clip in (False, True):
            ddim = ddim_sample(wobbly_denoiser, schedule, x_T, torch.tensor(ts), clip_x0=clip)
            dpm = dpmpp2m_sample(wobbly_denoiser, schedule, x_T, torch.tensor(ts), clip_x0=clip)
            assert torch.allclose(dpm, ddim, rtol=1e-5, atol=1e-5), (ts, clip)


def test_dpmpp2m_is_registered_deterministic_and_finite(schedule):
    assert get_sampler("dpmpp2m") is dpmpp2m_sample
    x_T = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    ts = make_timesteps(1000, 8)
    generators = (None, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    runs = [dpmpp2m_sample(wobbly_denoiser, schedule, x_T, ts, g) for g in generators]
    assert runs[0].dtype == torch.float32 and torch.isfinite(runs[0]).all()
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    # Every schedule, including the sigmoid one whose alpha-bar reaches ~1e-7 at t=T-1 (lambda ~ -8).
    for kind in ("cosine", "sigmoid"):
        out = dpmpp2m_sample(wobbly_denoiser, NoiseSchedule(kind, 1000), x_T, ts, clip_x0=False)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", [ddim_sample, dpmpp2m_sample])
def test_bad_timesteps(schedule, sampler):
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ConfigError, match="strictly decreasing"):
        sampler(wobbly_denoiser, schedule, x, torch.tensor([10, 20]))
    with pytest.raises(ConfigError, match=r"\[0, 999\]"):
        sampler(wobbly_denoiser, schedule, x, torch.tensor([1000, 20]))
    with pytest.raises(ConfigError, match="empty"):
        sampler(wobbly_denoiser, schedule, x, torch.tensor([], dtype=torch.long))


# --- slerp and interpolation ------------------------------------------------------------------------


def _bits(x):
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize("shape", [(1, 1, 6, 6), (1, 6, 6), (3, 4, 5)])
def test_slerp_endpoints_are_exact(shape):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    # The formula alone is not bit-exact: 1.0 * -0.0 + 0.0 * 1.0 is +0.0.
    a.view(-1)[0], b.view(-1)[0], a.view(-1)[-1], b.view(-1)[-1] = -0.0, 1.0, 1.0, -0.0
    out = slerp(a, b, [0.0, 0.25, 0.5, 1.0])
    sample = shape[1:] if len(shape) == 4 else shape
    assert out.shape == (4, *sample)
    assert torch.equal(_bits(out[0]), _bits(a.reshape(sample)))
    assert torch.equal(_bits(out[-1]), _bits(b.reshape(sample)))
    assert slerp(a, b, torch.linspace(0, 1, 3)).shape == (3, *sample)


def test_slerp_follows_the_great_circle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    h = math.sqrt(0.5)
    assert torch.allclose(slerp(a, b, [0.5]), torch.tensor([[h, h]]))
    out = slerp(a, b, [1 / 3])
    assert torch.allclose(out, torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]]))


def test_slerp_keeps_the_norm_of_gaussian_noise():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 1, 28, 28, generator=g), torch.randn(1, 1, 28, 28, generator=g)
    weights = torch.linspace(0, 1, 9)
    norms = slerp(a, b, weights).flatten(1).norm(dim=1)
    ends = torch.stack([a.norm(), b.norm()])
    assert ((norms - ends.mean()).abs() < 0.02 * ends.mean()).all(), norms
    # lerp, the control: its midpoint shrinks by about 1/sqrt(2), far outside the Gaussian shell.
    assert (0.5 * (a + b)).norm() < 0.75 * ends.mean()


def test_slerp_falls_back_to_lerp_without_an_angle():
    a = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    zero = torch.zeros_like(a)
    for b, mid in ((a.clone(), a[0]), (2 * a, 1.5 * a[0]), (-a, zero[0]), (zero, 0.5 * a[0])):
        out = slerp(a, b, [0.0, 0.5, 1.0])
        assert torch.isfinite(out).all() and torch.allclose(out[1], mid, atol=1e-6)


def test_slerp_rejects_batches_and_mismatched_shapes():
    with pytest.raises(ConfigError, match="single samples"):
        slerp(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), [0.5])
    with pytest.raises(ConfigError, match="same shape"):
        slerp(torch.randn(1, 4, 4), torch.randn(1, 4, 5), [0.5])


def _conv_denoiser():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 1, 3, padding=1))
    return lambda x, t: net(x) * (1 + t.view(-1, 1, 1, 1) / 1000)


def _strip(num, sampler):
    """`sample --interpolate`'s noises for a 1x8x8 model, from seed 4."""
    model = DiffusionModel(UNet(base_channels=8, channel_mults=(1,), num_res_blocks=1, attention_resolutions=[],
                                num_heads=1, in_channels=1, image_size=8))
    return interpolation_noise(model, num, sampler.__name__.removesuffix("_sample"), 0.0, 4, None)[0]


@pytest.mark.parametrize("sampler", [ddim_sample, dpmpp2m_sample])
def test_interpolate_ends_on_the_endpoint_samples(schedule, sampler):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(1, 1, 8, 8, generator=g), torch.randn(1, 1, 8, 8, generator=g)
    ts = make_timesteps(1000, 10)
    # An elementwise denoiser does the same arithmetic whatever the batch: the ends match bit for bit.
    out = sampler(wobbly_denoiser, schedule, _strip(5, sampler), ts)
    assert out.shape == (5, 1, 8, 8) and torch.isfinite(out).all()
    assert torch.equal(out[0], sampler(wobbly_denoiser, schedule, a, ts)[0])
    assert torch.equal(out[-1], sampler(wobbly_denoiser, schedule, b, ts)[0])
    assert not torch.allclose(out[2], out[0]) and not torch.allclose(out[2], out[-1])
    # A convolution may pick another kernel for another batch size: equal up to float rounding.
    den = _conv_denoiser()
    with torch.no_grad():
        out = sampler(den, schedule, _strip(4, sampler), ts, clip_x0=False)
        assert out.shape == (4, 1, 8, 8)
        assert (out[0] - sampler(den, schedule, a, ts, clip_x0=False)[0]).abs().max() <= 1e-4 * out[0].abs().max()  # |x| ~3e3: relative, ~3e-7 seen
        assert (out[-1] - sampler(den, schedule, b, ts, clip_x0=False)[0]).abs().max() <= 1e-4 * out[-1].abs().max()


def test_interpolate_needs_both_endpoints(schedule):
    with pytest.raises(ConfigError, match="at least 2 images"):
        _strip(1, ddim_sample)


class VEGaussianDenoiser:
    """The exact eps-predictor for data ~ N(0, std^2 I) at fractional timesteps too (alpha_bar from the schedule's
    interpolated sigma, as the Karras-grid samplers read it)."""

    def __init__(self, schedule: NoiseSchedule, std: float) -> None:
        self.s, self.std, self.calls = schedule, std, 0

    def __call__(self, x, t):
        self.calls += 1
        sigma = self.s.sigma_at(t.float()).view(-1, *[1] * (x.ndim - 1)).double()
        ab = 1 / (1 + sigma**2)
        return ((1 - ab).sqrt() * x / (ab * self.std**2 + 1 - ab)).float()


def test_edm_sde_without_churn_and_restart_without_restarts_are_heun(schedule):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ts = SAMPLERS["heun"].timesteps(schedule, 12)
    heun = SAMPLERS["heun"](wobbly_denoiser, schedule, x, ts)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(SAMPLERS["edm_sde"](wobbly_denoiser, schedule, x, ts, g, s_churn=0), heun)
    assert torch.equal(SAMPLERS["restart"](wobbly_denoiser, schedule, x, ts, g, restart=(3, 0, 0.06, 0.3)), heun)
    churned = SAMPLERS["edm_sde"](wobbly_denoiser, schedule, x, ts, torch.Generator().manual_seed(0))
    again = SAMPLERS["edm_sde"](wobbly_denoiser, schedule, x, ts, torch.Generator().manual_seed(0))
    assert torch.equal(churned, again) and not torch.equal(churned, heun)  # seeded, and noise was added


@pytest.mark.parametrize("name, steps, calls", [("edm_sde", 18, 35), ("restart", 18, 47), ("restart", 40, 91)])
def test_network_calls_of_the_stochastic_samplers(schedule, name, steps, calls):
    record = SAMPLERS[name]
    den = VEGaussianDenoiser(schedule, 0.5)
    record(den, schedule, torch.randn(2, 1, 2, 2), record.timesteps(schedule, steps), torch.Generator().manual_seed(0))
    assert den.calls == record.network_calls(steps) == calls
    assert not record.deterministic()


@pytest.mark.parametrize("name", ["edm_sde", "restart"])
def test_stochastic_samplers_keep_gaussian_marginals(schedule, name):
    """With the exact denoiser and s_noise = 1, the added noise keeps x's marginal exact (EDM's churn raises
    N(0, std^2 + sigma^2) to N(0, std^2 + sigma_hat^2); Restart's forward jump is q's), so with many steps the
    samples have the data's std."""
    x_T = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    record = SAMPLERS[name]
    out = record(VEGaussianDenoiser(schedule, 0.5), schedule, x_T, record.timesteps(schedule, 200),
                 torch.Generator().manual_seed(4), clip_x0=False, s_noise=1.0)
    assert out.mean().abs().item() < 0.02
    assert out.std().item() == pytest.approx(0.5, rel=0.03)


def test_restart_contracts_the_ode_error_and_churn_at_few_steps_does_not(schedule):
    """On Gaussian data at 18 steps, Heun's ODE error shows in the samples' std (too large); Restart's noise
    contracts it (the paper's claim), EDM's churn at so few steps adds error (its Figure 4: the SDE needs more)."""
    x_T = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(3))

    def std_error(name, **kw):
        record = SAMPLERS[name]
        out = record(VEGaussianDenoiser(schedule, 0.5), schedule, x_T, record.timesteps(schedule, 18),
                     torch.Generator().manual_seed(4), clip_x0=False, **kw)
        return abs(out.std().item() - 0.5)

    heun = std_error("heun")
    assert std_error("restart", s_noise=1.0) < 0.8 * heun
    assert std_error("edm_sde", s_noise=1.0) > heun


def test_stochastic_sampler_options_are_checked(schedule):
    x, ts = torch.randn(1, 1, 2, 2), SAMPLERS["heun"].timesteps(schedule, 4)
    with pytest.raises(ConfigError, match="s_churn must be"):
        SAMPLERS["edm_sde"](wobbly_denoiser, schedule, x, ts, s_churn=-1)
    with pytest.raises(ConfigError, match="restart must be"):
        SAMPLERS["restart"](wobbly_denoiser, schedule, x, ts, restart=(3, 2, 0.3, 0.06))


def test_ddpm_small_and_large_name_the_two_variances(schedule):
    """``ddpm_small`` / ``ddpm_large`` are DDPM with beta-tilde / beta_t, by name in a sampler list or a config."""
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    ts = SAMPLERS["ddpm"].timesteps(schedule, 1000)

    def run(fn, **kw):
        return fn(wobbly_denoiser, schedule, x, ts, torch.Generator().manual_seed(5), **kw)

    assert torch.equal(run(SAMPLERS["ddpm_large"]), run(ddpm_sample, variance="beta"))
    assert torch.equal(run(get_sampler("ddpm_large")), run(ddpm_sample, variance="beta"))
    assert torch.equal(run(SAMPLERS["ddpm_small"]), run(ddpm_sample, variance="posterior"))
    assert not torch.equal(run(SAMPLERS["ddpm_large"]), run(SAMPLERS["ddpm_small"]))
    spec = SamplerSpec.parse("ddpm_large1000")
    assert (spec.name, spec.steps, spec.sampler.network_calls(1000)) == ("ddpm_large", 1000, 1000)
    with pytest.raises(ConfigError, match="ddpm takes all"):
        parse_samplers(["ddpm_large50"], 1000)


def test_the_sampling_group_sets_the_stochastic_samplers_and_their_network_calls():
    """``sampling.s_churn`` etc. reach the sampler wherever the model samples, and the calls follow ``restart``."""
    from diffusion.samplers import SamplingDefaults

    net = UNet(base_channels=8, channel_mults=(1,), num_res_blocks=1, attention_resolutions=[], num_heads=1, image_size=8)
    heun = DiffusionModel(net, sampling=SamplingDefaults(sampler="heun", steps=6)).sample(2, seed=3)
    no_churn = DiffusionModel(net, sampling=SamplingDefaults(sampler="edm_sde", steps=6, s_churn=0.0))
    assert torch.equal(no_churn.sample(2, seed=3), heun)
    churned = DiffusionModel(net, sampling=SamplingDefaults(sampler="edm_sde", steps=6))
    assert not torch.equal(churned.sample(2, seed=3), heun)
    # An option given to sample still wins over the group's.
    assert torch.equal(churned.sample(2, seed=3, s_churn=0.0), heun)
    none = DiffusionModel(net, sampling=SamplingDefaults(sampler="restart", steps=6, restart=[2, 0, 0.06, 0.3]))
    assert torch.equal(none.sample(2, seed=3), heun)
    assert none.network_calls() == 11
    four = DiffusionModel(net, sampling=SamplingDefaults(sampler="restart", steps=6, restart=[2, 4, 0.06, 0.3]))
    assert four.network_calls() == 11 + 2 * 2 * 4 and four.network_calls("restart", 18) == 35 + 16
    assert DiffusionModel(net).network_calls("restart", 18) == 47
    with pytest.raises(ConfigError, match=r"restart must be .*\[3, 2, 0.06, 0.3\]"):
        SamplingDefaults(restart=[3, 2, 0.3, 0.06])
    with pytest.raises(ConfigError, match="s_noise"):
        SamplingDefaults(s_noise=0.0)
