"""Prompts: Jinja2 templates whose renders are lazy graph nodes.

Design
------
* A :class:`Prompt` holds a template source, a language (an ISO 639 ``iso639.Language``)
  and the Jinja2 environment it compiles in. The template is compiled once, when the
  prompt is built, so a syntax error surfaces on the line that created the prompt, as a
  :class:`feste.errors.TemplateSyntaxError` showing the template line.
* Calling a prompt with variables renders it. Whether that happens now or later is
  decided at call time: inside ``context.set(eager=True)`` the render runs at once (lazy
  variables are computed first) and a plain ``str`` comes back; otherwise the call adds
  one pure node (key ``"prompt-<token>"``) whose function is the module-level
  :func:`_render_prompt`, so identical renders share a node and graphs pickle for the
  processes scheduler. Variables may be lazy values anywhere inside lists and dicts.
* Missing variables are reported early: at call time the given names are compared with
  the names the template needs (those not guarded by ``is defined`` or ``|default``) and
  a :class:`feste.errors.MissingVariableError` is raised before any graph is built.
  Rendering uses ``jinja2.StrictUndefined``, so a missing attribute or key found while
  rendering raises the same error instead of producing an empty string. Variables the
  template does not use are ignored, so one dict of values can feed several prompts.
* :class:`FesteEnvironment` is a ``jinja2.Environment`` tuned for prompts: strict
  undefined values, no HTML autoescaping, trailing newline kept, a ``json`` filter and
  the ``enumerate`` and ``zip`` globals. :class:`SandboxedFesteEnvironment` is the same
  on Jinja2's immutable sandbox, for templates written by untrusted users
  (``Prompt(..., sandboxed=True)``); unsafe attribute access raises Jinja2's own
  ``jinja2.exceptions.SecurityError``, passed through with the prompt named in it.
* Identity: a prompt's token (graph keys), ``==`` and ``hash`` come from the template
  source and the language, plus the sandbox flag and, for a user-supplied environment,
  a deterministic fingerprint of its settings, filters, tests and globals (never the
  object's identity), because those change what a render produces. Pickling drops the
  compiled template and compiles it again on load.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from typing import Any

import iso639
import jinja2
import jinja2.meta
import jinja2.nodes
from dask.base import tokenize
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment

from feste.errors import MissingVariableError, TemplateSyntaxError, UnknownLanguageError
from feste.task import FesteBase, FesteDelayed, eager_or_lazy

__all__ = ["FesteEnvironment", "LanguageMismatch", "Prompt", "SandboxedFesteEnvironment"]

_DESCRIPTION_CHARS = 60
_DEFAULT_FILENAME = "<prompt>"


class LanguageMismatch(UserWarning):
    """Two prompts in different languages were joined with ``+``."""


# ---------------------------------------------------------------------------------------
# Environments


def _json_filter(value: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    """``{{ value | json }}``: the value as JSON text, non-ASCII characters kept as they are.

    Unlike Jinja2's ``tojson`` it does not HTML-escape ``<``, ``>`` and ``&``: a prompt is
    read by a model, not by a browser.
    """
    return json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)


def _prompt_options(options: dict[str, Any]) -> dict[str, Any]:
    options.setdefault("undefined", jinja2.StrictUndefined)
    options.setdefault("autoescape", False)
    options.setdefault("keep_trailing_newline", True)
    return options


def _install_helpers(environment: jinja2.Environment) -> None:
    environment.filters["json"] = _json_filter
    environment.globals["enumerate"] = enumerate
    environment.globals["zip"] = zip


class FesteEnvironment(jinja2.Environment):
    """A ``jinja2.Environment`` with feste's defaults for prompts.

    Defaults (each can be overridden with the usual Jinja2 keyword): ``undefined=
    jinja2.StrictUndefined`` (a missing value is an error, never an empty string),
    ``autoescape=False`` (prompts are not HTML), ``keep_trailing_newline=True``. Adds the
    ``json`` filter (``{{ data | json(indent=2) }}``) and the ``enumerate`` and ``zip``
    globals. Configure it fully before building prompts with it.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**_prompt_options(options))
        _install_helpers(self)


class SandboxedFesteEnvironment(ImmutableSandboxedEnvironment):
    """:class:`FesteEnvironment` on Jinja2's immutable sandbox, for untrusted templates.

    Templates cannot reach private or internal attributes (``__class__``, ``__globals__``)
    nor mutate lists and dicts; trying raises ``jinja2.exceptions.SecurityError``.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**_prompt_options(options))
        _install_helpers(self)


_DEFAULT_ENVIRONMENT = FesteEnvironment()
_DEFAULT_SANDBOXED_ENVIRONMENT = SandboxedFesteEnvironment()

# Settings that change how a template parses or renders; part of a custom
# environment's fingerprint.
_ENVIRONMENT_SETTINGS = (
    "block_start_string",
    "block_end_string",
    "variable_start_string",
    "variable_end_string",
    "comment_start_string",
    "comment_end_string",
    "line_statement_prefix",
    "line_comment_prefix",
    "trim_blocks",
    "lstrip_blocks",
    "newline_sequence",
    "keep_trailing_newline",
    "undefined",
    "finalize",
    "autoescape",
    "optimized",
    "is_async",
)


def _environment_fingerprint(environment: jinja2.Environment) -> str:
    """A token that is the same for two environments that render templates alike."""
    environment_type = type(environment)
    settings = {name: getattr(environment, name, None) for name in _ENVIRONMENT_SETTINGS}
    return tokenize(
        environment_type.__module__,
        environment_type.__qualname__,
        settings,
        dict(environment.filters),
        dict(environment.tests),
        dict(environment.globals),
        sorted(environment.extensions),
        dict(environment.policies),
    )


# ---------------------------------------------------------------------------------------
# Compiling


class _Compiled:
    """A compiled template and what its syntax tree says about its variables."""

    __slots__ = ("optional", "template", "variables")

    def __init__(
        self, template: jinja2.Template, variables: frozenset[str], optional: frozenset[str]
    ) -> None:
        self.template = template
        self.variables = variables
        self.optional = optional


def _guarded_names(tree: jinja2.nodes.Template) -> frozenset[str]:
    """Names the template only reads behind ``is defined`` / ``|default``.

    They may be left out of a call; StrictUndefined still catches any unguarded use
    while rendering.
    """
    guarded = set()
    for node in tree.find_all((jinja2.nodes.Test, jinja2.nodes.Filter)):
        subject = node.node
        if not isinstance(subject, jinja2.nodes.Name):
            continue
        if isinstance(node, jinja2.nodes.Test) and node.name in ("defined", "undefined"):
            guarded.add(subject.name)
        if isinstance(node, jinja2.nodes.Filter) and node.name in ("default", "d"):
            guarded.add(subject.name)
    return frozenset(guarded)


def _syntax_error(
    source: str, description: str, error: jinja2.TemplateSyntaxError
) -> TemplateSyntaxError:
    lines = source.splitlines()
    message = f"syntax error in prompt template {description}, line {error.lineno}: "
    message += str(error.message)
    if 1 <= error.lineno <= len(lines):
        message += f"\n    {error.lineno} | {lines[error.lineno - 1]}"
    return TemplateSyntaxError(message)


def _compile(
    environment: jinja2.Environment, source: str, filename: str | None, description: str
) -> _Compiled:
    try:
        tree = environment.parse(source, filename=filename or _DEFAULT_FILENAME)
        code = environment.compile(tree, filename=filename or _DEFAULT_FILENAME)
    except jinja2.TemplateSyntaxError as error:
        # TemplateAssertionError (an unknown filter or test) is a subclass, caught here too.
        raise _syntax_error(source, description, error) from None
    template = environment.template_class.from_code(
        environment, code, environment.make_globals(None), None
    )
    # find_undeclared_variables leaves out the environment's globals (range, zip, ...).
    variables = frozenset(jinja2.meta.find_undeclared_variables(tree))
    return _Compiled(template, variables, _guarded_names(tree) & variables)


@functools.lru_cache(maxsize=256)
def _compile_default(source: str, filename: str | None, sandboxed: bool) -> _Compiled:
    """Templates of the shared default environments, compiled once per process.

    Worker processes unpickle one prompt per task; this keeps that cheap.
    """
    environment = _DEFAULT_SANDBOXED_ENVIRONMENT if sandboxed else _DEFAULT_ENVIRONMENT
    return _compile(environment, source, filename, _describe(source, filename))


def _describe(source: str, filename: str | None) -> str:
    """How messages name a template: its file, or the start of its source."""
    if filename is not None:
        return repr(filename)
    if len(source) > _DESCRIPTION_CHARS:
        return repr(source[:_DESCRIPTION_CHARS] + "...")
    return repr(source)


def _match_language(language: str | iso639.Language) -> iso639.Language:
    if isinstance(language, iso639.Language):
        return language
    if not isinstance(language, str):
        raise TypeError(
            f"Prompt language must be an ISO 639 code such as 'en' or an iso639.Language, "
            f"got {type(language).__name__} {language!r}"
        )
    try:
        return iso639.Language.match(language.strip(), strict_case=False)
    except iso639.LanguageNotFoundError:
        raise UnknownLanguageError(
            f"unknown language {language!r}: not an ISO 639 code or language name; "
            f"use a code such as 'en', 'pt', 'de', 'jpn' or a name such as 'French'"
        ) from None


# ---------------------------------------------------------------------------------------
# Prompt


def _render_prompt(prompt: Prompt, variables: dict[str, Any]) -> str:
    """The function of a prompt's graph node: render with computed variables."""
    return prompt._render(variables)


def _template_line(error: BaseException, filename: str) -> int | None:
    """The template line being rendered when ``error`` was raised (Jinja2 rewrites the
    traceback so that template frames carry the template's file name and line)."""
    line = None
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == filename:
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return line


class Prompt(FesteBase):
    """A Jinja2 prompt template; calling it renders it, lazily unless in eager mode.

    >>> from feste import context
    >>> greeting = Prompt("Hello {{ name }}!")
    >>> with context.set(eager=True):
    ...     greeting(name="world")
    'Hello world!'

    Outside eager mode ``greeting(name=x)`` returns a lazy ``FesteDelayed`` string; ``x``
    may be a lazy value (the output of an earlier call), also inside lists and dicts.

    ``language`` is an ISO 639 code or name (``"en"``, ``"por"``, ``"German"``).
    ``environment`` is a ``jinja2.Environment`` to compile in (default: a shared
    :class:`FesteEnvironment`); ``sandboxed=True`` uses a shared
    :class:`SandboxedFesteEnvironment` instead, for templates from untrusted users.
    """

    def __init__(
        self,
        template: str,
        language: str | iso639.Language = "en",
        environment: jinja2.Environment | None = None,
        *,
        sandboxed: bool = False,
    ) -> None:
        self._setup(template, language, environment, sandboxed, filename=None)

    def _setup(
        self,
        template: str,
        language: str | iso639.Language,
        environment: jinja2.Environment | None,
        sandboxed: bool,
        filename: str | None,
    ) -> None:
        if not isinstance(template, str):
            raise TypeError(
                f"Prompt template must be a str, got {type(template).__name__}; "
                f"use Prompt.from_file(path) to load a template file"
            )
        if not isinstance(sandboxed, bool):
            raise TypeError(f"Prompt sandboxed must be True or False, got {sandboxed!r}")
        if environment is not None:
            if not isinstance(environment, jinja2.Environment):
                raise TypeError(
                    f"Prompt environment must be a jinja2.Environment (for example "
                    f"feste.FesteEnvironment()), got {type(environment).__name__}"
                )
            is_sandbox = isinstance(environment, SandboxedEnvironment)
            if sandboxed and not is_sandbox:
                raise ValueError(
                    f"Prompt(sandboxed=True) with a {type(environment).__name__}, which is "
                    f"not sandboxed: pass a SandboxedFesteEnvironment, or leave environment "
                    f"out to use feste's default sandbox"
                )
            sandboxed = is_sandbox
        self._source = template
        self._language = _match_language(language)
        self._environment = environment
        self._sandboxed = sandboxed
        self._filename = filename
        self._fingerprint: str | None = None
        self._token: Any = None
        self._compiled = self._compile()

    def _compile(self) -> _Compiled:
        if self._environment is None:
            return _compile_default(self._source, self._filename, self._sandboxed)
        return _compile(self._environment, self._source, self._filename, self._describe())

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        language: str | iso639.Language = "en",
        environment: jinja2.Environment | None = None,
        *,
        sandboxed: bool = False,
        encoding: str = "utf-8",
    ) -> Prompt:
        """Load a template file; error messages name the file."""
        filename = os.fspath(path)
        try:
            with open(filename, encoding=encoding) as handle:
                source = handle.read()
        except FileNotFoundError:
            raise FileNotFoundError(
                2, "prompt template file not found (check the path)", filename
            ) from None
        prompt = cls.__new__(cls)
        prompt._setup(source, language, environment, sandboxed, filename=filename)
        return prompt

    # -- what the prompt is -------------------------------------------------------------

    @property
    def template(self) -> str:
        """The template source."""
        return self._source

    @property
    def language(self) -> iso639.Language:
        """The prompt's language as an ``iso639.Language`` (``.part1``, ``.name``...)."""
        return self._language

    @property
    def language_code(self) -> str:
        """The shortest ISO 639 code of the language (``"en"``; ISO 639-3 if no 639-1)."""
        return self._language.part1 or self._language.part3

    @property
    def sandboxed(self) -> bool:
        """True when the template renders in a Jinja2 sandbox."""
        return self._sandboxed

    @property
    def filename(self) -> str | None:
        """The file the template was loaded from, if any."""
        return self._filename

    @property
    def environment(self) -> jinja2.Environment:
        """The Jinja2 environment the template is compiled in.

        Without an ``environment`` argument this is feste's shared default: do not add
        filters to it (prompt identity does not follow such changes); build a
        :class:`FesteEnvironment` and pass it instead.
        """
        return self._compiled.template.environment

    def variables(self) -> frozenset[str]:
        """Names the template reads from the caller (not those it sets itself, nor the
        environment's globals). A set: use ``sorted()`` for a stable order."""
        return self._compiled.variables

    def _required(self) -> frozenset[str]:
        return self._compiled.variables - self._compiled.optional

    def _describe(self) -> str:
        return _describe(self._source, self._filename)

    # -- rendering ----------------------------------------------------------------------

    def __call__(self, /, **variables: Any) -> FesteDelayed | str:
        """Render with ``variables``: a lazy string, or a ``str`` in eager mode.

        Raises :class:`~feste.errors.MissingVariableError` at once when a variable the
        template needs is not given. Extra variables are ignored.
        """
        missing = self._required() - variables.keys()
        if missing:
            raise self._missing_error(missing, variables)
        return eager_or_lazy(_render_prompt, (self, variables), {}, name="prompt", pure=True)

    def _missing_error(
        self, missing: frozenset[str], variables: dict[str, Any]
    ) -> MissingVariableError:
        names = sorted(missing)
        listed = ", ".join(repr(name) for name in names)
        given = ", ".join(repr(name) for name in sorted(variables)) or "none"
        example = ", ".join(f"{name}=..." for name in names)
        noun = "variable" if len(names) == 1 else "variables"
        return MissingVariableError(
            f"prompt {self._describe()} needs the {noun} {listed}, which "
            f"{'was' if len(names) == 1 else 'were'} not given (given: {given}); "
            f"call it as prompt({example})"
        )

    def _render(self, variables: dict[str, Any]) -> str:
        template = self._compiled.template
        try:
            return template.render(variables)
        except SecurityError as error:
            raise SecurityError(
                f"{error} (in sandboxed prompt {self._describe()}{self._where(error)})"
            ) from None
        except jinja2.UndefinedError as error:
            raise MissingVariableError(
                f"prompt {self._describe()}{self._where(error)}: {error}; "
                f"give the variable a value with that attribute or key"
            ) from None
        except Exception as error:
            error.add_note(f"while rendering prompt {self._describe()}{self._where(error)}")
            raise

    def _where(self, error: BaseException) -> str:
        line = _template_line(error, self._filename or _DEFAULT_FILENAME)
        if line is None:
            return ""
        lines = self._source.splitlines()
        text = lines[line - 1].strip() if 1 <= line <= len(lines) else ""
        return f", line {line}: {text}" if text else f", line {line}"

    # -- identity -----------------------------------------------------------------------

    def _environment_token(self) -> str | None:
        """None for the shared default environments; a fingerprint for a custom one."""
        if self._environment is None:
            return None
        if self._fingerprint is None:
            self._fingerprint = _environment_fingerprint(self._environment)
        return self._fingerprint

    def _token_state(self) -> Any:
        return (self._source, self._language.part3, self._sandboxed, self._environment_token())

    def __dask_tokenize__(self) -> Any:
        # Worked out once: a prompt does not change, and every call of it (thousands,
        # in a loop) puts this token into its node's key.
        if self._token is None:
            self._token = super().__dask_tokenize__()
        return self._token

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Prompt):
            return NotImplemented
        return self._token_state() == other._token_state()

    def __hash__(self) -> int:
        return hash((self._source, self._language.part3))

    def __len__(self) -> int:
        return len(self._source)

    def __str__(self) -> str:
        return self._source

    def __repr__(self) -> str:
        parts = [f"language={self.language_code!r}"]
        if self._filename is not None:
            parts.append(f"file={self._filename!r}")
        if self._sandboxed:
            parts.append("sandboxed=True")
        source = self._source
        if len(source) > _DESCRIPTION_CHARS:
            source = source[:_DESCRIPTION_CHARS] + "..."
        parts.append(f"template={source!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # -- joining ------------------------------------------------------------------------

    def __add__(self, other: object) -> Prompt:
        """``a + b``: a new prompt whose template is ``a``'s followed by ``b``'s, as is.

        The language is the left operand's (a :class:`LanguageMismatch` warning says when
        ``b`` differs). The result is sandboxed when either side is; a custom
        environment, left one first, is kept.
        """
        if isinstance(other, str):
            return self._joined(self._source + other, self._environment, self._sandboxed)
        if not isinstance(other, Prompt):
            return NotImplemented
        if other._language != self._language:
            warnings.warn(
                f"joining prompts in different languages ({self.language_code!r} + "
                f"{other.language_code!r}); the result keeps {self.language_code!r}",
                LanguageMismatch,
                stacklevel=2,
            )
        sandboxed = self._sandboxed or other._sandboxed
        environment = self._environment if self._environment is not None else other._environment
        if (
            sandboxed
            and environment is not None
            and not isinstance(environment, SandboxedEnvironment)
        ):
            raise ValueError(
                "cannot join a sandboxed prompt with a prompt whose custom environment is "
                "not sandboxed: the joined template would escape the sandbox; build both "
                "with a SandboxedFesteEnvironment"
            )
        return self._joined(self._source + other._source, environment, sandboxed)

    def __radd__(self, other: object) -> Prompt:
        if isinstance(other, str):
            return self._joined(other + self._source, self._environment, self._sandboxed)
        return NotImplemented

    def _joined(
        self, source: str, environment: jinja2.Environment | None, sandboxed: bool
    ) -> Prompt:
        return type(self)(source, self._language, environment, sandboxed=sandboxed)

    # -- pickling -----------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_compiled"]  # compiled code does not pickle; compile again on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_token", None)  # pickled before tokens were kept
        self._compiled = self._compile()
