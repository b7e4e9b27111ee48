"""Mapping engine-level exceptions to the API's errors, once, for every deployment."""

from __future__ import annotations

from vlora.adapters.folders import AdapterPathError, AdapterSourceNotFoundError
from vlora.adapters.peft_io import AdapterFormatError
from vlora.adapters.registry import AdapterConflictError, AdapterCorruptError, AdapterNameError, AdapterNotFoundError
from vlora.adapters.residency import AdapterCacheFullError
from vlora.adapters.store import PublishTimeoutError, StoreConfigError
from vlora.deployments.openai_api import ApiError
from vlora.engine.engine import ContextLengthError, EngineDeadError, RequestError
from vlora.engine.images import ImageError
from vlora.engine.lora import LoRASlotError
from vlora.engine.lora_manager import UnknownAdapterError
from vlora.engine.prompts import PromptError


def to_api_error(exc: BaseException) -> ApiError | None:
    """The ApiError a client should see for `exc`, or None if it is a server fault."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ImageError):
        return ApiError(400, f"invalid image: {exc}", param="messages")
    if isinstance(exc, PromptError):
        return ApiError(400, str(exc), param="messages")
    if isinstance(exc, UnknownAdapterError):
        return ApiError.model_not_found(exc.name)
    if isinstance(exc, AdapterConflictError):
        return ApiError(409, str(exc), code="conflict")
    if isinstance(exc, PublishTimeoutError):
        return ApiError(504, str(exc), type="server_error", code="publish_timeout")
    if isinstance(exc, AdapterCacheFullError):
        return ApiError(503, str(exc), type="server_error", retry_after=1)
    if isinstance(exc, StoreConfigError):
        return ApiError(400, str(exc))
    if isinstance(exc, AdapterNotFoundError):
        return ApiError(404, str(exc), code="adapter_not_found")
    if isinstance(exc, AdapterCorruptError):
        return ApiError(500, f"stored adapter is corrupt: {exc}", type="server_error")
    if isinstance(exc, AdapterSourceNotFoundError):
        return ApiError(404, str(exc), param="path", code="adapter_source_not_found")
    if isinstance(exc, AdapterPathError):
        return ApiError(400, str(exc), param="path")
    if isinstance(exc, AdapterNameError):
        return ApiError(400, str(exc), param="name")
    if isinstance(exc, (AdapterFormatError, LoRASlotError)):
        return ApiError(400, f"invalid adapter: {exc}")
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), type="server_error", retry_after=1)
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (RequestError, LoRASlotError, ValueError)):
        return ApiError(400, str(exc))
    return None


def find_api_error(exc: BaseException) -> ApiError | None:
    """Walk a Ray error chain (RayTaskError.cause, __cause__) to the ApiError inside, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found = to_api_error(exc)
        if found is not None and not _is_ray_wrapper(exc):
            return found
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def api_error_for(exc: BaseException) -> ApiError:
    """What a client sees for any failure: its ApiError; a 503 to retry when the replica serving it
    was lost (died, restarting, engine failed); else a 500 that names only the exception type."""
    api = find_api_error(exc)
    if api is not None:
        return api
    if _replica_lost(exc):
        return ApiError(503, "the replica serving this request stopped; retry the request", retry_after=1)
    return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")


def _replica_lost(exc: BaseException) -> bool:
    from ray.exceptions import ActorUnavailableError, RayActorError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (RayActorError, ActorUnavailableError)):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
    return False


def _is_ray_wrapper(exc: BaseException) -> bool:
    return type(exc).__name__.startswith("RayTaskError")
