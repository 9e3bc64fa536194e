"""DiT model: shapes, initialisation, parity with the official PyTorch code, guidance, input checks."""

from __future__ import annotations

import math

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax.weights.convert import load_official_state_dict, to_official_state_dict
from dit_jax import diffusion as gd
from dit_jax import model_compute, models
from dit_jax.model_compute import compute_options, resolve_attention
from dit_jax.models import BLOCK_TYPES, MODELS, DiT, count_params, create_model
from tests.torch_references import official_state

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
D, DEPTH, C = TINY["hidden_size"], TINY["depth"], TINY["in_channels"]


def slow_unless(fast: bool, *values: Any):
    """A parameter set of a test, marked slow unless ``fast`` (the fast suite keeps a sibling of each)."""
    return pytest.param(*values, marks=() if fast else pytest.mark.slow)


def tiny(**overrides: Any) -> DiT:
    """A freshly initialised tiny DiT."""
    return DiT(**{**TINY, **overrides}, rngs=nnx.Rngs(0))


def official_model(reference, **overrides: Any) -> DiT:
    """The reference model's config (plus ``overrides``) with the official weights loaded."""
    model = DiT(**{**reference.config, **overrides}, rngs=nnx.Rngs(0))
    load_official_state_dict(model, official_state(reference))
    return model


@pytest.fixture(scope="module")
def official(reference) -> DiT:
    return official_model(reference)


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((4, 8, 8, C), dtype=np.float32), np.array([0, 10, 500, 999]),
            np.array([0, 3, 9, 10]))


def assert_close(actual: Any, expected: Any, rtol: float = 1e-4) -> None:
    """Equal up to ``rtol`` times the largest magnitude of ``expected``."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=rtol * np.abs(expected).max())


# --- shapes and parameter counts -------------------------------------------------------

@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_output_shape(block_type, learn_sigma, inputs):
    out = tiny(block_type=block_type, learn_sigma=learn_sigma)(*inputs)
    assert out.shape == (4, 8, 8, 2 * C if learn_sigma else C) and out.dtype == jnp.float32


def test_param_counts_differ_by_block_design():
    counts = {bt: count_params(tiny(block_type=bt)) for bt in BLOCK_TYPES}

    def linear(din: int, dout: int) -> int:
        return din * dout + dout
    # adaLN regresses 4 vectors per block instead of 6.
    assert counts["adaln_zero"] - counts["adaln"] == DEPTH * (linear(D, 6 * D) - linear(D, 4 * D))
    # In-context: no regression layers, affine norms (2 per block, 1 final) instead.
    no_modulation = DEPTH * linear(D, 6 * D) + linear(D, 2 * D)
    assert counts["adaln_zero"] - counts["in_context"] == no_modulation - (2 * DEPTH + 1) * 2 * D
    # Cross-attention: in-context plus, per block, an affine norm and q, kv and output projections.
    per_block = 2 * D + linear(D, D) + linear(D, 2 * D) + linear(D, D)
    assert counts["cross_attention"] - counts["in_context"] == DEPTH * per_block


# --- initialisation ---------------------------------------------------------------------

def test_adaln_zero_blocks_start_as_identity_and_model_outputs_zeros(inputs):
    model = tiny()
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.standard_normal((4, 16, D), dtype=np.float32))
    c = jnp.asarray(rng.standard_normal((4, D), dtype=np.float32))
    for block in model.blocks:
        np.testing.assert_array_equal(block(tokens, c), tokens)
    np.testing.assert_array_equal(model(*inputs), 0.0)


def test_adaln_zero_modulation_and_output_layer_are_zero():
    model = tiny()
    zeroed = [block.adaLN_modulation.layers[1] for block in model.blocks]
    zeroed += [model.final_layer.adaLN_modulation.layers[1], model.final_layer.linear]
    for layer in zeroed:
        np.testing.assert_array_equal(layer.kernel[...], 0.0)
        np.testing.assert_array_equal(layer.bias[...], 0.0)


def test_label_table_has_null_row_only_with_dropout():
    table = tiny(num_classes=1000).y_embedder.embedding_table.embedding[...]
    assert table.shape == (1001, D)
    assert float(jnp.std(table)) == pytest.approx(0.02, rel=0.03)
    assert tiny(class_dropout_prob=0.0).y_embedder.embedding_table.embedding.shape == (10, D)


def test_timestep_mlp_is_normal_002():
    for layer in tiny().t_embedder.mlp.layers[::2]:
        assert float(jnp.std(layer.kernel[...])) == pytest.approx(0.02, rel=0.05)
        np.testing.assert_array_equal(layer.bias[...], 0.0)


def assert_xavier_uniform(kernel: jax.Array, fan_in: int, fan_out: int) -> None:
    """Uniform on [-b, b] with the xavier bound b: inside it, reaching it, rms b / sqrt(3)."""
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    w = np.asarray(kernel)
    assert 0.9 * bound < np.abs(w).max() <= bound
    assert np.sqrt(np.mean(w**2)) == pytest.approx(bound / np.sqrt(3), rel=0.1)


def test_linears_and_patch_conv_are_xavier_uniform():
    model = tiny(block_type="adaln")
    for block in model.blocks:
        for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2, block.adaLN_modulation.layers[1]):
            kernel = layer.kernel[...]  # fused qkv [in, 3, out]: fans of the official [in, 3 * out] linear
            assert_xavier_uniform(kernel, kernel.shape[0], math.prod(kernel.shape[1:]))
            np.testing.assert_array_equal(layer.bias[...], 0.0)
    p = TINY["patch_size"]
    kernel = model.x_embedder.proj.kernel[...]
    assert kernel.shape == (p, p, C, D)
    assert_xavier_uniform(kernel, fan_in=C * p * p, fan_out=D)


def test_position_table_matches_official(reference):
    np.testing.assert_array_equal(tiny().pos_embed[...], reference.arrays["param/pos_embed"])


# --- parity with the official code ----------------------------------------------------

def test_forward_matches_official(official, reference, nhwc):
    a = reference.arrays
    assert_close(official(nhwc(a["x"]), a["t"], a["y"]), nhwc(a["forward"]))


def test_forward_with_cfg_matches_official(official, reference, nhwc):
    a = reference.arrays
    out = official.forward_with_cfg(nhwc(a["cfg/x"]), a["cfg/t"], a["cfg/y"], float(a["cfg/scale"]))
    assert_close(out, nhwc(a["cfg/forward_with_cfg"]))


def test_state_dict_round_trip(official, reference):
    expected = official_state(reference)
    exported = to_official_state_dict(official)
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


# --- precision and rematerialisation ---------------------------------------------------

def matmul_operand_types(model: DiT, inputs) -> list[str]:
    """The StableHLO operand types of every matmul and convolution of a forward pass
    (outputs may be wider: attention logits accumulate in float32)."""
    text = jax.jit(lambda x, t, y: model(x, t, y)).lower(*inputs).as_text()
    return [line.rsplit(" : (", 1)[1].split(") -> ")[0] for line in text.splitlines()
            if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]


@pytest.mark.parametrize("block_type", [slow_unless(block_type == "adaln_zero", block_type) for block_type in BLOCK_TYPES])
def test_bfloat16_computes_in_bfloat16_with_float32_params_and_output(reference, inputs, block_type):
    config = dict(reference.config, block_type=block_type)
    f32 = DiT(**config, rngs=nnx.Rngs(0))
    bf16 = DiT(**config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    params = nnx.state(f32, nnx.Param)
    # Non-zero gates and output layer, so every block shapes the output.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
    nnx.update(f32, params)
    nnx.update(bf16, params)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    f32_types, bf16_types = matmul_operand_types(f32, inputs), matmul_operand_types(bf16, inputs)
    assert len(bf16_types) == len(f32_types) > 2 * DEPTH
    assert all("f32" in t and "bf16" not in t for t in f32_types)
    assert all("bf16" in t and "f32" not in t for t in bf16_types)
    expected, out = (nnx.jit(lambda m, x, t, y: m(x, t, y))(m, *inputs) for m in (f32, bf16))
    assert out.dtype == jnp.float32
    assert_close(out, expected, rtol=5e-2)
    assert not np.allclose(out, expected, rtol=0, atol=1e-6)  # it did compute in lower precision


def test_bfloat16_loss_and_gradients_are_float32(official, reference, inputs):
    model = official_model(reference, dtype=jnp.bfloat16)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, _, y = inputs
    d = gd.create_diffusion("", learn_sigma=True)
    t = jnp.array([1, 200, 500, 999])

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        return gd.training_losses(d, lambda x_t, tt: m(x_t, tt, y), x, t, jnp.ones_like(x))["loss"].mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert value.dtype == jnp.float32 and np.isfinite(value)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def unrolled_layout(state: nnx.State) -> dict[tuple, np.ndarray]:
    """A flat state with stacked block arrays (``scan_blocks``) split into the unrolled ``('blocks', i, ...)`` paths."""
    out = {}
    for path, value in nnx.to_flat_state(state):
        value = np.asarray(value[...] if hasattr(value, "get_value") else value)
        if path[0] == "blocks" and not isinstance(path[1], int):
            out.update({(path[0], i, *path[1:]): layer for i, layer in enumerate(value)})
        else:
            out[path] = value
    return out


@pytest.mark.parametrize("remat, scan_blocks", [("block", False), ("dots", False), ("none", True), ("dots", True)])
def test_remat_and_scanned_blocks_give_the_same_gradients(reference, inputs, remat, scan_blocks):
    grads = {}
    for options in (dict(remat="none"), dict(remat=remat, scan_blocks=scan_blocks)):
        model = official_model(reference, **options)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            return jnp.sum(nnx.merge(graphdef, params, rest)(*inputs) ** 2)

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        # One remat region per block, or one in the scan's body; the scan itself is one loop.
        expected = 0 if options["remat"] == "none" else (1 if options.get("scan_blocks") else DEPTH)
        assert len(re.findall(r"\b(?:remat2|checkpoint)\[", jaxpr)) == expected
        assert ("scan[" in jaxpr) == bool(options.get("scan_blocks"))
        grads[len(grads)] = unrolled_layout(jax.jit(jax.grad(loss))(params))
    assert grads[0].keys() == grads[1].keys()
    for path, value in grads[0].items():
        assert_close(grads[1][path], value, rtol=1e-5)


def test_dots_remat_saves_the_linear_outputs_and_recomputes_the_rest(reference, inputs):
    """``dots`` keeps the matmul results for the backward pass, ``block`` only the block inputs:
    the backward pass of ``block`` recomputes every forward matmul of the blocks, ``dots`` none."""
    def dots_in_gradient(remat):
        model = official_model(reference, remat=remat)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(*inputs) ** 2)
        return jax.jit(jax.grad(loss)).lower(params).compile().as_text().count(" dot(")
    none, block, dots = (dots_in_gradient(r) for r in ("none", "block", "dots"))
    assert block > none and dots < block


def test_scanned_blocks_start_as_the_unrolled_model_and_load_official_weights(reference, inputs, nhwc):
    unrolled, scanned = tiny(), tiny(scan_blocks=True)
    kernel = scanned.blocks.attn.qkv.kernel[...]
    assert kernel.shape == (DEPTH, D, 3, D)  # one stack: [layer, in, q/k/v, heads x head_dim]
    expected = unrolled_layout(nnx.state(unrolled))
    got = unrolled_layout(nnx.state(scanned))
    assert got.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))
    # The official checkpoint loads by the same names, computes the same outputs, exports unchanged.
    official = official_model(reference, scan_blocks=True)
    a = reference.arrays
    assert_close(official(nhwc(a["x"]), a["t"], a["y"]), nhwc(a["forward"]))
    exported = to_official_state_dict(official)
    assert exported.keys() == official_state(reference).keys()
    for name, value in official_state(reference).items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_scanned_model_rejects_a_checkpoint_of_another_depth_and_keeps_its_weights():
    model = tiny(scan_blocks=True)
    before = to_official_state_dict(model)
    with pytest.raises(ValueError, match=r"depth=2\):\n  missing \(\d+\): blocks\.1\."):
        load_official_state_dict(model, to_official_state_dict(tiny(depth=1)))
    for name, value in to_official_state_dict(model).items():
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize("dtype, remat, attention, match", [
    ("float16", "none", "xla", r"dtype 'float16' is not one of \('float32', 'bfloat16'\)"),
    ("float32", "full", "xla", r"remat 'full' is not one of \('none', 'block', 'dots'\)"),
    ("float32", "none", "flash", r"attention 'flash' is not one of \('auto', 'xla', 'cudnn'\)"),
    ("bfloat16", "none", "cudnn", r"attention 'cudnn' needs an NVIDIA GPU, but JAX runs on 'cpu'"),
])
def test_unknown_compute_options_are_rejected(dtype, remat, attention, match):
    with pytest.raises(ValueError, match=match):
        compute_options(dtype, remat, attention)
    assert compute_options("bfloat16", "block", "xla") == dict(dtype=jnp.bfloat16, remat="block", attention="xla",
                                                               qkv="fused", gelu_backward="saved", norm_modulate="xla")


def test_cudnn_attention_needs_bfloat16_on_a_gpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert compute_options("bfloat16", "none", "cudnn")["attention"] == "cudnn"
    with pytest.raises(ValueError, match="attention 'cudnn' needs dtype 'bfloat16'.*got 'float32'"):
        compute_options("float32", "none", "cudnn")


@pytest.fixture
def fresh_attention_choice():
    """``attention="auto"`` decided anew (its per-process caches cleared before and after)."""
    model_compute.auto_attention.cache_clear()
    model_compute._cudnn_probe_error.cache_clear()
    yield
    model_compute.auto_attention.cache_clear()
    model_compute._cudnn_probe_error.cache_clear()


def test_auto_attention_is_xla_off_gpus(fresh_attention_choice, caplog):
    assert compute_options("bfloat16", "none", "auto")["attention"] == "auto"  # the DiT resolves it
    assert resolve_attention(jnp.bfloat16, 64) == ("xla", "JAX runs on 'cpu'")
    model = tiny(dtype=jnp.bfloat16)
    assert model.attention == "xla" and {b.attn.implementation for b in model.blocks} == {"xla"}
    assert tiny().attention == "xla"  # the default
    assert not [r for r in caplog.records if "attention" in r.getMessage()]  # silently


@pytest.mark.parametrize("dtype, head_dim, probe_error, expected, reason", [
    (jnp.bfloat16, 72, None, "cudnn", "NVIDIA GPU, bfloat16, head size 72"),
    ("bfloat16", 128, None, "cudnn", "head size 128"),
    (jnp.float32, 72, None, "xla", "the compute dtype is float32"),
    (jnp.bfloat16, 12, None, "xla", "the head size 12 is not a multiple of 8"),
    (jnp.bfloat16, 136, None, "xla", "the head size 136 is not a multiple of 8 at most 128"),
    (jnp.bfloat16, 64, "CUDNN_STATUS_NOT_SUPPORTED: cuDNN 8.9 is too old", "xla",
     "failed to compile here: CUDNN_STATUS_NOT_SUPPORTED: cuDNN 8.9 is too old"),
])
def test_auto_attention_on_a_gpu(monkeypatch, dtype, head_dim, probe_error, expected, reason):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    probed = []
    monkeypatch.setattr(model_compute, "_cudnn_probe_error", lambda h: probed.append(h) or probe_error)
    implementation, why = resolve_attention(dtype, head_dim)
    assert implementation == expected and reason in why
    assert probed == ([head_dim] if jnp.dtype(dtype) == jnp.bfloat16 and head_dim in (64, 72, 128) else [])


def test_cudnn_probe_reports_the_first_line_of_its_error():
    error = model_compute._cudnn_probe_error.__wrapped__(64)  # this CPU cannot compile cuDNN's kernel
    assert error and "\n" not in error


def test_auto_attention_falls_back_on_a_gpu_with_one_log_line(fresh_attention_choice, monkeypatch, caplog):
    """The real probe, inside nnx.eval_shape as in ``train.step_flops``; one line per process and setting."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with caplog.at_level("WARNING"):
        for _ in range(2):
            model = nnx.eval_shape(lambda: tiny(dtype=jnp.bfloat16))
    assert model.attention == "xla" and model.blocks[0].attn.implementation == "xla"
    lines = [r.getMessage() for r in caplog.records if "attention 'auto'" in r.getMessage()]
    assert len(lines) == 1 and "failed to compile here: " in lines[0] and "\n" not in lines[0]
    with caplog.at_level("WARNING"):
        tiny()  # float32
    lines = [r.getMessage() for r in caplog.records if "attention 'auto'" in r.getMessage()]
    assert len(lines) == 2 and "the compute dtype is float32" in lines[1]


def test_auto_attention_picks_cudnn_on_a_gpu_that_compiles_it(fresh_attention_choice, monkeypatch, caplog):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(model_compute, "_cudnn_probe_error", lambda head_dim: None)
    model = nnx.eval_shape(lambda: tiny(dtype=jnp.bfloat16, block_type="cross_attention"))
    assert model.attention == "cudnn"
    assert {b.attn.implementation for b in model.blocks} == {b.cross_attn.implementation for b in model.blocks} == {"cudnn"}
    assert not [r for r in caplog.records if "attention" in r.getMessage()]


def test_every_paper_model_can_use_cudnn_attention():
    """Head sizes 64 (S, B, L) and 72 (XL): multiples of 8, at most 128, as cuDNN's kernel needs."""
    for name in MODELS:
        model = nnx.eval_shape(lambda: create_model(name, depth=1, attention="cudnn", rngs=nnx.Rngs(0)))
        assert model.blocks[0].attn.implementation == "cudnn"


@pytest.mark.parametrize("block_type", ["adaln_zero", "cross_attention"])
def test_attention_implementation_reaches_every_attention_layer(monkeypatch, inputs, block_type):
    """The model asks jax.nn.dot_product_attention for the configured kernel (run here by XLA)."""
    requested, xla_attention = [], jax.nn.dot_product_attention

    def recording(*args, implementation=None, **kwargs):
        requested.append(implementation)
        return xla_attention(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    model = tiny(block_type=block_type, attention="cudnn")
    out = model(*inputs)
    assert requested == ["cudnn"] * (DEPTH * (2 if block_type == "cross_attention" else 1))
    np.testing.assert_array_equal(out, tiny(block_type=block_type)(*inputs))


# --- classifier-free guidance ---------------------------------------------------------

@pytest.mark.parametrize("guidance, guided_channels", [("official", 3), ("all", C)])
def test_guidance_mixes_only_its_channels(reference, inputs, guidance, guided_channels):
    model = official_model(reference, guidance=guidance)
    x, t, y = inputs
    doubled = np.concatenate([x[:2], x[:2]])
    cond, uncond = np.split(np.asarray(model(doubled, t, y)), 2)
    k, scale = guided_channels, 4.0
    out = np.asarray(model.forward_with_cfg(x, t, y, scale))
    guided = uncond[..., :k] + scale * (cond[..., :k] - uncond[..., :k])
    assert_close(out[..., :k], np.concatenate([guided, guided]), rtol=1e-5)
    assert_close(out[..., k:], np.concatenate([cond, uncond])[..., k:], rtol=1e-6)
    assert not np.allclose(guided, cond[..., :k])


@pytest.mark.parametrize("guidance", ["official", "all"])
def test_guidance_scale_one_is_conditional(reference, inputs, guidance):
    model = official_model(reference, guidance=guidance)
    x, t, y = inputs
    cond = np.asarray(model(np.concatenate([x[:2], x[:2]]), t, y))[:2]
    assert_close(np.asarray(model.forward_with_cfg(x, t, y, 1.0))[:2], cond, rtol=1e-5)


def test_guidance_needs_an_even_batch(official, inputs):
    x, t, y = inputs
    with pytest.raises(ValueError, match="even batch"):
        official.forward_with_cfg(x[:3], t[:3], y[:3], 1.5)


# --- label dropout --------------------------------------------------------------------

def test_label_dropout_only_with_a_key(reference, nhwc):
    a = reference.arrays
    model = official_model(reference, class_dropout_prob=0.999)
    x, t, y = nhwc(a["x"]), a["t"], a["y"]
    null = model(x, t, np.full_like(y, reference.config["num_classes"]))
    assert_close(model(x, t, y, dropout_key=jax.random.key(0)), null, rtol=1e-6)
    no_key = model(x, t, y)
    assert_close(no_key, nhwc(a["forward"]))
    assert not np.allclose(no_key, null)


# --- input and config checks ------------------------------------------------------------

X, T, Y = np.zeros((2, 8, 8, C), np.float32), np.zeros(2, np.int32), np.zeros(2, np.int32)


@pytest.mark.parametrize("x, t, y, match", [
    (np.zeros((2, C, 8, 8), np.float32), T, Y, "NHWC"),
    (np.zeros((2, 16, 16, C), np.float32), T, Y, r"x of shape \[N, 8, 8, 4\]"),
    (X, np.zeros(3, np.int32), Y, "t and y must have shape"),
    (X, T, np.zeros((2, 1), np.int32), "t and y must have shape"),
    (X, T, np.zeros(2, np.float32), "must be integers"),
    (X, T, np.array([-1, 0]), r"class labels must be in \[0, 9\]"),
    (X, T, np.array([0, 11]), r"class labels must be in \[0, 9\], or 10 for the null label"),
], ids=["nchw", "spatial", "t-shape", "y-shape", "float-labels", "negative-label", "label-too-big"])
def test_bad_inputs_are_rejected(x, t, y, match):
    with pytest.raises(ValueError, match=match):
        tiny()(x, t, y)


def test_null_label_needs_dropout():
    tiny()(X, T, np.array([10, 0]))  # the null label exists when class_dropout_prob > 0
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 9\]; got"):
        tiny(class_dropout_prob=0.0)(X, T, np.array([10, 0]))


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'DiT-M/3'.*DiT-S/8.*DiT-XL/2"):
        create_model("DiT-M/3", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("overrides, match", [
    (dict(input_size=9), "input_size 9 must be a multiple of patch_size 2"),
    (dict(num_heads=5), "hidden_size 64 must be divisible by num_heads 5"),
    (dict(block_type="film"), "block_type 'film' is not one of"),
    (dict(guidance="half"), "guidance 'half' is not one of"),
    (dict(attention="flash"), "attention 'flash' is not one of"),
    (dict(remat=True), "remat True is not one of"),
    (dict(hidden_size=48, num_heads=4, attention="cudnn"), "multiple of 8 and at most 128, got 12"),
    (dict(hidden_size=288, num_heads=2, attention="cudnn"), "multiple of 8 and at most 128, got 144"),
])
def test_bad_config_is_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


@pytest.mark.parametrize("source, match", [
    (dict(depth=1), r"missing \(\d+\): blocks\.1\."),
    (dict(depth=3), r"unexpected \(\d+\): blocks\.2\."),
    (dict(input_size=16), r"wrong shape \(1\): pos_embed: checkpoint \(1, 64, 64\), model \(1, 16, 64\)"),
    (dict(num_classes=20), r"wrong shape \(1\): y_embedder\.embedding_table\.weight"),
    (dict(learn_sigma=False), r"wrong shape \(2\): .*final_layer\.linear\.weight: checkpoint \(16, 64\), model \(32, 64\)"),
], ids=["shallower", "deeper", "512-vs-256", "num-classes", "learn-sigma"])
def test_state_dict_of_another_model_is_rejected(source, match):
    model = tiny()
    before = to_official_state_dict(model)
    with pytest.raises(ValueError, match=match):
        load_official_state_dict(model, to_official_state_dict(tiny(**source)))
    for name, value in to_official_state_dict(model).items():  # nothing was written
        np.testing.assert_array_equal(value, before[name])


def test_wrongly_ranked_checkpoint_array_is_reported_not_crashed(reference):
    state = official_state(reference)
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][None]  # 3-D kernel
    model = DiT(**reference.config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"wrong shape \(1\): blocks\.0\.attn\.qkv\.weight: checkpoint \(1, 192, 64\)"):
        load_official_state_dict(model, state)


# The compute switches (model_compute.QKV_MODES, GELU_BACKWARD_MODES, NORM_MODULATE_MODES): each non-default
# value, and the block types where it changes the program.
SWITCHES = {"qkv": "split", "gelu_backward": "recompute", "norm_modulate": "fused"}
SWITCH_CASES = [(name, block_type) for name in SWITCHES for block_type in BLOCK_TYPES
                if name != "norm_modulate" or block_type in ("adaln_zero", "adaln")]
ONE_OR_ALL_SWITCHES = [SWITCHES, *({name: value} for name, value in SWITCHES.items())]
SMALL = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def loss_and_grads(**config: Any) -> tuple[jax.Array, Any, Any]:
    """(loss, gradients w.r.t. every parameter and the input, the parameters' shapes) of a small DiT, jitted (one
    compile, not one per operation as op by op).

    The parameters are moved off their initialisation (adaLN-Zero's zeros would hide most gradients)
    by the same noise whatever the switches; the loss weights the output by fixed random numbers.
    """
    model = DiT(**SMALL, **config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 4), dtype=np.float32)
    weights = rng.standard_normal((2, 4, 4, 8), dtype=np.float32)
    t, y = np.array([3, 700]), np.array([1, 10])

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x, t, y) * weights)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    return value, grads, jax.tree.map(jnp.shape, params)


_REFERENCES: dict[tuple, tuple] = {}


def reference_grads(block_type: str, scan_blocks: bool, dtype: Any = jnp.float32) -> tuple:
    """``loss_and_grads`` of the default path (no remat), computed once per setting."""
    key = (block_type, scan_blocks, dtype)
    if key not in _REFERENCES:
        _REFERENCES[key] = loss_and_grads(block_type=block_type, scan_blocks=scan_blocks, dtype=dtype)
    return _REFERENCES[key]


def relative_difference(actual: Any, expected: Any) -> float:
    """|actual - expected| / |expected| over all leaves together (Euclidean norms)."""
    a, e = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)]) for t in (actual, expected))
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))


def assert_same_loss_and_grads(switches: dict[str, str], block_type: str, *, scan_blocks: bool, remat: str) -> None:
    value, grads, shapes = loss_and_grads(block_type=block_type, scan_blocks=scan_blocks, remat=remat,
                                          **switches)
    expected_value, expected_grads, expected_shapes = reference_grads(block_type, scan_blocks)
    assert shapes == expected_shapes  # the same parameter tree
    assert float(value) == pytest.approx(float(expected_value), rel=1e-6)
    assert relative_difference(grads[0], expected_grads[0]) < 1e-6  # every parameter
    assert relative_difference(grads[1], expected_grads[1]) < 1e-6  # the input
    assert relative_difference(grads[0], expected_grads[0]) > 0 or switches == {"gelu_backward": "recompute"}


@pytest.mark.parametrize("switch, block_type, remat", [slow_unless(remat == "none", *case, remat)
                                                       for case in SWITCH_CASES for remat in ("none", "dots")])
def test_compute_switch_keeps_values_and_gradients(switch, block_type, remat):
    """float32: the same loss and gradients (1e-6 relative) as the default path, unrolled blocks."""
    assert_same_loss_and_grads({switch: SWITCHES[switch]}, block_type, scan_blocks=False, remat=remat)


@pytest.mark.parametrize("switches, block_type, remat", [
    slow_unless(len(switches) == 3 and block_type == "adaln_zero" and remat == "dots", switches, block_type, remat)
    for switches in ONE_OR_ALL_SWITCHES for block_type in BLOCK_TYPES for remat in ("none", "dots")
    if "norm_modulate" not in switches or len(switches) == 3 or block_type in ("adaln_zero", "adaln")])
def test_compute_switches_keep_gradients_with_scanned_blocks(switches, block_type, remat):
    assert_same_loss_and_grads(switches, block_type, scan_blocks=True, remat=remat)


@pytest.mark.parametrize("switches, block_type", [slow_unless(len(switches) == 3 and block_type == "adaln_zero",
                                                              switches, block_type)
                                                  for switches in ONE_OR_ALL_SWITCHES for block_type in BLOCK_TYPES])
def test_compute_switches_in_bfloat16_keep_the_loss(switches, block_type):
    value, grads, _ = loss_and_grads(block_type=block_type, dtype=jnp.bfloat16, **switches)
    expected_value, expected_grads, _ = reference_grads(block_type, False, jnp.bfloat16)
    assert float(value) == pytest.approx(float(expected_value), rel=2e-2)
    assert relative_difference(grads[0], expected_grads[0]) < 2e-2


def test_compute_switches_are_validated():
    with pytest.raises(ValueError, match=r"qkv 'separate' is not one of \('fused', 'split'\); gelu_backward 'none' is "
                                         r"not one of \('saved', 'recompute'\); norm_modulate 'triton' is not one of"):
        compute_options("float32", "none", "xla", qkv="separate", gelu_backward="none", norm_modulate="triton")
    with pytest.raises(ValueError, match=r"invalid DiT config: norm_modulate 'pallas' is not one of"):
        tiny(norm_modulate="pallas")
    assert compute_options("float32", "none", "xla", **SWITCHES) == dict(dtype=jnp.float32, remat="none",
                                                                          attention="xla", **SWITCHES)



# Slow (a train step per switch set): the switch tests above, on the model's loss and gradients, are its siblings.
@pytest.mark.slow
@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_train_step_with_every_compute_switch_gives_the_default_losses(dtype, rtol):
    """Two jitted train steps (config fields ``qkv``, ``gelu_backward``, ``norm_modulate``): the same losses
    and gradient norms as the default path; the second step's loss follows from the first step's gradients."""
    from dit_jax import train, train_state
    from tests.tiny_models import tiny_run_config

    def losses(**switches: str) -> list[tuple[float, float]]:
        config = tiny_run_config(dtype=dtype, **switches)
        graphdef, fixed, state = train_state.create_train_state(config)
        step = train.make_train_step(config, graphdef, fixed, train.build_diffusion(config))
        rng = np.random.default_rng(0)
        size = config.model.input_size
        batch = {"image": rng.uniform(-1, 1, (8, size, size, 3)).astype(np.float32),
                 "label": np.arange(8, dtype=np.int32) % 4}
        out = []
        for _ in range(2):
            state, metrics = step(state, batch)
            out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        return out

    expected = losses()
    assert losses(**SWITCHES) == [pytest.approx(pair, rel=rtol) for pair in expected]
