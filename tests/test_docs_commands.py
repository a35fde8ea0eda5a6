"""Every `python -m <module> ...` command in the fenced bash blocks of README.md and docs/ parses.

For each command the module is imported and its ``build_parser()`` parses the command's arguments
(nothing runs): an unknown flag, a bad value or a module that no longer exists (a renamed one) fails
with the file, the line and the command. Modules outside this project (``python -m pytest``) only
have to be importable. Nothing here names a module: the commands come from the docs.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from docs_text import FENCE, ROOT, doc_files

SHELL_LANGUAGES = {"bash", "sh", "shell", "zsh"}
OPERATORS = {"&&", "||", ";", "|", "&", ";;"}
# A Python interpreter (python, python3, python3.11, .venv/bin/python) or torchrun, which runs `-m` alike.
RUNNER = re.compile(r"^(?:.*/)?(?:python(?:\d+(?:\.\d+)?)?|torchrun)$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class DocCommand:
    path: Path  # the markdown file
    line: int  # 1-based line of the command's first line
    module: str
    argv: tuple[str, ...]
    text: str  # the command as written (continuations joined)

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where()}: {self.text}"


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, logical line) of every fenced shell block; ``\\`` continuations joined."""
    lines: list[tuple[int, str]] = []
    in_block, pending, start = False, "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(raw)
        if fence:
            if in_block:
                in_block = False
                if pending:
                    lines.append((start, pending))
                pending = ""
            else:
                in_block = fence.group(1).lower() in SHELL_LANGUAGES
            continue
        if not in_block:
            continue
        line = raw.rstrip()
        if line.lstrip().startswith("$ "):  # a console prompt
            line = line.lstrip()[2:]
        if not pending:
            start = number
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        if pending.strip():
            lines.append((start, pending.strip()))
        pending = ""
    return lines


def simple_commands(line: str) -> list[list[str]]:
    """The words of each simple command of a shell line (split at &&, ||, ;, |), comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def module_invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) when ``words`` run ``<python or torchrun> ... -m module args``."""
    words = list(words)
    while words and (ENV_ASSIGNMENT.match(words[0]) or words[0] in ("env", "time", "exec", "nohup", "sudo")):
        words.pop(0)
    for i, word in enumerate(words):
        if RUNNER.match(word):
            rest = words[i + 1 :]
            for j, option in enumerate(rest):
                if option.endswith(".py") or option == "-c":
                    return None  # python script.py ..., python -c CODE: not a module
                if option == "-m" and j + 1 < len(rest):
                    return rest[j + 1], rest[j + 2 :]
                if option.startswith("-m") and len(option) > 2 and not option.startswith("--"):
                    return option[2:], rest[j + 1 :]  # python -mclam.train
            return None
    return None


def commands_in(path: Path) -> list[DocCommand]:
    found = []
    for number, line in shell_lines(path.read_text(encoding="utf-8")):
        try:
            commands = simple_commands(line)
        except ValueError as error:  # an unclosed quote: a shell would refuse the line too
            if re.search(r"\s-m\s", line):
                found.append(DocCommand(path, number, "", (), f"{line}  [{error}]"))
            continue
        for words in commands:
            invocation = module_invocation(words)
            if invocation is not None:
                module, argv = invocation
                found.append(DocCommand(path, number, module, tuple(argv), line))
    return found


def project_packages(root: Path = ROOT) -> set[str]:
    return {p.parent.name for p in root.glob("*/__init__.py")}


def check_command(command: DocCommand, packages: set[str] | None = None) -> str | None:
    """None when the command parses, else why not."""
    packages = project_packages() if packages is None else packages
    if not command.module:
        return "the shell line does not parse"
    try:
        found = importlib.util.find_spec(command.module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"module {command.module} does not exist (renamed or removed?)"
    if command.module.split(".")[0] not in packages:
        return None  # pytest, pip, ...: importable is all that is asked
    module = importlib.import_module(command.module)
    build_parser = getattr(module, "build_parser", None)
    if build_parser is None:
        return f"module {command.module} has no build_parser(): is it a command at all?"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(list(command.argv))
    except SystemExit as stop:
        if stop.code == 0 and ({"-h", "--help"} & set(command.argv)):
            return None
        return f"arguments do not parse (exit {stop.code}): {stderr.getvalue().strip()}"
    return None


ALL_COMMANDS = [c for path in doc_files() for c in commands_in(path)]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: f"{c.where()} {c.module}")
def test_documented_command_parses(command: DocCommand):
    problem = check_command(command)
    assert problem is None, f"{command}\n{problem}"


def test_the_walker_finds_the_commands_of_readme_and_docs():
    by_file = {c.path.relative_to(ROOT).as_posix() for c in ALL_COMMANDS}
    assert {"README.md", "docs/training.md", "docs/evaluation.md", "docs/embedding.md"} <= by_file
    assert len(ALL_COMMANDS) >= 30


def test_the_walker_reads_shell_as_a_shell_would(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "\n".join(
            [
                "Text with `python -m not.in.a.block --x` is prose.",
                "```bash",
                "# a comment: python -m not.a.command",
                "python -m pkg.one --a 1 \\",
                "    --b <run>/file.pt   # trailing comment",
                'cd somewhere && PYTHONPATH=$PWD .venv/bin/python -m pkg.two --c "$X" ; echo done',
                "OMP_NUM_THREADS=1 python3 -u -m pkg.three",
                "torchrun --nproc_per_node 2 -m pkg.four --d /path/to/data | tee log",
                "python benchmarks/script.py --e",
                "```",
                "```python",
                "subprocess.run(['python', '-m', 'pkg.five'])",
                "```",
                "```",
                "python -m pkg.six   (an untyped block: output, not commands)",
                "```",
            ]
        ),
        encoding="utf-8",
    )
    found = [(c.line, c.module, c.argv) for c in commands_in(page)]
    assert found == [
        (4, "pkg.one", ("--a", "1", "--b", "<run>/file.pt")),
        (6, "pkg.two", ("--c", "$X")),
        (7, "pkg.three", ()),
        (8, "pkg.four", ("--d", "/path/to/data")),
    ]


def test_a_missing_module_and_an_unknown_flag_fail_with_the_file_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\npython -m clam.no_such_module --x 1\npython -m pytest -q\n"
        "python -m clam.evaluate --no_such_flag\npython -m clam.evaluate --help\n"
        "python -m clam.train --data_dir 'unclosed\n```\n",
        encoding="utf-8",
    )
    commands = commands_in(page)
    problems = [check_command(c) for c in commands]
    assert "does not exist" in problems[0]
    assert str(commands[0]).endswith("page.md:2: python -m clam.no_such_module --x 1")
    assert problems[1] is None  # another project's module: importable is enough
    assert "unrecognized arguments: --no_such_flag" in problems[2]
    assert problems[3] is None
    assert problems[4] == "the shell line does not parse" and "No closing quotation" in commands[4].text
