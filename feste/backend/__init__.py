"""Model providers: the backend base class and the OpenAI and Cohere backends.

Importing this package is cheap: the official ``openai`` and ``cohere`` packages are
imported by the ``sdk`` transport (:mod:`feste.backend.transports`) when it first
builds a client, not here.
"""

from feste.backend.base import Backend, MethodSpec
from feste.backend.cohere import Cohere
from feste.backend.openai import ChatParams, CompleteParams, EmbedParams, OpenAI

__all__ = [
    "Backend",
    "ChatParams",
    "Cohere",
    "CompleteParams",
    "EmbedParams",
    "MethodSpec",
    "OpenAI",
]
