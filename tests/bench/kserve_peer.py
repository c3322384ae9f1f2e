"""The plainest model server, a peer for ``make bench-http``: KServe's Python model server (``kserve.Model``).

It serves resnet18 (seeded random weights, as camserve's ``weights = "none"`` bench model) the way KServe's
documentation shows a custom predictor: the model runs in the server's event loop.

- ``POST /v1/models/resnet18:predict`` ``{"instances": [{"image": {"b64": ...}}]}``: decode, resize 256,
  crop 224, normalise, one forward under ``torch.no_grad()``, softmax, the top 5.
- ``POST /v1/models/resnet18:explain``, the same body: the top class and captum's ``LayerGradCam`` on
  ``layer4``, upsampled to the image's size, as a base64 PNG.

Run it in ``.venv-kserve`` (KServe's pins clash with the project's environment):
``.venv-kserve/bin/python -m tests.bench.kserve_peer --http_port 8090``. KServe reads its own options
(``--http_port``, ...) from the command line.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms

NAME = "resnet18"


def _image(payload: dict[str, Any]) -> Image.Image:
    instances = payload.get("instances")
    if not isinstance(instances, list) or len(instances) != 1:
        raise ValueError("expected {'instances': [{'image': {'b64': ...}}]} with one instance")
    return Image.open(io.BytesIO(base64.b64decode(instances[0]["image"]["b64"]))).convert("RGB")


def build() -> Any:
    import kserve
    from captum.attr import LayerAttribution, LayerGradCam

    class ResNet18(kserve.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(NAME)
            self.device = torch.device(os.environ.get("PEER_DEVICE", "cpu"))
            self.tf = transforms.Compose([
                transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ])
            self.model: torch.nn.Module | None = None
            self.load()

        def load(self) -> bool:
            torch.manual_seed(0)
            self.model = torchvision.models.resnet18().eval().to(self.device)
            self.gradcam = LayerGradCam(self.model, self.model.layer4)
            self.ready = True
            return True

        def _input(self, payload: dict[str, Any]) -> tuple[torch.Tensor, tuple[int, int]]:
            image = _image(payload)
            return self.tf(image)[None].to(self.device), (image.height, image.width)

        def predict(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
            x, _ = self._input(payload)
            assert self.model is not None
            with torch.no_grad():
                probs = self.model(x).softmax(1)[0]
            scores, idx = probs.topk(5)
            return {"predictions": [[{"index": int(i), "score": float(s)}
                                     for s, i in zip(scores.tolist(), idx.tolist(), strict=True)]]}

        def explain(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
            x, size = self._input(payload)
            assert self.model is not None
            with torch.no_grad():
                top = int(self.model(x).argmax(1))
            attribution = self.gradcam.attribute(x, target=top, relu_attributions=True)  # (1, 1, 7, 7)
            heat = LayerAttribution.interpolate(attribution, size, interpolate_mode="bilinear")[0, 0]
            heat = heat / heat.max().clamp(min=1e-12)
            buf = io.BytesIO()
            Image.fromarray((heat.detach().cpu().numpy() * 255).astype(np.uint8)).save(buf, format="PNG")
            return {"explanations": [{"index": top, "heatmap": base64.b64encode(buf.getvalue()).decode()}]}

    return ResNet18()


def main() -> None:
    import kserve

    kserve.ModelServer(enable_grpc=False).start([build()])


if __name__ == "__main__":
    main()
