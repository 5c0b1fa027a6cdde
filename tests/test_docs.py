"""The code blocks of the docs run as written, each page in its own empty scratch folder, on the CPU.

The rules, for a page listed in ``PAGES`` (a path from the repository root):

- Its ```python blocks run in page order in **one** Python process, as a reader runs them in one session: a
  later block may use the names an earlier block defined, and a block that is a complete program runs as it
  is. A block that begins with ``>>>`` is a doctest instead; ``test_doctests_pass`` runs those with
  :mod:`doctest`.
- Its shell blocks (```bash, ```sh, ```shell, ```console) run **at their place in the page**, between the
  python blocks, with ``bash -euo pipefail`` in the same folder and the virtualenv's ``bin`` first on
  ``PATH``. In a ```console block only the lines that start with ``$ `` are commands (the prompt is
  stripped); the other lines are their output and are ignored.
- Every fence of the page names its language (```text for output), so no command hides in an unnamed block.
- The page runs in its own ``tmp_path``: pages never see each other's files, and a page that writes
  ``runs/...`` starts from an empty folder.

An HTML comment on the line right before a fence, invisible on the rendered page, changes what happens to
that block:

- ``<!-- docs-test: skip (REASON) -->``: the block does not run, and ``test_skipped_block`` reports it as
  skipped with REASON under its own test id (``page:line``), so every skipped block shows in the summary.
  Only for what cannot run here: a download, CUDA, a cluster, a run of many minutes, a command that runs
  this test suite itself. A slow block gets small settings on the page instead.
- ``<!-- docs-test: needs VAR (REASON) -->``: the block runs when the environment variable VAR is set (for
  example ``MODELSTITCH_CIFAR10_DIR``, the CIFAR-10 JPEG copy that ``.ci/run`` exports) and is reported as
  skipped otherwise.
- ``<!-- docs-test: file NAME -->``: the block (any language, e.g. ```toml) is written to ``NAME`` in the
  page's folder at its place in the page, for the blocks after it to use.

Doctests take no marker: :mod:`doctest`'s own ``# doctest: +SKIP`` does that.

A page that is not covered yet is in ``NOT_COVERED``; it opts in by moving to ``PAGES``, with the same
markers. ``test_every_page_with_code_is_listed`` keeps a new page from being in neither.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PAGES = [
    "README.md",
    "docs/index.md",
    "docs/getting-started.md",
    "docs/stitches.md",
    "docs/measures.md",
    "docs/training.md",
    "docs/language-models.md",
    "docs/study.md",
    "docs/zoo.md",
    "docs/data.md",
    "docs/howto-torchvision.md",
    "docs/howto-vit.md",
    "docs/howto-mse-lstsq.md",
    "docs/howto-own-data.md",
    "docs/howto-gpu.md",
    "docs/scale-out.md",
    "docs/faq.md",
    "docs/paper.md",
    "docs/performance.md",
    "docs/trust.md",
]
# pages with code blocks that do not run yet: none now (a new page may start here, then opt in)
NOT_COVERED: list[str] = []
# pages whose blocks take more than about 20 s together (all of them still run in CI: .ci/run selects no marker)
SLOW = {
    "docs/getting-started.md",
    "docs/measures.md",
    "docs/study.md",
    "docs/howto-torchvision.md",
    "docs/howto-mse-lstsq.md",
    "docs/howto-own-data.md",
    "docs/howto-gpu.md",
    "docs/scale-out.md",
}

PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!-- docs-test: (?P<verb>\w+)(?: (?P<arg>[^ (]+))?(?: \((?P<reason>.+)\))? -->$")
TIMEOUT_S = 900


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page.

    Attributes:
        page: The page's path from the repository root.
        line: The 1-based line number of the block's first code line.
        lang: The fence's language (``"python"``, ``"bash"``, ``"toml"``, ...).
        code: The block's text, without the fences.
        marker: The ``docs-test`` verb on the line before the fence (``"skip"``, ``"needs"``, ``"file"``), or
            ``None``.
        arg: The marker's argument: the file name of ``file``, the variable of ``needs``.
        reason: The marker's reason in parentheses, or ``None``.
    """

    page: str
    line: int
    lang: str
    code: str
    marker: str | None = None
    arg: str | None = None
    reason: str | None = None

    @property
    def id(self) -> str:
        """``page:line``, the block's test id."""
        return f"{self.page}:{self.line}"

    @property
    def kind(self) -> str:
        """What the block is to the test: ``"python"``, ``"doctest"``, ``"shell"``, ``"file"`` or ``"text"``."""
        if self.marker == "file":
            return "file"
        if self.lang in PYTHON:
            return "doctest" if self.code.lstrip().startswith(">>>") else "python"
        return "shell" if self.lang in SHELL else "text"

    def skip_reason(self) -> str | None:
        """Why the block does not run here, or ``None`` when it runs."""
        if self.marker == "skip":
            return self.reason
        if self.marker == "needs" and not os.environ.get(self.arg or ""):
            return f"needs {self.arg}: {self.reason}" if self.reason else f"needs {self.arg}"
        return None

    def script(self) -> str:
        """The code to run: a console block's commands without their prompts, any other block as it is."""
        if self.lang != "console":
            return self.code
        return "".join(line[2:] + "\n" for line in self.code.splitlines() if line.startswith("$ "))


def parse(page: str) -> list[Block]:
    """Every fenced block of ``page``, with the ``docs-test`` marker of the line before its fence.

    Args:
        page: A path from the repository root, e.g. ``"docs/faq.md"``.

    Returns:
        The blocks in page order.

    Raises:
        ValueError: For a marker that is not right before a fence, or a verb that is not ``skip``, ``needs`` or
            ``file`` (with its argument or reason), or a fence that is never closed.
    """
    lines = (ROOT / page).read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("<!-- docs-test"):
            marker = MARKER.match(line)
            valid = marker is not None and (
                (marker["verb"] == "skip" and marker["arg"] is None and marker["reason"] is not None)
                or (marker["verb"] == "needs" and marker["arg"] is not None)
                or (marker["verb"] == "file" and marker["arg"] is not None and marker["reason"] is None)
            )
            if not valid or i + 1 == len(lines) or not FENCE.match(lines[i + 1]):
                raise ValueError(f"{page}:{i + 1}: not a docs-test marker right before a fence: {line!r}")
        fence = FENCE.match(line)
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j] == "```"), None)
            if end is None:
                raise ValueError(f"{page}:{i + 1}: a fence that is never closed")
            before = MARKER.match(lines[i - 1]) if i > 0 else None
            blocks.append(
                Block(
                    page=page,
                    line=i + 2,
                    lang=fence[1],
                    code="".join(text + "\n" for text in lines[i + 1 : end]),
                    marker=before["verb"] if before else None,
                    arg=before["arg"] if before else None,
                    reason=before["reason"] if before else None,
                )
            )
            i = end
        i += 1
    return blocks


# Runs one page's blocks in order in one process: python blocks in one namespace (compiled with the page's
# name and line numbers, so a traceback points into the page), shell blocks through bash, files written.
DRIVER = r"""
import json, subprocess, sys
from pathlib import Path

page, blocks = json.loads(Path(sys.argv[1]).read_text())
namespace = {"__name__": "__main__"}
for block in blocks:
    where = f"{page}:{block['line']}"
    print(f"[docs-test] {where} ({block['kind']})", file=sys.stderr, flush=True)
    if block["kind"] == "python":
        exec(compile("\n" * (block["line"] - 1) + block["code"], page, "exec"), namespace)
    elif block["kind"] == "shell":
        sys.stdout.flush()
        sys.stderr.flush()
        status = subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]]).returncode
        if status != 0:
            sys.exit(f"[docs-test] {where}: the shell block exited with status {status}")
    else:
        Path(block["name"]).parent.mkdir(parents=True, exist_ok=True)
        Path(block["name"]).write_text(block["code"])
"""


def _runnable(page: str) -> list[Block]:
    """The page's blocks that run in its process: python, shell and file blocks that are not skipped."""
    return [b for b in parse(page) if b.kind in {"python", "shell", "file"} and b.skip_reason() is None]


def _page_params() -> list:
    """One test per page with a block that runs here (a page of doctests only has ``test_doctests_pass``)."""
    return [
        pytest.param(page, marks=[pytest.mark.slow] if page in SLOW else [], id=page)
        for page in PAGES
        if _runnable(page)
    ]


def _skipped() -> list:
    """One test per block that does not run here, with its reason."""
    return [
        pytest.param(f"{b.id}: {b.skip_reason()}", id=b.id)
        for page in PAGES
        for b in parse(page)
        if b.kind in {"python", "shell", "file"} and b.skip_reason() is not None
    ]


@pytest.mark.parametrize("page", _page_params())
def test_page_runs_as_written(page: str, tmp_path: Path) -> None:
    """The page's python, shell and file blocks run in order in an empty folder and exit without error."""
    blocks = _runnable(page)
    folder = tmp_path / "page"
    folder.mkdir()
    spec = tmp_path / "blocks.json"
    spec.write_text(
        json.dumps([page, [{"kind": b.kind, "line": b.line, "code": b.script(), "name": b.arg} for b in blocks]])
    )
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "MODELSTITCH_CACHE_DIR": str(tmp_path / "cache"),
    }
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(spec)],
        cwd=folder,
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"{page} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.mark.parametrize("why", _skipped())
def test_skipped_block(why: str) -> None:
    """A block marked ``skip`` (or ``needs`` an unset variable) is reported as skipped: ``page:line: reason``."""
    pytest.skip(why)


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.kind == "doctest" for b in parse(p))])
def test_doctests_pass(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's ``>>>`` blocks pass as doctests (pytest's ``--doctest-glob`` does not collect ``docs/``)."""
    monkeypatch.chdir(tmp_path)
    failures, tried = doctest.testfile(str(ROOT / page), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert tried and failures == 0, f"{page}: {failures} of {tried} doctest examples failed (output above)"


def test_every_page_with_code_is_listed() -> None:
    """Every page with a python or shell block is in ``PAGES`` or ``NOT_COVERED``; covered pages name every fence."""
    pages = [p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]]
    with_code = [p for p in pages if any(b.kind in {"python", "doctest", "shell"} for b in parse(p))]
    assert sorted(set(with_code) - set(PAGES) - set(NOT_COVERED)) == []
    assert sorted(set(PAGES) & set(NOT_COVERED)) == []
    unnamed = [b.id for page in PAGES for b in parse(page) if not b.lang]
    assert unnamed == [], "name the language of these fences (```text for output)"
