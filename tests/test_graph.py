"""feste.graph: collecting graphs, their structure, and the tools that show them.

Keys are fixed with ``dask_key_name`` so that printed output can be compared exactly.
"""

from __future__ import annotations

import graphlib
import io
import shutil

import dask
import pytest
from dask.task_spec import Alias, DataNode, Task, TaskRef

from feste.errors import GraphError
from feste.graph import FesteGraph, GraphStats
from feste.task import FesteDelayed, feste_task


@feste_task
def inc(a):
    return a + 1


@feste_task
def add(a, b):
    return a + b


def _identity(x):
    return x


def diamond():
    """a -> (b, c) -> d, plus a node e that nothing depends on."""
    a = inc(1, dask_key_name="a")
    b = inc(a, dask_key_name="b")
    c = inc(a, dask_key_name="c")
    d = add(b, c, dask_key_name="d")
    e = inc(10, dask_key_name="e")
    return a, b, c, d, e


# -- collect -------------------------------------------------------------------------------


def test_collect_returns_graph_collections_and_repack():
    _, b, _, d, e = diamond()
    graph, collections, repack = FesteGraph.collect([d, {"e": e}], "plain", (b,))
    assert isinstance(graph, FesteGraph)
    assert sorted(graph) == ["a", "b", "c", "d", "e"]
    assert [collection.key for collection in collections] == ["d", "e", "b"]
    assert all(isinstance(collection, FesteDelayed) for collection in collections)
    assert repack(["D", "E", "B"]) == (["D", {"e": "E"}], "plain", ("B",))


def test_collect_without_traverse_keeps_containers_as_they_are():
    a, *_ = diamond()
    holder = [a]
    graph, collections, repack = FesteGraph.collect(holder, traverse=False)
    assert len(graph) == 0
    assert collections == []
    assert repack([]) == ([a],)


def test_collect_merges_dask_delayed_graphs_into_task_spec_nodes():
    base = dask.delayed(_identity)(5, dask_key_name="base")
    on_top = inc(base, dask_key_name="top")
    graph, _, _ = FesteGraph.collect(on_top)
    assert sorted(graph) == ["base", "top"]
    assert isinstance(graph["base"], Task)
    assert graph["top"].dependencies == frozenset({"base"})


def test_old_style_tuple_graphs_are_converted():
    graph = FesteGraph({"x": 1, "y": (_identity, "x"), "z": "y"})
    assert isinstance(graph["x"], DataNode)
    assert isinstance(graph["y"], Task)
    assert isinstance(graph["z"], Alias)
    assert graph.get_all_dependencies() == {"x": set(), "y": {"x"}, "z": {"y"}}


# -- the mapping interface ----------------------------------------------------------------


def test_mapping_interface():
    graph, _, _ = FesteGraph.collect(diamond()[3])
    assert len(graph) == 4
    assert set(iter(graph)) == {"a", "b", "c", "d"}
    assert "a" in graph
    assert graph.get("missing") is None
    node = Task("extra", _identity, TaskRef("d"))
    graph["extra"] = node
    assert graph["extra"] is node
    assert len(graph) == 5
    del graph["extra"]
    assert "extra" not in graph
    with pytest.raises(KeyError):
        graph["extra"]
    assert repr(graph) == "<FesteGraph: 4 nodes>"


def test_to_dict_is_a_shallow_copy():
    graph, _, _ = FesteGraph.collect(diamond()[3])
    copy = graph.to_dict()
    assert copy == {key: graph[key] for key in graph}
    assert copy["a"] is graph["a"]
    del copy["a"]
    assert "a" in graph


# -- structure -----------------------------------------------------------------------------


def test_get_all_dependencies_and_dependents():
    *_, d, e = diamond()
    graph, _, _ = FesteGraph.collect(d, e)
    assert graph.get_all_dependencies() == {
        "a": set(),
        "b": {"a"},
        "c": {"a"},
        "d": {"b", "c"},
        "e": set(),
    }
    assert graph.get_all_dependents() == {
        "a": {"b", "c"},
        "b": {"d"},
        "c": {"d"},
        "d": set(),
        "e": set(),
    }


def test_a_dependency_missing_from_the_graph_is_a_graph_error():
    graph = FesteGraph({"x": Task("x", _identity, TaskRef("ghost"))})
    with pytest.raises(GraphError, match=r"task 'x' depends on 'ghost', which is not in the graph"):
        graph.get_all_dependencies()


def test_topological_sorter_puts_dependencies_first():
    *_, d, e = diamond()
    graph, _, _ = FesteGraph.collect(d, e)
    sorter = graph.topological_sorter()
    assert isinstance(sorter, graphlib.TopologicalSorter)
    order = list(sorter.static_order())
    assert sorted(order) == ["a", "b", "c", "d", "e"]
    position = {key: index for index, key in enumerate(order)}
    for key, deps in graph.get_all_dependencies().items():
        for dep in deps:
            assert position[dep] < position[key]


def test_a_cycle_is_a_graph_error():
    graph = FesteGraph(
        {"x": Task("x", _identity, TaskRef("y")), "y": Task("y", _identity, TaskRef("x"))}
    )
    with pytest.raises(GraphError, match=r"the graph has a cycle through"):
        graph.topological_order()
    with pytest.raises(GraphError, match="cycle"):
        graph.print(file=io.StringIO())
    with pytest.raises(GraphError, match="cycle"):
        graph.stats()


def test_order_gives_every_key_an_int_priority_after_its_dependencies():
    *_, d, e = diamond()
    graph, _, _ = FesteGraph.collect(d, e)
    priorities = graph.order()
    assert set(priorities) == {"a", "b", "c", "d", "e"}
    assert all(type(value) is int for value in priorities.values())
    assert sorted(priorities.values()) == [0, 1, 2, 3, 4]
    for key, deps in graph.get_all_dependencies().items():
        for dep in deps:
            assert priorities[dep] < priorities[key]


def test_chain_order_is_the_chain():
    a = inc(0, dask_key_name="a")
    b = inc(a, dask_key_name="b")
    c = inc(b, dask_key_name="c")
    graph, _, _ = FesteGraph.collect(c)
    assert graph.order() == {"a": 0, "b": 1, "c": 2}
    assert graph.topological_order() == ["a", "b", "c"]


# -- stats ---------------------------------------------------------------------------------


def test_stats_counts_nodes_and_depth():
    *_, d, e = diamond()
    graph, _, _ = FesteGraph.collect(d, e)
    stats = graph.stats()
    assert stats == GraphStats(nodes=5, depth=3, calls={}, requests={})
    assert graph.depth() == 3
    assert str(stats) == "5 nodes, depth 3"


def test_stats_of_a_longer_chain_and_of_an_empty_graph():
    value = inc(0)
    for _ in range(9):
        value = inc(value)
    graph, _, _ = FesteGraph.collect(value)
    assert (graph.stats().nodes, graph.stats().depth) == (10, 10)
    assert FesteGraph().stats() == GraphStats(nodes=0, depth=0)


def test_depth_of_a_deep_chain_beside_short_branches_and_of_broken_graphs():
    value = inc(0)
    for _ in range(2999):
        value = inc(value)
    side = inc(inc(0))
    graph, _, _ = FesteGraph.collect(value, side, inc(value))
    assert graph.depth() == 3001
    self_loop = FesteGraph({"x": Task("x", _identity, TaskRef("x"))})
    with pytest.raises(GraphError, match=r"the graph has a cycle through"):
        self_loop.depth()
    missing = FesteGraph({"x": Task("x", _identity, TaskRef("gone"))})
    with pytest.raises(GraphError, match=r"task 'x' depends on 'gone', which is not in the graph"):
        missing.depth()


def test_stats_text_lists_backend_methods():
    stats = GraphStats(
        nodes=3, depth=2, calls={"openai.chat": 4, "cohere.embed": 2}, requests={"openai.chat": 1}
    )
    assert str(stats) == (
        "3 nodes, depth 2\n"
        "  cohere.embed: 2 calls -> 0 requests\n"
        "  openai.chat: 4 calls -> 1 request"
    )


# -- display -------------------------------------------------------------------------------


def test_print_shows_one_line_per_node_dependencies_first():
    a = inc(1, dask_key_name="a")
    b = inc(a, dask_key_name="b")
    c = add(a, b, dask_key_name="c")
    graph, _, _ = FesteGraph.collect(c)
    out = io.StringIO()
    graph.print(file=out)
    assert out.getvalue() == "a = inc\nb = inc <- a\nc = add <- a, b\n"
    assert str(graph) == out.getvalue()


def test_print_labels_aliases_and_data(capsys):
    graph = FesteGraph({"x": 1, "y": "x"})
    graph.print()
    assert capsys.readouterr().out == "x = data\ny = alias <- x\n"


def test_to_dot_shows_function_names_and_keys_but_never_argument_values():
    a = inc(1, dask_key_name="a")
    secret_call = add(a, "sk-very-secret-value", dask_key_name="b")
    graph, _, _ = FesteGraph.collect(secret_call)
    dot = graph.to_dot()
    assert dot.startswith("digraph feste {\n")
    assert dot.endswith("}\n")
    assert "sk-very-secret-value" not in dot
    assert 'label="inc\\na"' in dot
    assert 'label="add\\nb"' in dot
    assert dot.count(" -> ") == 1


def test_visualize_writes_dot_source_without_graphviz(tmp_path):
    *_, d, _ = diamond()
    graph, _, _ = FesteGraph.collect(d)
    path = graph.visualize(tmp_path / "graph.dot")
    assert path == tmp_path / "graph.dot"
    assert path.read_text() == graph.to_dot()
    assert path.read_text().count(" -> ") == 4


MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-", "svg": b"<?xml"}


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_visualize_renders_with_graphviz_or_says_it_is_missing(tmp_path, fmt):
    *_, d, _ = diamond()
    graph, _, _ = FesteGraph.collect(d)
    target = tmp_path / f"graph.{fmt}"
    if shutil.which("dot") is None:
        with pytest.raises(RuntimeError, match=r"Graphviz's `dot` program"):
            graph.visualize(target)
        assert not target.exists()
    else:
        assert graph.visualize(target) == target
        content = target.read_bytes()
        assert content.startswith(MAGIC[fmt])
        if fmt == "svg":
            assert b"<svg" in content


def test_visualize_explains_a_missing_dot_program(tmp_path, monkeypatch):
    # An empty PATH hides Graphviz even where it is installed.
    monkeypatch.setenv("PATH", str(tmp_path))
    graph, _, _ = FesteGraph.collect(inc(1))
    with pytest.raises(RuntimeError) as raised:
        graph.visualize(tmp_path / "graph.png")
    message = str(raised.value)
    assert "Graphviz" in message
    assert "apt-get install graphviz" in message
    assert "visualize('graph.dot')" in message


def test_visualize_format_argument_and_unknown_formats(tmp_path):
    graph, _, _ = FesteGraph.collect(inc(1))
    path = graph.visualize(tmp_path / "source.txt", format="dot")
    assert path.read_text().startswith("digraph feste {")
    with pytest.raises(ValueError, match=r"cannot render format 'jpg'; use png, svg, pdf or dot"):
        graph.visualize(tmp_path / "graph.jpg")
