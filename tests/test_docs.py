"""The documentation stays true: the README is short, its commands parse with the real
parser, its quick start runs as written, every relative link resolves, and
docs/architecture.md names every module of the package."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "onetrick"
MAX_README_BYTES = 15_000


def fenced_blocks(text: str, shell: bool = False) -> list[str]:
    """The bodies of the text's fenced code blocks, in order; ``shell``: only those marked
    bash, sh, console or nothing (not python)."""
    blocks = re.findall(r"(?ms)^```([^\n]*)\n(.*?)^```", text)
    return [body for lang, body in blocks if not shell or lang.strip() in ("", "bash", "sh", "shell", "console")]


def commands(block: str) -> list[str]:
    """The block's shell commands: line continuations joined, trailing comments dropped."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


def onetrick_args(command: str) -> list[str] | None:
    """The arguments ``onetrick`` gets from a command line, or None if it is not one:
    ``onetrick ...``, ``.venv/bin/onetrick ...``, ``... -m onetrick.cli ...``."""
    words = shlex.split(command)
    if words and Path(words[0]).name == "onetrick":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["onetrick.cli"]:
        return words[words.index("-m") + 2:]
    return None


def readme_commands() -> list[list[str]]:
    """Every onetrick command of the README's shell blocks, and the examples in its tables."""
    text = README.read_text()
    found = [args for block in fenced_blocks(text, shell=True) for cmd in commands(block)
             if (args := onetrick_args(cmd)) is not None]
    in_tables = [cmd for line in text.splitlines() if line.startswith("|")
                 for cmd in re.findall(r"`(onetrick [^`]+)`", line)]
    return found + [shlex.split(cmd)[1:] for cmd in in_tables]


def test_the_readme_is_at_most_15_kb():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; at most {MAX_README_BYTES}: move text to docs/"


def test_the_command_reader_joins_continuations_and_drops_comments():
    block = "onetrick train --workers 2 \\\n     --strategy hybrid   # the trick\nscripts/setup.sh\n"
    assert commands(block) == ["onetrick train --workers 2 --strategy hybrid", "scripts/setup.sh"]
    assert onetrick_args(".venv/bin/onetrick eval runs/latest") == ["eval", "runs/latest"]
    assert onetrick_args("torchrun --nnodes 2 -m onetrick.cli train --out x") == ["train", "--out", "x"]
    assert onetrick_args(".venv/bin/python -m pytest -q") is None


def test_every_onetrick_command_in_the_readme_parses():
    from onetrick.cli.main import build_parser

    found = readme_commands()
    assert len(found) >= 2, "the README shows no onetrick command"
    for args in found:
        line = shlex.join(["onetrick", *args])
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit as exit_:
            pytest.fail(f"README command does not parse (exit {exit_.code}): {line}")
        assert parsed.command is not None, line


def quick_start() -> list[list[str]]:
    """The README's quick-start training commands: the first fenced block under ``## Quick start``."""
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [args for cmd in commands(fenced_blocks(section, shell=True)[0])
            if (args := onetrick_args(cmd)) is not None and args[:1] == ["train"]]


@pytest.mark.timeout(600)
def test_the_quick_start_trains_as_written(tmp_path):
    """Both quick-start commands, run exactly as the README writes them (about 30 s together
    on a 2-core machine): one worker, then the hybrid on two."""
    runs = quick_start()
    assert len(runs) == 2 and "--workers" not in runs[0] and "hybrid" in runs[1], runs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in runs:
        result = subprocess.run([sys.executable, "-m", "onetrick.cli", *args], capture_output=True, text=True,
                                cwd=tmp_path, env=env, timeout=280)
        line = shlex.join(["onetrick", *args])
        assert result.returncode == 0, f"{line} failed:\n{result.stderr[-2000:]}"
        assert "test top-1 error" in result.stdout, f"{line} printed no test error:\n{result.stdout[-2000:]}"


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def relative_links(text: str) -> list[str]:
    """Every link target of ``[text](target)`` and ``![alt](target)`` that is not a URL or an anchor."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_a_file(page):
    broken = [t for t in relative_links(page.read_text()) if not (page.parent / t.split("#", 1)[0]).exists()]
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"


def tree_paths(text: str) -> set[str]:
    """The module paths (relative to src/onetrick) named by docs/architecture.md's tree: the
    fenced block starting with ``src/onetrick/``, nested by two-space indentation."""
    block = next(b for b in fenced_blocks(text) if b.startswith("src/onetrick/"))
    stack: list[str] = []
    paths = set()
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2 - 1
        name = line.split()[0]
        stack = stack[:depth]
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
        else:
            paths.add("/".join([*stack, name]))
    return paths


def test_the_tree_reader_follows_indentation():
    block = "```\nsrc/onetrick/\n  api.py — x\n  run/\n    train.py — y\n  cli/\n    main.py — z\n```\n"
    assert tree_paths(block) == {"api.py", "run/train.py", "cli/main.py"}


def test_the_architecture_page_names_every_module():
    named = tree_paths((DOCS / "architecture.md").read_text())
    modules = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    missing = sorted(modules - named)
    stale = sorted(n for n in named if not (SRC / n).is_file())
    assert not missing and not stale, f"docs/architecture.md: modules not named: {missing}; named but gone: {stale}"
