import pytest
import torch

from diffusion.errors import ConfigError
from diffusion.samplers import SAMPLERS, ddim_sample, ddpm_sample, get_sampler, make_timesteps
from diffusion.schedule import NoiseSchedule


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
    assert torch.allclose(ddpm, ddim, atol=1e-4), (ddpm - ddim).abs().max()


@pytest.mark.parametrize("name, steps", [("ddpm", 1000), ("ddim", 50), ("ddim", 10)])
def test_samplers_recover_a_point_mass(schedule, name, steps):
    target = torch.rand(1, 1, 5, 5) * 1.6 - 0.8
    x_T = torch.randn(4, 1, 5, 5)
    out = get_sampler(name)(PointDenoiser(schedule, target), schedule, x_T, make_timesteps(1000, steps), torch.Generator().manual_seed(0))
    assert torch.allclose(out, target.expand_as(out), atol=1e-3)


@pytest.mark.parametrize("name, steps, kw", [("ddpm", 1000, {}), ("ddim", 1000, {}), ("ddim", 1000, {"eta": 0.5})])
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


def test_clipping_keeps_predicted_x0_in_range(schedule):
    seen = []

    def wild(x, t):
        return -10 * torch.ones_like(x)  # implies x0 far outside [-1, 1]

    out = ddim_sample(wild, schedule, torch.randn(2, 1, 3, 3), make_timesteps(1000, 5), None, clip_x0=True)
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
    assert set(SAMPLERS) == {"ddpm", "ddim"}
