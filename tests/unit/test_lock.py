"""The lock: what `make install` installs is exactly what the suite last passed with."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.]+)", line)
        assert match is not None, f"not an exact pin without a local label: {line!r}"
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def test_the_lock_pins_every_direct_dependency_within_its_declared_range() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = locked()
    for spec in declared:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is declared but not locked"
        assert requirement.specifier.contains(pins[name]), f"lock has {name}=={pins[name]}, outside {spec}"
    assert pins["torch"] == "2.13.0"


def test_the_environment_running_this_suite_is_the_locked_one() -> None:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    installed = {}
    for line in frozen.splitlines():
        name, _, version = line.partition("==")
        installed[canonicalize_name(name)] = version.split("+")[0]
    assert installed == locked()
