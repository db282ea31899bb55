"""The locks (requirements.txt, requirements-dev.txt) hold what pyproject.toml pins, with hashes,
and the image's lock holds no development tool."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pins(requirements: list[str]) -> dict[str, str]:
    found = {}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        found[re.sub(r"\[.*\]", "", name).lower().replace("_", "-")] = version
    return found


def locked(path: Path) -> dict[str, str]:
    text = path.read_text()
    entries = re.findall(
        r"^([A-Za-z0-9_.\[\],-]+)==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M
    )
    names = re.findall(r"^([A-Za-z0-9_.-]+)==", text, re.M)
    assert len(entries) == len(names), f"{path.name}: a package without hashes"
    return {re.sub(r"\[.*\]", "", n).lower().replace("_", "-"): v for n, v, _ in entries}


def test_the_locks_hold_every_pin_of_pyproject_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, dev = pins(project["dependencies"]), pins(project["optional-dependencies"]["dev"])
    image, development = locked(ROOT / "requirements.txt"), locked(ROOT / "requirements-dev.txt")
    assert {n: v for n, v in runtime.items() if image.get(n) != v} == {}, "run make lock"
    assert {n: v for n, v in {**runtime, **dev}.items() if development.get(n) != v} == {}, "run make lock"
    # The development lock agrees with the image's on every package they share.
    assert {n for n, v in image.items() if development.get(n) != v} == set()


def test_the_image_installs_no_development_tool() -> None:
    image = locked(ROOT / "requirements.txt")
    assert not {"honcho", "uv", "pytest", "ruff", "mypy", "selenium", "schemathesis"} & set(image)
