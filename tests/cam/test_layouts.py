"""Layer layouts decided at trace time: NCHW, NHWC (Swin, ConvNeXt's MLP), tokens (ViT) and (L, N, D) (CLIP),
each read by one function, with parity against pytorch-grad-cam's matching reshape_transform."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from service.cam import CamEngine, CamQuery, find_layers
from service.cam.layers import Layout, from_nchw, to_nchw, token_grid
from service.errors import InvalidArgument
from service.modelspec import ModelSpec, SpecError
from service.registry import serve_module
from tests.cam.helpers import gradient_parity, nhwc_reshape, token_reshape


def _x(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _loud(head: nn.Linear) -> None:
    """Random heads give gradients near GradCAM++'s epsilon, which is 1e-7 here and 1e-6 in pytorch-grad-cam;
    a louder head keeps that convention out of a comparison of layouts."""
    with torch.no_grad():
        head.weight.mul_(100)


def test_swin_stages_are_channels_last():
    torch.manual_seed(0)
    info = find_layers(torchvision.models.swin_t(num_classes=5).eval(), _x(1, 112))
    # The stage outputs are (N, H, W, C): 96 channels on a 28x28 grid, not 28 channels on a 28x96 one.
    assert info.layouts["features.1"] == Layout("nhwc", (28, 28), 96)
    assert info.layouts["features"] == Layout("nhwc", (4, 4), 768)
    assert info.layouts["norm"] == Layout("nhwc", (4, 4), 768)
    assert info.layouts["permute"].kind == "nchw"
    assert all(lay.grid[0] == lay.grid[1] for lay in info.layouts.values()), "every map of a square input is square"


def test_swin_maps_lie_on_the_grid_and_match_the_reference():
    # swin_t's own class, smaller: two stages of one block each, 8x8 then 4x4 windows of 4.
    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=5).eval()
    _loud(swin.head)
    x = _x(2, 32)
    with CamEngine(swin, x[:1]) as engine:
        out = engine.explain(x, [CamQuery(layer="features", top=1)] * 2)
    assert engine.layers.layouts["features"] == Layout("nhwc", (4, 4), 32)
    assert out.cams[0].maps.shape == (1, 4, 4)
    gradient_parity(swin, "features.1", x, nhwc_reshape)
    gradient_parity(swin, "norm", x, nhwc_reshape, methods=("gradcam",))


def test_convnext_inner_mlp_is_channels_last():
    torch.manual_seed(0)
    info = find_layers(torchvision.models.convnext_tiny(num_classes=5).eval(), _x(1, 64))
    assert info.layouts["features.5.4.block.3"] == Layout("nhwc", (4, 4), 4 * 384)
    assert info.layouts["features.5.4.block.0"] == Layout("nchw", (4, 4), 384)
    assert info.layouts["features.7"] == Layout("nchw", (2, 2), 768)
    # convnext_tiny's own class, smaller, for the comparison.
    model = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5).eval()
    _loud(model.classifier[2])
    x = _x(2, 32)
    assert find_layers(model, x[:1]).layouts["features.3.0.block.3"] == Layout("nhwc", (4, 4), 128)
    gradient_parity(model, "features.3.0.block.3", x, nhwc_reshape)


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every gradient would be 0
    return model


def test_vit_tokens_drop_the_class_token():
    model = _tiny_vit()
    x = _x(2, 32)
    info = find_layers(model, x[:1])
    assert info.default == "encoder.layers.encoder_layer_1.ln_1"
    assert info.layouts[info.default] == Layout("tokens", (4, 4), 32, prefix=1)
    gradient_parity(model, info.default, x, token_reshape(1, (4, 4)))


class _SequenceFirst(nn.Module):
    """CLIP's visual tower in miniature: patch tokens plus a class token, run through the encoder as (L, N, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, kernel_size=8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.pre = nn.LayerNorm(16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, norm_first=True)
        self.post = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        t = self.pre(t).permute(1, 0, 2)  # (L, N, D)
        t = self.block(t)
        return self.head(self.post(t)[0])


def test_sequence_first_tokens():
    torch.manual_seed(0)
    model = _SequenceFirst().eval()
    x = _x(2, 32)
    info = find_layers(model, x[:1])
    assert info.layouts["block.norm1"] == Layout("lnd", (4, 4), 16, prefix=1)
    gradient_parity(model, "block.norm1", x, token_reshape(1, (4, 4), sequence_first=True), methods=("gradcam",))


class _Mixer(nn.Module):
    """A channels-last module whose (N, 8, 8, 8) output reads as NCHW as well as NHWC."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.mean(dim=(1, 2), keepdim=True)


class _Ambiguous(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.mix = _Mixer()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.mix(self.conv(x).permute(0, 2, 3, 1))  # (N, 8, 8, 8), channels last
        return self.head(t.mean(dim=(1, 2)))


def test_a_layer_of_unknown_layout_is_not_listed_unless_configured():
    model = _Ambiguous().eval()
    x = _x(1, 32)
    info = find_layers(model, x)
    assert info.candidates == ("conv",)
    with pytest.raises(InvalidArgument, match="`layer` must name a spatial layer"):
        info.resolve("mix")
    forced = find_layers(model, x, layout="nhwc")
    assert forced.layouts["mix"] == Layout("nhwc", (8, 8), 8)
    assert forced.layouts["conv"] == Layout("nchw", (8, 8), 8), "the override only applies where the shape fits"


def test_layout_from_the_model_table():
    served = serve_module(_Ambiguous(), ModelSpec("amb", "python:x:y", device="cpu", layout="nhwc",
                                                  target_layer="mix"))
    try:
        assert served.engine.layers.default == "mix"
        out = served.engine.explain(_x(1, 224), [CamQuery()])
        assert out.cams[0].maps.shape == (1, 56, 56)
    finally:
        served.close()
    with pytest.raises(SpecError, match="`layout` must be one of nchw, nhwc, tokens, lnd, got 'hwc'"):
        ModelSpec.from_table("m", {"source": "builtin:shapes", "layout": "hwc"})


def test_layouts_convert_both_ways():
    t = torch.randn(2, 5, 7, 3)
    nhwc = Layout("nhwc", (5, 7), 3)
    assert to_nchw(t, nhwc).shape == (2, 3, 5, 7)
    assert torch.equal(from_nchw(to_nchw(t, nhwc), nhwc), t)
    tokens = Layout("tokens", (2, 3), 4, prefix=2)
    seq = torch.randn(2, 8, 4)
    assert torch.equal(to_nchw(seq, tokens)[1, :, 1, 2], seq[1, 2 + 5])
    assert from_nchw(to_nchw(seq, tokens), tokens) is None
    # Leading dimensions (the targets of a batched backward) pass through.
    assert to_nchw(torch.randn(4, 2, 5, 7, 3), nhwc).shape == (4, 2, 3, 5, 7)
    assert token_grid(197, 224, 224) == (1, 14, 14)
    assert token_grid(198, 224, 224) == (2, 14, 14)  # DeiT's class and distillation tokens
    assert token_grid(14 * 20, 224, 320) == (0, 14, 20)
    assert token_grid(5, 224, 224) is None


class _OneAtATime(nn.Module):
    """A model written for a batch of one (its head flattens the whole batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)).view(1, -1))


def test_a_model_that_runs_one_image_at_a_time_is_traced_on_one():
    info = find_layers(_OneAtATime().eval(), _x(1, 32))
    assert info.layouts["conv"] == Layout("nchw", (16, 16), 4)


class _NormOverChannelsFirst(nn.LayerNorm):
    """timm's LayerNorm2d in miniature: a LayerNorm subclass that normalises the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_a_layer_norm_subclass_is_not_taken_for_channels_last():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), _NormOverChannelsFirst(8), nn.Flatten(),
                          nn.LazyLinear(2)).eval()
    info = find_layers(model, _x(1, 32))
    assert info.layouts["1"] == Layout("nchw", (8, 8), 8)
