"""Tests for dit_jax.diffusion: official-parity checks plus behavioural properties."""

from __future__ import annotations

import functools
import math
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import diffusion as gd
from dit_jax.parity import nhwc
from dit_jax.diffusion import (
    approx_standard_normal_cdf,
    create_diffusion,
    ddim_sample,
    ddim_sample_loop,
    discretized_gaussian_log_likelihood,
    get_beta_schedule,
    mean_flat,
    normal_kl,
    p_mean_variance,
    p_sample,
    p_sample_loop,
    q_posterior_mean_variance,
    q_sample,
    space_timesteps,
    training_losses,
)

SHAPE = (2, 8, 8, 4)  # NHWC


@pytest.fixture(scope="module")
def ref(reference):
    return reference.arrays


def chain_t(d, i: int, n: int = SHAPE[0]) -> jnp.ndarray:
    return jnp.full((n,), i, dtype=jnp.int32)


def data_point(seed: int = 0) -> jnp.ndarray:
    return jax.random.uniform(jax.random.PRNGKey(seed), SHAPE, minval=-1.0, maxval=1.0)


def oracle_model(x0: jnp.ndarray, learn_sigma: bool = True, var_value: float = 0.0):
    """Exact eps for data concentrated at x0; uses the ORIGINAL 1000-step alpha_bar."""
    abar = jnp.asarray(np.cumprod(1.0 - get_beta_schedule("linear", 1000)), dtype=jnp.float32)

    def model_fn(x, t_orig):
        a = abar[t_orig][:, None, None, None]
        eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
        if not learn_sigma:
            return eps
        return jnp.concatenate([eps, jnp.full_like(eps, var_value)], axis=-1)

    return model_fn


def constant_model(output: jnp.ndarray):
    """A model that ignores its inputs (for feeding chosen outputs to the losses)."""

    def model_fn(x, t_orig):
        return output

    return model_fn


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("respacing", ["250", "ddim10", "10", "25"])
def test_respacing_matches_official(ref, respacing):
    d = create_diffusion(respacing)
    np.testing.assert_array_equal(
        np.asarray(d.timestep_map), ref[f"respace/{respacing}/timestep_map"]
    )
    np.testing.assert_array_equal(
        np.asarray(d.betas), ref[f"respace/{respacing}/betas"].astype(np.float32)
    )
    assert d.timestep_map.dtype == jnp.int32 and d.betas.dtype == jnp.float32


def test_q_sample_matches_official(ref):
    d = create_diffusion("")
    x_t = q_sample(
        d, nhwc(ref["loss/x_start"]), jnp.asarray(ref["loss/t"], jnp.int32), nhwc(ref["loss/noise"])
    )
    np.testing.assert_allclose(
        np.asarray(x_t), np.asarray(nhwc(ref["loss/x_t"])), rtol=0, atol=1e-6
    )


def test_p_mean_variance_and_p_sample_match_official(ref):
    """Feed back the model output implied by the official pmv results (10-step chain)."""
    d = create_diffusion("10")
    x = nhwc(ref["pmv/x_t"])
    t = jnp.asarray(ref["pmv/t"], jnp.int32)
    pred_xstart = nhwc(ref["pmv/pred_xstart"])
    idx = np.asarray(t)

    def bc(table):
        return jnp.asarray(table)[idx][:, None, None, None]

    eps = (bc(d.sqrt_recip_alphas_cumprod) * x - pred_xstart) / bc(d.sqrt_recipm1_alphas_cumprod)
    lo, hi = bc(d.posterior_log_variance_clipped), bc(d.log_betas)
    var_values = 2 * (nhwc(ref["pmv/log_variance"]) - lo) / (hi - lo) - 1
    seen = []

    def model_fn(x_in, t_orig):
        seen.append(np.asarray(t_orig))
        return jnp.concatenate([eps, var_values], axis=-1)

    out = p_mean_variance(d, model_fn, x, t)
    np.testing.assert_array_equal(seen[0], np.asarray(d.timestep_map)[idx])
    for key, atol in [("mean", 1e-5), ("variance", 1e-6), ("log_variance", 1e-5)]:
        np.testing.assert_allclose(
            np.asarray(out[key]), np.asarray(nhwc(ref[f"pmv/{key}"])), rtol=0, atol=atol
        )
    np.testing.assert_allclose(
        np.asarray(out["pred_xstart"]), np.asarray(pred_xstart), rtol=1e-6, atol=1e-5
    )
    sample = p_sample(d, model_fn, x, t, nhwc(ref["psample/noise"]))["sample"]
    np.testing.assert_allclose(
        np.asarray(sample), np.asarray(nhwc(ref["psample/sample"])), rtol=0, atol=1e-5
    )


# ------------------------------------------------------------------ schedules, respacing


def test_linear_schedule_endpoints_and_scaling():
    b = get_beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b250 = get_beta_schedule("linear", 250)
    assert b250[0] == pytest.approx(4e-4) and b250[-1] == pytest.approx(0.08)


def test_cosine_schedule_against_closed_form():
    T = 1000
    b = get_beta_schedule("cosine", T)
    np.testing.assert_array_equal(b, get_beta_schedule("squaredcos_cap_v2", T))
    assert b.dtype == np.float64 and b.shape == (T,)
    assert np.all(b > 0) and np.all(b <= 0.999) and np.all(np.diff(b) >= 0)
    assert b[-1] == 0.999  # the cap bites on the last step, where alpha_bar(1) = 0

    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    for i in (0, 137, 500, 900):
        expected = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T)
        assert b[i] == pytest.approx(expected, rel=1e-12)
    # Below the cap, the cumulative product telescopes back to alpha_bar(k / T) / alpha_bar(0).
    k = 700
    assert np.prod(1 - b[:k]) == pytest.approx(alpha_bar(k / T) / alpha_bar(0), rel=1e-10)
    d = create_diffusion("", noise_schedule="cosine")
    np.testing.assert_allclose(np.asarray(d.betas), b.astype(np.float32), rtol=1e-5)


def test_unknown_schedule_names_the_options():
    with pytest.raises(ValueError, match="linear") as err:
        get_beta_schedule("quadratic", 1000)
    assert "cosine" in str(err.value) and "quadratic" in str(err.value)


def test_space_timesteps_examples():
    assert space_timesteps(1000, "") == list(range(1000))
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim7") == list(range(0, 1000, 143))
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(6, "3") == [0, 2, 5]  # Python round(2.5) == 2, as officially
    assert space_timesteps(7, "3,3") == [0, 2, 3, 4, 5, 6]  # first section gets the remainder
    steps = space_timesteps(300, "25,10,5")
    assert len(steps) == 40 and steps == sorted(steps)
    assert [s for s in steps if s < 100][-1] == 99 and {0, 100, 199, 200, 299} <= set(steps)
    assert sum(100 <= s < 200 for s in steps) == 10 and sum(s >= 200 for s in steps) == 5


@pytest.mark.parametrize(
    "bad, why",
    [
        ("abc", "comma-separated positive integers"),
        ("10,abc", "comma-separated positive integers"),
        ("ddim", "positive integer N"),
        ("ddim0", "positive integer N"),
        ("ddim-3", "positive integer N"),
        ("ddim37", "no integer stride"),
        ("ddim1001", "no integer stride"),
        ("0", "must be positive"),
        ("-5", "must be positive"),
        ("10,0", "must be positive"),
        ("1001", "cannot hold 1001"),
        ("600,600", "cannot hold 600"),
    ],
)
def test_space_timesteps_rejects_bad_strings(bad, why):
    with pytest.raises(ValueError, match=re.escape(why)) as err:
        space_timesteps(1000, bad)
    assert repr(bad) in str(err.value)


def test_create_diffusion_identity_map_and_short_chain_error():
    d = create_diffusion("")
    assert d.num_timesteps == 1000 and d.learn_sigma and not d.sigma_small
    np.testing.assert_array_equal(np.asarray(d.timestep_map), np.arange(1000))
    np.testing.assert_allclose(np.asarray(d.betas), get_beta_schedule("linear", 1000), rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2 steps"):
        create_diffusion("1")


# ------------------------------------------------------------------------- sampling


def test_p_sample_noise_only_where_t_nonzero():
    d = create_diffusion("50")
    x = data_point(1)
    noise = jax.random.normal(jax.random.PRNGKey(2), SHAPE)
    t = jnp.array([0, 17], jnp.int32)

    def model_fn(x_in, t_orig):
        return 0.3 * jnp.concatenate([x_in, -x_in], axis=-1)

    out = p_mean_variance(d, model_fn, x, t)
    sample = p_sample(d, model_fn, x, t, noise)["sample"]
    np.testing.assert_array_equal(np.asarray(sample[0]), np.asarray(out["mean"][0]))
    expected = out["mean"][1] + jnp.exp(0.5 * out["log_variance"][1]) * noise[1]
    np.testing.assert_allclose(np.asarray(sample[1]), np.asarray(expected), rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(sample[1] - out["mean"][1]).max()) > 1e-2


@pytest.mark.parametrize("respacing", ["ddim25", "10"])
def test_ddim_oracle_recovers_data_point(respacing):
    d = create_diffusion(respacing)
    x0 = data_point(3)
    noise = jax.random.normal(jax.random.PRNGKey(4), SHAPE)
    sample = jax.jit(
        lambda d_, n: ddim_sample_loop(d_, oracle_model(x0), n, jax.random.PRNGKey(0))
    )(d, noise)
    np.testing.assert_allclose(np.asarray(sample), np.asarray(x0), rtol=0, atol=1e-4)


def test_p_sample_loop_oracle_recovers_data_point():
    d = create_diffusion("50")
    x0 = data_point(5)
    noise = jax.random.normal(jax.random.PRNGKey(6), SHAPE)
    sample = jax.jit(lambda d_, n: p_sample_loop(d_, oracle_model(x0), n, jax.random.PRNGKey(1)))(
        d, noise
    )
    np.testing.assert_allclose(np.asarray(sample), np.asarray(x0), rtol=0, atol=1e-3)


@pytest.mark.parametrize("i", [1, 13, 49])
def test_oracle_posterior_matches_model_mean_on_respaced_chain(i):
    """Needs the model to see timestep_map[t]: with raw chain indices x_0 would be wrong."""
    d = create_diffusion("50")
    x0 = data_point(7)
    t = chain_t(d, i)
    x_t = q_sample(d, x0, t, jax.random.normal(jax.random.PRNGKey(8), SHAPE))
    out = p_mean_variance(d, oracle_model(x0, var_value=-1.0), x_t, t)
    mean, variance, log_variance = q_posterior_mean_variance(d, x0, x_t, t)
    np.testing.assert_allclose(np.asarray(out["pred_xstart"]), np.asarray(x0), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["mean"]), np.asarray(mean), atol=1e-4)
    # var_value = -1 selects the lower end of the learned range: the clipped posterior.
    np.testing.assert_allclose(np.asarray(out["log_variance"]), np.asarray(log_variance), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["variance"]), np.asarray(variance), rtol=1e-5)
    ddim = ddim_sample(d, oracle_model(x0), x_t, t, jnp.zeros(SHAPE))
    np.testing.assert_allclose(np.asarray(ddim["pred_xstart"]), np.asarray(x0), atol=1e-4)


def test_loops_equal_python_loop_of_single_steps():
    """The scan walks t = T-1 .. 0 and draws step noise from fold_in(key, t)."""
    d = create_diffusion("5")
    key = jax.random.PRNGKey(9)
    noise = jax.random.normal(jax.random.PRNGKey(10), SHAPE)

    oracle = oracle_model(data_point(15), var_value=0.0)

    def model_fn(x, t_orig):  # an imperfect, t-dependent model with non-trivial variance values
        out = oracle(x, t_orig)
        wobble = 0.05 * jnp.sin(x) * (t_orig.astype(jnp.float32) / 1000.0)[:, None, None, None]
        return jnp.concatenate([out[..., :4] + wobble, 0.5 * jnp.sin(3.0 * x)], axis=-1)

    p_step = jax.jit(lambda x, t, n: p_sample(d, model_fn, x, t, n)["sample"])
    ddim_step = jax.jit(lambda x, t, n: ddim_sample(d, model_fn, x, t, n, eta=0.5)["sample"])
    x_p, x_d = noise, noise
    for i in reversed(range(d.num_timesteps)):
        step_noise = jax.random.normal(jax.random.fold_in(key, i), SHAPE)
        x_p = p_step(x_p, chain_t(d, i), step_noise)
        x_d = ddim_step(x_d, chain_t(d, i), step_noise)
    np.testing.assert_allclose(
        np.asarray(p_sample_loop(d, model_fn, noise, key)), np.asarray(x_p), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(ddim_sample_loop(d, model_fn, noise, key, eta=0.5)), np.asarray(x_d), atol=1e-5
    )
    zero_model = constant_model(jnp.zeros(SHAPE[:-1] + (8,)))
    a, b = (p_sample_loop(d, zero_model, noise, jax.random.PRNGKey(k)) for k in (11, 12))
    assert float(jnp.abs(a - b).max()) > 1e-2  # the key drives the per-step noise


def _count_primitives(jaxpr) -> Counter:
    counts: Counter = Counter()
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    counts += _count_primitives(sub)
    return counts


@pytest.mark.parametrize("loop", [p_sample_loop, ddim_sample_loop])
def test_loop_is_one_compiled_scan(loop):
    d = create_diffusion("250")

    def model_fn(x, t_orig):
        return jnp.concatenate([jnp.sin(x), jnp.zeros_like(x)], axis=-1)

    fn = jax.jit(lambda d_, n, k: loop(d_, model_fn, n, k))
    counts = _count_primitives(jax.make_jaxpr(fn)(d, jnp.zeros(SHAPE), jax.random.PRNGKey(0)).jaxpr)
    assert counts["scan"] + counts["while"] == 1, counts
    assert counts["sin"] == 1, counts  # the model body is traced once, not 250 times


# ------------------------------------------------------------------------------ losses


def test_approx_cdf_and_discretized_likelihood():
    x = jnp.linspace(-5.0, 5.0, 101)
    np.testing.assert_allclose(
        np.asarray(approx_standard_normal_cdf(x)),
        np.asarray(jax.scipy.stats.norm.cdf(x)),
        atol=5e-4,
    )
    # Over all 256 bins (edge bins open-ended) the probabilities sum to one.
    bins = jnp.linspace(-1.0, 1.0, 256)
    for mean, log_scale in [(0.1, -1.0), (-0.7, -3.0), (0.95, -0.2)]:
        logp = discretized_gaussian_log_likelihood(
            bins, means=jnp.full_like(bins, mean), log_scales=jnp.full_like(bins, log_scale)
        )
        assert float(jnp.exp(logp).sum()) == pytest.approx(1.0, abs=1e-4)
    # A very narrow Gaussian on an interior bin puts all its mass there; clamp at 1e-12 elsewhere.
    narrow = discretized_gaussian_log_likelihood(
        jnp.array([0.2, 0.2]), means=jnp.array([0.2, -0.5]), log_scales=jnp.full((2,), -12.0)
    )
    assert float(narrow[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(narrow[1]) == pytest.approx(math.log(1e-12), rel=1e-6)
    with pytest.raises(ValueError, match="shape mismatch"):
        discretized_gaussian_log_likelihood(bins, means=bins[:3], log_scales=bins)


def test_normal_kl_closed_form():
    kl = normal_kl(jnp.array(1.0), jnp.array(math.log(2.0)), 0.0, 0.0)
    assert float(kl) == pytest.approx(0.5 * (2.0 + 1.0 - 1.0 - math.log(2.0)), rel=1e-6)
    assert float(normal_kl(jnp.array(0.3), jnp.array(-1.2), jnp.array(0.3), jnp.array(-1.2))) == 0.0


def _loss_setup(t_values, seed: int = 12):
    d = create_diffusion("")
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x_start = jax.random.uniform(k1, SHAPE, minval=-1.0, maxval=1.0)
    noise = jax.random.normal(k2, SHAPE)
    output = 0.5 * jax.random.normal(k3, SHAPE[:-1] + (2 * SHAPE[-1],))
    return d, x_start, jnp.asarray(t_values, jnp.int32), noise, output


def test_vb_trains_only_variance_and_mse_only_eps():
    d, x_start, t, noise, output = _loss_setup([0, 400])
    C = SHAPE[-1]

    def term(name):
        return jax.grad(
            lambda o: training_losses(d, constant_model(o), x_start, t, noise)[name].sum()
        )(output)

    g_vb, g_mse, g_loss = term("vb"), term("mse"), term("loss")
    assert float(jnp.abs(g_vb[..., :C]).max()) == 0.0
    assert float(jnp.abs(g_vb[..., C:]).max()) > 1e-6
    assert float(jnp.abs(g_mse[..., C:]).max()) == 0.0
    assert float(jnp.abs(g_mse[..., :C]).max()) > 1e-6
    np.testing.assert_allclose(np.asarray(g_loss), np.asarray(g_vb + g_mse), rtol=1e-5, atol=1e-8)


def test_vb_is_decoder_nll_at_t0_and_kl_elsewhere():
    d, x_start, t, noise, output = _loss_setup([0, 400])
    C = SHAPE[-1]
    model_fn = constant_model(output)
    terms = training_losses(d, model_fn, x_start, t, noise)
    x_t = q_sample(d, x_start, t, noise)
    out = p_mean_variance(d, model_fn, x_t, t)
    nll = -mean_flat(
        discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
    ) / math.log(2.0)
    true_mean, _, true_log_var = q_posterior_mean_variance(d, x_start, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(
        2.0
    )
    assert float(terms["vb"][0]) == pytest.approx(float(nll[0]), rel=1e-5)
    assert float(terms["vb"][1]) == pytest.approx(float(kl[1]), rel=1e-5)
    assert float(terms["vb"][1]) > 0.0
    np.testing.assert_allclose(
        np.asarray(terms["mse"]), np.asarray(mean_flat((noise - output[..., :C]) ** 2)), rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(terms["loss"]), np.asarray(terms["mse"] + terms["vb"]), rtol=1e-6
    )


def _official_decoder_log_likelihood(x, means, log_scales):
    """ADM/DiT's ``discretized_gaussian_log_likelihood`` (tanh-approximated CDF, 1e-12 floor), in float64."""
    x, means, log_scales = (np.asarray(a, np.float64) for a in (x, means, log_scales))

    def cdf(v):
        return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * np.power(v, 3))))

    inv_stdv = np.exp(-log_scales)
    cdf_plus = cdf(inv_stdv * (x - means + 1.0 / 255.0))
    cdf_min = cdf(inv_stdv * (x - means - 1.0 / 255.0))
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = np.log(np.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
    return np.where(x < -0.999, log_cdf_plus, np.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _t0_beyond_unit_setup():
    """t = 0, data in [-3, 3] (as SD-VAE latents), eps predictions off by a few posterior stds (NumPy)."""
    rng = np.random.default_rng(3)
    shape = (4, 8, 8, 4)
    x_start = rng.uniform(-3.0, 3.0, shape)
    noise = rng.normal(size=shape)
    eps = noise + np.array([0.3, 1.0, 3.0, 10.0])[:, None, None, None] * rng.normal(size=shape)
    output = np.concatenate([eps, rng.uniform(-1.0, 1.0, shape)], axis=-1)
    return x_start, noise, output


def _vb_and_official_at_t0(d, x_start, noise, output):
    t = jnp.zeros(x_start.shape[0], jnp.int32)
    model_fn = constant_model(output)
    vb = training_losses(d, model_fn, x_start, t, noise)["vb"]
    out = p_mean_variance(d, model_fn, q_sample(d, x_start, t, noise), t)
    return vb, out["mean"], 0.5 * out["log_variance"]


def test_vb_at_t0_matches_the_official_maths_for_data_beyond_unit():
    """The decoder NLL's tails and bin differences, computed stably in float32, equal the official
    formula evaluated in float64 (and our own float64 run); the naive float32 formula is off by %."""
    arrays = _t0_beyond_unit_setup()
    assert (np.abs(arrays[0]) > 1).mean() > 0.5
    d = create_diffusion("")
    x_start, noise, output = (jnp.asarray(a, jnp.float32) for a in arrays)
    vb32, means, log_scales = jax.jit(_vb_and_official_at_t0)(d, x_start, noise, output)
    official = -_official_decoder_log_likelihood(x_start, means, log_scales).mean(axis=(1, 2, 3)) / math.log(2)
    np.testing.assert_allclose(np.asarray(vb32), official, rtol=2e-6)

    with jax.enable_x64(True):
        d64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)) if np.issubdtype(a.dtype, np.floating)
                           else a, d)
        vb64, means64, log_scales64 = jax.jit(_vb_and_official_at_t0)(d64, *(jnp.asarray(a) for a in arrays))
        vb64 = np.asarray(vb64)
        official64 = -_official_decoder_log_likelihood(arrays[0], means64, log_scales64).mean(
            axis=(1, 2, 3)) / math.log(2)
    assert vb64.dtype == np.float64
    # (The oracle's own 1 - cdf cancels in float64 too: ~1e-16 / p relative in a tail of mass p.)
    np.testing.assert_allclose(vb64, official64, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(vb32), vb64, rtol=2e-6)

    # Control: the same maths written naively in float32 (1 - cdf, cdf_plus - cdf_min) is far off.
    centered, inv_stdv = x_start - means, jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1 / 255))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1 / 255))
    naive = jnp.where(x_start < -0.999, jnp.log(jnp.maximum(cdf_plus, 1e-12)),
                      jnp.where(x_start > 0.999, jnp.log(jnp.maximum(1 - cdf_min, 1e-12)),
                                jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))))
    naive_vb = -np.asarray(mean_flat(naive)) / math.log(2)
    assert np.max(np.abs(naive_vb / official - 1)) > 1e-2


def test_vb_is_zero_for_the_true_posterior():
    """eps = noise gives the posterior mean; var value -1 gives the posterior log-variance."""
    d, x_start, t, noise, _ = _loss_setup([1, 400])
    model_fn = constant_model(jnp.concatenate([noise, -jnp.ones_like(noise)], axis=-1))
    terms = training_losses(d, model_fn, x_start, t, noise)
    np.testing.assert_allclose(np.asarray(terms["vb"]), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(terms["mse"]), 0.0, atol=1e-12)


def test_vb_rescaling_is_opt_in():
    d_off = create_diffusion("250")
    d_on = create_diffusion("250", rescale_learned_sigmas=True)
    _, x_start, t, noise, output = _loss_setup([3, 100])
    model_fn = constant_model(output)
    vb_off = training_losses(d_off, model_fn, x_start, t, noise)["vb"]
    vb_on = training_losses(d_on, model_fn, x_start, t, noise)["vb"]
    np.testing.assert_allclose(np.asarray(vb_on), 0.25 * np.asarray(vb_off), rtol=1e-6)


def test_training_losses_under_jit_with_schedule_as_argument():
    d, x_start, t, noise, output = _loss_setup([5, 999])
    eager = training_losses(d, constant_model(output), x_start, t, noise)
    jitted = jax.jit(lambda d_, xs, tt, n: training_losses(d_, constant_model(output), xs, tt, n))(
        d, x_start, t, noise
    )
    for key in ("loss", "mse", "vb"):
        assert jitted[key].shape == (SHAPE[0],)
        np.testing.assert_allclose(np.asarray(jitted[key]), np.asarray(eager[key]), rtol=1e-5)


# ------------------------------------------------------------------- fixed variances


def test_fixed_variance_paths():
    x = data_point(13)
    t = jnp.array([0, 30], jnp.int32)

    def eps_model(x_in, t_orig):
        return 0.1 * x_in

    large = create_diffusion("", learn_sigma=False)
    out = p_mean_variance(large, eps_model, x, t)
    betas = get_beta_schedule("linear", 1000)
    abar = np.cumprod(1 - betas)
    post_var_1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    np.testing.assert_allclose(
        np.asarray(out["variance"][:, 0, 0, 0]), [post_var_1, betas[30]], rtol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(out["log_variance"]), np.log(np.asarray(out["variance"])), rtol=1e-5
    )
    small = create_diffusion("", learn_sigma=False, sigma_small=True)
    out_small = p_mean_variance(small, eps_model, x, t)
    np.testing.assert_allclose(
        np.asarray(out_small["variance"][:, 0, 0, 0]), [0.0, small.posterior_variance[30]]
    )
    np.testing.assert_allclose(np.asarray(out_small["mean"]), np.asarray(out["mean"]), rtol=1e-6)

    noise = jax.random.normal(jax.random.PRNGKey(14), SHAPE)
    terms = training_losses(large, eps_model, x, t, noise)
    assert set(terms) == {"loss", "mse"}
    np.testing.assert_array_equal(np.asarray(terms["loss"]), np.asarray(terms["mse"]))
    with pytest.raises(ValueError, match="learn_sigma=False"):
        p_mean_variance(large, lambda x_in, tt: jnp.concatenate([x_in, x_in], -1), x, t)
    with pytest.raises(ValueError, match="learn_sigma=True"):
        p_mean_variance(create_diffusion(""), eps_model, x, t)
    sample = jax.jit(
        lambda d_, n: ddim_sample_loop(
            d_, oracle_model(x, learn_sigma=False), n, jax.random.PRNGKey(0)
        )
    )(create_diffusion("ddim10", learn_sigma=False), noise)
    np.testing.assert_allclose(np.asarray(sample), np.asarray(x), atol=1e-4)


@pytest.mark.parametrize("loop", ["ddpm", "ddim"])
def test_per_sample_keys_make_a_sample_independent_of_its_batch(loop):
    d = gd.create_diffusion("5")

    def model_fn(x, t):  # a learned-sigma output: eps, then variance values
        return jnp.concatenate([0.3 * x + 0.01 * t[:, None, None, None], 0.5 * jnp.tanh(x)], axis=-1)

    run = (gd.p_sample_loop if loop == "ddpm" else functools.partial(gd.ddim_sample_loop, eta=1.0))
    keys = jax.random.split(jax.random.key(0), 3)
    noise = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
    together = run(d, model_fn, noise, keys)
    alone = run(d, model_fn, noise[1:2], keys[1:2])
    np.testing.assert_allclose(together[1], alone[0], rtol=1e-6, atol=1e-6)
    assert gd.per_sample_keys(keys) and not gd.per_sample_keys(keys[0])
    assert gd.per_sample_keys(jax.random.split(jax.random.PRNGKey(0), 3))  # raw uint32 keys too
    assert not np.allclose(together, run(d, model_fn, noise, jax.random.key(0)))  # one key: other noise
    with pytest.raises(ValueError, match="2 per-sample keys for a batch of 3"):
        run(d, model_fn, noise, keys[:2])
