"""The domain errors of camserve, one tree.

Everything below the HTTP layer raises these. Each class says what went wrong and carries a
machine-readable ``code``; ``service.api.errors`` holds the one table from class to HTTP status,
looked up along the class hierarchy, and the one renderer of error bodies. The tree:

CamserveError               base
+-- InvalidInput            the request body cannot be understood
|   +-- InvalidImage        bytes that are not a decodable image, bad base64
+-- InvalidArgument         a well-formed option with a bad value; ``field`` names the option
+-- Unauthorized            API keys are set and none valid was given
+-- Forbidden               a valid key, but not one allowed to do this (operator actions)
+-- ModelNotFound           no model of that name
+-- PayloadTooLarge         body, image pixels, image count or output size over a limit
|   +-- HeadersTooLarge     request headers over their size or count limits
+-- NotAcceptable           nothing the client's ``Accept`` allows can be produced
+-- UnsupportedMediaType    a body that is neither JSON nor multipart
+-- ModelError              the model itself raised while computing a batch
+-- NotReady                a model is loading or unloading, or the server is draining
+-- Overloaded              the queue is full; carries ``retry_after`` seconds
|   +-- OutOfMemory         one image alone does not fit on the device
+-- RequestTimeout          the request took longer than the configured timeout

Messages name the argument and the bad value, and never contain paths, keys or image data.
"""

from __future__ import annotations


class CamserveError(Exception):
    """Base of every domain error. ``code`` is stable; ``message`` is for people."""

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


class Forbidden(CamserveError):
    code = "forbidden"


class ModelNotFound(CamserveError):
    code = "model_not_found"


class PayloadTooLarge(CamserveError):
    code = "payload_too_large"


class HeadersTooLarge(PayloadTooLarge):
    code = "headers_too_large"


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
