"""The README agrees with the code: options table, quick-start commands, CI script (issue 2)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import httpx
import pytest

from tests.test_cli import serve_fd
from uvworker.settings import markdown_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_options_table_is_generated_from_the_settings() -> None:
    start = README.index("<!-- options-table:")
    table = README[README.index("\n", start) + 1 : README.index("<!-- options-table: end -->")]
    assert table.strip() == markdown_table(), "regenerate it: python -m uvworker.settings"


def test_quick_start_is_two_commands_and_ci_runs_the_test_command() -> None:
    run, test = quick_start_commands()
    assert "\n" not in run and "\n" not in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    assert test in ci.splitlines()


def test_quick_start_run_command_serves_the_example() -> None:
    pytest.importorskip("starlette")
    run_command = quick_start_commands()[0].split("&&")[-1]
    program, *args = shlex.split(run_command)
    assert program == "uvworker"
    with serve_fd(*args) as (proc, url):
        assert httpx.get(url, timeout=10).json()["hello"] == "world"
