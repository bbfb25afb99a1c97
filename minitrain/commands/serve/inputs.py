"""What a client sent to ``POST /predict``, as named images, or a :class:`Refused` with the
HTTP status and the one-line reason the client gets back.

Two ways to send: the raw bytes of one image (``Content-Type: image/...`` or
``application/octet-stream``), or a ``multipart/form-data`` form with one file part per image
(``curl -F image=@cat.jpg -F image=@dog.png``). The body is read up to :data:`MAX_BODY` bytes;
each image is decoded by ``minitrain predict``'s own reader, in a thread, so a large or broken
image stalls neither the event loop nor other requests.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
from starlette.exceptions import HTTPException
from starlette.requests import Request

from minitrain.commands.predict import read
from minitrain.engine.errors import MinitrainError

MAX_BODY = 32 * 1024 * 1024
"""Bytes one request may send."""
RAW = ("image/", "application/octet-stream")


class Refused(Exception):
    """A request answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


async def images(request: Request, metadata: dict, max_images: int, resize: str) -> tuple[list[str], np.ndarray]:
    """The names and the pixels (N×H×W(×C) uint8, the model's size) of the request's images."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (kind == "multipart/form-data" or kind.startswith(RAW)):
        raise Refused(
            415,
            f"unsupported content type {kind or '(none)'!r}: send one image as its raw bytes "
            "(Content-Type: image/png, image/jpeg, ... or application/octet-stream) or images as "
            "multipart/form-data file parts",
        )
    body = await _body(request)
    if not body:
        raise Refused(400, "empty body: send an image")
    files = [("body", body)] if kind != "multipart/form-data" else await _parts(request, body, max_images)
    if len(files) > max_images:
        raise Refused(413, f"too many images: {len(files)} in one request, at most {max_images}")
    pixels = await asyncio.gather(*(asyncio.to_thread(_decode, name, data, metadata, resize) for name, data in files))
    return [name for name, _ in files], np.stack(pixels)


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise Refused(413, f"body too large: {int(declared):,} bytes, at most {MAX_BODY:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise Refused(413, f"body too large: over {MAX_BODY:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parts(request: Request, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    """The file parts of a multipart body already read (Starlette parses it once more, from memory)."""

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=max_images, max_fields=max_images) as form:
            parts = [value for _, value in form.multi_items() if not isinstance(value, str)]
            files = [(part.filename or f"image {i}", await part.read()) for i, part in enumerate(parts)]
    except HTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise Refused(413, f"too many images: more than {max_images} in one request") from None
        raise Refused(400, f"malformed multipart body: {exc.detail}") from None
    if not files:
        raise Refused(400, "no image in the form: send each image as a file part (curl -F image=@cat.jpg)")
    return files


def _decode(name: str, data: bytes, metadata: dict, resize: str) -> np.ndarray:
    if not data:
        raise Refused(400, f"empty image: {name}")
    stream = io.BytesIO(data)
    try:
        return read(stream, metadata, resize, name=name)
    except MinitrainError as exc:
        message = str(exc).replace(f" {stream!r}", "")  # Pillow names the file object
        raise Refused(413 if "too large to decode safely" in message else 422, message) from None
