"""feste.errors: the error tree, what messages show, pickling, Failure, task annotation."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import cloudpickle
import pytest

from feste import errors
from feste.errors import (
    AuthenticationError,
    BackendError,
    BadRequestError,
    BudgetExceeded,
    CacheError,
    CancelledError,
    ConfigurationError,
    Failure,
    FesteError,
    GraphError,
    MalformedResponseError,
    MissingVariableError,
    OptionError,
    PromptError,
    RateLimitError,
    RetryableError,
    SchedulerError,
    StructuredOutputError,
    TemplateSyntaxError,
    TransientError,
    TruncatedOutputError,
    TruncatedOutputWarning,
    UnknownLanguageError,
    annotate_task_error,
)

SECRET = "sk-test-0123456789abcdef"

# (class, direct feste parent, extra builtin base or None) as the module docstring draws it
TREE = [
    (OptionError, FesteError, KeyError),
    (SchedulerError, FesteError, ValueError),
    (GraphError, FesteError, ValueError),
    (PromptError, FesteError, ValueError),
    (TemplateSyntaxError, PromptError, ValueError),
    (MissingVariableError, PromptError, ValueError),
    (UnknownLanguageError, PromptError, ValueError),
    (CancelledError, FesteError, None),
    (CacheError, FesteError, None),
    (BackendError, FesteError, None),
    (ConfigurationError, BackendError, ValueError),
    (AuthenticationError, BackendError, None),
    (BadRequestError, BackendError, ValueError),
    (MalformedResponseError, BackendError, None),
    (StructuredOutputError, BackendError, None),
    (TruncatedOutputError, BackendError, None),
    (BudgetExceeded, BackendError, None),
    (RetryableError, BackendError, None),
    (RateLimitError, RetryableError, None),
    (TransientError, RetryableError, None),
]


@pytest.mark.parametrize(("cls", "parent", "builtin"), TREE, ids=[t[0].__name__ for t in TREE])
def test_the_tree(cls, parent, builtin):
    assert issubclass(cls, parent)
    assert issubclass(cls, FesteError)
    assert issubclass(FesteError, Exception)
    if builtin is not None:
        assert issubclass(cls, builtin)


def test_every_exported_error_is_in_the_tree():
    exported = {getattr(errors, name) for name in errors.__all__} - {Failure}
    assert exported == {FesteError, TruncatedOutputWarning} | {cls for cls, _, _ in TREE}
    # The warning is a warning, outside the tree of errors.
    assert issubclass(TruncatedOutputWarning, UserWarning)
    assert not issubclass(TruncatedOutputWarning, FesteError)


def test_branches_do_not_overlap():
    assert not issubclass(AuthenticationError, RetryableError)
    assert not issubclass(BadRequestError, RetryableError)
    assert not issubclass(MalformedResponseError, RetryableError)
    assert not issubclass(StructuredOutputError, RetryableError)
    assert not issubclass(TruncatedOutputError, RetryableError)
    assert not issubclass(CancelledError, BackendError)
    assert not issubclass(RateLimitError, ValueError)
    assert not issubclass(AuthenticationError, ValueError)


def test_only_retryable_errors_say_so():
    assert RetryableError.retryable is True
    assert RateLimitError("x").retryable is True
    assert TransientError("x").retryable is True
    for cls in (BackendError, ConfigurationError, AuthenticationError, BadRequestError):
        assert cls("x").retryable is False


def test_option_error_message_is_not_quoted_like_a_key_error():
    error = OptionError("unknown feste option 'x'")
    assert str(error) == "unknown feste option 'x'"
    assert str(OptionError()) == ""


def test_backend_error_message_names_backend_method_model_status_key_attempts():
    error = RateLimitError(
        "slow down",
        backend="openai",
        method="chat",
        model="gpt-4o-mini",
        status=429,
        key="chat-abc",
        attempts=3,
        retry_after=1.5,
    )
    assert str(error) == (
        "[openai.chat model=gpt-4o-mini status=429 task='chat-abc' attempts=3] slow down"
    )
    assert error.message == "slow down"
    assert error.args == ("slow down",)


def test_backend_error_message_with_little_context():
    assert str(BackendError("plain")) == "plain"
    assert str(BackendError("one try", backend="cohere", attempts=1)) == "[cohere] one try"
    assert str(BackendError("m", method="embed")) == "[embed] m"


def test_backend_error_message_and_repr_leave_other_fields_out():
    error = AuthenticationError(
        "invalid key", backend="openai", method="chat", model="gpt-4o", status=401, key="k1"
    )
    # Anything attached later (headers, the request) stays out of what is shown.
    error.request_headers = {"Authorization": f"Bearer {SECRET}"}  # type: ignore[attr-defined]
    assert SECRET not in str(error)
    assert SECRET not in repr(error)
    assert "openai.chat" in str(error)
    assert "model=gpt-4o" in str(error)
    assert "task='k1'" in str(error)


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_pickling_keeps_type_message_and_attributes(dumps):
    error = RateLimitError(
        "too many",
        backend="openai",
        method="embed",
        model="text-embedding-3-small",
        status=429,
        key="embed-1",
        attempts=2,
        item_index=4,
        retry_after=2.5,
    )
    loaded = pickle.loads(dumps(error))
    assert type(loaded) is RateLimitError
    assert loaded.retry_after == 2.5
    assert (loaded.backend, loaded.method, loaded.model) == (
        "openai",
        "embed",
        "text-embedding-3-small",
    )
    assert (loaded.status, loaded.key, loaded.attempts, loaded.item_index) == (429, "embed-1", 2, 4)
    assert str(loaded) == str(error)
    assert loaded.args == ("too many",)


def test_output_errors_keep_the_answer_through_pickling_and_copying():
    structured = StructuredOutputError(
        "not JSON", raw='{"a": ', detail="Expecting value", backend="openai", model="m"
    )
    structured.repairs = 2
    copied = pickle.loads(cloudpickle.dumps(structured))
    assert type(copied) is StructuredOutputError
    assert (copied.raw, copied.detail, copied.repairs) == ('{"a": ', "Expecting value", 2)
    assert str(copied) == "[openai model=m] not JSON"
    truncated = TruncatedOutputError("cut", text="echo(gpt", backend="cohere", method="chat")
    assert pickle.loads(pickle.dumps(truncated)).text == "echo(gpt"
    assert copy.copy(truncated).text == "echo(gpt"


def test_pickling_errors_with_a_builtin_base():
    error = ConfigurationError("missing api_key", backend="cohere", method="embed")
    loaded = pickle.loads(pickle.dumps(error))
    assert type(loaded) is ConfigurationError
    assert isinstance(loaded, ValueError)
    assert str(loaded) == "[cohere.embed] missing api_key"


def test_pickling_keeps_a_note():
    error = TransientError("reset", backend="openai")
    error.add_note("raised in feste task 'k'")
    loaded = pickle.loads(pickle.dumps(error))
    assert loaded.__notes__ == ["raised in feste task 'k'"]


def test_other_feste_errors_pickle():
    for error in (SchedulerError("s"), GraphError("g"), CancelledError("c"), OptionError("o")):
        loaded = pickle.loads(pickle.dumps(error))
        assert type(loaded) is type(error)
        assert str(loaded) == str(error)


# -- Failure -------------------------------------------------------------------------------


def test_failure_is_falsy_and_shows_what_failed():
    failure = Failure(ValueError("bad"), key="task-1", attempts=2)
    assert not failure
    assert bool(failure) is False
    assert repr(failure) == "Failure(failed key='task-1', attempts=2, ValueError: bad)"
    assert failure.cancelled is False
    assert failure.extra == {}


def test_cancelled_failure():
    failure = Failure(CancelledError("upstream 'a' failed"), key="b", cancelled=True)
    assert repr(failure) == (
        "Failure(cancelled key='b', attempts=1, CancelledError: upstream 'a' failed)"
    )
    assert not failure


def test_failure_reraise_and_immutability():
    original = KeyError("k")
    failure = Failure(original, key="t")
    with pytest.raises(KeyError) as raised:
        failure.reraise()
    assert raised.value is original
    with pytest.raises(AttributeError):
        failure.key = "other"  # type: ignore[misc]


def test_failure_equality_ignores_extra():
    error = ValueError("x")
    assert Failure(error, "k", extra={"a": 1}) == Failure(error, "k")
    assert Failure(error, "k") != Failure(error, "other")


# -- annotate_task_error -------------------------------------------------------------------


def test_annotate_adds_the_key_to_a_plain_message():
    error = ValueError("bad value")
    assert annotate_task_error(error, "parse-1") is error
    assert str(error) == "bad value (in feste task 'parse-1')"
    assert error.args == ("bad value (in feste task 'parse-1')",)


def test_annotate_is_idempotent():
    error = RuntimeError("boom")
    annotate_task_error(error, "outer")
    annotate_task_error(error, "inner")
    assert str(error) == "boom (in feste task 'outer')"
    assert not getattr(error, "__notes__", [])


def test_annotate_sets_the_key_attribute_of_backend_errors():
    error = TransientError("reset", backend="openai", method="chat")
    annotate_task_error(error, "chat-7")
    assert error.key == "chat-7"
    assert error.message == "reset"
    assert str(error) == "[openai.chat task='chat-7'] reset"
    already = TransientError("reset", key="original")
    annotate_task_error(already, "other")
    assert already.key == "original"


def test_annotate_uses_a_note_when_the_message_is_not_a_plain_string():
    key_error = KeyError("missing")
    annotate_task_error(key_error, "lookup")
    assert key_error.args == ("missing",)  # the missing key stays what it was
    assert key_error.__notes__ == ["raised in feste task 'lookup'"]

    two_args = OSError(2, "No such file")
    annotate_task_error(two_args, "read")
    assert two_args.args == (2, "No such file")
    assert two_args.__notes__ == ["raised in feste task 'read'"]

    no_args = ValueError()
    annotate_task_error(no_args, "empty")
    assert no_args.__notes__ == ["raised in feste task 'empty'"]


def test_annotate_leaves_an_exception_that_refuses_attributes_unchanged():
    @dataclasses.dataclass(frozen=True)
    class FrozenError(Exception):
        reason: str

    error = FrozenError("read only")
    assert annotate_task_error(error, "k") is error
    assert error.args == ("read only",)  # set by Exception.__new__, untouched
    assert not getattr(error, "__notes__", [])
