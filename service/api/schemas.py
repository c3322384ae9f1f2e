"""Wire schemas: what clients send and receive. The compute layers never see these."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.cam import FUSIONS, METHODS, SMOOTHINGS
from service.cam.metrics import DEFAULT_STEPS, MAX_STEPS, METRICS, MIN_STEPS
from service.cam.tasks import OBJECTIVES
from service.colormaps import COLORMAPS
from service.dataplane import ExplainOptions as ExplainRequest
from service.rendering import OUTPUTS, SIZES


def _enum(names: tuple[str, ...] | list[str], default: str, description: str) -> Any:
    """A string option whose allowed values come from the table that defines them (methods,
    outputs, sizes, colormaps); the data plane checks the value and names the valid ones."""
    return Field(default, description=description, json_schema_extra={"enum": list(names)})


def _no_bools(value: object) -> object:
    # Pydantic's lax mode reads true/false as 1/0: a class index of `true` is a client bug, not class 1.
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) for v in items):
        raise ValueError("booleans are not class indices or counts")
    return value


class PredictOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    _check_top_k = field_validator("top_k", mode="before")(_no_bools)

    model: str | None = Field(None, description="Model name; the server's default model when omitted.")
    top_k: int | None = Field(None, ge=1, description="Predictions returned per image; default 5 (or every class "
                              "of a model with fewer), at most the number of classes.")


class ExplainOptions(PredictOptions):
    targets: list[int | str | dict[str, Any]] | None = Field(
        None, description="Classes to explain for every image, as indices or labels; default: each image's top-1. "
        "Detection: detection indices or {box: [x0, y0, x1, y1], label}; segmentation: classes or "
        "{class, mask: base64 PNG}; embedding: {reference: [numbers]} or {similar_to: image index}; an object may "
        "name the `image` it is for.")
    objective: str = _enum(list(OBJECTIVES), "score", "How a detection target is scored: the matched detection's "
                           "score, or score+iou (pytorch-grad-cam's FasterRCNNBoxScoreTarget).")
    method: str = _enum(list(METHODS), "gradcam", "CAM method; when omitted, gradcam, or eigencam for a model "
                        "explained without gradients (`explanations` in /models).")
    layer: str | list[str] | None = Field(
        None, description="Dotted module name, or several (comma-separated in forms and queries) fused with "
        "`fuse`; the model's default layer when omitted.")
    fuse: str = _enum(list(FUSIONS), "mean", "How the maps of several layers are combined.")
    smooth: str | None = Field(None, description="aug: averaged over flips and brightness changes; eigen: first "
                               "principal component of the weighted activations.", json_schema_extra={
                                   "enum": list(SMOOTHINGS)})
    metrics: list[str] | None = Field(None, description="Faithfulness metrics per explanation, comma-separated in "
                                      "forms and queries.", json_schema_extra={"items": {"enum": list(METRICS)}})
    metric_steps: int = Field(DEFAULT_STEPS, ge=MIN_STEPS, le=MAX_STEPS,
                              description="Steps of the deletion and insertion curves.")
    output: str = _enum(OUTPUTS, "png", "png: greyscale heatmap; overlay: coloured on the image; array: floats.")
    size: str = _enum(SIZES, "original", "Heatmap size: the upload's, the model input's, or the layer's grid.")
    colormap: str = _enum(COLORMAPS, "jet", "Colormap for overlays.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Heatmap opacity for overlays.")

    _check_targets = field_validator("targets", mode="before")(_no_bools)
    _check_steps = field_validator("metric_steps", mode="before")(_no_bools)

    def request(self) -> ExplainRequest:
        """The data plane's options: every field passes through, so no front-end can drop one."""
        # A method left out is the model's choice (gradcam, or eigencam without gradients), not the wire default.
        return ExplainRequest(
            method=self.method if "method" in self.model_fields_set else None, layer=self.layer,
            targets=tuple(self.targets or ()), objective=self.objective, fuse=self.fuse,
            smooth=self.smooth, metrics=tuple(self.metrics or ()), metric_steps=self.metric_steps,
            output=self.output, size=self.size, colormap=self.colormap, alpha=self.alpha)  # type: ignore[arg-type]


class _Images(BaseModel):
    image: str | None = Field(None, description="One image, base64 or a data: URI.")
    images: list[str] | None = Field(None, description="Several images, base64 or data: URIs.")


class PredictBody(_Images, PredictOptions):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"model": "shapes", "image": "<base64 PNG or JPEG>", "top_k": 3}]},
    )


class ExplainBody(_Images, ExplainOptions):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"image": "<base64>", "targets": ["circle"], "method": "gradcam",
                                         "output": "overlay", "colormap": "turbo"}]},
    )


class PredictionOut(BaseModel):
    index: int
    label: str
    score: float


class HeatmapOut(BaseModel):
    format: str = _enum(OUTPUTS, "png", "The output asked for.")
    width: int
    height: int
    data: str | list[list[float]] = Field(description="Base64 PNG for png/overlay; rows of floats in [0, 1] for array.")


class ExplanationOut(PredictionOut):
    method: str
    layer: str
    heatmap: HeatmapOut
    metrics: dict[str, float] | None = Field(
        None, description="Faithfulness figures when `metrics` was asked for: average_drop, increase (confidence), "
        "deletion, insertion (areas under the curves) and the curves' steps.")
    note: str | None = Field(None, description="Why the map is what it is, when it would puzzle: an all-zero map "
                             "says whether the model ignores its input or the layer does not raise the class.")
    target: dict[str, Any] | None = Field(None, description="For a detector, segmenter or embedding model: what the "
                                          "map explains (the detection and its box, the region, the similarity).")


class DetectionOut(BaseModel):
    index: int = Field(description="The detection's rank, best first: what a target's `detection` names.")
    class_: int = Field(alias="class", description="The class index, into the model's labels.")
    label: str
    score: float
    box: tuple[float, float, float, float] = Field(description="[x0, y0, x1, y1] in the uploaded image's pixels.")


class SegmentOut(BaseModel):
    index: int
    label: str
    area: int = Field(description="Pixels of the uploaded image predicted as this class.")
    score: float = Field(description="Mean probability of the class over its region.")


class ResultOut(BaseModel):
    predictions: list[PredictionOut]
    explanations: list[ExplanationOut] | None = None
    detections: list[DetectionOut] | None = Field(None, description="A detector's detections, best first.")
    segments: list[SegmentOut] | None = Field(None, description="A segmenter's classes present, largest first.")
    mask: str | None = Field(None, description="A segmenter's class map over the upload: a base64 PNG whose pixel "
                             "values are class indices.")
    embedding: list[float] | None = Field(None, description="An embedding model's embedding.")


class InferenceResponse(BaseModel):
    model: str
    results: list[ResultOut]


class ModelSummary(BaseModel):
    name: str
    source: str = Field(description="The source kind and name, e.g. `torchvision:resnet50` or `python:pkg.mod:make`;"
                        " never a server file path.")
    state: str = Field(description="loading, ready, draining, failed or unloaded.")
    device: str
    task: str = Field(description="classification, detection, segmentation or embedding.")
    num_classes: int = Field(description="Classes (labels); an embedding model's embedding size.")
    input_size: tuple[int, int]
    layers: list[str] = Field(description="Target layers; the default first.")
    methods: list[str]
    method_costs: dict[str, str] = Field(description="Each method's cost class: free (from the shared pass), "
                                         "replay, forwards (one per channel) or backward.")
    precision: str
    output: str = Field(description="Score activation: softmax, sigmoid or none.")
    explanations: str = Field(description="gradients (every method), gradient-free (the model runs outside autograd, "
                              "as an ONNX graph does: methods from activations and extra forwards only) or none.")
    explanations_note: str | None = Field(None, description="Why the model cannot be explained, when it cannot.")


class LayerOut(BaseModel):
    name: str
    layout: str = Field(description="How the layer's output lies on the image: nchw, nhwc, tokens (N, prefix + h*w, C)"
                        " or lnd (prefix + h*w, N, C).")
    grid: tuple[int, int] = Field(description="The map's (height, width) at the model's input size.")
    channels: int
    prefix: int = Field(description="Tokens before the patch grid (class, distillation, register tokens).")
    aliases: list[str] = Field(description="Other names `layer` accepts for it: the PyTorch module paths an "
                               "exported graph's tensor came from.")


class ModelDetail(ModelSummary):
    labels: list[str]
    layer_details: list[LayerOut] = Field(description="Each candidate layer, the default first, with its layout.")


class ModelList(BaseModel):
    default: str
    models: list[ModelSummary]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
