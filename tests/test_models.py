"""Tests for the frozen ViT encoder (models/vit.py) and the UNet denoiser (models/unet.py).

Models are tiny (16-24 px inputs) and compiled things are shared through module-scoped fixtures:
XLA compile time dominates on CPU. Structural checks use `jax.eval_shape` (tracing, no compile).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semantica_jax import config_lib
from semantica_jax.models import layers, pos_embed, unet, vit

RULE_NAMES = {name for name, _ in config_lib.DEFAULT_AXIS_RULES}


def _boxed_leaves(tree) -> list:
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _assert_all_logically_named(params) -> int:
    """Every leaf is LogicallyPartitioned, names have the value's rank and come from the rules."""
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )[0]
    assert flat, "empty parameter tree"
    for path, leaf in flat:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no logical axis names"
        names = leaf.names
        assert len(names) == len(leaf.value.shape), f"{where}: names {names} vs {leaf.value.shape}"
        assert set(names) - {None} <= RULE_NAMES, f"{where}: unknown axis names {names}"
        assert any(n is not None for n in names), f"{where}: all axes unnamed {names}"
        assert leaf.value.dtype == jnp.float32, f"{where}: param dtype {leaf.value.dtype}"
    return len(flat)


def _perturb(params, key: jax.Array, scale: float = 0.1):
    """Adds Gaussian noise to every parameter (so zero-initialised parts become active)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)],
    )


# ============================================================================ ViT

VIT_KW = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=16)


def _np_layer_norm(x: np.ndarray, p: dict, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


_np_erf = np.vectorize(math.erf)


def _np_vit(params: dict, images: np.ndarray, m: vit.ViT, pos_embed: np.ndarray) -> np.ndarray:
    """Float64 numpy re-implementation of HF Dinov2(WithRegisters)Model's forward pass."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = (images.astype(np.float64) - np.array(m.mean)) / np.array(m.std)
    b, h, w, _ = x.shape
    ps, d = m.patch_size, m.width
    gh, gw = h // ps, w // ps
    patches = x.reshape(b, gh, ps, gw, ps, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
    x = patches @ p["patch_embed"]["kernel"].reshape(-1, d) + p["patch_embed"]["bias"]
    x = np.concatenate([np.repeat(p["cls_token"], b, 0), x], 1) + np.asarray(pos_embed, np.float64)
    if m.num_registers:
        x = np.concatenate([x[:, :1], np.repeat(p["register_tokens"], b, 0), x[:, 1:]], 1)
    for i in range(m.depth):
        blk = p[f"block_{i}"]
        a = blk["attn"]
        y = _np_layer_norm(x, blk["norm1"], m.ln_eps)
        q, k, v = (
            np.einsum("btd,dnh->btnh", y, a[n]["kernel"]) + a[n]["bias"]
            for n in ("query", "key", "value")
        )
        logits = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = np.einsum("bnqk,bknh->bqnh", probs, v)
        o = np.einsum("bqnh,nhd->bqd", o, a["out"]["kernel"]) + a["out"]["bias"]
        x = x + (blk["ls1"]["scale"] * o if "ls1" in blk else o)
        y = _np_layer_norm(x, blk["norm2"], m.ln_eps)
        f = blk["mlp"]
        if m.ffn == "mlp":
            y = y @ f["fc1"]["kernel"] + f["fc1"]["bias"]
            y = 0.5 * y * (1 + _np_erf(y / np.sqrt(2)))
            y = y @ f["fc2"]["kernel"] + f["fc2"]["bias"]
        else:
            y = y @ f["weights_in"]["kernel"] + f["weights_in"]["bias"]
            gate, up = np.split(y, 2, -1)
            y = gate / (1 + np.exp(-gate)) * up
            y = y @ f["weights_out"]["kernel"] + f["weights_out"]["bias"]
        x = x + (blk["ls2"]["scale"] * y if "ls2" in blk else y)
    return _np_layer_norm(x, p["norm"], m.ln_eps)


@pytest.fixture(scope="module")
def images() -> dict[int, jax.Array]:
    key = jax.random.PRNGKey(1)
    return {s: jax.random.uniform(jax.random.fold_in(key, s), (2, s, s, 3)) for s in (16, 24)}


@pytest.fixture(scope="module")
def vit_reg():
    """Tiny ViT with 2 registers and a non-trivial layer-scale, its params, a jitted apply."""
    model = vit.ViT(
        **VIT_KW, num_registers=2, layerscale_init=0.5, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25)
    )
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    params = nn.meta.unbox(variables)["params"]
    params = _perturb(params, jax.random.PRNGKey(5), 0.05)  # non-trivial biases / scales
    return model, params, jax.jit(lambda p, x: model.apply({"params": p}, x))


def test_vit_shapes_pooled_and_hf_reference(vit_reg, images):
    model, params, apply = vit_reg
    out = apply(params, images[16])
    assert set(out) == {"tokens", "pooled"}
    assert out["tokens"].shape == (2, 1 + 2 + 16, 32)
    assert out["tokens"].dtype == jnp.float32
    np.testing.assert_array_equal(out["pooled"], out["tokens"][:, 0])
    ref = _np_vit(params, np.asarray(images[16]), model, params["pos_embed"])
    np.testing.assert_allclose(out["tokens"], ref, atol=2e-4, rtol=2e-4)


def test_vit_pos_embed_interpolation(vit_reg, images):
    model, params, apply = vit_reg
    pos = params["pos_embed"]
    # Matching grid: the stored embedding is used as is.
    assert pos_embed.interpolate_pos_embed(pos, (4, 4)) is pos
    # The resize path at the stored size is the identity (so both paths agree there).
    grid = pos[:, 1:].reshape(1, 4, 4, -1)
    np.testing.assert_allclose(pos_embed.resize_pos_grid(grid, (4, 4)), grid, atol=1e-6)
    # Resizing keeps the CLS position and maps a constant grid to the same constant (up/down).
    const = jnp.concatenate([pos[:, :1], jnp.full((1, 16, 32), 0.7)], axis=1)
    for new in [(6, 6), (2, 2), (3, 5)]:
        out = pos_embed.interpolate_pos_embed(const, new)
        assert out.shape == (1, 1 + new[0] * new[1], 32)
        np.testing.assert_array_equal(out[:, 0], pos[:, 0])
        np.testing.assert_allclose(out[:, 1:], 0.7, atol=1e-5)
    # A 24 px input (6x6 grid vs the stored 4x4) runs through the interpolated embedding.
    out = apply(params, images[24])
    assert out["tokens"].shape == (2, 1 + 2 + 36, 32)
    resized = pos_embed.interpolate_pos_embed(pos, (6, 6))
    assert not np.allclose(resized[:, 1:7], pos[:, 1:7])
    ref = _np_vit(params, np.asarray(images[24]), model, resized)
    np.testing.assert_allclose(out["tokens"], ref, atol=2e-4, rtol=2e-4)


def test_vit_registers_absent_and_layerscale_off():
    model = vit.ViT(**VIT_KW, num_registers=0, layerscale_init=None)
    x = jnp.zeros((2, 16, 16, 3))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    params = variables["params"]
    assert "register_tokens" not in params
    assert "ls1" not in params["block_0"] and "ls2" not in params["block_0"]
    assert set(params) == {"patch_embed", "cls_token", "pos_embed", "block_0", "block_1", "norm"}
    assert params["pos_embed"].value.shape == (1, 17, 32)
    out = jax.eval_shape(model.apply, variables, x)
    assert out["tokens"].shape == (2, 17, 32) and out["pooled"].shape == (2, 32)
    _assert_all_logically_named(params)


def test_vit_swiglu_matches_reference(images):
    assert vit.swiglu_hidden_dim(1536, 4) == vit.SIZES["g"]["mlp_dim"] == 4096
    model = vit.ViT(**{**VIT_KW, "mlp_dim": 48}, ffn="swiglu", num_registers=1)
    variables = model.init(jax.random.PRNGKey(3), images[16])
    _assert_all_logically_named(variables["params"])
    params = nn.meta.unbox(variables)["params"]
    mlp = params["block_1"]["mlp"]
    assert set(mlp) == {"weights_in", "weights_out"}
    assert mlp["weights_in"]["kernel"].shape == (32, 96)
    assert mlp["weights_out"]["kernel"].shape == (48, 32)
    out = model.apply({"params": params}, images[16])
    ref = _np_vit(params, np.asarray(images[16]), model, params["pos_embed"])
    np.testing.assert_allclose(out["tokens"], ref, atol=2e-4, rtol=2e-4)


def test_vit_param_logical_names(vit_reg):
    model = vit_reg[0]
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    n = _assert_all_logically_named(boxed["params"])
    assert n == 4 + 1 + 2 * 18 + 2  # embeddings + registers + 2 blocks x 18 leaves + final norm
    names = {k: v.names for k, v in boxed["params"]["block_0"]["attn"]["query"].items()}
    assert names == {"kernel": ("embed", "heads", "kv"), "bias": ("heads", "kv")}
    assert boxed["params"]["block_0"]["attn"]["out"]["kernel"].names == ("heads", "kv", "embed")
    assert boxed["params"]["block_0"]["mlp"]["fc1"]["kernel"].names == ("embed", "mlp")


@pytest.mark.parametrize(
    "kwargs, size, match",
    [
        ({}, 18, r"18x18 is not a multiple of patch_size=4"),
        ({}, 8, None),  # fine: a smaller grid than stored
        ({"image_size": 18}, 16, r"image_size=18 .* not a multiple of patch_size=4"),
        ({"num_heads": 3}, 16, r"num_heads=3 does not divide width=32"),
        ({"ffn": "geglu"}, 16, r"ffn must be one of"),
    ],
)
def test_vit_invalid_sizes(kwargs, size, match):
    model = vit.ViT(**{**VIT_KW, **kwargs})
    x = jnp.zeros((1, size, size, 3))
    if match is None:
        out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x)[0])
        assert out["tokens"].shape == (1, 1 + (size // 4) ** 2, 32)
    else:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def test_vit_bf16_and_remat(vit_reg, images):
    model, params, apply = vit_reg
    ref = apply(params, images[16])["tokens"]
    bf16 = model.clone(dtype="bfloat16", remat=True)
    boxed = jax.eval_shape(bf16.init, jax.random.PRNGKey(0), images[16])
    _assert_all_logically_named(boxed["params"])  # also asserts float32 params
    out = bf16.apply({"params": params}, images[16])
    assert out["tokens"].dtype == jnp.bfloat16
    np.testing.assert_allclose(out["tokens"].astype(jnp.float32), ref, atol=0.15)
    remat_out = model.clone(remat=True).apply({"params": params}, images[16])["tokens"]
    np.testing.assert_allclose(remat_out, ref, atol=1e-5)


def test_vit_from_config():
    c = config_lib.default_config().encoder
    c.size = "tiny"
    c.patch_size = 4
    c.image_size = 16
    c.num_registers = 3
    c.layerscale_init = None
    c.mean = (0.5, 0.5, 0.5)
    model = vit.vit_from_config(c, dtype="bfloat16")
    assert (model.width, model.depth, model.num_heads, model.mlp_dim) == (32, 2, 2, 64)
    assert model.ffn == "mlp"
    assert (model.patch_size, model.image_size, model.num_registers) == (4, 16, 3)
    assert model.layerscale_init is None and model.mean == (0.5, 0.5, 0.5)
    assert model.dtype == "bfloat16"
    x = jnp.zeros((1, 16, 16, 3))
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x)[0])
    assert out["tokens"].shape == (1, 1 + 3 + 16, 32) and out["tokens"].dtype == jnp.bfloat16
    c.size = "g"
    g = vit.vit_from_config(c)
    assert (g.width, g.depth, g.ffn, g.mlp_dim) == (1536, 40, "swiglu", 4096)
    c.size = "XL"
    with pytest.raises(ValueError, match=r"encoder.size='XL'"):
        vit.vit_from_config(c)


def test_preprocess():
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 40, 30, 3))
    y = vit.preprocess(x, 28)
    assert y.shape == (2, 28, 28, 3) and y.dtype == jnp.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    np.testing.assert_array_equal(vit.preprocess(x[:, :28, :28], 28), x[:, :28, :28])
    u8 = (np.asarray(x[:, :28, :28]) * 255).astype(np.uint8)
    np.testing.assert_allclose(vit.preprocess(jnp.asarray(u8), 28), u8 / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="preprocess expects"):
        vit.preprocess(x[..., :1], 28)


# ============================================================================ UNet

UNET_KW = dict(channels=(16, 32), num_res_blocks=1, num_heads=2, attn_resolution=8)
B, RES, T, DC = 4, 16, 3, 24


@pytest.fixture(scope="module")
def unet_inputs() -> dict[str, jax.Array]:
    ks = jax.random.split(jax.random.PRNGKey(7), 6)
    return dict(
        x=jax.random.normal(ks[0], (B, RES, RES, 3)),
        logsnr=jnp.linspace(-10.0, 10.0, B),
        tokens_a=jax.random.normal(ks[1], (B, T, DC)),
        pooled_a=jax.random.normal(ks[2], (B, DC)),
        tokens_b=jax.random.normal(ks[3], (B, T, DC)),
        pooled_b=jax.random.normal(ks[4], (B, DC)),
    )


@pytest.fixture(scope="module")
def unet_model(unet_inputs):
    """Tiny UNet (16/8 px levels, attention at 8), boxed init params, a jitted apply."""
    model = unet.UNet(**UNET_KW)
    i = unet_inputs
    args = (i["x"], i["logsnr"], i["tokens_a"], i["pooled_a"], None)
    boxed = jax.jit(lambda r: model.init(r, *args, train=False))(jax.random.PRNGKey(0))["params"]

    @jax.jit
    def apply(params, tokens, pooled, mask):
        variables = {"params": params}
        return model.apply(variables, i["x"], i["logsnr"], tokens, pooled, mask, train=False)

    return model, boxed, apply


def test_unet_zero_init_output_then_nonzero(unet_model, unet_inputs):
    _, boxed, apply = unet_model
    i = unet_inputs
    params = nn.meta.unbox(boxed)
    mask = jnp.ones((B,), bool)
    out = apply(params, i["tokens_a"], i["pooled_a"], mask)
    assert out.shape == (B, RES, RES, 3) and out.dtype == jnp.float32
    assert not np.any(np.asarray(out)), "zero-initialised head must give exactly 0 at init"
    out = apply(_perturb(params, jax.random.PRNGKey(1)), i["tokens_a"], i["pooled_a"], mask)
    assert np.all(np.isfinite(out)) and float(jnp.abs(out).mean()) > 1e-3


def test_unet_null_condition(unet_model, unet_inputs):
    _, boxed, apply = unet_model
    i = unet_inputs
    params = _perturb(nn.meta.unbox(boxed), jax.random.PRNGKey(2))
    mask = jnp.array([False, False, True, True])
    out_a = np.asarray(apply(params, i["tokens_a"], i["pooled_a"], mask))
    out_b = np.asarray(apply(params, i["tokens_b"], i["pooled_b"], mask))
    # mask False: the condition is replaced by the learned null tokens / pooled vector.
    np.testing.assert_array_equal(out_a[:2], out_b[:2])
    # mask True: the condition matters, through the tokens and through the pooled vector.
    assert np.abs(out_a[2:] - out_b[2:]).max() > 1e-3
    out_pooled = np.asarray(apply(params, i["tokens_a"], i["pooled_b"], mask))
    np.testing.assert_array_equal(out_pooled[:2], out_a[:2])
    assert np.abs(out_pooled[2:] - out_a[2:]).max() > 1e-4
    # The null condition is not the same as the real one for the same example.
    out_true = np.asarray(apply(params, i["tokens_a"], i["pooled_a"], jnp.ones((B,), bool)))
    assert np.abs(out_true[:2] - out_a[:2]).max() > 1e-3
    np.testing.assert_array_equal(out_true[2:], out_a[2:])


def test_unet_gradients_head_first_and_null_condition(unet_model, unet_inputs):
    model, boxed, apply = unet_model
    i = unet_inputs
    remat_model = model.clone(remat=True)  # the backward pass also exercises nn.remat

    @jax.jit
    @jax.value_and_grad
    def loss_and_grad(params, mask):
        y = remat_model.apply(
            {"params": params}, i["x"], i["logsnr"], i["tokens_a"], i["pooled_a"], mask, train=True
        )
        return jnp.mean((y - i["x"]) ** 2)

    mixed = jnp.array([False, True, True, False])
    params = nn.meta.unbox(boxed)
    _, grads = loss_and_grad(params, mixed)
    # Zero-initialised head: at init only conv_out itself receives gradient.
    for name, g in grads.items():
        norm = float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(g)))
        assert (norm > 0) == (name == "conv_out"), (name, norm)

    params = _perturb(params, jax.random.PRNGKey(4))
    loss, grads = loss_and_grad(params, mixed)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    ref = jnp.mean((apply(params, i["tokens_a"], i["pooled_a"], mixed) - i["x"]) ** 2)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert float(jnp.abs(grads["null_cond_tokens"]).max()) > 0
    assert float(jnp.abs(grads["null_pooled"]).max()) > 0
    # Learned null condition gets no gradient from examples that keep their condition.
    _, grads = loss_and_grad(params, jnp.ones((B,), bool))
    assert not np.any(np.asarray(grads["null_cond_tokens"]))
    assert not np.any(np.asarray(grads["null_pooled"]))


def test_unet_none_mask_means_all_true(unet_model, unet_inputs):
    model, boxed, _ = unet_model
    i = unet_inputs
    params = _perturb(nn.meta.unbox(boxed), jax.random.PRNGKey(3))
    args = (i["x"], i["logsnr"], i["tokens_a"], i["pooled_a"])
    both = jax.jit(
        lambda p: (
            model.apply({"params": p}, *args, None, train=False),
            model.apply({"params": p}, *args, jnp.ones((B,), bool), train=False),
        )
    )(params)
    np.testing.assert_allclose(both[0], both[1], atol=1e-6)


def test_unet_param_tree_and_logical_names(unet_model):
    model, boxed, _ = unet_model
    _assert_all_logically_named(boxed)
    expected = {
        "conv_in", "time_dense1", "time_dense2", "pooled_norm", "pooled_proj", "null_pooled",
        "cond_norm", "cond_proj", "null_cond_tokens", "down_0_res_0", "down_0_downsample",
        "down_1_res_0", "down_1_attn_0", "mid_res_0", "mid_attn", "mid_res_1",
        "up_1_res_0", "up_1_attn_0", "up_1_res_1", "up_1_attn_1", "up_1_upsample",
        "up_0_res_0", "up_0_res_1", "out_norm", "conv_out",
    }
    assert set(boxed) == expected  # attention only at 8 px (level 1) and in the middle
    assert boxed["null_cond_tokens"].value.shape == (T, 32)  # cond_dim -1 -> channels[-1]
    assert boxed["cond_proj"]["kernel"].names == ("cond_embed", "embed")
    assert boxed["mid_attn"]["cross_attn"]["key"]["kernel"].names == ("embed", "heads", "kv")
    assert boxed["conv_in"]["kernel"].names == ("conv_h", "conv_w", "channels", "conv_out")
    assert boxed["conv_out"]["kernel"].names == ("conv_h", "conv_w", "conv_in", "channels")
    assert boxed["time_dense1"]["kernel"].value.shape == (16, 64)  # 4 * channels[0]


def test_unet_bf16_keeps_float32_params_and_pooled_off(unet_inputs):
    i = unet_inputs
    model = unet.UNet(**UNET_KW, dtype="bfloat16", pooled_cond=False, cond_dim=8, remat=True)
    args = (i["x"], i["logsnr"], i["tokens_a"], None, None)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, train=False))
    _assert_all_logically_named(boxed["params"])  # asserts float32
    assert not {"pooled_norm", "pooled_proj", "null_pooled"} & set(boxed["params"])
    assert boxed["params"]["null_cond_tokens"].value.shape == (T, 8)
    out = jax.eval_shape(lambda v: model.apply(v, *args, train=False), boxed)
    assert out.shape == (B, RES, RES, 3) and out.dtype == jnp.float32


def test_unet_dropout_needs_train_and_rng(unet_model, unet_inputs):
    _, boxed, _ = unet_model
    i = unet_inputs
    model = unet.UNet(**UNET_KW, dropout=0.5)
    args = (i["x"], i["logsnr"], i["tokens_a"], i["pooled_a"], None)
    params = {"params": nn.meta.unbox(boxed)}
    jax.eval_shape(lambda: model.apply(params, *args, train=False))  # deterministic: no rng
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda: model.apply(params, *args, train=True))
    jax.eval_shape(
        lambda: model.apply(params, *args, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    )


def _init_shapes(model: unet.UNet, res: int = RES, width: int | None = None, **overrides):
    x = jnp.zeros((2, res, width or res, 3))
    kw = dict(
        logsnr=jnp.zeros((2,)), tokens=jnp.zeros((2, T, DC)), pooled=jnp.zeros((2, DC)), mask=None
    )
    kw.update(overrides)
    args = (x, kw["logsnr"], kw["tokens"], kw["pooled"], kw["mask"])
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, train=False))


@pytest.mark.parametrize(
    "model_kw, call_kw, match",
    [
        ({}, dict(width=8), r"must be square, got 16x8"),
        ({}, dict(res=17), r"resolution 17 is not divisible by 2 .*channels=\(16, 32\)"),
        ({"channels": (16, 32, 32)}, dict(res=18), r"resolution 18 is not divisible by 4"),
        (
            {"attn_resolution": 4},
            {},
            r"no level at or below model.attn_resolution=4 .*levels are \(16, 8\)",
        ),
        ({"num_heads": 3}, {}, r"num_heads=3 does not divide 32 channels .* resolution 8"),
        ({}, dict(mask=jnp.ones((3,), bool)), r"cond_mask must have shape \(2,\)"),
        ({}, dict(pooled=None), r"pooled_cond=True needs cond_pooled"),
        ({}, dict(logsnr=jnp.zeros((2, 1))), r"logsnr must have shape \(2,\)"),
        ({"num_res_blocks": 0}, {}, r"num_res_blocks must be >= 1"),
    ],
)
def test_unet_invalid_inputs_raise(model_kw, call_kw, match):
    model = unet.UNet(**{**UNET_KW, **model_kw})
    with pytest.raises(ValueError, match=match):
        _init_shapes(model, **call_kw)


def test_unet_token_count_must_match_init(unet_model, unet_inputs):
    model, boxed, _ = unet_model
    i = unet_inputs
    tokens = jnp.zeros((B, T + 1, DC))
    variables = {"params": nn.meta.unbox(boxed)}
    args = (i["x"], i["logsnr"], tokens, i["pooled_a"], None)
    with pytest.raises(ValueError, match=r"cond_tokens has 4 tokens .* shape \(3, 32\)"):
        jax.eval_shape(lambda: model.apply(variables, *args, train=False))


def test_unet_from_config_overrides():
    c = config_lib.default_config().model
    model = unet.unet_from_config(c)
    s = unet.SIZES["S"]
    assert (model.channels, model.num_res_blocks, model.num_heads) == (
        s["channels"], s["num_res_blocks"], s["num_heads"],
    )
    assert model.resolved_cond_dim == s["channels"][-1]
    c.size = "tiny"
    c.channels = (16, 32)
    c.num_res_blocks = 2
    c.num_heads = 4
    c.attn_resolution = 8
    c.cond_dim = 48
    c.pooled_cond = False
    c.dtype = "bfloat16"
    c.remat = True
    c.dropout = 0.1
    c.patch_size = 2
    model = unet.unet_from_config(c)
    assert model.patch_size == 2
    assert model.channels == (16, 32) and isinstance(model.channels, tuple)
    assert (model.num_res_blocks, model.num_heads, model.attn_resolution) == (2, 4, 8)
    assert (model.cond_dim, model.pooled_cond, model.dtype, model.remat, model.dropout) == (
        48, False, "bfloat16", True, 0.1,
    )
    c.channels = ()
    c.num_res_blocks = -1
    c.num_heads = -1
    tiny = unet.unet_from_config(c)
    assert (tiny.channels, tiny.num_res_blocks, tiny.num_heads) == ((16, 32, 64), 1, 2)
    c.size = "XXL"
    with pytest.raises(ValueError, match=r"model.size='XXL'"):
        unet.unet_from_config(c)


def test_space_to_depth_round_trip_and_block_layout():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    y = layers.space_to_depth(x, 2)
    assert y.shape == (2, 2, 3, 12)
    # Channel k*C + c of block (i, j) is pixel (2i + k // 2, 2j + k % 2), channel c.
    np.testing.assert_array_equal(y[1, 1, 2, 3 * 3 + 1], x[1, 3, 5, 1])
    np.testing.assert_array_equal(y[0, 0, 1, 1 * 3 + 2], x[0, 0, 3, 2])
    np.testing.assert_array_equal(layers.depth_to_space(y, 2), x)
    with pytest.raises(ValueError, match="not divisible"):
        layers.space_to_depth(x, 4)


def test_unet_patchified_stem(unet_inputs):
    """patch_size=2: levels run at RES/2, the output is full-resolution, and the model still
    depends on the condition; a resolution the patch does not divide is refused."""
    kw = dict(UNET_KW, channels=(16,), attn_resolution=8, patch_size=2)
    model = unet.UNet(**kw)
    i = unet_inputs
    assert model.level_resolutions(RES) == (RES // 2,)
    args = (i["x"], i["logsnr"], i["tokens_a"], i["pooled_a"], None)
    params = _perturb(nn.meta.unbox(model.init(jax.random.PRNGKey(0), *args, train=False)["params"]),
                      jax.random.PRNGKey(3))
    assert params["conv_in"]["kernel"].shape[-2] == 4 * 3
    assert params["conv_out"]["kernel"].shape[-1] == 4 * 3
    out = model.apply({"params": params}, *args, train=False)
    assert out.shape == (B, RES, RES, 3) and np.all(np.isfinite(out))
    out_b = model.apply({"params": params}, i["x"], i["logsnr"], i["tokens_b"], i["pooled_b"], None,
                        train=False)
    assert np.abs(np.asarray(out) - np.asarray(out_b)).max() > 1e-4
    with pytest.raises(ValueError, match="patch_size=3"):
        unet.UNet(**dict(kw, patch_size=3)).level_resolutions(RES)


def test_group_norm_groups_divide_channels():
    for c in (3, 16, 32, 48, 64, 96, 128, 192, 768, 1000):
        g = layers.group_norm_groups(c)
        assert c % g == 0 and 1 <= g <= 32
    assert [layers.group_norm_groups(c) for c in (32, 64, 96, 128)] == [8, 16, 24, 32]


def test_logsnr_embedding_distinguishes_range():
    emb = unet.logsnr_embedding(jnp.linspace(-15.0, 15.0, 301), 32)
    assert emb.shape == (301, 32) and np.all(np.isfinite(emb))
    d = np.linalg.norm(np.asarray(emb[1:] - emb[:-1]), axis=-1)
    assert d.min() > 0.05  # neighbouring logsnr values (0.1 apart) get distinct features


def test_models_trace_under_mesh_with_axis_rules(unet_inputs):
    """Init/apply trace under a ('data', 'fsdp', 'model') = (2, 2, 2) mesh with the default rules
    (activation and boxed-param sharding constraints active); every param's sharding divides it."""
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "model"))
    rules = config_lib.DEFAULT_AXIS_RULES
    i = unet_inputs
    u = unet.UNet(**UNET_KW)
    u_args = (i["x"], i["logsnr"], i["tokens_a"], i["pooled_a"], None)
    v = vit.ViT(**VIT_KW, num_registers=2)
    v_x = jnp.zeros((B, 16, 16, 3))
    cases = [
        (lambda: u.init(jax.random.PRNGKey(0), *u_args, train=False),
         lambda p: u.apply(p, *u_args, train=False), ("mid_attn", "self_attn")),
        (lambda: v.init(jax.random.PRNGKey(0), v_x),
         lambda p: v.apply(p, v_x)["tokens"], ("block_0", "attn")),
    ]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for init, apply, attn_path in cases:
            boxed = jax.eval_shape(init)
            specs = nn.get_partition_spec(boxed)
            shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
            for leaf, sharding in zip(_boxed_leaves(boxed), jax.tree.leaves(shardings)):
                sharding.shard_shape(leaf.value.shape)  # raises if a dimension does not divide
            query = shardings["params"][attn_path[0]][attn_path[1]]["query"]["kernel"]
            assert query.spec == jax.sharding.PartitionSpec("fsdp", "model", None)
            assert jax.eval_shape(apply, boxed).shape[0] == B
