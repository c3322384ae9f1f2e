"""``hf:<directory or hub id>``: a Hugging Face ``transformers`` image classifier (the ``camserve[hf]`` extra).

Loaded with ``AutoModelForImageClassification`` from a ``save_pretrained`` directory, or from the hub when the
machine is online (``TRANSFORMERS_OFFLINE``/``HF_HUB_OFFLINE`` are respected). Its ``AutoImageProcessor``
gives the preprocessing, ``config.id2label`` the labels. The model returns a ``ModelOutput``; the served
module returns its ``.logits``, and its layers keep the names ``transformers`` gives them
(``vit.encoder.layer.11.layernorm_before``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from service.modelspec import ModelSpec
from service.preprocess import Preprocess
from service.sources import Built, ModelLoadError, require, source

# PIL's resampling filters, as image processors store them.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class Logits(nn.Module):
    """A ``transformers`` classifier whose forward returns ``.logits``; its submodules are the model's own,
    under the model's own names."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_classifier", model)  # not a submodule: its children are ours already

    def forward(self, x: Tensor) -> Tensor:
        classifier: Any = self.__dict__["_classifier"]
        logits: Tensor = classifier(pixel_values=x).logits
        return logits


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = values if values is not None else (0.5, 0.5, 0.5)
    return float(a), float(b), float(c)


def _dim(sizes: Any, key: str) -> int | None:
    """One entry of a processor's ``size``/``crop_size`` (a dict, or a ``SizeDict`` in recent versions)."""
    value = sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)
    return int(value) if value else None


def preprocess_of(processor: Any) -> Preprocess:
    """An image processor's resize, crop and normalisation as a :class:`Preprocess`."""
    size = getattr(processor, "size", None)
    crop_size = getattr(processor, "crop_size", None)
    crop_h, crop_w = _dim(crop_size, "height"), _dim(crop_size, "width")
    crop = (crop_h, crop_w) if getattr(processor, "do_center_crop", False) and crop_h and crop_w else None
    common: dict[str, Any] = {"mean": _triple(getattr(processor, "image_mean", None)),
                              "std": _triple(getattr(processor, "image_std", None)),
                              "interpolation": _RESAMPLE.get(int(getattr(processor, "resample", 2) or 2), "bilinear")}
    height, width, short = _dim(size, "height"), _dim(size, "width"), _dim(size, "shortest_edge")
    if height and width:
        return Preprocess(resize=(height, width), crop=crop, **common)
    if not short:
        raise ModelLoadError(f"the image processor's size {size!r} has neither height and width nor shortest_edge")
    crop_pct = getattr(processor, "crop_pct", None)
    if crop_pct and short < 384:  # ConvNeXt's rule: resize to size / crop_pct, then crop to size
        return Preprocess(resize=int(short / crop_pct), crop=(short, short), **common)
    if crop is not None:
        return Preprocess(resize=short, crop=crop, **common)
    return Preprocess(resize=(short, short), crop=None, **common)


def default_layer(names: list[str]) -> str | None:
    """The last block's first norm (``layernorm_before``), for token models whose head reads the class token:
    after the last block the gradient on the patch tokens is zero. ``None``: the trace's choice stands."""
    before = [n for n in names if n.endswith("layernorm_before")]
    return before[-1] if before and not any(".swin." in f".{n}" for n in before) else None


@source("hf", "hf:<directory or hub id>")
def _hf(spec: ModelSpec, target: str, num_labels: int | None) -> Built:
    transformers = require("transformers", "hf", "hf")
    local = Path(target).is_dir()
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("TRANSFORMERS_OFFLINE",
                                                                                 "HF_HUB_OFFLINE"))
    try:
        # Offline, only the local cache is looked at: the hub client reads its own variable once, at import.
        model = transformers.AutoModelForImageClassification.from_pretrained(
            target, local_files_only=offline, **dict(spec.options or {}))
        processor = transformers.AutoImageProcessor.from_pretrained(target, local_files_only=offline)
    except (OSError, ValueError) as exc:
        if local:
            raise ModelLoadError(f"model {spec.name!r}: {target!r} is not a saved image classifier: {exc}") from None
        why = "the machine is offline (TRANSFORMERS_OFFLINE or HF_HUB_OFFLINE is set) and it is not in the local " \
            "cache" if offline else f"no such directory, and the hub did not provide it ({exc})"
        raise ModelLoadError(f"model {spec.name!r}: cannot fetch {target!r} from the Hugging Face hub: {why}") from None
    model.eval()
    id2label = getattr(model.config, "id2label", None) or {}
    labels = [str(id2label[i]) for i in sorted(id2label)] if id2label else None
    wrapped = Logits(model)
    return Built(wrapped, labels, preprocess_of(processor), default_layer([n for n, _ in wrapped.named_modules()]))
