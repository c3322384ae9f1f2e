"""The CAM engine and methods; tensors in, tensors out, no HTTP."""

from service.cam.engine import CamEngine, CamMaps, CamQuery, EngineOutput
from service.cam.layers import LayerInfo, find_layers
from service.cam.methods import METHODS, get_method

__all__ = ["METHODS", "CamEngine", "CamMaps", "CamQuery", "EngineOutput", "LayerInfo", "find_layers", "get_method"]
