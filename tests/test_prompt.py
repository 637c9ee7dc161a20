"""Tests of feste.prompt: lazy and eager renders, errors, languages, joining, pickling."""

from __future__ import annotations

import pickle
import warnings

import cloudpickle
import iso639
import jinja2
import pytest
from dask.base import tokenize

import feste
from feste import context, feste_task
from feste.errors import (
    MissingVariableError,
    PromptError,
    TemplateSyntaxError,
    UnknownLanguageError,
)
from feste.prompt import FesteEnvironment, LanguageMismatch, Prompt, SandboxedFesteEnvironment
from feste.task import FesteDelayed

GREETING = "Hello {{ name }}!"


@feste_task(pure=True)
def shout(text: str) -> str:
    return text.upper() + "!"


@feste_task(pure=True)
def token_of(value: object) -> str:
    return str(tokenize(value))


# -- rendering ------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_lazy_render_exact_value(scheduler: str) -> None:
    prompt = Prompt(GREETING)
    rendered = prompt(name="world")
    assert isinstance(rendered, FesteDelayed)
    assert rendered.key.startswith("prompt-")
    assert feste.compute(rendered, scheduler=scheduler) == ("Hello world!",)


def test_lazy_render_with_processes_scheduler() -> None:
    prompt = Prompt("{{ a }} and {{ b }}")
    first = prompt(a=shout("x"), b="y")
    # The worker unpickles the prompt; its token there must match the one here.
    token_in_worker = token_of(prompt)
    result = feste.compute(first, token_in_worker, scheduler="processes")
    assert result == ("X! and y", tokenize(prompt))


def test_eager_render_returns_str() -> None:
    with context.set(eager=True):
        prompt = Prompt(GREETING)
        assert prompt(name="world") == "Hello world!"


def test_eagerness_is_checked_at_call_time() -> None:
    prompt = Prompt(GREETING)
    with context.set(eager=True):
        rendered = prompt(name="world")
    assert type(rendered) is str
    assert rendered == "Hello world!"
    assert isinstance(prompt(name="world"), FesteDelayed)


def test_eager_render_computes_lazy_inputs_first() -> None:
    prompt = Prompt("{{ a }} / {{ items | join(',') }}")
    lazy_a = shout("hey")
    lazy_item = shout("b")
    with context.set(eager=True):
        assert prompt(a=lazy_a, items=["a", lazy_item]) == "HEY! / a,B!"


def test_lazy_variable_from_task_output() -> None:
    prompt = Prompt("Summary: {{ summary }}")
    rendered = prompt(summary=shout("ok"))
    assert rendered.key in dict(rendered.__dask_graph__())
    assert feste.compute(rendered, scheduler="sync") == ("Summary: OK!",)


def test_nested_lazy_values_inside_lists_and_dicts() -> None:
    prompt = Prompt(
        "{% for item in items %}[{{ item }}]{% endfor %} "
        "{{ meta.title }} {{ meta.tags | join('+') }}"
    )
    rendered = prompt(
        items=["a", shout("b"), 3],
        meta={"title": shout("t"), "tags": [shout("x"), "y"]},
    )
    (text,) = feste.compute(rendered, scheduler="sync")
    assert text == "[a][B!][3] T! X!+y"


def test_identical_renders_share_one_key() -> None:
    prompt = Prompt(GREETING)
    same_prompt = Prompt(GREETING)
    first = prompt(name=shout("a"))
    second = same_prompt(name=shout("a"))
    other = prompt(name=shout("b"))
    assert first.key == second.key
    assert first.key != other.key
    graph = feste.FesteGraph.collect(first, second)[0].to_dict()
    assert sum(1 for key in graph if str(key).startswith("prompt-")) == 1
    assert feste.compute(first, second, scheduler="sync") == ("Hello A!!", "Hello A!!")


def test_extra_variables_are_ignored() -> None:
    with context.set(eager=True):
        assert Prompt(GREETING)(name="x", unused=1) == "Hello x!"


def test_guarded_variables_are_optional() -> None:
    prompt = Prompt("{% if tone is defined %}[{{ tone }}] {% endif %}{{ text | default('-') }}")
    with context.set(eager=True):
        assert prompt() == "-"
        assert prompt(tone="calm", text="hi") == "[calm] hi"


# -- errors ---------------------------------------------------------------------------


def test_syntax_error_shows_line_number_and_line() -> None:
    source = "first line\n{% for x in items %}\n{{ x }}\n{% endif %}\n"
    with pytest.raises(TemplateSyntaxError) as info:
        Prompt(source)
    message = str(info.value)
    assert "line 4" in message
    assert "4 | {% endif %}" in message
    assert isinstance(info.value, PromptError)


def test_unknown_filter_is_a_syntax_error_at_construction() -> None:
    with pytest.raises(TemplateSyntaxError, match=r"line 2: No filter named 'nosuch'"):
        Prompt("ok\n{{ x | nosuch }}")


def test_missing_variable_raises_at_call_time() -> None:
    prompt = Prompt("Dear {{ name }}, about {{ topic }}")
    with pytest.raises(MissingVariableError) as info:
        prompt(name="Ann", topc="typo")
    message = str(info.value)
    assert "'topic'" in message
    assert "'Dear {{ name }}, about {{ topic }}'" in message
    assert "'topc'" in message  # the given names help spot the typo
    with context.set(eager=True), pytest.raises(MissingVariableError, match="'topic'"):
        prompt(name="Ann")


def test_missing_variable_message_truncates_long_template() -> None:
    prompt = Prompt("{{ needed }}" + "x" * 200)
    with pytest.raises(MissingVariableError) as info:
        prompt()
    message = str(info.value)
    assert "'needed'" in message
    assert "{{ needed }}" + "x" * 48 + "..." in message
    assert "x" * 100 not in message


def test_missing_attribute_raises_at_render_time() -> None:
    prompt = Prompt("line one\nHi {{ user.first_name }}")
    rendered = prompt(user={"name": "Ann"})
    with pytest.raises(MissingVariableError) as info:
        feste.compute(rendered, scheduler="sync")
    message = str(info.value)
    assert "first_name" in message
    assert "line 2" in message
    assert rendered.key in message
    with context.set(eager=True), pytest.raises(MissingVariableError, match="first_name"):
        prompt(user={})


def test_guarded_variable_used_unguarded_still_fails_at_render() -> None:
    prompt = Prompt("{% if x is defined %}{{ x }}{% endif %}{{ x }}")
    with context.set(eager=True), pytest.raises(MissingVariableError, match="'x' is undefined"):
        prompt()


def test_unknown_language_code() -> None:
    with pytest.raises(UnknownLanguageError) as info:
        Prompt(GREETING, language="xx")
    message = str(info.value)
    assert "'xx'" in message
    assert "'en'" in message


def test_bad_argument_types() -> None:
    with pytest.raises(TypeError, match="template must be a str"):
        Prompt(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="language"):
        Prompt(GREETING, language=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"jinja2\.Environment"):
        Prompt(GREETING, environment={})  # type: ignore[arg-type]


# -- languages ------------------------------------------------------------------------


def test_language_is_an_iso639_object() -> None:
    prompt = Prompt(GREETING, language="pt")
    assert prompt.language == iso639.Language.match("por")
    assert prompt.language.name == "Portuguese"
    assert prompt.language_code == "pt"
    assert Prompt(GREETING, language="deu").language_code == "de"
    assert Prompt(GREETING, language="EN").language_code == "en"
    assert Prompt(GREETING).language.part3 == "eng"


# -- joining --------------------------------------------------------------------------


def test_add_with_different_languages_warns_and_keeps_left() -> None:
    left = Prompt("Olá {{ name }}. ", language="pt")
    right = Prompt("Bye {{ other }}", language="en")
    with pytest.warns(LanguageMismatch, match="'pt' \\+ 'en'"):
        joined = left + right
    assert joined.template == "Olá {{ name }}. Bye {{ other }}"
    assert joined.language_code == "pt"
    assert joined.variables() == {"name", "other"}


def test_add_same_language_and_str_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        joined = Prompt("A {{ a }}", language="en") + Prompt(" B", language="eng")
        with_suffix = joined + "\nC {{ c }}"
        with_prefix = "Start. " + joined
    assert isinstance(with_suffix, Prompt)
    assert isinstance(with_prefix, Prompt)
    assert str(with_suffix) == "A {{ a }} B\nC {{ c }}"
    assert str(with_prefix) == "Start. A {{ a }} B"
    with context.set(eager=True):
        assert with_suffix(a=1, c=2) == "A 1 B\nC 2"


def test_add_keeps_sandbox() -> None:
    joined = Prompt("{{ a }}") + Prompt("{{ b }}", sandboxed=True)
    assert joined.sandboxed
    with pytest.raises(ValueError, match="sandbox"):
        Prompt("x", environment=FesteEnvironment()) + Prompt("y", sandboxed=True)


def test_add_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        Prompt("x") + 1  # type: ignore[operator]


# -- files, introspection, identity ---------------------------------------------------


def test_from_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ask.j2"
    path.write_text("Question: {{ question }}\n", encoding="utf-8")
    prompt = Prompt.from_file(path, language="fr")
    assert prompt.filename == str(path)
    assert prompt.language_code == "fr"
    assert prompt.template == "Question: {{ question }}\n"
    with context.set(eager=True):
        assert prompt(question="why?") == "Question: why?\n"
    assert "ask.j2" in repr(prompt)
    with pytest.raises(MissingVariableError, match=r"ask\.j2"):
        prompt()


def test_from_file_errors_name_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "nope.j2"
    with pytest.raises(FileNotFoundError, match=r"nope\.j2"):
        Prompt.from_file(missing)
    broken = tmp_path / "broken.j2"
    broken.write_text("ok\n{{ x\n", encoding="utf-8")
    with pytest.raises(TemplateSyntaxError, match=r"broken\.j2', line 2"):
        Prompt.from_file(broken)


def test_variables() -> None:
    prompt = Prompt(
        "{% set greeting = 'hi' %}{{ greeting }} {{ user.name }}"
        "{% for i, doc in enumerate(docs) %}{{ i }}{{ doc }}{% endfor %}{{ range(2) | list }}"
    )
    assert prompt.variables() == frozenset({"user", "docs"})
    assert sorted(prompt.variables()) == ["docs", "user"]
    assert Prompt("plain text").variables() == frozenset()


def test_len_str_repr_eq_hash() -> None:
    prompt = Prompt(GREETING, language="de")
    assert len(prompt) == len(GREETING)
    assert str(prompt) == GREETING
    assert repr(prompt) == "Prompt(language='de', template='Hello {{ name }}!')"
    long_repr = repr(Prompt("y" * 100))
    assert long_repr == f"Prompt(language='en', template='{'y' * 60}...')"
    assert prompt == Prompt(GREETING, language="deu")
    assert hash(prompt) == hash(Prompt(GREETING, language="German"))
    assert prompt != Prompt(GREETING, language="en")
    assert prompt != Prompt("Hi {{ name }}!", language="de")
    assert prompt != GREETING
    assert len({prompt, Prompt(GREETING, language="de")}) == 1


def test_custom_environment_is_part_of_identity() -> None:
    source = "{% if x %}\nyes\n{% endif %}"
    default = Prompt(source)
    trimmed = Prompt(source, environment=FesteEnvironment(trim_blocks=True))
    trimmed_again = Prompt(source, environment=FesteEnvironment(trim_blocks=True))
    assert trimmed == trimmed_again
    assert trimmed != default
    assert trimmed(x=True).key == trimmed_again(x=True).key
    assert trimmed(x=True).key != default(x=True).key
    assert feste.compute(trimmed(x=True), default(x=True), scheduler="sync") == (
        "yes\n",
        "\nyes\n",
    )


# -- environments ---------------------------------------------------------------------


def test_feste_environment_defaults_and_helpers() -> None:
    environment = FesteEnvironment()
    assert isinstance(environment, jinja2.Environment)
    template = environment.from_string(
        "{{ html }} {{ data | json }}"
        "{% for i, x in enumerate(xs) %} {{ i }}={{ x }}{% endfor %}"
        "{% for a, b in zip(xs, ys) %} {{ a }}{{ b }}{% endfor %}\n"
    )
    text = template.render(html="<b>&</b>", data={"é": [1, None]}, xs=["p", "q"], ys=[1, 2])
    assert text == '<b>&</b> {"é": [1, null]} 0=p 1=q p1 q2\n'
    with pytest.raises(jinja2.UndefinedError):
        environment.from_string("{{ nothing }}").render()


def test_sandbox_blocks_attribute_escape() -> None:
    source = "{{ ''.__class__.__mro__ }}"
    trusted = Prompt(source)
    untrusted = Prompt(source, sandboxed=True)
    assert untrusted.sandboxed
    assert isinstance(untrusted.environment, SandboxedFesteEnvironment)
    assert trusted != untrusted
    assert trusted().key != untrusted().key
    with context.set(eager=True):
        assert "object" in trusted()
        with pytest.raises(jinja2.exceptions.SecurityError) as info:
            untrusted()
    assert "__class__" in str(info.value)
    assert "sandboxed prompt" in str(info.value)
    with pytest.raises(jinja2.exceptions.SecurityError):
        feste.compute(untrusted(), scheduler="sync")


def test_sandbox_blocks_mutation_and_allows_helpers() -> None:
    prompt = Prompt("{{ items.append(4) }}", sandboxed=True)
    with context.set(eager=True):
        with pytest.raises(jinja2.exceptions.SecurityError, match="append"):
            prompt(items=[1])
        helpers = Prompt(
            "{% for i, x in enumerate(xs) %}{{ i }}{{ x }}{% endfor %}", sandboxed=True
        )
        assert helpers(xs="ab") == "0a1b"


def test_sandboxed_flag_needs_sandboxed_environment() -> None:
    with pytest.raises(ValueError, match="not sandboxed"):
        Prompt("x", environment=FesteEnvironment(), sandboxed=True)
    assert Prompt("x", environment=SandboxedFesteEnvironment()).sandboxed


# -- pickling -------------------------------------------------------------------------


@pytest.mark.parametrize("module", [pickle, cloudpickle], ids=["pickle", "cloudpickle"])
@pytest.mark.parametrize(
    "prompt",
    [
        Prompt("Hi {{ name | upper }}\n", language="it"),
        Prompt("Hi {{ name }}", sandboxed=True),
        Prompt(
            "{% if name %}\nHi {{ name }}{% endif %}",
            environment=FesteEnvironment(trim_blocks=True),
        ),
    ],
    ids=["default", "sandboxed", "custom"],
)
def test_pickle_round_trip_renders_the_same(module, prompt: Prompt) -> None:  # type: ignore[no-untyped-def]
    restored = module.loads(module.dumps(prompt))
    assert restored == prompt
    assert restored.sandboxed == prompt.sandboxed
    assert restored.language_code == prompt.language_code
    assert tokenize(restored) == tokenize(prompt)
    assert restored(name="ann").key == prompt(name="ann").key
    with context.set(eager=True):
        assert restored(name="ann") == prompt(name="ann")


def test_a_prompt_pickled_before_tokens_were_kept_still_tokenizes() -> None:
    prompt = Prompt("Hi {{ name }}")
    key = prompt(name="ann").key
    state = prompt.__getstate__()
    del state["_token"]  # the state of a prompt pickled by an earlier feste
    restored = Prompt.__new__(Prompt)
    restored.__setstate__(state)
    assert tokenize(restored) == tokenize(prompt)
    assert restored(name="ann").key == key


def test_prompt_calls_in_a_loop_share_the_prompt_token_and_differ_by_variables() -> None:
    prompt = Prompt("Summarize {{ text }} in {{ words }} words")
    keys = [prompt(text=f"doc {index}", words=20).key for index in range(3)]
    assert len(set(keys)) == 3
    assert prompt(text="doc 0", words=20).key == keys[0]
    assert prompt(text="doc 0", words=20.0).key != keys[0]
    same_template = Prompt("Summarize {{ text }} in {{ words }} words")
    assert same_template(text="doc 0", words=20).key == keys[0]
