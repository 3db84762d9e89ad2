"""The documentation, checked: the README stays a front door whose links resolve, the docs site builds
with `mkdocs build --strict`, the configuration reference is the schema's, and every command the README,
docs, Dockerfile and configs show names a real command with real flags (the cheap ones are run as written)."""

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ray_jobs.cli import COMMANDS
from ray_jobs.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Everything a user reads commands from.
SOURCES = [README, *DOCS, ROOT / "Dockerfile", ROOT / "cluster.yaml", *sorted((ROOT / "tune_configs").glob("*.yaml"))]
SOURCES.append(ROOT / "serve_app" / "serve_config.yaml")
# A command's arguments end where the line, the code span or a shell operator (`&&`, `|`, `;`, `)`) does.
COMMAND = re.compile(r"python3? -m ray_jobs ([a-z][a-z_-]*)([^`\n&|;)]*)")
DOCKER_CMD = re.compile(r"^CMD \[(.+)\]$", re.M)


def _documented_commands() -> list[tuple[str, str, str]]:
    """(file, command, the rest of the line) for every `python -m ray_jobs <command> ...` shown anywhere."""
    found = []
    for path in SOURCES:
        text = path.read_text()
        for m in DOCKER_CMD.finditer(text):
            text += "\n" + " ".join(json.loads(f"[{m.group(1)}]"))
        for m in COMMAND.finditer(text):
            found.append((path.name, m.group(1), m.group(2)))
    return found


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli_main([*argv, "--help"])
    assert done.value.code == 0
    return out.getvalue()


def test_the_readme_is_a_front_door_whose_links_resolve():
    text = README.read_text()
    assert len(text.encode()) <= 20_000, f"README.md is {len(text.encode())} bytes; depth belongs in docs/"
    for marker in ("<!-- quickstart-command -->", "<!-- test-command -->"):
        assert marker in text
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, "the README links to its docs"
    for link in links:
        if "://" in link or link.startswith("#"):
            continue
        assert (ROOT / link.split("#")[0]).exists(), f"README links to {link}, which does not exist"
    # Every docs page is reachable from the site's navigation (mkdocs --strict checks the rest).
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(f" {p.name}" in nav for p in DOCS), [p.name for p in DOCS if f" {p.name}" not in nav]


def test_the_docs_site_builds_strict(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").exists()


def test_the_configuration_reference_is_the_schemas():
    """docs/configuration.md is generated from the schema; a field added without regenerating it fails here."""
    from ray_jobs.cli.config import markdown
    from ray_jobs.config import PipelineConfig

    expected = markdown(PipelineConfig())
    assert (ROOT / "docs" / "configuration.md").read_text() == expected, (
        "regenerate: python -m ray_jobs config --markdown > docs/configuration.md"
    )


def test_every_config_key_documents_itself():
    from ray_jobs.cli.config import keys
    from ray_jobs.config import PipelineConfig

    undocumented = [key for key, _, _, description in keys(PipelineConfig()) if not description]
    assert undocumented == []
    # ... and the documentation reaches the JSON schema (editors and docs read it from there).
    schema = json.dumps(PipelineConfig.model_json_schema())
    assert "share of the steps spent warming up the learning rate" in schema


def test_every_documented_command_and_flag_exists():
    documented = _documented_commands()
    assert len(documented) >= 20, "the extraction found the docs' commands"
    helps: dict[tuple[str, ...], str] = {}
    registry_subcommands = re.search(r"\{([a-z,]+)\}", _help("registry")).group(1).split(",")
    registry_help = {s: _help("registry", s) for s in registry_subcommands}
    for source, command, rest in documented:
        assert command in COMMANDS, f"{source}: `python -m ray_jobs {command}` is no command"
        words = rest.split()
        sub = next((w for w in words if w in registry_subcommands), None) if command == "registry" else None
        key = (command, sub) if sub else (command,)
        if key not in helps:
            helps[key] = _help(*key)
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
            if flag in ("--set", "--config", "--help") or flag in helps[key]:
                continue
            # A registry line lists several subcommands (`shadow 3 | canary 3 --share 0.1`): any may own it.
            owners = [s for s in registry_subcommands if command == "registry" and flag in registry_help[s]]
            assert owners, f"{source}: `python -m ray_jobs {command}{rest}` uses {flag}, which it does not take"


def test_every_config_file_the_docs_name_loads():
    from ray_jobs.config import load_config

    named = {m for path in SOURCES for m in re.findall(r"tune_configs/[\w.-]+\.yaml", path.read_text())}
    assert "tune_configs/quickstart.yaml" in named
    for name in sorted(named):
        assert (ROOT / name).is_file(), f"the docs name {name}, which does not exist"
        load_config(ROOT / name)


def _runnable(rest: str) -> bool:
    """Shown exactly as a user would type it: no placeholders, alternatives or elisions."""
    return not re.search(r"\.\.\.|<|\||\[|\bC\b|\\$", rest)


@pytest.mark.parametrize("cheap", [("config", None), ("registry", "status")], ids=["config", "registry-status"])
def test_the_cheap_documented_commands_run_as_written(cheap, tmp_path):
    """Run, in a fresh folder (the embedded registry starts empty there), each documented command of
    these kinds that has no placeholder, exactly as written, through `python -m ray_jobs`."""
    command, sub = cheap
    lines = {
        f"python -m ray_jobs {c}{rest}".strip()
        for _, c, rest in _documented_commands()
        if c == command and (sub is None or sub in rest.split()) and _runnable(rest)
    }
    assert lines, f"the docs show a runnable `{command} {sub or ''}`"
    (tmp_path / "tune_configs").symlink_to(ROOT / "tune_configs")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for line in sorted(lines):
        argv = shlex.split(line.split("#")[0])
        r = subprocess.run(
            [sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}{r.stderr[-2000:]}"


def test_the_command_line_lists_every_command_and_refuses_unknown_ones(capsys):
    assert cli_main([]) == 2
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert cli_main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
