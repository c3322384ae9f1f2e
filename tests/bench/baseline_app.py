"""The baseline a newcomer writes: FastAPI calling pytorch-grad-cam per request under a lock.

Served by ``bench_http`` next to camserve, on the same model and inputs. The lock is needed: a
shared pytorch-grad-cam object is not safe across threads.
"""

from __future__ import annotations

import base64
import io
import os
import threading

import numpy as np
import torch
import torchvision
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchvision import transforms

device = torch.device(os.environ.get("BASELINE_DEVICE", "cpu"))
torch.manual_seed(0)
model = torchvision.models.resnet18().eval().to(device)
lock = threading.Lock()
tf = transforms.Compose([
    transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])
app = FastAPI()


def _load(data: bytes) -> torch.Tensor:
    return tf(Image.open(io.BytesIO(data)).convert("RGB"))[None].to(device)


@app.post("/predict")
def predict(image: UploadFile = File(...)) -> dict[str, object]:
    x = _load(image.file.read())
    with lock, torch.no_grad():
        probs = model(x).softmax(1)[0]
    scores, idx = probs.topk(5)
    return {"predictions": [{"index": int(i), "score": float(s)} for s, i in zip(scores, idx, strict=True)]}


@app.post("/explain")
def explain(image: UploadFile = File(...)) -> dict[str, object]:
    x = _load(image.file.read())
    with lock:
        with torch.no_grad():
            top = int(model(x).argmax(1))
        with GradCAM(model=model, target_layers=[model.layer4]) as cam:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(top)])[0]
    buf = io.BytesIO()
    Image.fromarray((heat * 255).astype(np.uint8)).save(buf, format="PNG")
    return {"index": top, "heatmap": base64.b64encode(buf.getvalue()).decode()}
