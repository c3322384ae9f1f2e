"""The CAM engine, the methods and their faithfulness metrics; tensors in, tensors out, no HTTP."""

from service.cam.engine import FUSIONS, SMOOTHINGS, CamEngine, CamMaps, CamQuery, EngineOutput, ExplainJob
from service.cam.layers import LayerInfo, find_layers
from service.cam.methods import METHODS, CamContext, CamMethod, Cost, Needs, get_method, register_method

__all__ = [
    "FUSIONS",
    "METHODS",
    "SMOOTHINGS",
    "CamContext",
    "CamEngine",
    "CamMaps",
    "CamMethod",
    "CamQuery",
    "Cost",
    "EngineOutput",
    "ExplainJob",
    "LayerInfo",
    "Needs",
    "find_layers",
    "get_method",
    "register_method",
]
