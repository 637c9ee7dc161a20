"""feste.context: the option registry, nesting, validation and isolation."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

import feste
from feste import context
from feste.errors import FesteError, OptionError
from feste.task import feste_task

EXPECTED_OPTIONS = {
    "eager": False,
    "scheduler": None,
    "num_workers": None,
    "python_executor": "threads",
    "max_concurrency": None,
    "requests_per_minute": None,
    "tokens_per_minute": None,
    "max_retries": 5,
    "retry_backoff": 0.5,
    "max_retry_after": 60.0,
    "rate_limit_timeout": 600.0,
    "call_timeout": None,
    "task_timeout": None,
    "event_loop": "auto",
    "batch_window": 0.005,
    "errors": "raise",
    "progress": None,
    "on_task_done": None,
    "on_task_failed": None,
    "on_progress": None,
    "cache": None,
    "on_truncation": "warn",
    "prices": None,
    "max_cost": None,
    "over_estimate": "refuse",
    "batch_api": False,
    "batch_api_window": 0.5,
    "batch_api_poll": 10.0,
    "batch_api_job_limits": None,
    "batch_api_on_expiry": "resubmit",
    "run": None,
}


@feste_task
def read_option(name):
    return context.get(name), threading.get_ident()


def test_registry_holds_the_documented_options_with_their_defaults():
    # Every option feste reads lives in the registry; this is the list the docs promise.
    assert {name: option.default for name, option in context.OPTIONS.items()} == (EXPECTED_OPTIONS)
    for name, default in EXPECTED_OPTIONS.items():
        assert context.get(name) == default
    assert context.snapshot() == EXPECTED_OPTIONS


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        context.OPTIONS["new_option"] = context.Option("new_option", 1, "doc")  # type: ignore[index]


def test_set_is_nestable_inner_wins_and_exit_restores():
    with context.set(max_retries=1, errors="return"):
        assert context.get("max_retries") == 1
        with context.set(max_retries=2):
            assert context.get("max_retries") == 2
            assert context.get("errors") == "return"  # outer values stay visible
        assert context.get("max_retries") == 1
    assert context.get("max_retries") == 5
    assert context.get("errors") == "raise"


def test_exit_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="inside"), context.set(eager=True, max_retries=0):
        assert context.get("eager") is True
        raise RuntimeError("inside")
    assert context.get("eager") is False
    assert context.get("max_retries") == 5


def test_setting_an_option_to_its_default_value_and_to_none():
    with context.set(max_concurrency=8):
        with context.set(max_concurrency=None):
            assert context.get("max_concurrency") is None
        assert context.get("max_concurrency") == 8


def test_values_are_normalized():
    with context.set(requests_per_minute=60, retry_backoff=1, batch_window=0):
        assert context.get("requests_per_minute") == 60.0
        assert isinstance(context.get("requests_per_minute"), float)
        assert context.get("retry_backoff") == 1.0
        assert context.get("batch_window") == 0.0


def test_unknown_name_in_get_lists_the_known_names():
    with pytest.raises(OptionError) as raised:
        context.get("max_retry")
    message = str(raised.value)
    assert message.startswith("unknown feste option 'max_retry'; known options: ")
    for name in EXPECTED_OPTIONS:
        assert name in message
    assert isinstance(raised.value, KeyError)
    assert isinstance(raised.value, FesteError)


def test_unknown_name_in_set_lists_the_known_names_and_changes_nothing():
    expected = r"unknown feste option 'eagre'; known options: .*eager"
    with pytest.raises(OptionError, match=expected), context.set(max_retries=1, eagre=True):
        pass  # pragma: no cover - never entered
    assert context.get("max_retries") == 5


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("max_concurrency", 0, "must be a positive integer"),
        ("max_concurrency", -1, "must be a positive integer"),
        ("max_concurrency", "x", "expected a positive integer or None, got 'x'"),
        ("max_concurrency", 1.5, "expected a positive integer"),
        ("max_concurrency", True, "expected a positive integer"),
        ("num_workers", 0, "must be a positive integer"),
        ("eager", "yes", "expected True or False, got 'yes'"),
        ("eager", 1, "expected True or False"),
        ("progress", "on", "expected True or False"),
        ("errors", "ignore", "must be one of 'raise', 'return'; got 'ignore'"),
        ("python_executor", "gpu", "must be one of 'threads', 'processes'"),
        ("event_loop", "trio", "must be one of 'auto', 'uvloop', 'asyncio'; got 'trio'"),
        ("max_retries", -1, "must be >= 0"),
        ("max_retries", 2.0, "expected an integer >= 0"),
        ("retry_backoff", -0.1, "must be >= 0"),
        ("batch_window", math.nan, "must be >= 0"),
        ("requests_per_minute", 0, "must be a positive finite number"),
        ("requests_per_minute", math.inf, "must be a positive finite number"),
        ("tokens_per_minute", "many", "expected a positive number or None"),
        ("task_timeout", -3, "must be a positive finite number"),
        ("scheduler", 5, "expected a scheduler name, a get function or a distributed Client"),
        ("on_task_done", "print", "expected a callable or None"),
        ("on_truncation", "error", "must be one of 'warn', 'raise', 'ignore'; got 'error'"),
        ("prices", 0.15, "expected a TOML file path, a mapping"),
        ("prices", " ", "the price table location is empty"),
    ],
)
def test_invalid_values_name_the_option(name, value, reason):
    with pytest.raises(OptionError) as raised, context.set(**{name: value}):
        pass  # pragma: no cover - never entered
    message = str(raised.value)
    assert f"invalid value for feste option {name!r}" in message
    assert reason in message
    assert context.get(name) == EXPECTED_OPTIONS[name]


def test_callbacks_and_scheduler_values_are_accepted():
    seen = []
    with context.set(on_task_done=seen.append, scheduler="threads"):
        assert context.get("on_task_done") == seen.append
        assert context.get("scheduler") == "threads"


def test_describe_lists_every_option_with_default_and_doc():
    text = context.describe()
    for name, option in context.OPTIONS.items():
        assert f"{name} (default {option.default!r})" in text
        assert option.doc in text
    assert text.count("(default ") == len(EXPECTED_OPTIONS)


def test_threads_do_not_see_each_others_settings():
    entered = threading.Barrier(2, timeout=10)
    read = threading.Barrier(2, timeout=10)
    seen = {}

    def setter():
        with context.set(eager=True, max_retries=0):
            entered.wait()  # B reads while A is inside its block
            read.wait()
            seen["a"] = (context.get("eager"), context.get("max_retries"))

    def reader():
        entered.wait()
        seen["b"] = (context.get("eager"), context.get("max_retries"))
        read.wait()

    threads = [threading.Thread(target=setter), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert seen == {"a": (True, 0), "b": (False, 5)}


def test_asyncio_tasks_do_not_see_each_others_settings():
    async def main():
        a_inside = asyncio.Event()
        b_done = asyncio.Event()

        async def task_a():
            with context.set(max_retries=1):
                a_inside.set()
                await b_done.wait()
                return context.get("max_retries")

        async def task_b():
            await a_inside.wait()
            with context.set(max_retries=2):
                value_inside = context.get("max_retries")
            value_after = context.get("max_retries")
            b_done.set()
            return value_inside, value_after

        return await asyncio.gather(task_a(), task_b())

    assert asyncio.run(main()) == [1, (2, 5)]


def test_options_reach_the_threads_scheduler_workers():
    with context.set(max_retries=3, errors="return"):
        results = feste.compute(
            [read_option("max_retries"), read_option("errors")], scheduler="threads", num_workers=2
        )
    ((retries, retries_thread), (errors, errors_thread)) = results[0]
    assert (retries, errors) == (3, "return")
    main_thread = threading.get_ident()
    assert main_thread not in (retries_thread, errors_thread)  # really read in a worker
    # Outside the block the workers see the defaults again.
    ((value, _),) = feste.compute(read_option("max_retries"), scheduler="threads")
    assert value == 5


def test_scheduler_option_picks_the_scheduler():
    calls = []

    def recording_get(graph, keys, **kwargs):
        calls.append(keys)
        from dask.local import get_sync

        return get_sync(graph, keys)

    double = feste_task(lambda x: 2 * x)(21)
    with context.set(scheduler=recording_get):
        assert feste.compute(double) == (42,)
    assert calls == [[[double.key]]]  # one entry per collection: its __dask_keys__()
