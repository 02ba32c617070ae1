"""The inference service without the web framework: one model, one worker thread, a bounded queue, the results.

- The model (``CasePredictor``, the one prediction API) is loaded once and warmed up with one prediction of an
  empty patch; one worker thread owns it and predicts the queued cases one at a time.
- The queue is bounded (``queue_size`` cases waiting, besides the one being predicted): ``submit`` on a full queue
  is a ``ServiceError`` 503 with a Retry-After estimate. The caller waits for its case with a timeout; a case
  whose caller gave up is skipped if it has not started, and its result dropped if it has.
- Every file lives in one private folder (``tempfile.mkdtemp``: mode 0700): uploads in ``uploads/<random>/`` under
  the server's names, removed as soon as the case is done (or failed, or skipped), masks and saliency maps in
  ``results/``, removed with their result. Results expire after ``result_ttl`` seconds, and beyond
  ``max_results`` the oldest go first. ``close`` removes the folder. Its name carries the host and process id
  (as atomic.py's temporary files do), so that the next start removes the folder of a server that was killed.
- A full (or read-only) disk fails the request in one line (507, or 503: uploads.storage_error) and leaves
  nothing of it behind; the service goes on, and the same request succeeds once there is room.
"""
import math
import os
import queue
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from multitask_nnunet.io.atomic import owner_is_gone, owner_tag
from multitask_nnunet.errors import InputError, WriteError
from multitask_nnunet.inference.options import PredictorOptions
from multitask_nnunet.io.labels import volumes_ml
from multitask_nnunet.serve.options import ServeOptions
from multitask_nnunet.serve.uploads import ServiceError, Upload, assign_channels
from multitask_nnunet.serve.viewer import Views


PRIVATE_PREFIX = "multitask-nnunet-serve-"
# multitask-nnunet-serve-<host>-<pid>-<mkdtemp's random letters, digits and _>
_PRIVATE = re.compile(re.escape(PRIVATE_PREFIX) + r"(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[A-Za-z0-9_]+")


def remove_leftover_folders(parent: str) -> List[str]:
    """The private folders in ``parent`` of servers on this host whose process is gone (killed: a server that
    stops removes its own), removed; their names."""
    removed = []
    for name in sorted(os.listdir(parent)):
        match = _PRIVATE.fullmatch(name)
        if match and owner_is_gone(match["host"], match["pid"]) and os.path.isdir(os.path.join(parent, name)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
    return removed


@dataclass
class Job:
    folder: str                       # the upload folder: the worker removes it
    files: List[str]                  # channel files, channel order
    name: str                         # case name (from the client's file names)
    uploads: List[Upload]
    submitted: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    abandoned: bool = False           # the caller gave up (timeout)

    def clean(self, message: str) -> str:
        """A message without the server's paths: the client's names instead."""
        for path, upload in zip(self.files, self.uploads):
            message = message.replace(path, upload.name)
        return message.replace(self.folder + os.sep, "").replace(self.folder, "")


@dataclass
class Stored:
    created: float                    # time.monotonic()
    payload: dict                     # the JSON answer of POST /predict
    mask: str                         # NIfTI file in the input's geometry
    saliency: Optional[str]
    views: Views


class ResultStore:
    def __init__(self, ttl: float, max_count: int):
        self.ttl, self.max_count = ttl, max_count
        self._items: "OrderedDict[str, Stored]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, result_id: str, stored: Stored) -> None:
        with self._lock:
            self._items[result_id] = stored
            self._expire()

    def get(self, result_id: str) -> Optional[Stored]:
        with self._lock:
            self._expire()
            return self._items.get(result_id)

    def __len__(self):
        with self._lock:
            self._expire()
            return len(self._items)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            oldest_id, oldest = next(iter(self._items.items()))
            if now - oldest.created <= self.ttl and len(self._items) <= self.max_count:
                break
            del self._items[oldest_id]
            for path in (oldest.mask, oldest.saliency):
                if path:
                    _remove(path)


class Service:
    def __init__(self, model_dir, predictor_options: PredictorOptions, options: ServeOptions = ServeOptions()):
        from multitask_nnunet.inference.case_predictor import CasePredictor
        self.options = options
        t0 = time.perf_counter()
        self.predictor = CasePredictor(model_dir, predictor_options)
        self.load_seconds = time.perf_counter() - t0
        self.warm_up_seconds = self._warm_up()
        # made only now: nothing is left behind by a start that fails or is interrupted while the model loads
        for name in remove_leftover_folders(tempfile.gettempdir()):
            print(f"multitask-nnunet serve: removed {os.path.join(tempfile.gettempdir(), name)}, left by a server "
                  f"that was killed", flush=True)
        self.root = tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{owner_tag()}-")
        self.uploads = os.path.join(self.root, "uploads")
        self.results = os.path.join(self.root, "results")
        os.mkdir(self.uploads, 0o700)
        os.mkdir(self.results, 0o700)
        self.dataset_json = self.predictor.io.dataset_json
        self.store = ResultStore(options.result_ttl, options.max_results)
        self.queue: "queue.Queue[Optional[Job]]" = queue.Queue(options.queue_size)
        self.seconds_per_case = self.warm_up_seconds
        self.closed = False
        self._thread = threading.Thread(target=self._work, name="predict", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- requests
    def new_upload_folder(self) -> str:
        return tempfile.mkdtemp(dir=self.uploads)

    def retry_after(self) -> int:
        return max(1, math.ceil(self.seconds_per_case * (self.options.queue_size + 1)))

    def check_room(self) -> None:
        """503 now, before the upload is read, when the queue is already full."""
        if self.closed or self.queue.full():
            raise self._busy()

    def submit(self, folder: str, uploads: List[Upload]) -> Job:
        """Queue a case (the upload folder then belongs to the worker); ``ServiceError`` for bad uploads (the
        caller removes the folder) and 503 when the queue is full."""
        name, channels = assign_channels(uploads, self.dataset_json["channel_names"])
        files = []
        for channel, (upload, ending) in enumerate(channels):
            path = os.path.join(folder, f"case_{channel:04d}{ending}")
            os.rename(upload.path, path)
            files.append(path)
        job = Job(folder, files, name, [u for u, _ in channels])
        if self.closed:
            raise self._busy()
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise self._busy() from None
        return job

    def _busy(self) -> ServiceError:
        seconds = self.retry_after()
        return ServiceError(503, f"busy: {self.options.queue_size} case(s) already waiting (serve --queue-size); "
                                 f"retry in {seconds} s", {"Retry-After": str(seconds)})

    # ---------------------------------------------------------------- the worker
    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                shutil.rmtree(job.folder, ignore_errors=True)
                continue
            started = time.perf_counter()
            stored = failure = None
            try:
                stored = self._predict(job, started)
            except InputError as e:
                failure = InputError(job.clean(str(e)))
            except WriteError as e:  # the server's disk: the request is answered 507/503 (app.py), no traceback
                print(f"multitask-nnunet serve: case '{job.name}': {e}", file=sys.stderr, flush=True)
                failure = e
            except Exception as e:  # the service keeps serving; the request gets a 500 naming the error
                print(f"multitask-nnunet serve: error predicting '{job.name}': {type(e).__name__}: {e}",
                      file=sys.stderr)
                failure = e
            finally:
                # the upload goes before the request is answered: an answered request has left nothing behind
                shutil.rmtree(job.folder, ignore_errors=True)
            self.seconds_per_case = 0.7 * self.seconds_per_case + 0.3 * (time.perf_counter() - started)
            if failure is not None:
                job.future.set_exception(failure)
            else:
                job.future.set_result(stored)

    def _predict(self, job: Job, started: float) -> Stored:
        result = self.predictor.predict_case(job.files, name=job.name)
        if job.abandoned:
            raise InputError(f"case '{job.name}': the request timed out")
        result_id = secrets.token_hex(16)
        ending = self.predictor.file_ending
        mask = os.path.join(self.results, result_id + ending)
        saliency_map = getattr(result, "saliency", None)
        saliency = None
        try:
            self.predictor.write_mask(result, mask)
            if saliency_map is not None and hasattr(self.predictor, "write_saliency"):
                saliency = os.path.join(self.results, f"{result_id}_saliency{ending}")
                self.predictor.write_saliency(result, saliency)
            image, properties = self.predictor.io.plans_manager.image_reader_writer_class().read_images(
                job.files[:1])
            views = Views.from_case(image[0], result.segmentation, saliency_map, properties["spacing"],
                                    properties.get("sitk_stuff", {}).get("direction"),
                                    self.dataset_json["channel_names"]["0"])
        except BaseException:
            for path in (mask, saliency):
                if path:
                    _remove(path)
            raise
        class_names = self.predictor.class_names
        timings = {stage: round(seconds, 4) for stage, seconds in result.timings.items()}
        timings["queue"] = round(started - job.submitted, 4)
        timings["service"] = round(time.perf_counter() - started, 4)
        payload = {
            "id": result_id,
            "name": job.name,
            "files": [u.name for u in job.uploads],
            "class_index": int(result.class_index),
            "class_name": result.class_name,
            "probabilities": {name: round(float(p), 6) for name, p in zip(class_names, result.probabilities)},
            "calibrated": self.predictor.temperatures is not None,  # every fold's calibration.json applied
            "uncertainty": {k: float(v) for k, v in (getattr(result, "uncertainty", None) or {}).items()},
            "volumes_ml": volumes_ml(result.segmentation, result.properties["spacing"],
                                     self.predictor.predictor.label_manager),
            "guide": dict(getattr(result, "guide", None) or {}),  # guide_ml, no_guide (heads.guide_summary)
            "timings": timings,
            "path": result.path,
            "fallback": result.fallback,
            "shape": [int(n) for n in result.shape],
            "spacing": [float(s) for s in result.properties["spacing"]],
            "saliency": saliency is not None,
            "viewer": {"sizes": views.sizes(), "window": list(views.window)},
            "expires_in_s": self.options.result_ttl,
        }
        stored = Stored(time.monotonic(), payload, mask, saliency, views)
        self.store.add(result_id, stored)
        return stored

    def _warm_up(self) -> float:
        """One prediction of an empty patch at the plans' spacing (the first prediction builds what torch caches)."""
        configuration = self.predictor.predictor.configuration_manager
        backward = self.predictor.predictor.plans_manager.transpose_backward
        shape = [configuration.patch_size[i] for i in backward]
        spacing = [configuration.spacing[i] for i in backward]
        image = np.zeros((len(self.predictor.io.dataset_json["channel_names"]), *shape), np.float32)
        t0 = time.perf_counter()
        self.predictor.predict_case(image, {"spacing": spacing}, name="warm-up")
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- the model, shutting down
    def model_info(self) -> dict:
        from importlib.metadata import version

        import torch

        import multitask_nnunet
        predictor = self.predictor
        configuration = predictor.predictor.configuration_manager
        label_manager = predictor.predictor.label_manager
        return {
            "model_dir": predictor.model_dir,
            "classes": list(predictor.class_names),
            "labels": self.dataset_json["labels"],
            "regions": bool(label_manager.has_regions),
            "channels": self.dataset_json["channel_names"],
            "file_ending": predictor.file_ending,
            "folds": [f if isinstance(f, str) else int(f) for f in predictor.folds],
            "checkpoint": predictor.options.checkpoint,
            "plans": {"name": predictor.predictor.plans_manager.plans_name,
                      "configuration": predictor.configuration_name,
                      "patch_size": [int(n) for n in configuration.patch_size],
                      "spacing": [float(s) for s in configuration.spacing]},
            "device": str(predictor.device),
            "tta": predictor.options.tta,
            "saliency": bool(getattr(predictor.options, "saliency", False)),
            "calibration": None if predictor.temperatures is None else
            {str(f): float(t) for f, t in zip(predictor.folds, predictor.temperatures[:, 0])},
            "version": {"multitask_nnunet": multitask_nnunet.__version__, "nnunetv2": version("nnunetv2"),
                        "torch": torch.__version__},
            "service": {"queue_size": self.options.queue_size, "timeout_s": self.options.timeout,
                        "max_upload_bytes": self.options.max_upload_bytes, "result_ttl_s": self.options.result_ttl,
                        "max_results": self.options.max_results, "load_s": round(self.load_seconds, 3),
                        "warm_up_s": round(self.warm_up_seconds, 3)},
        }

    def close(self) -> None:
        """Stop taking cases, drop the waiting ones, let the running one finish (up to a minute), remove the
        private folder."""
        if self.closed:
            return
        self.closed = True
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
                shutil.rmtree(job.folder, ignore_errors=True)
        self.queue.put(None)
        self._thread.join(60)
        shutil.rmtree(self.root, ignore_errors=True)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
