"""The `dg` command line, as the README's users call it: its help lists commands and options.

`dg` renders help with typer's rich formatter; a typer release that no longer renders plain
click commands prints only the usage line, so these run the installed `dg` itself.
"""

import os
import subprocess
import sys
from pathlib import Path

from helpers.graph import REPO

DG = Path(sys.executable).parent / "dg"


def _dg(*args: str) -> str:
    venv = Path(sys.executable).parent.parent
    # As after `source .venv/bin/activate`: the README's way to call dg.
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "COLUMNS": "120", "NO_COLOR": "1"}
    done = subprocess.run([str(DG), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_dg_help_lists_its_commands():
    out = _dg("--help")
    for command in ("check", "dev", "launch", "list", "scaffold"):
        assert f" {command} " in out, out


def test_dg_launch_help_lists_the_options_the_docs_use():
    out = _dg("launch", "--help")
    for option in ("--assets", "--partition", "--partition-range", "--config"):
        assert option in out, out
