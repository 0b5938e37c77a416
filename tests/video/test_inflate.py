import pytest
import torch
from torch import nn

from transfer.errors import ConfigError
from video.inflate import InflationConfig, inflate_conv, inflate_model, iter_temporal_convs
from video.layers import SelfGating3d, SqueezeExcite3d
from video.model import VideoClassifier, inflate_backbone

FRAMES = 48  # long enough that the centre of res5 is out of reach of the zero-padded borders (mean mode)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Float32 equality relative to the tensor's magnitude (deep random ResNets reach activations of 100s)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


def static_clip(x: torch.Tensor, frames: int = FRAMES) -> torch.Tensor:
    return x.unsqueeze(2).repeat(1, 1, frames, 1, 1)  # (B, 3, H, W) -> (B, 3, T, H, W)


@torch.no_grad()
def test_center_inflation_static_clip_matches_2d(backbone2d):
    video = inflate_backbone(backbone2d, InflationConfig(mode="center")).eval()
    x = torch.randn(2, 3, 32, 32)
    feats2d = backbone2d.forward_features(x)
    feats3d = video.forward_features(static_clip(x, 16))
    assert len(feats3d) == len(feats2d) == 5
    for f2, f3 in zip(feats2d, feats3d):
        assert f3.shape[2] == 8  # stem temporal stride 2
        assert_close_scaled(f3, f2.unsqueeze(2).expand_as(f3))
    assert_close_scaled(video(static_clip(x, 16)), backbone2d(x))


@torch.no_grad()
def test_mean_inflation_static_clip_matches_2d_away_from_borders(backbone2d):
    video = inflate_backbone(backbone2d, InflationConfig(mode="mean")).eval()
    x = torch.randn(1, 3, 32, 32)
    feats2d = backbone2d.forward_features(x)
    feats3d = video.forward_features(static_clip(x))
    has_se = any(isinstance(m, SqueezeExcite3d) for m in video.modules())
    # SE squeezes over the whole clip, border frames included, so with SE the equality away from the
    # borders holds only up to the first SE block (the stem); see docs/video.md.
    levels = 1 if has_se else 5
    for f2, f3 in list(zip(feats2d, feats3d))[:levels]:
        mid = f3.shape[2] // 2
        assert_close_scaled(f3[:, :, mid], f2)
    # The borders do differ: zero padding enters the temporal kernels there.
    assert not torch.allclose(feats3d[0][:, :, 0], feats2d[0], atol=1e-3)


def test_weights_kept_and_kernels_placed(backbone2d):
    cfg = InflationConfig(mode="mean", stem_temporal_kernel=5, stage_temporal_kernels=(1, 1, 3, (3, 1)))
    model = inflate_model(backbone2d.model, cfg)
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules())
    temporal = dict(iter_temporal_convs(model))
    stem_name, stem = next(iter(temporal.items()))
    assert stem.kernel_size[0] == 5 and stem.stride[0] == 2
    # res4 (layer3): every block's first conv has kernel 3; res5 (layer4) alternates 3, 1, 3.
    layer3 = [n for n in temporal if n.startswith("layer3.")]
    layer4 = [n for n in temporal if n.startswith("layer4.")]
    assert len(layer3) == len(backbone2d.model.layer3) and len(layer4) == 2
    assert not any(n.startswith(("layer1.", "layer2.")) for n in temporal)
    w2d = dict(backbone2d.model.named_parameters())
    for name, p in model.named_parameters():
        if p.ndim == 5:
            torch.testing.assert_close(p.sum(2), w2d[name], rtol=1e-5, atol=1e-6)  # mean: taps sum to the 2D kernel


def test_center_conv_puts_kernel_in_middle():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    conv3d = inflate_conv(conv, time=3, mode="center")
    torch.testing.assert_close(conv3d.weight[:, :, 1], conv.weight)
    assert conv3d.weight[:, :, [0, 2]].abs().sum() == 0


def test_self_gating_in_last_block_before_se(backbone2d):
    model = inflate_model(backbone2d.model, InflationConfig(self_gating="last"))
    gated = [n for n, m in model.named_modules() if isinstance(m, SelfGating3d)]
    assert [n.split(".")[1] for n in gated] == [str(len(getattr(model, f"layer{i}")) - 1) for i in range(1, 5)]
    clip = torch.randn(1, 3, 4, 32, 32)
    head = VideoClassifier(inflate_backbone(backbone2d, InflationConfig(self_gating="all")), num_classes=3)
    assert head(clip).shape == (1, 3)


@pytest.mark.parametrize("kwargs", [dict(mode="sum"), dict(stem_temporal_kernel=4), dict(self_gating="first"),
                                    dict(stage_temporal_kernels=(1, 3))])
def test_bad_inflation_settings_raise(kwargs, backbone2d):
    with pytest.raises(ConfigError):
        inflate_model(backbone2d.model, InflationConfig(**kwargs))


def test_unknown_layer_type_is_an_error(backbone2d):
    model = backbone2d.model
    original = model.act1
    model.act1 = nn.Upsample(scale_factor=1)  # a layer with no known 3D form
    try:
        with pytest.raises(ConfigError, match="Upsample"):
            inflate_model(model, InflationConfig())
    finally:
        model.act1 = original
