"""Shell commands quoted in the README and in infra/ manifests, checked against the code.

A command line such as ``python -m pipelines.train --config configs/voc.yaml data=... k=v`` is
valid when its module exists and its config file plus overrides load into that entry point's typed
config: a renamed key or a wrong type in the documentation fails a test instead of a user's job.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

from pipelines.demo import DemoConfig
from pipelines.docs import CONFIGS
from system.config import load_config

REPO = Path(__file__).resolve().parent.parent
ENTRY_CONFIGS = {module: cls for module, cls, _ in CONFIGS} | {"pipelines.demo": DemoConfig}


def shell_lines(block: str) -> list[str]:
    """A shell code block's commands: continuation lines joined, comments dropped."""
    commands, current = [], ""
    for raw in block.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            commands.append(current.strip())
        current = ""
    return commands


def entry_point(command: str) -> tuple[str, list[str]] | None:
    """(module, arguments after it) of the ``python -m pipelines.X`` part of a command, if any."""
    words = shlex.split(command)
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1].startswith("pipelines."):
            return words[i + 1], words[i + 2 :]
    return None


def check_entry_point(module: str, args: list[str], app_dir: str = "/app/") -> None:
    """Raise unless ``python -m module args`` would parse: module and config file exist, keys valid."""
    assert importlib.util.find_spec(module) is not None, f"{module} does not exist"
    assert module in ENTRY_CONFIGS, f"{module} is not an entry point with a typed config"
    config = None
    overrides = []
    words = iter(args)
    for word in words:
        if word == "--config":
            config = next(words)
        elif word != "--help":
            assert re.match(r"^[A-Za-z_][\w.]*=", word), f"{module}: {word!r} is not key=value"
            overrides.append(word)
    if config is not None:
        config = config.removeprefix(app_dir)
        assert (REPO / config).is_file(), f"{module}: config file {config} is not in the repository"
        load_config(ENTRY_CONFIGS[module], str(REPO / config), overrides)
        return
    load_config(ENTRY_CONFIGS[module], config, overrides)
