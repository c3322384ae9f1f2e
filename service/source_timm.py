"""``timm:<name>``: any classifier of the ``timm`` package (the ``camserve[timm]`` extra).

Random weights unless ``weights`` names a local ``.pth``/``.safetensors``/timm checkpoint (or ``pretrained``,
which downloads from the Hugging Face hub when the machine is online). Preprocessing comes from the
model's own ``pretrained_cfg``: input size, interpolation, crop percentage, mean and std. The default
target layer is chosen per family: the last block's first norm for the token models (ViT, DeiT, BEiT,
EVA), where only the class token reaches the head after the last block; the last stage of
``feature_info`` for the others (ResNet ``layer4``, ConvNeXt and Swin ``stages.3``/``layers.3``,
EfficientNet and MobileNet ``blocks.N``, RegNet ``s4``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from service.modelspec import ModelSpec
from service.preprocess import INTERPOLATIONS, Preprocess
from service.sources import Built, ModelLoadError, require, source


def preprocess_of(cfg: dict[str, Any]) -> Preprocess:
    """timm's data config (``resolve_data_config``) as camserve's :class:`Preprocess`."""
    _, height, width = cfg["input_size"]
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interpolation = cfg.get("interpolation", "bilinear")
    return Preprocess(resize=math.floor(min(height, width) / crop_pct), crop=(int(height), int(width)),
                      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear")


def default_layer(model: nn.Module) -> str | None:
    """The family's target layer: see the module docstring."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) and hasattr(blocks[-1], "norm1") \
            and getattr(model, "cls_token", None) is not None:
        return f"blocks.{len(blocks) - 1}.norm1"
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict):
        name = info[-1].get("module")
        return str(name) if name else None
    return None


@source("timm", "timm:<name>")
def _timm(spec: ModelSpec, name: str, num_labels: int | None) -> Built:
    timm = require("timm", "timm", "timm")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:4]}*")[:10]
        raise ModelLoadError(f"model {spec.name!r}: unknown timm model {name!r}"
                             + (f"; similar: {', '.join(close)}" if close else ""))
    kwargs = dict(spec.options or {})
    weights = spec.weights
    state = None
    pretrained = weights is not None and weights.lower() == "pretrained"
    if weights is not None and not pretrained and weights.lower() != "none":
        from service.sources import load_state_dict

        # timm's own reader unwraps its checkpoints ("state_dict", "state_dict_ema", "model").
        try:
            state = timm.models.load_state_dict(weights) if not weights.endswith(".safetensors") else \
                load_state_dict(weights)
        except FileNotFoundError:
            raise ModelLoadError(f"weights file not found: {weights}") from None
    if num_labels:
        kwargs.setdefault("num_classes", num_labels)
    elif state is not None:
        classifier = timm.models.get_pretrained_cfg(name)
        head = getattr(classifier, "classifier", None) if classifier is not None else None
        heads = [head] if isinstance(head, str) else list(head or [])
        sizes = [int(state[f"{h}.weight"].shape[0]) for h in heads if f"{h}.weight" in state]
        if sizes:
            kwargs.setdefault("num_classes", sizes[0])
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        where = " (weights = \"pretrained\" downloads from the Hugging Face hub)" if pretrained else ""
        raise ModelLoadError(f"model {spec.name!r}: timm could not build {name!r}{where}: {exc}") from None
    if state is not None:
        model.load_state_dict(state)
    # A model built at another size (``options.img_size``) takes that size, not its pretrained one.
    size = kwargs.get("img_size")
    args = {"input_size": (3, *((size, size) if isinstance(size, int) else size))} if size else {}
    cfg = timm.data.resolve_data_config(args, model=model)
    return Built(model, None, preprocess_of(cfg), default_layer(model))
