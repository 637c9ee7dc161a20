"""Docs that cannot drift: every Python block of README.md and docs/ runs here.

The convention (also in CONTRIBUTING.md):

* Each ```python block runs, against feste's local test server: ``OPENAI_BASE_URL``,
  ``OPENAI_API_KEY``, ``CO_API_URL`` and ``CO_API_KEY`` point at it, so a backend made
  with no arguments talks to it. The local model is the bundled one. The blocks of one
  file run in order in one namespace (a name defined in one block is known in the
  next), in a fresh temporary folder (files a block writes land there).
* ``<!-- not-run: reason -->`` on the line before the fence skips the block; the
  reason must say why (it needs a real model, a cluster...).
* ``<!-- setup: code -->`` (one or more lines) before the fence runs ``code`` first,
  unseen by readers: for names a snippet assumes (``documents``...).
* A ```text block right after a Python block (only blank lines between) is what the
  block prints, checked as doctest checks output: ``...`` matches anything, runs of
  whitespace are equal.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import doctest
import io
import re
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from feste.backend import Cohere, OpenAI

ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_COMMENT_END = "-->"
_CHECKER = doctest.OutputChecker()
_OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass
class Block:
    """One fenced Python block: where it is, its code, and what its markers say."""

    path: str
    line: int
    code: str
    skip_reason: str | None = None
    setup: str = ""
    expected_output: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _comment_before(lines: list[str], fence_index: int) -> str | None:
    """The HTML comment that ends on the last non-blank line before the fence, if any."""
    index = fence_index - 1
    while index >= 0 and not lines[index].strip():
        index -= 1
    if index < 0 or not lines[index].rstrip().endswith(_COMMENT_END):
        return None
    end = index
    while index >= 0 and "<!--" not in lines[index]:
        index -= 1
    if index < 0:
        return None
    text = "\n".join(
        line.strip() if n == 0 else line for n, line in enumerate(lines[index : end + 1])
    )
    start = text.index("<!--") + len("<!--")
    return text[start : text.rindex(_COMMENT_END)]


def extract_blocks(text: str, path: str) -> list[Block]:
    """The Python blocks of a Markdown text, with their markers and shown output."""
    lines = text.splitlines()
    fences: list[tuple[int, int, str, str]] = []  # (open index, close index, language, body)
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, language = opening.group(1), opening.group(2).lower()
        close = index + 1
        while close < len(lines) and lines[close].strip() != "```":
            close += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line
            for line in lines[index + 1 : close]
        ]
        fences.append((index, close, language, "\n".join(body) + "\n"))
        index = close + 1

    blocks: list[Block] = []
    for number, (opening, closing, language, body) in enumerate(fences):
        if language not in ("python", "py"):
            continue
        block = Block(path=path, line=opening + 1, code=body)
        comment = _comment_before(lines, opening)
        if comment is not None:
            marker, _, rest = comment.strip().partition(":")
            if marker.strip() == "not-run":
                block.skip_reason = rest.strip()
                if not block.skip_reason:
                    raise ValueError(f"{block.where}: <!-- not-run: ... --> needs a reason")
            elif marker.strip() == "setup":
                block.setup = textwrap.dedent(comment.split("setup:", 1)[1]).strip() + "\n"
        if number + 1 < len(fences):
            next_opening, _, next_language, next_body = fences[number + 1]
            between = lines[closing + 1 : next_opening]
            if next_language == "text" and all(not line.strip() for line in between):
                block.expected_output = next_body
        blocks.append(block)
    return blocks


def documented_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _run_code(code: str, namespace: dict[str, object], filename: str) -> None:
    # dont_inherit: the snippets run as a user's module does, without this file's
    # ``from __future__ import annotations`` (Pydantic models resolve their annotations).
    compiled = compile(
        code, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )
    result = eval(compiled, namespace)
    if asyncio.iscoroutine(result):
        asyncio.run(result)


def run_blocks(blocks: list[Block]) -> list[str]:
    """Run the blocks of one file in order, in one namespace; one problem per failure."""
    namespace: dict[str, object] = {"__name__": "__docs__"}
    problems: list[str] = []
    for block in blocks:
        if block.skip_reason is not None:
            continue
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output):
                if block.setup:
                    _run_code(block.setup, namespace, f"{block.where} (setup)")
                _run_code(block.code, namespace, block.where)
        except BaseException as error:  # a failing snippet is a finding, not a crash
            if isinstance(error, KeyboardInterrupt):
                raise
            detail = "".join(traceback.format_exception(error, limit=-3))
            problems.append(f"{block.where} raised:\n{detail}")
            continue
        got = output.getvalue()
        if block.expected_output is not None and not _CHECKER.check_output(
            block.expected_output, got, _OPTIONS
        ):
            problems.append(
                f"{block.where} printed:\n{got}\nbut the docs show:\n{block.expected_output}"
            )
    return problems


@pytest.fixture
def docs_environment(llm_server, monkeypatch, tmp_path):
    """Backends made with no arguments talk to the local server; files go to tmp_path."""
    monkeypatch.setenv("OPENAI_BASE_URL", llm_server.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "docs-test-key")
    monkeypatch.setenv("CO_API_URL", llm_server.cohere_base_url)
    monkeypatch.setenv("CO_API_KEY", "docs-test-key")
    monkeypatch.delenv("FESTE_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    return llm_server


@pytest.mark.parametrize("path", documented_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_python_block_runs_or_says_why_not(path, docs_environment, local_model):
    blocks = extract_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    problems = run_blocks(blocks)
    assert problems == [], "\n\n".join(problems)


def test_the_docs_hold_python_blocks_that_run():
    # Guards the test above: it must find blocks, and most of them must run.
    blocks = [
        block
        for path in documented_files()
        for block in extract_blocks(path.read_text(encoding="utf-8"), str(path))
    ]
    running = [block for block in blocks if block.skip_reason is None]
    assert len(running) >= 30
    assert len(running) > 3 * (len(blocks) - len(running))


SAMPLE = """
# A page

<!-- setup:
greeting = "hello"
-->
```python
print(greeting)
```

```text
hello
```

<!-- not-run: it would fail -->
```python
raise SystemExit("never")
```

```python
print(greeting.upper(), 1 + 1)
```

```text
HELLO 3
```

- a list item

  ```python
  print("indented...", "ok")
  ```

  ```text
  indented... ...
  ```

```python
undefined_name
```
"""


def test_the_runner_checks_output_skips_marked_blocks_and_reports_failures():
    blocks = extract_blocks(SAMPLE, "sample.md")
    assert [block.line for block in blocks] == [7, 16, 20, 30, 38]
    assert blocks[0].setup == 'greeting = "hello"\n'
    assert blocks[0].expected_output == "hello\n"
    assert blocks[1].skip_reason == "it would fail"
    assert blocks[3].code == 'print("indented...", "ok")\n'
    assert blocks[4].expected_output is None
    problems = run_blocks(blocks)
    assert len(problems) == 2
    assert problems[0].startswith("sample.md:20 printed:\nHELLO 2\n")
    assert problems[1].startswith("sample.md:38 raised:")
    assert "NameError: name 'undefined_name' is not defined" in problems[1]


def test_a_not_run_marker_needs_a_reason():
    with pytest.raises(ValueError, match=r"page.md:2: <!-- not-run: ... --> needs a reason"):
        extract_blocks("<!-- not-run: -->\n```python\npass\n```\n", "page.md")


def test_backends_take_their_address_from_the_environment(monkeypatch):
    # The docs rely on it, as users of the official clients do.
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("CO_API_URL", "http://127.0.0.1:9")
    assert OpenAI().base_url == "http://127.0.0.1:9/v1"
    assert Cohere().base_url == "http://127.0.0.1:9"
    assert OpenAI(base_url="http://127.0.0.1:8/v1").base_url == "http://127.0.0.1:8/v1"
    monkeypatch.delenv("OPENAI_BASE_URL")
    monkeypatch.delenv("CO_API_URL")
    assert OpenAI().base_url == "https://api.openai.com/v1"
    assert Cohere().base_url == "https://api.cohere.com"
