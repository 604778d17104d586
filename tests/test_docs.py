"""The docs cannot drift from the code.

README.md and docs/*.md are read as text and checked against the real code:

* every ``capline ...`` command in a code block parses with click's own parser
  against the real commands (no command runs);
* every ``data/...`` path of the README's outputs table is an output of the stage
  it names in dvc.yaml (or inside one);
* every ``dvc exp run -S key=value`` names a key of the params schema, and its
  values pass validation (a transcript that shows the refusal must show the
  message the code gives); a comment "reruns a, b and c only" names exactly the
  stages that read the key and those after them in dvc.yaml;
* every relative link and every repository path named (``bench/train.py``,
  ``docs/model.md#anchor``, ...) exists;
* the path defaults of the stage commands are the paths dvc.yaml's commands pass,
  so the stages run by hand with no path options chain as ``dvc repro`` runs them;
* no paragraph is repeated, no HTML marker comment is left, and the README's demo
  table is docs/demo.md's.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from pipeline.core.errors import ParamsError
from pipeline.core.params import Params, parse_params
from stages.cli import capline

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")
SEPARATORS = {"&&", "||", "|", ";"}


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_lines(text: str) -> list[tuple[str, str]]:
    """(line, next line) of every code block, ``# comments`` removed, continuation lines joined
    (after a backslash, and a synopsis's indented ``[--option VALUE]`` lines)."""
    lines = []
    for block in CODE_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if lines and line[:1].isspace() and line.strip().startswith("["):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
        lines.append("")
    out = []
    for i, line in enumerate(lines):
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append((line, lines[i + 1] if i + 1 < len(lines) else ""))
    return out


def commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``|``, ...), ``$ `` prompts dropped."""
    lexer = shlex.shlex(line.removeprefix("$ "), posix=True, punctuation_chars="&|;")
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError:  # an apostrophe in prose ("ClipCap's ..."): plain words
        tokens = line.removeprefix("$ ").split()
    out: list[list[str]] = [[]]
    for token in tokens:
        if token in SEPARATORS:
            out.append([])
        else:
            out[-1].append(token)
    return [c for c in out if c]


def capline_args(command: list[str]) -> list[str] | None:
    """The arguments after ``capline`` (or ``python -m stages.cli`` under torchrun), else None."""
    if command[0] == "capline":
        return command[1:]
    if "stages.cli" in command:
        return command[command.index("stages.cli") + 1:]
    return None


def synopsis_args(args: list[str]) -> list[str]:
    """A synopsis's optional parts as plain arguments (``[--model DIR]``), ``...`` dropped."""
    return [a.strip("[]") for a in args if a.strip("[]") not in ("", "...")]


def without_shown_defaults(args: list[str]) -> list[str]:
    """A synopsis without its ``[--option VALUE]`` parts, which show the option's default."""
    out, group = [], None
    for a in args:
        if a.startswith("["):
            group = []
        if group is None:
            out.append(a)
            continue
        group.append(a)
        if a.endswith("]"):
            if not (len(group) == 2 and group[0].startswith("[--")):
                out += group
            group = None
    return synopsis_args(out)


def all_commands() -> list[click.Command]:
    ctx = click.Context(capline)
    found, todo = [], [capline.get_command(ctx, name) for name in capline.list_commands(ctx)]
    while todo:
        command = todo.pop()
        found.append(command)
        if isinstance(command, click.Group):
            todo += list(command.commands.values())
    return found


@pytest.fixture
def parse(monkeypatch):
    """``parse(args)``: click parses ``capline ARGS`` as the shell would; returns the leaf command's
    name and values. No command runs: every callback is replaced by one that records its values."""
    calls = []
    for command in all_commands():
        if not isinstance(command, click.Group):
            monkeypatch.setattr(command, "callback", lambda _name=command.name, **kw: calls.append((_name, kw)))

    def run(args: list[str]) -> tuple[str, dict]:
        calls.clear()
        capline.main(list(args), prog_name="capline", standalone_mode=False)
        assert len(calls) == 1, f"capline {' '.join(args)}: no command ran"
        return calls[0]

    return run


# ------------------------------------------------------------------ capline commands
def documented_capline_commands(inline: bool = False) -> list[tuple[str, list[str]]]:
    """(doc, arguments) of every capline command line in a code block (``inline``: in an inline code span)."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        if inline:
            lines = [span.replace("\n", " ") for span in INLINE_CODE.findall(CODE_BLOCK.sub("", text))]
        else:
            lines = [line for line, _ in code_lines(text)]
        for line in lines:
            for command in commands(line):
                args = capline_args(command)
                if args is not None:
                    found.append((doc_id(doc), args))
    return found


def leaf_command(args: list[str]) -> tuple[click.Command, list[str]]:
    """The (sub)command that ``capline ARGS`` names, and the arguments after its name."""
    command, rest = capline, list(args)
    while isinstance(command, click.Group) and rest:
        sub = command.get_command(click.Context(command), rest[0])
        if sub is None:
            break
        command, rest = sub, rest[1:]
    return command, rest


def test_the_docs_show_capline_commands():
    found = documented_capline_commands()
    assert len(found) > 20 and any(doc == "README.md" for doc, _ in found)


@pytest.mark.parametrize("doc,args", documented_capline_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_documented_capline_commands_parse(parse, doc, args):
    try:
        name, values = parse(synopsis_args(args))
    except click.ClickException as err:
        pytest.fail(f"{doc}: `capline {' '.join(args)}` does not parse: {err.format_message()}")
    plain = without_shown_defaults(args)
    if plain != synopsis_args(args):  # a synopsis shows the defaults: `capline train [--out data/model_xe]`
        _, defaults = parse(plain)
        changed = {k: str(v) for k, v in values.items() if str(v) != str(defaults[k])}
        assert not changed, f"{doc}: `capline {' '.join(args)}` shows values that are not the defaults: {changed}"


def test_options_named_in_prose_exist():
    """An inline mention such as `capline download --rank R` names an option the command has."""
    mentions = documented_capline_commands(inline=True)
    assert len(mentions) > 10
    for doc, args in mentions:
        command, rest = leaf_command(args)
        names = {"--help"} | {name for p in command.params for name in (*p.opts, *p.secondary_opts)}
        for token in synopsis_args(rest):
            option = token.split("=", 1)[0]
            assert not option.startswith("--") or option in names, \
                f"{doc}: `capline {' '.join(args)}`: {command.name} has no option {option}"


# ------------------------------------------------------------------ outputs table
def stage_outputs(stage: str) -> list[str]:
    spec = DVC["stages"][stage]
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind, []):
            paths += list(entry) if isinstance(entry, dict) else [entry]
    return paths


def readme_outputs_table() -> list[tuple[list[str], list[str]]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Outputs\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("path", "---"):
            continue
        paths = [p.rstrip("/") for p in re.findall(r"`(data/[^`]+)`", cells[0])]
        stages = [s.strip() for s in cells[1].split(",")]
        rows.append((paths, stages))
    return rows


def test_readme_outputs_are_outputs_of_the_stages_named():
    rows = readme_outputs_table()
    assert len(rows) >= 10
    for paths, stages in rows:
        assert paths, f"README outputs table: a row names no data/ path ({stages})"
        for stage in stages:
            assert stage in DVC["stages"], f"README outputs table: no stage {stage!r} in dvc.yaml"
        outs = [o for stage in stages for o in stage_outputs(stage)]
        for path in paths:
            assert any(path == o or path.startswith(o + "/") for o in outs), \
                f"README outputs table: {path} is no output of {', '.join(stages)} in dvc.yaml ({outs})"


# ------------------------------------------------------------------ dvc exp run -S
def set_params(command: list[str]) -> list[str]:
    """The ``key=value`` of each ``-S``/``--set-param`` of a ``dvc exp run`` command."""
    return [command[i + 1] for i, token in enumerate(command[:-1]) if token in ("-S", "--set-param")]


def documented_experiments() -> list[tuple[str, list[str], str]]:
    """(doc, key=value list, the error the doc shows or "") of every ``dvc exp run -S``."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        lines = code_lines(text)
        prose = CODE_BLOCK.sub("", text)
        lines += [(span.replace("\n", " "), "") for span in INLINE_CODE.findall(prose)]
        for line, following in lines:
            shown = following.removeprefix("ERROR: ") if line.startswith("$ ") else ""
            for command in commands(line):
                if command[:3] == ["dvc", "exp", "run"] and set_params(command):
                    found.append((doc_id(doc), set_params(command), shown))
    return found


def key_exists(key: str) -> bool:
    model = Params
    for part in key.split("."):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        model = field.annotation
    return True


def with_values(raw: dict, settings: list[tuple[str, str]]) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(raw))
    for key, value in settings:
        *sections, last = key.split(".")
        node = raw
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return raw


def test_the_docs_show_experiments():
    assert len(documented_experiments()) > 10


@pytest.mark.parametrize("doc,settings,shown", documented_experiments(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_documented_experiments_set_real_params(doc, settings, shown):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    pairs = []
    for setting in settings:
        key, _, value = setting.partition("=")
        assert key_exists(key), f"{doc}: `-S {setting}`: params has no key {key}"
        pairs.append((key, value))
    # A queued sweep lists several values of one key (-S mapper.layers=2,4,8): each must pass.
    variants = [pairs]
    for i, (key, value) in enumerate(pairs):
        if "," in value and not value.startswith(("[", "{")):
            variants = [v[:i] + [(key, one)] + v[i + 1:] for v in variants for one in value.split(",")]
    for variant in variants:
        try:
            parse_params(with_values(raw, variant))
        except ParamsError as err:
            assert shown == f"params.yaml: {err}", f"{doc}: `-S {' -S '.join(settings)}` is refused: {err}"
        else:
            assert not shown.startswith("params.yaml:"), f"{doc}: shows a refusal the params do not give: {shown}"


def stages_rerun_by(keys: list[str]) -> set[str]:
    """The stages that read one of ``keys`` (params lists a key or a section above it), and all after them."""
    reads = {stage for stage, spec in DVC["stages"].items() for key in keys
             for listed in spec.get("params", []) if key == listed or key.startswith(listed + ".")}
    changed = True
    while changed:
        outs = [o for stage in reads for o in stage_outputs(stage)]
        after = {stage for stage, spec in DVC["stages"].items()
                 if any(dep == o or dep.startswith(o + "/") for dep in spec.get("deps", []) for o in outs)}
        changed = not after <= reads
        reads |= after
    return reads


def test_documented_reruns_are_the_dags():
    """`dvc exp run -S key=value   # reruns a, b and c only` names exactly what dvc.yaml reruns."""
    claims = 0
    for doc in DOCS:
        for block in CODE_BLOCK.findall(doc.read_text()):
            for line in block.splitlines():
                said = re.search(r"#\s*reruns (.+?) only", line)
                if "dvc exp run" not in line or said is None:
                    continue
                claims += 1
                keys = [s.split("=")[0] for c in commands(line.split("#")[0]) for s in set_params(c)]
                named = set(re.split(r",\s*|\s+and\s+", said.group(1)))
                assert named == stages_rerun_by(keys), \
                    f"{doc_id(doc)}: `{line.strip()}`: dvc.yaml reruns {sorted(stages_rerun_by(keys))}"
    assert claims >= 3


# ------------------------------------------------------------------ paths and links
REPO_PATH = re.compile(r"(?<![\w./~-])((?:bench|configs|docs|pipeline|stages|tests)/[\w./-]*[\w/])")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = CODE_BLOCK.sub("", doc.read_text())
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_relative_links_lead_to_files_and_headings():
    for doc in DOCS:
        for target in LINK.findall(CODE_BLOCK.sub("", doc.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc_id(doc)}: link to {target}: no such file"
            if anchor and file.suffix == ".md":
                assert anchor in anchors(file), f"{doc_id(doc)}: link to {target}: no such heading"


def test_repository_paths_named_exist():
    for doc in DOCS:
        for path in REPO_PATH.findall(doc.read_text()):
            if any(part.startswith(".") for part in path.split("/")):
                continue  # made when a benchmark first runs (bench/.venv-img2dataset)
            assert (ROOT / path).exists(), f"{doc_id(doc)}: names {path}, which does not exist"


# ------------------------------------------------------------------ CLI defaults = dvc.yaml
def test_stage_path_defaults_are_the_dags_paths(parse):
    """Run by hand with no path options, each stage reads and writes what dvc.yaml's command does."""
    from stages.evaluate import report_folder
    from stages.models import out_folder

    def resolved(name: str, values: dict) -> dict:
        values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
        if name == "evaluate":
            values["report_dir"] = str(report_folder(Path(values["out"]), values["report_dir"]))
        if name == "models":
            values["out_dir"] = out_folder(values["kind"], values["out_dir"])
        return values

    for stage, spec in DVC["stages"].items():
        if stage == "generate_xe":
            continue  # the second use of `capline generate`: the cross-entropy model's captions
        args = capline_args(shlex.split(spec["cmd"]))
        name, dag = parse(args)
        positional = [a for a in args[1:] if not a.startswith("-")][:1] if name == "models" else []
        _, plain = parse([args[0], *positional])
        dag, plain = resolved(name, dag), resolved(name, plain)
        assert dag == plain, f"dvc.yaml stage {stage}: `{spec['cmd']}` differs from the defaults: " + \
            ", ".join(f"{k} {plain[k]!r} (dvc.yaml: {dag[k]!r})" for k in dag if dag[k] != plain[k])


# ------------------------------------------------------------------ one home per fact
def test_no_paragraph_is_repeated():
    seen: dict[str, str] = {}
    for doc in DOCS:
        for paragraph in CODE_BLOCK.sub("", doc.read_text()).split("\n\n"):
            text = " ".join(paragraph.split())
            if len(text) < 150 or text.startswith("|"):
                continue
            assert text not in seen, f"{doc_id(doc)} repeats a paragraph of {seen[text]}: {text[:80]}..."
            seen[text] = doc_id(doc)


def test_the_readme_stays_short():
    """Details live in docs/; the README names what there is and links to them."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_no_html_markers():
    """Nothing reads marker comments (<!-- x: begin -->), so the docs hold none."""
    for doc in DOCS:
        assert "<!--" not in doc.read_text(), f"{doc_id(doc)} holds an HTML comment"


def test_the_readmes_demo_table_is_docs_demos():
    def table(text: str, heading: str) -> list[str]:
        section = text.split(heading, 1)[1]
        return [line for line in section.split("\n\n|", 1)[1].split("\n\n", 1)[0].splitlines()]

    readme = table((ROOT / "README.md").read_text(), "\n## The demo\n")
    demo = table((ROOT / "docs" / "demo.md").read_text(), "\n## The demo's scores\n")
    assert readme == demo and len(readme) == 6  # header, rule, four rows
