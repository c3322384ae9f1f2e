"""The domain errors of camserve, one tree.

Everything below the HTTP layer raises these; ``service.api.errors`` maps each class to one HTTP
status in a single table and renders ``{"error": {"code", "message"}}``. The codes:

CamserveError                 base; ``code`` is the machine-readable name
+-- InvalidInput              400 ``invalid_input``: the request body cannot be understood
|   +-- InvalidImage          400 ``invalid_image``: bytes that are not a decodable image, bad base64
+-- InvalidArgument           422 ``invalid_argument``: a well-formed option with a bad value
+-- Unauthorized              401 ``unauthorized``: API keys are set and none valid was given
+-- ModelNotFound             404 ``model_not_found``
+-- PayloadTooLarge           413 ``payload_too_large``: body, image pixels or image count
+-- NotAcceptable             406 ``not_acceptable``: ``Accept: image/png`` for more than one heatmap
+-- UnsupportedMediaType      415 ``unsupported_media_type``
+-- ModelError                500 ``model_error``: the model itself raised while computing a batch
+-- NotReady                  503 ``not_ready``: models are still loading or the server is draining
+-- Overloaded                503 ``overloaded``: the queue is full; carries ``retry_after`` seconds
|   +-- OutOfMemory           503 ``out_of_memory``: one image alone does not fit on the device
+-- RequestTimeout            504 ``timeout``: the request waited longer than the configured timeout

Messages name the argument and the bad value, and never contain paths, keys or image data.
"""

from __future__ import annotations


class CamserveError(Exception):
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(CamserveError):
    code = "invalid_input"


class InvalidImage(InvalidInput):
    code = "invalid_image"


class InvalidArgument(CamserveError):
    code = "invalid_argument"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Unauthorized(CamserveError):
    code = "unauthorized"


class ModelNotFound(CamserveError):
    code = "model_not_found"


class PayloadTooLarge(CamserveError):
    code = "payload_too_large"


class NotAcceptable(CamserveError):
    code = "not_acceptable"


class UnsupportedMediaType(CamserveError):
    code = "unsupported_media_type"


class ModelError(CamserveError):
    code = "model_error"


class NotReady(CamserveError):
    code = "not_ready"


class Overloaded(CamserveError):
    code = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OutOfMemory(Overloaded):
    code = "out_of_memory"


class RequestTimeout(CamserveError):
    code = "timeout"
