"""feste.task: ``feste_task``, ``FesteDelayed``, ``FesteBase`` and eager mode.

Graphs are computed with the synchronous scheduler; the other schedulers are covered in
test_compute.py and test_schedulers.py.
"""

from __future__ import annotations

import multiprocessing
import pickle

import cloudpickle
import dask
import pytest
from dask.base import is_dask_collection, tokenize
from dask.highlevelgraph import HighLevelGraph
from dask.task_spec import Task

import feste
from feste import context
from feste.task import (
    FesteBase,
    FesteDelayed,
    FesteTaskFunction,
    feste_task,
    is_eager,
    lazy_call,
    lazy_values_in,
)

CALLS: list[tuple[str, tuple[object, ...]]] = []


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()
    yield
    CALLS.clear()


@feste_task
def add(a, b):
    CALLS.append(("add", (a, b)))
    return a + b


@feste_task(pure=True)
def pure_add(a, b):
    CALLS.append(("pure_add", (a, b)))
    return a + b


@feste_task(nout=2)
def divmod_task(a, b):
    return divmod(a, b)


def _square(x):
    CALLS.append(("square", (x,)))
    return x * x


def _value(x):
    return x


def sync(*objs):
    return feste.compute(*objs, scheduler="sync")


# -- feste_task: the forms it is used in --------------------------------------------------


def test_decorated_function_builds_a_node_and_runs_only_on_compute():
    x = add(1, 2)
    assert isinstance(x, FesteDelayed)
    assert CALLS == []
    assert x.key.startswith("add-")
    assert x.compute(scheduler="sync") == 3
    assert CALLS == [("add", (1, 2))]


def test_call_form_wraps_a_plain_function():
    square = feste_task(_square)
    assert isinstance(square, FesteTaskFunction)
    assert repr(square) == "feste_task(_square)"
    assert square.__name__ == "_square"  # functools.update_wrapper
    x = square(7)
    assert x.key.startswith("_square-")
    assert sync(x) == (49,)


def test_wrapping_twice_keeps_one_wrapper_and_applies_new_options():
    square = feste_task(_square)
    assert feste_task(square) is square
    renamed = feste_task(square, name="sq", pure=True)
    assert renamed.func is _square
    assert renamed(3).key == renamed(3).key
    assert renamed(3).key.startswith("sq-")


def test_non_callable_is_refused_naming_its_type():
    with pytest.raises(TypeError, match=r"feste_task expects a function or method.*got int 3"):
        feste_task(3)
    with pytest.raises(TypeError, match=r"got str 'abc'"):
        feste_task("abc")


def test_name_gives_the_key_prefix():
    task = feste_task(name="summary")(_square)
    assert task(2).key.startswith("summary-")
    with pytest.raises(TypeError, match=r"name must be a string, got 3"):
        feste_task(_square, name=3)


class Counter(FesteBase):
    def __init__(self, start):
        self.start = start

    @feste_task
    def plus(self, n):
        return self.start + n

    @feste_task(pure=True, name="times")
    def times(self, n):
        return self.start * n


def test_method_takes_the_instance_as_an_argument_of_the_node():
    counter = Counter(10)
    x = counter.plus(5)
    node = dict(x.__dask_graph__())[x.key]
    assert isinstance(node, Task)
    assert node.args[0] is counter
    assert node.args[1] == 5
    assert x.key.startswith("plus-")
    assert x.compute(scheduler="sync") == 15


def test_method_through_the_class_and_on_several_instances():
    first, second = Counter(1), Counter(100)
    assert isinstance(Counter.plus, FesteTaskFunction)
    assert sync(Counter.plus(first, 1), first.plus(2), second.plus(3)) == (2, 3, 103)


def test_pure_method_keys_follow_the_instance_state():
    assert Counter(2).times(3).key == Counter(2).times(3).key
    assert Counter(2).times(3).key != Counter(3).times(3).key
    assert Counter(2).times(3).key.startswith("times-")
    assert Counter(2).times(3).compute(scheduler="sync") == 6


# -- keys: pure and impure calls -----------------------------------------------------------


def test_identical_pure_calls_share_one_key():
    assert pure_add(1, 2).key == pure_add(1, 2).key
    assert pure_add(1, 2).key != pure_add(2, 1).key
    assert pure_add(1, b=2).key != pure_add(1, 2).key  # keywords are part of the call


def test_identical_pure_calls_run_once():
    total = pure_add(pure_add(1, 2), pure_add(1, 2))
    assert len(dict(total.__dask_graph__())) == 2
    assert sync(total) == (6,)
    assert CALLS.count(("pure_add", (1, 2))) == 1


def test_impure_calls_get_distinct_keys():
    assert add(1, 2).key != add(1, 2).key
    both = add(add(1, 2), add(1, 2))
    assert sync(both) == (6,)
    assert CALLS.count(("add", (1, 2))) == 2


def test_call_time_pure_overrides_the_decorator():
    assert add(1, 2, pure=True).key == add(1, 2, pure=True).key
    assert pure_add(1, 2, pure=False).key != pure_add(1, 2, pure=False).key
    # The keyword is consumed by feste, not passed to the function.
    assert add(1, 2, pure=True).compute(scheduler="sync") == 3


def test_dask_key_name_sets_the_key():
    x = add(1, 2, dask_key_name="three")
    assert x.key == "three"
    assert list(dict(x.__dask_graph__())) == ["three"]
    assert sync(add(x, 1, dask_key_name="four")) == (4,)


def test_lazy_arguments_become_dependencies():
    a = add(1, 1, dask_key_name="a")
    b = add(a, 2, dask_key_name="b")
    node = dict(b.__dask_graph__())["b"]
    assert node.dependencies == frozenset({"a"})
    assert sync(b) == (4,)


def test_lazy_values_nested_in_containers_are_computed_first():
    a = add(1, 1)
    joined = feste_task(lambda items, mapping: [*items, mapping["k"]])([a, 5], {"k": a})
    assert sync(joined) == ([2, 5, 2],)


# -- nout ----------------------------------------------------------------------------------


def test_nout_unpacks_len_and_iterates():
    quotient, remainder = divmod_task(17, 5)
    assert sync(quotient, remainder) == (3, 2)
    result = divmod_task(9, 4)
    assert len(result) == 2
    assert [item.compute(scheduler="sync") for item in result] == [2, 1]
    assert result.compute(scheduler="sync") == (2, 1)


def test_nout_zero_is_an_empty_sequence():
    empty = feste_task(nout=0)(lambda: ())()
    assert len(empty) == 0
    assert list(empty) == []
    assert empty.compute(scheduler="sync") == ()


@pytest.mark.parametrize("bad", [-1, -5])
def test_negative_nout_is_a_value_error(bad):
    with pytest.raises(ValueError, match=rf"nout must be a non-negative integer, got {bad}"):
        feste_task(nout=bad)


@pytest.mark.parametrize("bad", ["2", 2.0, True])
def test_non_integer_nout_is_a_type_error(bad):
    with pytest.raises(TypeError, match=r"nout must be a non-negative integer or None"):
        feste_task(_square, nout=bad)


def test_unknown_length_refuses_len_and_iteration():
    x = add(1, 2)
    with pytest.raises(TypeError, match=r"unknown length is not iterable; give nout="):
        iter(x)
    with pytest.raises(TypeError, match=r"unknown length is not iterable"):
        _first, _second = x
    with pytest.raises(TypeError, match=r"unknown length has no len\(\); give nout="):
        len(x)


# -- FesteDelayed: a Dask collection --------------------------------------------------------


def test_dask_collection_protocol():
    x = add(1, 2, dask_key_name="x")
    assert is_dask_collection(x)
    graph = x.__dask_graph__()
    assert isinstance(graph, HighLevelGraph)
    assert set(dict(graph)) == {"x"}
    assert x.__dask_keys__() == ["x"]
    assert x.__dask_layers__() == ("x",)
    assert x.__dask_tokenize__() == "x"
    assert tokenize(x) == tokenize(add(5, 6, dask_key_name="x"))  # identity is the key
    finalize, extra = x.__dask_postcompute__()
    assert finalize([3], *extra) == 3
    assert x.key == "x"
    assert repr(x) == "FesteDelayed('x')"


def test_compute_runs_through_feste_and_accepts_scheduler_keywords():
    x = add(20, 22)
    assert x.compute(scheduler="sync") == 42
    assert x.compute(scheduler="threads") == 42


def test_persist_keeps_a_feste_value_holding_the_result():
    x = add(add(1, 2), 3)
    persisted = x.persist()
    assert isinstance(persisted, FesteDelayed)
    assert persisted.key == x.key
    assert dict(persisted.__dask_graph__()) == {x.key: 6}
    CALLS.clear()
    assert persisted.compute(scheduler="sync") == 6
    assert CALLS == []  # nothing ran again
    assert sync(add(persisted, 1)) == (7,)


OPERATORS = [
    ("add", lambda v: v + 2, 9),
    ("radd", lambda v: 2 + v, 9),
    ("sub", lambda v: v - 2, 5),
    ("rsub", lambda v: 10 - v, 3),
    ("mul", lambda v: v * 3, 21),
    ("rmul", lambda v: 3 * v, 21),
    ("truediv", lambda v: v / 2, 3.5),
    ("rtruediv", lambda v: 14 / v, 2.0),
    ("floordiv", lambda v: v // 2, 3),
    ("mod", lambda v: v % 4, 3),
    ("pow", lambda v: v**2, 49),
    ("rpow", lambda v: 2**v, 128),
    ("eq", lambda v: v == 7, True),
    ("eq-false", lambda v: v == 8, False),
    ("ne", lambda v: v != 7, False),
    ("lt", lambda v: v < 8, True),
    ("le", lambda v: v <= 6, False),
    ("gt", lambda v: v > 6, True),
    ("ge", lambda v: v >= 8, False),
    ("neg", lambda v: -v, -7),
    ("abs", lambda v: abs(-v), 7),
    ("and", lambda v: v & 3, 3),
    ("or", lambda v: v | 8, 15),
    ("xor", lambda v: v ^ 1, 6),
    ("lshift", lambda v: v << 1, 14),
    ("invert", lambda v: ~v, -8),
]


@pytest.mark.parametrize(
    ("label", "expression", "expected"), OPERATORS, ids=[o[0] for o in OPERATORS]
)
def test_operators_build_nodes_that_compute_the_right_value(label, expression, expected):
    seven = add(3, 4)
    result = expression(seven)
    assert isinstance(result, FesteDelayed)
    value = result.compute(scheduler="sync")
    assert value == expected
    assert type(value) is type(expected)


def test_operators_between_two_lazy_values_and_are_pure():
    a, b = add(3, 4, dask_key_name="a"), add(1, 1, dask_key_name="b")
    assert sync(a * b, a - b, a // b) == (14, 5, 3)
    assert (a + b).key == (a + b).key  # operators are pure: same operands, one node


def test_getitem_by_index_slice_and_key():
    items = feste_task(lambda: [10, 20, 30])()
    mapping = feste_task(lambda: {"name": "feste", "n": 2})()
    assert sync(items[0], items[-1], items[1:], mapping["name"]) == (10, 30, [20, 30], "feste")
    index = feste_task(lambda: 1)()
    assert items[index].compute(scheduler="sync") == 20  # a lazy index works too


def test_attribute_access_and_method_calls():
    text = feste_task(lambda: "Hello World")()
    number = feste_task(lambda: 3 + 4j)()
    upper = text.upper()
    assert isinstance(upper, FesteDelayed)
    assert upper.key.startswith("upper-")
    assert sync(upper, text.split(" "), text.replace("World", "x")) == (
        "HELLO WORLD",
        ["Hello", "World"],
        "Hello x",
    )
    assert number.real.compute(scheduler="sync") == 3.0
    assert number.imag.compute(scheduler="sync") == 4.0
    assert text.upper().key == text.upper().key  # method calls are pure
    with pytest.raises(AttributeError, match=r"FesteDelayed has no attribute '_private'"):
        text._private  # noqa: B018


def test_calling_a_lazy_callable():
    make_adder = feste_task(lambda n: lambda x: x + n)
    adder = make_adder(10)
    assert adder(5).compute(scheduler="sync") == 15


def test_bool_refuses_with_advice():
    x = add(1, 2)
    with pytest.raises(TypeError, match=r"truth value of a lazy feste value is unknown"):
        bool(x)
    with pytest.raises(TypeError, match=r"context.set\(eager=True\)"):
        if x:
            pass


def test_lazy_values_are_immutable():
    x = add(1, 2)
    with pytest.raises(TypeError, match="immutable"):
        x.foo = 1
    with pytest.raises(TypeError, match="lazy feste values are immutable"):
        x[0] = 1
    attribute = feste_task(lambda: "a")().upper
    with pytest.raises(TypeError, match="immutable"):
        attribute.foo = 1


def test_lazy_values_in_detects_nested_values():
    assert lazy_values_in(add(1, 2))
    assert lazy_values_in([1, {"a": (add(1, 2),)}])
    assert lazy_values_in(dask.delayed(1))
    assert not lazy_values_in([1, {"a": (2,)}])


def test_lazy_call_uses_token_source_for_pure_keys():
    first = lazy_call(_value, 1, name="val", pure=True, token_source="declaration-1")
    same = lazy_call(_value, 1, name="val", pure=True, token_source="declaration-1")
    other = lazy_call(_value, 1, name="val", pure=True, token_source="declaration-2")
    assert first.key == same.key
    assert first.key != other.key
    assert first.key.startswith("val-")
    assert first.compute(scheduler="sync") == 1


# -- FesteBase -----------------------------------------------------------------------------


class Greeter(FesteBase):
    def __init__(self, greeting, secret="s3cret"):
        self.greeting = greeting
        self._secret = secret

    @feste_task
    def greet(self, name):
        CALLS.append(("greet", (name,)))
        return f"{self.greeting}, {name}!"


def test_methods_honour_eager_mode_set_after_the_object_was_created():
    greeter = Greeter("Hi")
    lazy = greeter.greet("Ann")
    assert isinstance(lazy, FesteDelayed)
    with context.set(eager=True):
        assert greeter.greet("Bob") == "Hi, Bob!"
    assert CALLS == [("greet", ("Bob",))]
    assert isinstance(greeter.greet("Cid"), FesteDelayed)


def test_tokenization_is_deterministic_for_equal_state():
    assert tokenize(Greeter("Hi")) == tokenize(Greeter("Hi"))
    assert tokenize(Greeter("Hi")) != tokenize(Greeter("Hello"))
    # Private attributes are not part of the identity (backends keep API keys there).
    assert tokenize(Greeter("Hi", secret="a")) == tokenize(Greeter("Hi", secret="b"))
    assert Greeter("Hi")._token_state() == {"greeting": "Hi"}


def test_subclass_of_a_different_type_with_same_state_has_another_token():
    class OtherGreeter(Greeter):
        pass

    assert tokenize(OtherGreeter("Hi")) != tokenize(Greeter("Hi"))


# -- eager mode ----------------------------------------------------------------------------


def test_eager_mode_returns_plain_values_at_once():
    assert not is_eager()
    with context.set(eager=True):
        assert is_eager()
        result = add(2, 3)
        assert result == 5
        assert type(result) is int
        assert CALLS == [("add", (2, 3))]
        quotient, remainder = divmod_task(7, 2)
        assert (quotient, remainder) == (3, 1)
        assert add(1, 1, pure=True, dask_key_name="ignored") == 2
    assert not is_eager()


def test_eager_mode_computes_lazy_values_created_before():
    before = add(1, 2)
    nested = [add(10, 0), {"k": add(20, 0)}]
    with context.set(eager=True):
        assert add(before, 10) == 13
        joined = feste_task(lambda items: [items[0], items[1]["k"]])(nested)
        assert joined == [10, 20]
        assert Greeter("Hey").greet(feste_task(lambda: "Dee")()) == "Hey, Dee!"


def test_eager_mode_operators_and_method_calls_on_earlier_lazy_values():
    number = add(3, 4)
    text = feste_task(lambda: "abc")()
    make_adder = feste_task(lambda n: lambda x: x + n)(1)
    with context.set(eager=True):
        assert number + 1 == 8
        assert -number == -7
        assert (number == 7) is True
        assert text[0] == "a"
        assert text.upper() == "ABC"
        assert make_adder(1) == 2


def test_eager_mode_scoped_by_nesting():
    with context.set(eager=True):
        with context.set(eager=False):
            assert isinstance(add(1, 2), FesteDelayed)
        assert add(1, 2) == 3


# -- graphs built from each value's own node ---------------------------------------------


@feste_task(pure=True)
def inc(value):
    return value + 1


def test_a_long_chain_holds_each_node_once_dependencies_first():
    value = 0
    for _ in range(3000):
        value = inc(value)
    graph = dict(value.__dask_graph__())
    assert len(graph) == 3000
    position = {key: index for index, key in enumerate(graph)}
    for key, node in graph.items():
        for dependency in node.dependencies:
            assert position[dependency] < position[key]
    (dependency,) = graph[value.key].dependencies
    assert graph[dependency].dependencies != frozenset()
    assert sync(value) == (3000,)
    assert dask.compute(value, scheduler="sync") == (3000,)


def test_a_shared_input_is_one_node_of_the_merged_graph():
    shared = add(1, 2)
    left = add(shared, 10)
    right = add(shared, 20)
    both = add(left, right)
    graph = dict(both.__dask_graph__())
    assert set(graph) == {shared.key, left.key, right.key, both.key}
    assert list(graph) in (
        [shared.key, left.key, right.key, both.key],
        [shared.key, right.key, left.key, both.key],
    )
    assert sync(both) == (36,)
    assert [name for name, _ in CALLS].count("add") == 4


def test_dask_delayed_takes_a_feste_chain_as_input():
    value = 1
    for _ in range(50):
        value = inc(value)
    doubled = dask.delayed(lambda v: 2 * v)(value)
    assert dask.compute(doubled, scheduler="sync") == (102,)
    assert value.key in dict(doubled.__dask_graph__())


def test_an_attribute_of_a_chain_value_carries_the_chain():
    text = feste_task(lambda: "abc")()
    upper = text.upper
    graph = dict(upper.__dask_graph__())
    assert set(graph) == {text.key, upper.key}
    assert sync(upper)[0]() == "ABC"


# -- keys of pure calls ----------------------------------------------------------------------


def test_pure_keys_tell_apart_values_that_compare_equal():
    arguments = [1, 1.0, True, "1", [1], (1,), {"a": 1}, {"a": 1.0}, None, [None]]
    keys = [pure_add(argument, 0).key for argument in arguments]
    assert len(set(keys)) == len(arguments)
    assert [pure_add(argument, 0).key for argument in arguments] == keys


def test_pure_keys_of_lazy_and_tokenizable_arguments():
    first, second = add(1, 1), add(1, 1)  # impure: two different nodes
    assert pure_add(first, 1).key == pure_add(first, 1).key
    assert pure_add(first, 1).key != pure_add(second, 1).key
    assert pure_add([first, "x"], 1).key == pure_add([first, "x"], 1).key
    assert pure_add(Greeter("Hi"), 1).key == pure_add(Greeter("Hi"), 1).key
    assert pure_add(Greeter("Hi"), 1).key != pure_add(Greeter("Yo"), 1).key


class _Text(str):
    pass


def test_pure_keys_of_a_str_subclass_are_its_own():
    assert pure_add(_Text("a"), "b").key == pure_add(_Text("a"), "b").key
    assert pure_add(_Text("a"), "b").key != pure_add("a", "b").key
    assert sync(pure_add(_Text("a"), "b")) == ("ab",)


def _adder(amount):
    def add_amount(value):
        return value + amount

    return add_amount


def test_local_functions_with_other_captured_values_have_other_keys():
    plus_one = feste_task(_adder(1), pure=True)
    plus_two = feste_task(_adder(2), pure=True)
    assert plus_one(10).key != plus_two(10).key
    assert plus_one(10).key == plus_one(10).key
    assert sync(plus_one(10), plus_two(10)) == (11, 12)


def test_one_module_function_wrapped_twice_gives_one_key():
    assert feste_task(_value, pure=True)(3).key == feste_task(_value, pure=True)(3).key
    assert feste_task(_value, pure=True)(3).key != feste_task(_square, pure=True)(3).key


def _impure_key():
    return add(1, 1).key


def test_impure_keys_stay_unique_in_a_forked_child():
    keys = {add(1, 1).key for _ in range(100)}
    assert len(keys) == 100
    with multiprocessing.get_context("fork").Pool(1) as pool:
        here = _impure_key()  # both sides continue from the same point after the fork
        there = pool.apply(_impure_key)
    assert here != there
    assert here not in keys and there not in keys


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_a_long_chain_pickles_with_its_graph(dumps):
    # The call form: pickle finds the plain function under its module name.
    lazy_increment = feste_task(_increment, pure=True)
    value = 0
    for _ in range(3000):
        value = lazy_increment(value)
    restored = pickle.loads(dumps(value))
    assert isinstance(restored, FesteDelayed)
    assert restored.key == value.key
    assert dict(restored.__dask_graph__()).keys() == dict(value.__dask_graph__()).keys()
    assert sync(restored, lazy_increment(restored)) == (3000, 3001)


def _increment(value):
    return value + 1
