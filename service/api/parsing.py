"""Turn a JSON or multipart request (plus query parameters) into images and validated options."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.api.middleware import BodyTooLarge
from service.errors import InvalidArgument, InvalidImage, InvalidInput, PayloadTooLarge, UnsupportedMediaType

OptionsT = TypeVar("OptionsT", bound=BaseModel)

_DATA_URI = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_LIST_OPTIONS = {"targets", "metrics", "layer"}
# Keys that are never options, so never refused: client-side request ids. Any key starting with `_`
# is ignored too (`?_=1700000000` cache busters). Every other unknown key is a 422, so a misspelled
# option (`ouput=overlay`) is reported instead of silently ignored.
IGNORED_KEYS = frozenset({"request_id", "id"})


def _is_ignored(key: str) -> bool:
    return key.startswith("_") or key in IGNORED_KEYS


def decode_base64(text: str, index: int) -> bytes:
    """Plain or URL-safe base64, or a ``data:image/...;base64,`` URI -> bytes."""
    if not text.startswith("data:"):
        # Most clients send plain padded base64: decode it as is, without the copies and the regex
        # scan below (a third of a millisecond for a small image).
        with contextlib.suppress(binascii.Error, ValueError):
            return base64.b64decode(text, validate=True)
    body = _DATA_URI.sub("", text.strip(), count=1)
    body = re.sub(r"\s+", "", body).replace("-", "+").replace("_", "/")
    body += "=" * (-len(body) % 4)
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"image {index} is not valid base64") from None


def json_object(raw: bytes, what: str = "the body",
                error: Callable[[str], Exception] = InvalidInput) -> dict[str, Any]:
    """``raw`` parsed as a JSON object; anything else (bad syntax, bad UTF-8, too deep, not an object)
    is ``error(message)``, a 400 in every dialect."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, Unicode, int digit limit, deep nesting
        raise error(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise error(f"{what} must be a JSON object, got {type(body).__name__}")
    return body


def validation_message(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "body"
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return field, f"`{field}`: {err['msg']}, got {shown}"


def _validate(model: type[OptionsT], data: dict[str, Any]) -> OptionsT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        field, message = validation_message(exc)
        raise InvalidArgument(field, message) from None


def query_options(request: Request) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in request.query_params:
        values = request.query_params.getlist(key)
        out[key] = _list_option(values, key) if key in _LIST_OPTIONS else values[-1]
    return out


def _list_option(values: list[str], key: str = "targets") -> list[Any]:
    """``targets=3&targets=cat``, ``targets=3,cat`` or ``targets=[3, "cat"]`` -> ``["3", "cat"]``. A JSON list
    of ``targets`` may hold objects (a detector's boxes, a segmenter's masks), kept as they are."""
    items: list[Any] = []
    for v in values:
        v = v.strip()
        if v.startswith("["):
            try:
                parsed = json.loads(v)
            except (ValueError, RecursionError):  # also int digit limits and absurd nesting
                raise InvalidArgument(key, f"`{key}` is not a valid JSON list, got {v!r}") from None
            keep = key == "targets"
            items += ([x if keep and isinstance(x, dict) else str(x) for x in parsed] if isinstance(parsed, list)
                      else [parsed if keep and isinstance(parsed, dict) else str(parsed)])
        else:
            items += [p.strip() for p in v.split(",") if p.strip()]
    return items


async def parse_request(request: Request, options: type[OptionsT], max_images: int) -> tuple[list[bytes], OptionsT]:
    """Read images and options from a JSON body or a multipart form; query parameters fill the gaps
    (an option given in both places takes the body's or form's value)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = query_options(request)
    if ctype == "application/json" or ctype.endswith("+json"):
        images, fields = await _from_json(request)
    elif ctype == "multipart/form-data":
        images, fields = await _from_form(request, max_images)
    else:
        got = ctype or "none"
        raise UnsupportedMediaType(f"content type must be application/json or multipart/form-data, got {got!r}")
    merged = {k: v for k, v in {**query, **fields}.items() if not _is_ignored(k)}
    opts = _validate(options, merged)
    if not images:
        raise InvalidInput("no image given: send `image` or `images` (JSON) or file parts named `image` (multipart)")
    if len(images) > max_images:
        raise PayloadTooLarge(f"{len(images)} images in one request, over the limit of {max_images}")
    return images, opts


async def _from_json(request: Request) -> tuple[list[bytes], dict[str, Any]]:
    body = json_object(await request.body(), "the JSON body", lambda message: InvalidArgument("body", message))
    image, images = body.pop("image", None), body.pop("images", None)
    if image is not None and images is not None:
        raise InvalidArgument("image", "send either `image` or `images`, not both")
    if image is not None and not isinstance(image, str):
        raise InvalidArgument("image", f"`image` must be a base64 string, got {type(image).__name__}")
    if images is not None and (not isinstance(images, list) or not all(isinstance(i, str) for i in images)):
        raise InvalidArgument("images", "`images` must be a list of base64 strings")
    texts = [image] if image is not None else list(images or [])
    return [decode_base64(t, i) for i, t in enumerate(texts)], body


async def _from_form(request: Request, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    try:
        form = await request.form(max_files=max_images + 1, max_fields=100)
    except BodyTooLarge:
        raise
    except Exception as exc:  # multipart's parser raises several unrelated types
        if "Too many files" in str(exc):
            raise PayloadTooLarge(f"more than {max_images} images in one request") from None
        raise InvalidInput(f"malformed multipart body: {exc}") from None
    images: list[bytes] = []
    fields: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise InvalidArgument(key, f"file parts must be named `image`, got {key!r}")
                images.append(await value.read())
            elif key == "image":
                images.append(decode_base64(value, len(images)))
            elif key in _LIST_OPTIONS:
                fields[key] = [*fields.get(key, []), *_list_option([value], key)]
            else:
                fields[key] = value
    finally:
        await form.close()
    return images, fields
