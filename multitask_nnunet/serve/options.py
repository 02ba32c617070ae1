"""The service's limits and the token's environment variable: no web framework here, so that the CLI can
register ``serve`` without the serve extra."""
from dataclasses import dataclass, fields

from multitask_nnunet.inference.options import PredictorOptions

TOKEN_ENV = "MULTITASK_NNUNET_TOKEN"


@dataclass(frozen=True)
class ServeOptions:
    queue_size: int = 4                  # cases waiting for the model (besides the one it predicts)
    timeout: float = 300.0               # s, per request: queueing and prediction
    max_upload_bytes: int = 2 ** 30      # the whole request body
    result_ttl: float = 3600.0           # s a result (JSON, mask, viewer) is kept
    max_results: int = 32                # results kept at most (the oldest go first)


def saliency_available() -> bool:
    """Whether this version's predictor computes saliency maps (``PredictorOptions.saliency``)."""
    return "saliency" in {f.name for f in fields(PredictorOptions)}
