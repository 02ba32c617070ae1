"""``multitask-nnunet serve``: the inference service and its browser viewer (app.py, service.py, viewer.py).

Needs the serve extra, ``pip install "multitask-nnunet[serve]"`` (FastAPI, uvicorn, python-multipart); nothing of
it is imported until the command runs, so the other commands work without it.

Security: it binds to 127.0.0.1 by default; any other address needs a token (``--token`` or the environment
variable ``MULTITASK_NNUNET_TOKEN``), which every request but ``/health`` must then carry.
"""
import ipaddress
import os

from multitask_nnunet.errors import InputError
from multitask_nnunet.inference.options import DEFAULT_CHECKPOINT, PredictorOptions
from multitask_nnunet.serve.options import TOKEN_ENV, ServeOptions, saliency_available

EXTRA = 'pip install "multitask-nnunet[serve]"'


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_parser(subparsers) -> None:
    defaults = ServeOptions()
    p = subparsers.add_parser(
        "serve", help="HTTP inference service with a browser viewer (needs the serve extra)",
        description="Serve one trained model over HTTP: POST /predict a NIfTI case, get its class, probabilities, "
                    "volumes and mask; GET / is a viewer for the browser. Binds to 127.0.0.1 unless --host; "
                    f"any other address needs --token (or ${TOKEN_ENV}). Needs {EXTRA}.")
    p.add_argument("-m", required=True, metavar="MODEL_DIR", help="nnU-Net results folder Trainer__Plans__configuration")
    p.add_argument("-f", nargs="+", metavar="FOLD", help="folds to ensemble (default: every fold_N with the checkpoint)")
    p.add_argument("-chk", default=DEFAULT_CHECKPOINT, metavar="CHECKPOINT",
                   help=f"checkpoint file name (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available, else cpu")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (off by default)")
    p.add_argument("--saliency", action="store_true", help="compute a saliency map per case, where available")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token", help=f"required from clients as 'Authorization: Bearer TOKEN' (default ${TOKEN_ENV}); "
                                   f"needed for any --host but loopback")
    p.add_argument("--queue-size", type=int, default=defaults.queue_size, metavar="N",
                   help=f"cases that may wait for the model; beyond, 503 with Retry-After (default "
                        f"{defaults.queue_size})")
    p.add_argument("--timeout", type=float, default=defaults.timeout, metavar="S",
                   help=f"seconds per request, waiting included; beyond, 504 (default {defaults.timeout:g})")
    p.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 2 ** 20, metavar="MB",
                   help="largest request body in MiB; beyond, 413 (default 1024)")
    p.add_argument("--result-ttl", type=float, default=defaults.result_ttl, metavar="S",
                   help=f"seconds a result (mask, viewer) is kept (default {defaults.result_ttl:g})")
    p.add_argument("--max-results", type=int, default=defaults.max_results, metavar="N",
                   help=f"results kept at most; the oldest go first (default {defaults.max_results})")
    p.set_defaults(func=_run)


def _run(args) -> int:
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not token:
        raise InputError(f"--host {args.host}: binding to an address other than loopback needs --token TOKEN "
                         f"(or ${TOKEN_ENV})")
    for name, value, low in (("--queue-size", args.queue_size, 1), ("--max-results", args.max_results, 1),
                             ("--timeout", args.timeout, 1e-9), ("--max-upload-mb", args.max_upload_mb, 1e-9),
                             ("--result-ttl", args.result_ttl, 1e-9), ("--port", args.port, 1)):
        if value < low:
            raise InputError(f"{name} {value}: must be {'at least 1' if low == 1 else 'positive'}")
    if args.saliency and not saliency_available():
        raise InputError("--saliency: not available in this version of multitask-nnunet")
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise InputError(f"serve needs the serve extra ({e.name} is missing): {EXTRA}") from None
    from multitask_nnunet.serve.app import serve
    from multitask_nnunet.serve.service import Service
    predictor_options = PredictorOptions(args.f, args.chk, args.device, args.tta,
                                         **({"saliency": True} if args.saliency else {}))
    options = ServeOptions(args.queue_size, args.timeout, int(args.max_upload_mb * 2 ** 20), args.result_ttl,
                           args.max_results)
    serve(Service(args.m, predictor_options, options), args.host, args.port, token)
    import gc
    gc.freeze()  # as predict does: the interpreter's exit would otherwise scan every object torch made (seconds)
    return 0
