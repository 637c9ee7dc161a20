"""Model providers: the backend base class and the OpenAI and Cohere backends.

Importing this package is cheap: the HTTP client (aiohttp) and the official ``openai``
and ``cohere`` packages are imported by :mod:`feste.backend.transports` when the first
request is sent, not here.
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
