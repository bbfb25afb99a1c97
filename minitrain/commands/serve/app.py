"""The FastAPI application of ``minitrain serve``: its routes, its key check, and errors as one
JSON line (``{"error": "..."}``) with the right status, never a traceback."""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from typing import Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from minitrain.commands.serve import inputs, page
from minitrain.commands.serve.batcher import Batcher
from minitrain.commands.serve.inputs import Refused
from minitrain.commands.serve.metrics import Metrics
from minitrain.commands.serve.model import Served

ROUTES = ("/", "/health", "/metadata", "/metrics", "/predict")
log = logging.getLogger("minitrain.serve")


def create(
    served: Served,
    max_batch: int = 32,
    batch_timeout_ms: float = 0.0,
    workers: int = 1,
    max_images: int = 32,
    api_key: str | None = None,
) -> FastAPI:
    metrics = Metrics(max_batch)
    batcher = Batcher(served.probabilities, max_batch, batch_timeout_ms / 1000, workers, metrics.batched)
    names = served.metadata["class_names"]
    settings = {"max_batch": max_batch, "batch_timeout_ms": batch_timeout_ms, "workers": workers,
                "max_images": max_images, "max_body_bytes": inputs.MAX_BODY}  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield  # uvicorn lets the requests in flight finish before it gets here on SIGTERM
        await batcher.stop()

    app = FastAPI(title="minitrain serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
        if not given:
            raise Refused(401, "missing API key: send the header Authorization: Bearer KEY (or X-API-Key: KEY)")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise Refused(403, "wrong API key")

    @app.middleware("http")
    async def count(request: Request, call_next):
        path = request.url.path if request.url.path in ROUTES else "other"
        if path != "/predict":
            response = await call_next(request)
            metrics.answered(path, response.status_code)
            return response
        started = time.perf_counter()
        with metrics.in_flight.track_inprogress():
            response = await call_next(request)
        metrics.answered(path, response.status_code)
        metrics.latency.observe(time.perf_counter() - started)
        return response

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"bad request: {problems}"}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    async def home() -> str:
        return page.html_page(served.metadata, api_key is not None)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metadata", dependencies=[Depends(authorised)])
    async def metadata() -> dict:
        return {**served.public_metadata(), "runtime": served.runtime, "server": settings}

    @app.get("/metrics", dependencies=[Depends(authorised)])
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/predict", dependencies=[Depends(authorised)])
    async def predict(
        request: Request,
        top_k: int = Query(5, ge=1, description="classes per image"),
        resize: Literal["stretch", "crop"] = Query("stretch"),
    ) -> dict:
        files, pixels = await inputs.images(request, served.metadata, max_images, resize)
        try:
            probabilities = await batcher.submit(pixels)
        except Exception:
            log.exception("the model failed on a batch")
            raise Refused(500, "internal error: the model failed on this batch (the server log says why)") from None
        predictions = []
        for name, row in zip(files, probabilities):
            best = row.argsort(kind="stable")[::-1][: min(top_k, len(row))]
            top = [{"class": names[i], "index": int(i), "probability": float(row[i])} for i in best]
            predictions.append({"image": name, "top": top})
        return {"predictions": predictions}

    return app
