"""Every command the docs show must run as written.

Commands are taken from README.md and docs/*.md: lines of shell code blocks, and inline code spans that start
with `nnunetv2_dram ` or `nnUNetv2_`. An `nnunetv2_dram SUBCOMMAND ...` line must parse with the real parser
(placeholders such as ID, N, CONFIG, D become values of the type the flag expects). Every flag of an `nnUNetv2_*`
line must appear in that program's own `--help` (the program is found through its console-script entry point).
The flag tables of docs/reference.md must list exactly the parsers' flags.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DRAM = "nnunetv2_dram"
NNUNET_PREFIX = "nnUNetv2_"
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}
HELP_TIMEOUT_S = 120


def doc_files() -> list[Path]:
    return [p for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))] if p.is_file()]


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/x.md:12"
    text: str  # the command as the reader sees it (one logical line)
    argv: tuple = ()
    reference_only: bool = False  # an inline mention of a program or sub-command by name, not an invocation
    abbreviated: bool = False  # written with `...`: only its flags can be checked
    error: str | None = None  # the line could not be split as shell code

    def __str__(self):
        return f"{self.where}: {self.text}"


# ------------------------------------------------------------------------------------------------ extraction
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
_SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
_ALTERNATIVES = re.compile(r"(?<![\s|])\|(?![\s|])")  # `none|dense` (usage-line style), not a spaced pipe
_CONTROL = {";", "&&", "||", "|", "&", "(", ")"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")


def _is_command_start(text: str) -> bool:
    return text.startswith(DRAM + " ") or text == DRAM or text.startswith(NNUNET_PREFIX)


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one shell line; a `#` starts a comment at the line start or after whitespace,
    outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:]
    return line, ""


def _simple_commands(code: str) -> list[list[str]]:
    """The simple commands of one shell line (substitutions included), each without leading VAR=value words."""
    inner = []
    while (m := _SUBSTITUTION.search(code)) is not None:
        inner.append(m.group(1))
        code = code[:m.start()] + "SUBSTITUTED" + code[m.end():]
    code = _ALTERNATIVES.sub(" ALTERNATIVE_SEPARATOR ", code)
    lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    tokens = list(lexer)  # ValueError on unbalanced quotes
    commands, current, skip = [], [], False
    for tok in tokens:
        if skip:
            skip = False
        elif tok in _CONTROL:
            commands.append(current)
            current = []
        elif set(tok) <= set("<>&") and set(tok) & set("<>"):
            skip = not tok.endswith("&")  # a redirection and its target
        else:
            current.append(tok)
    commands.append(current)
    out = []
    for cmd in commands:
        while cmd and (_ASSIGNMENT.match(cmd[0]) or cmd[0] == "$"):
            cmd = cmd[1:]
        # `a|b` alternatives: keep the first one
        cleaned, drop = [], False
        for tok in cmd:
            if tok == "ALTERNATIVE_SEPARATOR":
                drop = True
                continue
            if drop:
                drop = False
                continue
            cleaned.append(tok)
        if cleaned:
            out.append(cleaned)
    for text in inner:
        out += _simple_commands(text)
    return out


def _commands_of(text: str, where: str, inline: bool) -> list[DocCommand]:
    text = text.strip()
    if DRAM not in text and NNUNET_PREFIX not in text:
        return []
    try:
        simple = _simple_commands(text)
    except ValueError as e:
        return [DocCommand(where, text, error=f"cannot be split as a shell line ({e})")]
    found = []
    for argv in simple:
        if argv[0] != DRAM and not argv[0].startswith(NNUNET_PREFIX):
            continue
        argv = [t.strip("[]") if t not in ("[", "]") else "" for t in argv]
        argv = [t for t in argv if t]
        reference_only = inline and (len(argv) == 1 or (argv[0] == DRAM and len(argv) == 2))
        found.append(DocCommand(where, text, tuple(argv), reference_only=reference_only,
                                abbreviated="..." in argv or "…" in argv))
    return found


def _inline_spans(text: str) -> list[tuple[int, str]]:
    """(line number, content) of the inline code spans of Markdown prose (fenced blocks already removed).
    A span may run over a line break inside a paragraph (the break counts as a space), never into the next
    paragraph, so a stray backtick cannot pair with one further down."""
    spans = []
    line_no = 1
    for paragraph in re.split(r"(\n[ \t]*\n)", text):
        for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", paragraph, flags=re.S):
            content = re.sub(r"\s*\n\s*", " ", m.group(2)).replace("\\|", "|").strip()
            spans.append((line_no + paragraph.count("\n", 0, m.start()), content))
        line_no += paragraph.count("\n")
    return spans


def extract_commands(markdown: str, name: str) -> list[DocCommand]:
    """Every `nnunetv2_dram`/`nnUNetv2_*` command of one Markdown document."""
    found: list[DocCommand] = []
    prose_lines: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            prose_lines.append(lines[i])
            i += 1
            continue
        marker, language = fence.group(1), fence.group(2).lower()
        prose_lines.append("")
        i += 1
        block_start = i
        while i < len(lines) and not lines[i].strip().startswith(marker):
            i += 1
        block = lines[block_start:i]
        prose_lines += [""] * (len(block) + 1)
        i += 1
        if language not in SHELL_LANGUAGES:
            continue
        j = 0
        while j < len(block):
            first = j
            code, comment = _split_comment(block[j])
            comments = [comment]
            while code.rstrip().endswith("\\") and j + 1 < len(block):
                j += 1
                more, more_comment = _split_comment(block[j])
                code = code.rstrip()[:-1] + " " + more.strip()
                comments.append(more_comment)
            j += 1
            where = f"{name}:{block_start + first + 1}"
            if code.strip():
                found += _commands_of(code, where, inline=False)
            for c in comments:
                # commands shown in comments (alternatives such as "# or: nnunetv2_dram ...") are documented too
                for _, span in _inline_spans(c):
                    if _is_command_start(span):
                        found += _commands_of(span, where, inline=True)
                bare = re.sub(r"`[^`]*`", " ", c)
                for part in bare.split("#"):
                    m = re.search(r"(?:^|\s)((?:%s\s|%s\w+).*)" % (DRAM, NNUNET_PREFIX), part)
                    if m:
                        found += _commands_of(m.group(1), where, inline=False)
    for line_no, span in _inline_spans("\n".join(prose_lines)):
        if _is_command_start(span):
            found += _commands_of(span, f"{name}:{line_no}", inline=True)
    return found


def documented_commands() -> list[DocCommand]:
    out = []
    for path in doc_files():
        out += extract_commands(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    return out


# ------------------------------------------------------------------------------------------------ nnunetv2_dram
@functools.lru_cache(maxsize=None)
def _dram_parser() -> tuple[argparse.ArgumentParser, dict]:
    from nnunetv2_dram.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, dict(sub.choices)


_PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*|<[^>]+>)(?:\.[A-Za-z.]+)?/?$")


def _value_for(action: argparse.Action | None, token: str) -> str:
    """A value of the kind `action` expects, standing in for the placeholder `token`."""
    if action is None:
        return token
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type is int:
        return "1"
    if action.type is float:
        return "0.5"
    return token


def fill_placeholders(args: list[str], subparser: argparse.ArgumentParser) -> list[str]:
    """Replace upper-case placeholders (ID, N, CONFIG, D, DIR, ...) by values of the flag's type and choices."""
    options = subparser._option_string_actions
    out, action, remaining = [], None, 0
    for tok in args:
        if tok.startswith("-") and not re.fullmatch(r"-\d+(\.\d*)?", tok):
            flag = tok.split("=", 1)[0]
            action = options.get(flag)
            nargs = action.nargs if action is not None else None
            remaining = {None: 1, "?": 1, "+": 1 << 20, "*": 1 << 20}.get(nargs, nargs) if action else 0
            if action is not None and nargs == 0:
                remaining = 0
            if "=" in tok and action is not None and _PLACEHOLDER.match(tok.split("=", 1)[1]):
                tok = f"{flag}={_value_for(action, tok.split('=', 1)[1])}"
                remaining = 0
            out.append(tok)
            continue
        value_action = action if remaining > 0 else None
        remaining -= 1
        if _PLACEHOLDER.match(tok) or tok == "SUBSTITUTED":
            tok = _value_for(value_action, tok)
        out.append(tok)
    return out


def dram_problem(cmd: DocCommand) -> str | None:
    """Why this `nnunetv2_dram` command would not parse (None if it does)."""
    parser, subcommands = _dram_parser()
    if len(cmd.argv) < 2 or cmd.argv[1].startswith("-"):
        top_level = {"-h", "--help", "--version"}  # the flags that need no sub-command
        return None if cmd.reference_only or top_level & set(cmd.argv) else "no sub-command"
    name = cmd.argv[1]
    if name not in subcommands:
        return f"unknown sub-command {name!r} (known: {', '.join(subcommands)})"
    if cmd.reference_only:
        return None
    sub = subcommands[name]
    if cmd.abbreviated:
        unknown = [t.split("=", 1)[0] for t in cmd.argv[2:] if t.startswith("-") and t not in ("-", "--")
                   and t.split("=", 1)[0] not in sub._option_string_actions]
        return f"unknown flag(s) {unknown}" if unknown else None
    argv = [name, *fill_placeholders(list(cmd.argv[2:]), sub)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                lines = err.getvalue().strip().splitlines()
                return (lines[-1] if lines else f"exit {e.code}") + f"  (parsed as: {' '.join(argv)})"
    return None


# ------------------------------------------------------------------------------------------------ nnU-Net
@functools.lru_cache(maxsize=None)
def _console_scripts() -> dict:
    return {ep.name: ep for ep in entry_points(group="console_scripts")}


@functools.lru_cache(maxsize=None)
def nnunet_help(program: str) -> str:
    """`program --help`, run through its console-script entry point in a subprocess."""
    ep = _console_scripts()[program]
    head, _, rest = ep.attr.partition(".")
    code = (f"import sys; sys.argv[0] = {program!r}; from {ep.module} import {head} as f; "
            f"f = f{'.' + rest if rest else ''}; sys.exit(f())")
    proc = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True,
                          timeout=HELP_TIMEOUT_S)
    if proc.returncode != 0:
        raise AssertionError(f"{program} --help failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def nnunet_flags(cmd: DocCommand) -> list[str]:
    return [t.split("=", 1)[0] for t in cmd.argv[1:]
            if t.startswith("-") and t not in ("-", "--") and not re.fullmatch(r"-\d+(\.\d*)?", t)]


def nnunet_problem(cmd: DocCommand) -> str | None:
    """Why this `nnUNetv2_*` command would be refused by nnU-Net (None if every flag exists)."""
    program = cmd.argv[0]
    if program not in _console_scripts():
        return f"{program} is not a console script of this environment"
    flags = nnunet_flags(cmd)
    if cmd.reference_only or not flags:
        return None
    text = nnunet_help(program)
    unknown = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    return f"{program} has no flag(s) {unknown}" if unknown else None


def problem(cmd: DocCommand) -> str | None:
    if cmd.error:
        return cmd.error
    return dram_problem(cmd) if cmd.argv[0] == DRAM else nnunet_problem(cmd)


def problems_in(markdown: str, name: str = "doc.md") -> list[str]:
    return [f"{c}\n    -> {p}" for c in extract_commands(markdown, name) if (p := problem(c)) is not None]


# ------------------------------------------------------------------------------------------------ tests
COMMANDS = documented_commands()


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where} {' '.join(c.argv[:2])}" for c in COMMANDS])
def test_documented_command(cmd):
    p = problem(cmd)
    assert p is None, f"{cmd}\n  {p}"


def test_docs_show_commands_of_both_kinds():
    readme = [c for c in COMMANDS if c.where.startswith("README.md")]
    assert any(c.argv[0] == DRAM and not c.reference_only for c in readme)
    assert any(c.argv[0].startswith(NNUNET_PREFIX) and nnunet_flags(c) for c in readme)


EXAMPLE = """\
Intro `nnunetv2_dram check -d ID` and `nnunetv2_dram pipeline -d ID -o NEW_ID
--preset quick --epochs N -device D`; by name: `nnunetv2_dram regions`, `nnUNetv2_train`.

A stray ` backtick stays in its paragraph.

Abbreviated: `nnunetv2_dram regions --run ...`.

| col | usage |
| --- | --- |
| x | `nnunetv2_dram pseudolabels -d ID -o NEW_ID [--crf none\\|dense] [-device D]` |

```bash
export nnUNet_extTrainer=$(nnunetv2_dram trainers-path)   # see `nnunetv2_dram check`'s output
nnunetv2_dram convert --images cts/ --regions lobes/ --table t.csv -d 901 --name Covid \\
    --region-preset identity     # comment
nnUNetv2_train 901 3d_fullres 0 -tr DRAMTrainer --c   # or: nnunetv2_dram generate -d 5 --shape Z Y X
OUT=$HOME/x nnunetv2_dram evaluate -ref DIR -pred "$OUT" -o FILE.json && echo done
```

```json
{"nnunetv2_dram bogus": 1}
```
"""


def test_extraction_of_a_known_example():
    cmds = extract_commands(EXAMPLE, "example.md")
    texts = [" ".join(c.argv) for c in cmds]
    assert texts == [
        "nnunetv2_dram trainers-path",
        "nnunetv2_dram check",  # from the comment: a mention by name
        "nnunetv2_dram convert --images cts/ --regions lobes/ --table t.csv -d 901 --name Covid "
        "--region-preset identity",
        "nnUNetv2_train 901 3d_fullres 0 -tr DRAMTrainer --c",
        "nnunetv2_dram generate -d 5 --shape Z Y X",
        "nnunetv2_dram evaluate -ref DIR -pred $OUT -o FILE.json",
        "nnunetv2_dram check -d ID",
        "nnunetv2_dram pipeline -d ID -o NEW_ID --preset quick --epochs N -device D",
        "nnunetv2_dram regions",
        "nnUNetv2_train",
        "nnunetv2_dram regions --run ...",
        "nnunetv2_dram pseudolabels -d ID -o NEW_ID --crf none -device D",
    ], texts
    by_text = dict(zip(texts, cmds))
    assert by_text["nnunetv2_dram check"].reference_only and by_text["nnunetv2_dram regions"].reference_only
    assert by_text["nnunetv2_dram regions --run ..."].abbreviated
    assert problems_in(EXAMPLE) == []


def test_placeholders_take_the_flags_type():
    _, subcommands = _dram_parser()
    args = fill_placeholders(["-d", "ID", "-o", "NEW_ID", "--epochs", "N", "-device", "D", "-c", "CONFIG"],
                             subcommands["pipeline"])
    assert args == ["-d", "ID", "-o", "1", "--epochs", "1", "-device", "auto", "-c", "CONFIG"]
    assert fill_placeholders(["-d", "1", "--shape", "Z", "Y", "X"], subcommands["generate"])[-3:] == ["1"] * 3


@pytest.mark.parametrize("bad, expected", [
    ("nnunetv2_dram check -d 5 --no-such-flag", "--no-such-flag"),
    ("nnunetv2_dram pseudolabels -d 5 -o 6 --crf maybe", "maybe"),
    ("nnunetv2_dram pipeline -d 5 -o N --epochs many", "many"),
    ("nnunetv2_dram evaluate -ref DIR", "-pred"),  # a required flag left out
    ("nnunetv2_dram no-such-command -d 5", "no-such-command"),
    ("nnunetv2_dram regions --run ... --no-such-flag", "--no-such-flag"),
    ("nnUNetv2_no_such_program -d 5", "nnUNetv2_no_such_program"),
])
def test_checker_rejects_broken_commands(bad, expected):
    found = problems_in(f"```bash\n{bad}\n```\n")
    assert len(found) == 1 and expected in found[0], found


def test_checker_rejects_a_bogus_flag_added_to_a_real_doc():
    """Copy the docs, add an unknown flag to one real nnunetv2_dram and one real nnUNetv2_* command of each
    kind: the checker must report exactly those."""
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        before = problems_in(text, path.name)
        dram = re.search(r"^(\s*%s [\w-]+)(?= )" % DRAM, text, flags=re.M)
        nnunet = re.search(r"^(\s*%s\w+)(?= )" % NNUNET_PREFIX, text, flags=re.M)
        if not dram or not nnunet:
            continue
        broken = text
        for m, bogus in sorted(((nnunet, "-no_such_nnunet_flag"), (dram, "--no-such-dram-flag")),
                               key=lambda x: -x[0].end()):
            broken = broken[:m.end()] + f" {bogus}" + broken[m.end():]
        after = problems_in(broken, path.name)
        new = [p for p in after if p not in before]
        assert len(new) == 2, new
        assert any("--no-such-dram-flag" in p for p in new) and any("-no_such_nnunet_flag" in p for p in new), new
        return
    pytest.fail("no doc has both an nnunetv2_dram and an nnUNetv2_* command in a code block")


def _reference_sections() -> dict[str, str]:
    """docs/reference.md split at its `### \\`nnunetv2_dram NAME\\`` headings: NAME -> section text."""
    text = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    parts = re.split(r"^### `%s ([\w-]+)`\s*$" % DRAM, text, flags=re.M)
    return {parts[k]: parts[k + 1].split("\n## ")[0] for k in range(1, len(parts), 2)}


def _flag_table_flags(section: str) -> set[str]:
    """Flags named in the first column of the section's `| flag | default | meaning |` table."""
    flags, in_table = set(), False
    for line in section.splitlines():
        if line.startswith("| flag |"):
            in_table = True
            continue
        if in_table and line.startswith("|"):
            first = line.split("|")[1]
            flags |= {f.split()[0] for f in re.findall(r"`(-[^`]*)`", first)}
        elif in_table:
            in_table = False
    return flags


def test_reference_tables_list_exactly_the_parsers_flags():
    """The flag tables of docs/reference.md were generated from the parsers; they must stay in step."""
    sections = _reference_sections()
    _, subcommands = _dram_parser()
    assert set(sections) == set(subcommands), "docs/reference.md needs one section per sub-command"
    for name, sub in subcommands.items():
        flags = {o for a in sub._actions if not isinstance(a, argparse._HelpAction) for o in a.option_strings}
        documented = _flag_table_flags(sections[name])
        assert documented == flags, (f"{name}: missing from docs/reference.md {sorted(flags - documented)}, "
                                     f"not a flag {sorted(documented - flags)}")


def test_reference_trainer_settings_match_the_classes():
    """Defaults in the trainer settings table of docs/reference.md are the class attributes' values."""
    import ast
    from nnunetv2_dram.training.dram_trainers import DRAMTrainer
    from nnunetv2_dram.training.weak_trainer import WeakRegressionTrainer
    owners = {"all weak trainers": WeakRegressionTrainer, "`DRAMTrainer`": DRAMTrainer}
    text = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    table = text.split("### Settings (class attributes)", 1)[1].split("\n\n", 2)[1]
    checked = 0
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        name, owner, default = cells[0].strip("`"), cells[1], cells[2]
        if not (default.startswith("`") and default.endswith("`")):
            continue  # set in __init__, described in words
        value = ast.literal_eval(default.strip("`"))
        assert getattr(owners[owner], name) == value, f"{name}: docs say {value!r}, " \
                                                       f"code has {getattr(owners[owner], name)!r}"
        checked += 1
    assert checked >= 10


HISTORY = re.compile(r"\b20\d\d-\d\d-\d\d\b|\bsessions?\b|\bdevice tool\b|\buntil 20\d\d|<this repository>|(?-i:\bSPEC\b)",
                     flags=re.I)


def test_docs_and_messages_describe_the_software_not_its_history():
    """Docs are for users who never saw the project's history: no dates, work sessions, internal tools, a contract
    file they do not have (SPEC), or placeholders for the repository. The same holds for the package's messages and
    docstrings, which users see in `-h` output and error hints."""
    files = [*doc_files(), REPO / "CHANGELOG.md", *sorted((REPO / "nnunetv2_dram").rglob("*.py")),
             *sorted((REPO / "trainers").rglob("*.py"))]
    found = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
