"""Safety: no shell command line is built from config strings. A config value (a path, a prompt, a run name)
that reached a `shell:` directive or a shell=True subprocess could run arbitrary commands.

Scans the Snakefile and rules/*.smk for shell: blocks that interpolate config (directly, or through
params/wildcards that may carry config values), and the Python code of the workflow for shell execution.
Each scanner is first shown to catch a bad example, so a pass means something."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
PYTHON_FILES = sorted((REPO / "workflow_scripts").rglob("*.py"))

# Inside a shell: block, any of these brings a config-derived string into the command line.
CONFIG_IN_SHELL = re.compile(r"\{(config|params|wildcards)\b|config\[|config\.get|\bformat\(|f\"|f'")


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every shell: directive with its (indented or inline) body."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)shell\s*:(.*)$", line)
        if not match:
            continue
        indent, body = len(match.group(1)), [match.group(2)]
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        blocks.append((i + 1, "\n".join(body)))
    return blocks


def config_shell_blocks(text: str) -> list[int]:
    """Lines of shell: directives, and of shell(...) calls in run: blocks, that interpolate config."""
    lines = [line for line, body in shell_blocks(text) if CONFIG_IN_SHELL.search(body)]
    for match in re.finditer(r"\bshell\((.*)", text):
        if CONFIG_IN_SHELL.search(match.group(1)):
            lines.append(text.count("\n", 0, match.start()) + 1)
    return sorted(lines)


def shell_calls(source: str) -> list[int]:
    """Line numbers of os.system / os.popen calls and of any call with shell=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("system", "popen", "getoutput", "getstatusoutput"):
            found.append(node.lineno)
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (
                isinstance(keyword.value, ast.Constant) and keyword.value.value is False
            ):
                found.append(node.lineno)
    return found


def test_scanners_catch_bad_examples():
    bad_rule = """
rule copy:
    input: "a"
    output: "b"
    params:
        path=config["model"]["path"],
    shell:
        "cp {input} {params.path}/b"

rule inline:
    shell: "echo {config[run]}"

rule good:
    shell:
        "touch {output}"

rule in_run:
    run:
        shell(f"echo {config['run']}")
"""
    assert config_shell_blocks(bad_rule) == [7, 11, 19]
    bad_python = (
        "import os, subprocess\nos.system('ls ' + x)\nsubprocess.run(cmd, shell=True)\n"
        "subprocess.run(['git', 'status'], shell=False)\n"
    )
    assert shell_calls(bad_python) == [2, 3]


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_no_shell_directive_interpolates_config(path):
    assert config_shell_blocks(path.read_text()) == []


def test_workflow_python_never_runs_a_shell():
    offenders = {
        str(path.relative_to(REPO)): lines
        for path in PYTHON_FILES
        if (lines := shell_calls(path.read_text()))
    }
    assert offenders == {}
