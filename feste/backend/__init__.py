"""Model providers: the backend base class, the OpenAI and Cohere backends, and local
sentence-transformers models (:mod:`feste.backend.local`).

Importing this package is cheap: the official ``openai`` and ``cohere`` packages are
imported by the ``sdk`` transport (:mod:`feste.backend.transports`) when it first
builds a client, and ``sentence_transformers`` (with torch) by the local transport when
it first loads a model, not here.
"""

from feste.backend.base import Backend, MethodSpec
from feste.backend.cohere import Cohere
from feste.backend.local import SentenceTransformers
from feste.backend.openai import ChatParams, CompleteParams, EmbedParams, OpenAI

__all__ = [
    "Backend",
    "ChatParams",
    "Cohere",
    "CompleteParams",
    "EmbedParams",
    "MethodSpec",
    "OpenAI",
    "SentenceTransformers",
]
