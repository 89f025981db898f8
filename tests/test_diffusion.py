"""Diffusion math: schedule, parameterisations, loss weightings, samplers with an oracle model."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semantica_jax import diffusion as D


def test_alpha_sigma_unit_norm():
    logsnr = jnp.linspace(-20, 20, 101)
    a, s = D.alpha_sigma(logsnr)
    np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(np.log(a**2 / s**2), logsnr, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_logsnr_monotone_and_endpoints(size):
    t = jnp.linspace(0, 1, 1001)
    lam = D.logsnr_schedule(t, kind="cosine_shifted", image_size=size, base_resolution=64)
    assert np.all(np.diff(np.asarray(lam)) < 0), "logsnr must decrease in t"
    shift = 2 * math.log(64 / size)
    np.testing.assert_allclose(lam[0], 15.0 + shift, atol=1e-3)
    np.testing.assert_allclose(lam[-1], -15.0 + shift, atol=1e-3)
    # The unshifted cosine passes through 0 at t = 1/2.
    mid = D.logsnr_schedule(0.5, kind="cosine", logsnr_min=-15, logsnr_max=15)
    np.testing.assert_allclose(mid, 0.0, atol=1e-5)
    mid_shifted = D.logsnr_schedule(0.5, kind="cosine_shifted", image_size=size)
    np.testing.assert_allclose(mid_shifted, shift, atol=1e-5)


def test_schedule_rejects_bad_kind():
    with pytest.raises(ValueError, match="diffusion.schedule"):
        D.logsnr_schedule(0.5, kind="linear")


def test_parameterisations_invert():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.uniform(k1, (4, 8, 8, 3), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x.shape)
    logsnr = jax.random.uniform(k3, (4,), minval=-8, maxval=8)
    z = D.diffuse(x, eps, logsnr)
    v = D.v_from_x_eps(x, eps, logsnr)
    np.testing.assert_allclose(D.x_from_z_v(z, v, logsnr), x, atol=1e-5)
    np.testing.assert_allclose(D.eps_from_z_v(z, v, logsnr), eps, atol=1e-5)
    np.testing.assert_allclose(D.x_from_z_eps(z, eps, logsnr), x, atol=1e-4)
    np.testing.assert_allclose(D.eps_from_z_x(z, x, logsnr), eps, atol=1e-4)
    for pred, out in (("v", v), ("eps", eps), ("x", x)):
        xh, eh = D.to_x_eps(out, z, logsnr, pred)
        np.testing.assert_allclose(xh, x, atol=1e-4)
        np.testing.assert_allclose(eh, eps, atol=1e-4)


@pytest.mark.parametrize("weighting", D.LOSS_WEIGHTINGS)
def test_loss_zero_for_exact_prediction_and_weightings_relate(weighting):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.uniform(k1, (3, 4, 4, 3), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x.shape)
    logsnr = jnp.array([-3.0, 0.0, 3.0])
    z = D.diffuse(x, eps, logsnr)
    v = D.v_from_x_eps(x, eps, logsnr)
    exact = D.loss_per_example(v, x, eps, z, logsnr, prediction="v", weighting=weighting)
    np.testing.assert_allclose(exact, 0.0, atol=1e-8)
    # A wrong prediction: the weightings relate to the x-space error by known factors.
    wrong = v + 0.1
    lx = D.loss_per_example(wrong, x, eps, z, logsnr, prediction="v", weighting="x")
    lw = D.loss_per_example(wrong, x, eps, z, logsnr, prediction="v", weighting=weighting)
    snr = np.exp(np.asarray(logsnr))
    factor = {"x": 1.0, "v": 1.0 + snr, "eps": snr,
              "sigmoid": snr / (1.0 + np.exp(-(-3.0 - np.asarray(logsnr))))}[weighting]
    np.testing.assert_allclose(lw, lx * factor, rtol=1e-4)


def _oracle(x_data, prediction):
    """A model that knows the data: returns the exact output for any z at any logsnr."""

    def model_fn(z, logsnr, cond_mask):
        del cond_mask
        xd = jnp.concatenate([x_data] * (z.shape[0] // x_data.shape[0]))
        eps = D.eps_from_z_x(z, xd, logsnr)
        return {"x": xd, "eps": eps, "v": D.v_from_x_eps(xd, eps, logsnr)}[prediction]

    return model_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_sampler_with_exact_model_returns_data(sampler, prediction):
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 8, 8, 3), minval=-0.9, maxval=0.9)
    sched = lambda t: D.logsnr_schedule(t, kind="cosine_shifted", image_size=8)
    out = jax.jit(
        lambda rng: D.sample(
            _oracle(x, prediction), rng, x.shape, schedule_fn=sched, prediction=prediction,
            num_steps=16, sampler=sampler, guidance_scale=2.0,
        )
    )(jax.random.PRNGKey(3))
    np.testing.assert_allclose(out, x, atol=2e-3)


def test_ddpm_posterior_matches_forward_marginal():
    """Ancestral steps with the true x keep z_s distributed as q(z_s | x) (mean and variance)."""
    sched = lambda t: D.logsnr_schedule(t, kind="cosine")
    t, s = 0.7, 0.4
    lt, ls = sched(t), sched(s)
    at, st = D.alpha_sigma(lt)
    as_, ss = D.alpha_sigma(ls)
    r = jnp.exp(lt - ls)
    # z_t = at x + st e1; z_s = r (as/at) z_t + (1-r) as x + sqrt((1-r)) ss e2
    coef_x = r * (as_ / at) * at + (1 - r) * as_
    var = (r * (as_ / at) * st) ** 2 + (1 - r) * ss**2
    np.testing.assert_allclose(coef_x, as_, rtol=1e-5)
    np.testing.assert_allclose(var, ss**2, rtol=1e-5)


def test_guidance_combines_and_respects_interval():
    calls = []

    def model_fn(z, logsnr, mask):
        calls.append(z.shape[0])
        return jnp.where(mask[:, None], 1.0, 0.0) * jnp.ones_like(z)

    z = jnp.zeros((3, 2))
    lam = jnp.zeros((3,))
    out = D.guided_output(model_fn, z, lam, jnp.float32(0.5), guidance_scale=3.0)
    np.testing.assert_allclose(out, 3.0)  # 0 + 3 * (1 - 0)
    out = D.guided_output(model_fn, z, lam, jnp.float32(0.9), guidance_scale=3.0,
                          guidance_interval=(0.0, 0.5))
    np.testing.assert_allclose(out, 1.0)  # outside the interval: conditional output
    calls.clear()
    D.guided_output(model_fn, z, lam, jnp.float32(0.5), guidance_scale=1.0)
    assert calls == [3], "scale 1.0 must run the conditional pass only"


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_tied_channels_diffuse_grey_images_as_grey(sampler):
    """tie_channels: one noise draw for all channels; an exact model returns the (grey) data, and
    a model that knows nothing still produces exactly grey samples."""
    key = jax.random.PRNGKey(3)
    n = D.noise(key, (2, 4, 4, 3), tie_channels=True)
    np.testing.assert_array_equal(n[..., 0], n[..., 2])
    assert float(jnp.std(n[..., 0])) > 0.5
    assert not np.allclose(D.noise(key, (2, 4, 4, 3))[..., 0], D.noise(key, (2, 4, 4, 3))[..., 1])
    grey = jax.random.uniform(jax.random.PRNGKey(4), (2, 8, 8, 1), minval=-0.9, maxval=0.9)
    x = jnp.repeat(grey, 3, axis=-1)
    sched = lambda t: D.logsnr_schedule(t, kind="cosine", image_size=8)
    common = dict(schedule_fn=sched, prediction="v", num_steps=16, sampler=sampler, tie_channels=True,
                  example_keys=jax.random.split(jax.random.PRNGKey(5), 2))
    out = D.sample(_oracle(x, "v"), None, x.shape, **common)
    np.testing.assert_allclose(out, x, atol=1e-4)
    rgb_model = lambda z, logsnr, cond_mask: z * jnp.array([0.3, -0.2, 0.5])  # channels disagree
    out = D.sample(rgb_model, None, x.shape, **common)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
