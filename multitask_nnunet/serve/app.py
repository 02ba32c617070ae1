"""The HTTP side of ``multitask-nnunet serve``: a FastAPI app around a ``Service`` (service.py), run by uvicorn.

Endpoints (every answer that is not a file is JSON; errors are ``{"detail": "one line"}``):

- ``GET /health``: ``{"status": "ok", ...}`` (no token needed).
- ``GET /model``: classes, labels or regions, channels, folds, plans, device, versions, the service's limits.
- ``POST /predict``: one case, one NIfTI file per channel (multipart/form-data, any field name; several channels
  named by nnU-Net's suffixes ``<case>_0000.nii.gz``...). Answers the class, the probabilities, the uncertainty
  (where the model gives one), the volumes in mL, the timings and an ``id``.
- ``GET /predict/{id}/mask``: the mask, NIfTI in the input's geometry; ``/predict/{id}/saliency``: the saliency
  map, where the model was served with ``--saliency`` (else 404).
- ``GET /predict/{id}/slice/{view}/{index}?layer=image|mask|saliency``: a slice as PNG, for the viewer.
- ``GET /``: the viewer page (static/index.html).

With a token, every endpoint but ``/health`` and the page itself needs ``Authorization: Bearer TOKEN`` (or
``?token=TOKEN``, which the page's images and download link use); 401 otherwise.
"""
import asyncio
import hmac
import os
import re
import shutil
import signal
import sys
import traceback
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from multitask_nnunet.errors import InputError, WriteError, one_line
from multitask_nnunet.serve.service import Service
from multitask_nnunet.serve.uploads import ServiceError, UploadReceiver, describe_bytes, storage_error
from multitask_nnunet.serve.viewer import LAYERS, VIEWS

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
RESULT_ID = re.compile(r"[0-9a-f]{32}")


def create_app(service: Service, token: Optional[str] = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="multitask-nnunet", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def authorized(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ServiceError(401, "missing or wrong token (Authorization: Bearer TOKEN)",
                               {"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorized)]

    @app.exception_handler(ServiceError)
    async def service_error(request, e: ServiceError):
        return JSONResponse({"detail": e.message}, e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        return JSONResponse({"detail": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in error.get('loc', ()))}: {error.get('msg')}"
                             for error in e.errors())
        return JSONResponse({"detail": f"bad request: {problems}"}, 422)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        traceback.print_exception(e, file=sys.stderr)
        return JSONResponse({"detail": f"internal error: {type(e).__name__}: {one_line(e)}"}, 500)

    @app.get("/health")
    def health():
        return {"status": "ok", "queued": service.queue.qsize(), "results": len(service.store)}

    @app.get("/model", dependencies=guarded)
    def model():
        return service.model_info()

    @app.post("/predict", dependencies=guarded)
    async def predict(request: Request):
        body = request.stream()
        folder = receiver = None
        try:
            service.check_room()
            limit = service.options.max_upload_bytes
            length = request.headers.get("content-length")
            if length is not None and not length.isdigit():
                raise ServiceError(400, f"bad Content-Length {length!r}")
            if length is not None and int(length) > limit:
                raise ServiceError(413, f"upload larger than the limit of {describe_bytes(limit)} "
                                        f"(serve --max-upload-mb)")
            folder = service.new_upload_folder()
            receiver = UploadReceiver(folder, request.headers.get("content-type"), limit)
            async for chunk in body:
                receiver.write(chunk)
            job = service.submit(folder, receiver.finish())
        except BaseException as e:
            if receiver is not None:
                receiver.close()
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            refused = e if isinstance(e, ServiceError) else storage_error(e, "the upload")
            if refused is not None:
                await _drain(body)
            if refused is not None and refused is not e:
                raise refused from None
            raise
        # from here the worker owns the folder and removes it
        try:
            stored = await asyncio.wait_for(asyncio.wrap_future(job.future), service.options.timeout)
        except asyncio.TimeoutError:
            job.abandoned = True
            raise ServiceError(504, f"case '{job.name}': no result within {service.options.timeout:g} s "
                                    f"(serve --timeout)") from None
        except InputError as e:
            raise ServiceError(422, str(e)) from None
        except WriteError as e:
            raise storage_error(e, f"the result of case '{job.name}'") from None
        payload = stored.payload
        print(f"predicted {payload['name']} ({payload['id']}): class {payload['class_index']} "
              f"({payload['class_name']}) in {payload['timings']['service']:.2f} s", flush=True)
        return payload

    def stored(result_id: str):
        found = service.store.get(result_id) if RESULT_ID.fullmatch(result_id) else None
        if found is None:
            raise ServiceError(404, f"no result {result_id[:40]!r} (unknown, or expired: results are kept "
                                    f"{service.options.result_ttl:g} s, at most {service.options.max_results})")
        return found

    def download_name(found, suffix: str = "") -> str:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", found.payload["name"])
        return f"{name}{suffix}{service.predictor.file_ending}"

    media_type = "application/gzip" if service.predictor.file_ending.endswith(".gz") else "application/octet-stream"

    @app.get("/predict/{result_id}/mask", dependencies=guarded)
    def mask(result_id: str):
        found = stored(result_id)
        return FileResponse(found.mask, media_type=media_type, filename=download_name(found))

    @app.get("/predict/{result_id}/saliency", dependencies=guarded)
    def saliency(result_id: str):
        found = stored(result_id)
        if found.saliency is None:
            raise ServiceError(404, f"result {result_id}: no saliency map (" + (
                "serve was started without --saliency)" if service.model_info()["saliency"] is False
                else "the model gave none for this case)"))
        return FileResponse(found.saliency, media_type=media_type, filename=download_name(found, "_saliency"))

    @app.get("/predict/{result_id}/slice/{view}/{index}", dependencies=guarded)
    def slice_png(result_id: str, view: str, index: int, layer: str = "image"):
        found = stored(result_id)
        if view not in VIEWS or layer not in LAYERS:
            raise ServiceError(404, f"view {view!r}, layer {layer!r}: need a view of {', '.join(VIEWS)} and a "
                                    f"layer of {', '.join(LAYERS)}")
        size = found.views.sizes()[view]
        if not 0 <= index < size:
            raise ServiceError(404, f"{view} slice {index}: the case has slices 0-{size - 1}")
        if layer == "saliency" and found.views.saliency is None:
            raise ServiceError(404, f"result {result_id}: no saliency map")
        return Response(found.views.png(view, index, layer), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    def page():
        with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
            return f.read()

    return app


def serve(service: Service, host: str, port: int, token: Optional[str]) -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM; the private folder goes on shutdown, also after errors."""
    import uvicorn
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then sends the signal again to the handler it found: this
    # one, so that the command ends normally (status 0) instead of being killed by its own signal
    previous = {s: signal.signal(s, _ignore) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"multitask-nnunet serve: model loaded in {service.load_seconds:.1f} s, warmed up in "
              f"{service.warm_up_seconds:.1f} s on {service.predictor.device}; serving http://{host}:{port}/"
              + (" (token required)" if token else ""), flush=True)
        uvicorn.run(create_app(service, token), host=host, port=port, log_level="warning", access_log=False)
    finally:
        service.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _ignore(signum, frame) -> None:
    pass


async def _drain(body, limit: int = 64 * 2 ** 20) -> None:
    """Read (and drop) what is left of a refused request's body, up to ``limit`` bytes: a connection closed with
    unread data is reset, and the client may lose the answer."""
    try:
        read = 0
        async for chunk in body:
            read += len(chunk)
            if read > limit:
                return
    except Exception:  # the client went away, or the body was already read
        pass
