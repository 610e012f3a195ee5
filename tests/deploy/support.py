"""Helpers of the deploy tests: where things are, and the command lines inside deploy/."""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MFSWEEP = Path(sys.executable).with_name("mfsweep")  # the console script of the environment under test

_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;"}


@dataclass(frozen=True)
class Command:
    """One shell command found in a deploy file: its tokens from the program name on."""

    source: str
    tokens: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.source}:{' '.join(self.tokens[:2])}"


def yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _segments(text: str) -> Iterator[list[str]]:
    """Simple shell commands of ``text`` (one per line; quotes honoured, comments and redirections dropped,
    split at ; && || | &)."""
    for line in text.replace("\\\n", " ").splitlines():
        yield from _line_segments(line)


def _line_segments(line: str) -> Iterator[list[str]]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    seg: list[str] = []
    skip_next = False
    for tok in lex:
        if skip_next:  # the target of a redirection
            skip_next = False
        elif tok in _SEPARATORS:
            if seg:
                yield seg
            seg = []
        elif tok and set(tok) <= set("<>&"):  # a redirection: drop it, its target and a lone fd before it
            if seg and seg[-1].isdigit():
                seg.pop()
            skip_next = True
        else:
            seg.append(tok)
    if seg:
        yield seg


def commands_in(text: str, program: str, source: str) -> list[Command]:
    """Every ``program ARG...`` in shell text, also inside ``bash -c '...'`` strings and after ``--``."""
    out: list[Command] = []
    for seg in _segments(text):
        for i, tok in enumerate(seg[:-1]):
            if tok in ("bash", "sh") and seg[i + 1] == "-c" and i + 2 < len(seg):
                out += commands_in(seg[i + 2], program, source)
                break
        else:
            # A program name alone (a label, a container name) is not a command: it needs an argument.
            if program in seg[:-1]:
                out.append(Command(source, tuple(seg[seg.index(program):])))
    return out


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _markdown_shell(text: str) -> Iterator[str]:
    """Shell code blocks of a Markdown file, with backslash-continued lines joined."""
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        yield block.replace("\\\n", " ")


def _dockerfile_shell(text: str) -> Iterator[str]:
    """RUN/CMD/ENTRYPOINT bodies of a Dockerfile (exec form turned back into a shell line)."""
    for ins in dockerfile_instructions(text):
        if ins.keyword in ("RUN", "CMD", "ENTRYPOINT"):
            body = ins.args
            if body.startswith("["):
                body = shlex.join(json.loads(body))
            yield body


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped."""
    lines: list[str] = []
    cur = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):  # comment lines, also inside a continued instruction
            continue
        if raw.rstrip().endswith("\\"):
            cur += raw.rstrip()[:-1] + " "
            continue
        cur += raw
        if cur.strip():
            lines.append(cur.strip())
        cur = ""
    out = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    return out


def deploy_commands(program: str) -> list[Command]:
    """Every ``program ...`` command line in deploy/: README code blocks, YAML strings, the Dockerfile."""
    found: list[Command] = []
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(ROOT))
        if path.suffix == ".md":
            for block in _markdown_shell(path.read_text()):
                found += commands_in(block, program, rel)
        elif path.suffix in (".yaml", ".yml"):
            for doc in yaml_docs(path):
                for s in _strings(doc):
                    found += commands_in(s, program, rel)
        elif path.name == "Dockerfile":
            for body in _dockerfile_shell(path.read_text()):
                found += commands_in(body, program, rel)
    return found
