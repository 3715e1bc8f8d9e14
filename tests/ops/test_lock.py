"""pyproject.toml and the hash-pinned locks agree (no network: both files are only parsed).

requirements.lock is the default install's closure (dependencies + [models] + ops/lock.in +
ops/lock-nodeps.in); requirements-dev.lock adds [dev] and keeps every runtime pin as it is. A
dependency added to, removed from or narrowed in pyproject.toml without `make lock` fails here
with the list of what disagrees; install.sh would otherwise install the stale lock (it installs
with --no-deps, so a package missing from the lock is simply absent).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
RUNTIME, DEV = ROOT / "requirements.lock", ROOT / "requirements-dev.lock"
FIX = "run `make lock` and commit requirements.lock and requirements-dev.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
# The annotation uv writes under a package pulled in by pyproject.toml itself.
FROM_PYPROJECT = "domain-appliance (pyproject.toml)"


def read_lock(path: Path) -> tuple[dict[str, Version], dict[str, set[str]], set[str]]:
    """Pins (canonical name -> version), what each pin is "via", and the pins without a hash."""
    pins: dict[str, Version] = {}
    via: dict[str, set[str]] = {}
    unhashed: set[str] = set()
    current = ""
    for block in re.split(r"\n(?=[A-Za-z0-9])", path.read_text(encoding="utf-8")):
        match = PIN.match(block)
        if not match:
            continue
        current = canonicalize_name(match.group(1))
        pins[current] = Version(match.group(2))
        if "--hash=sha256:" not in block:
            unhashed.add(current)
        via[current] = {
            line.strip().removeprefix("# via").strip(" #")
            for line in block.splitlines()[1:]
            if line.strip().startswith("#")
        } - {""}
    return pins, via, unhashed


def wanted(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = list(project["dependencies"])
    for extra in extras:
        names += project["optional-dependencies"][extra]
    for extra_file in ("ops/lock.in", "ops/lock-nodeps.in"):
        for line in (ROOT / extra_file).read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                names.append(line.strip())
    return [Requirement(n) for n in names]


def disagreements(lock: Path, extras: tuple[str, ...]) -> list[str]:
    if not lock.is_file():
        return [f"{lock.name} is missing"]
    pins, via, unhashed = read_lock(lock)
    problems = [f"{name} has no --hash" for name in sorted(unhashed)]
    declared = set()
    for req in wanted(extras):
        name = canonicalize_name(req.name)
        declared.add(name)
        if name not in pins:
            problems.append(f"{req} is not in {lock.name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} does not allow {lock.name}'s {name}=={pins[name]}")
    stale = [n for n, v in via.items() if FROM_PYPROJECT in v and n not in declared]
    problems += [f"{n} is locked as a direct dependency but pyproject.toml no longer asks for it"
                 for n in sorted(stale)]  # fmt: skip
    return problems


@pytest.mark.parametrize(
    ("lock", "extras"), [(RUNTIME, ("models",)), (DEV, ("models", "dev"))], ids=["runtime", "dev"]
)
def test_lock_matches_pyproject(lock: Path, extras: tuple[str, ...]) -> None:
    problems = disagreements(lock, extras)
    assert not problems, f"{lock.name} disagrees with pyproject.toml; {FIX}:\n" + "\n".join(
        f"  - {p}" for p in problems
    )


def test_dev_lock_keeps_the_runtime_pins() -> None:
    """A developer tests exactly the versions an appliance runs."""
    runtime, _, _ = read_lock(RUNTIME)
    dev, _, _ = read_lock(DEV)
    moved = [f"{n}: {v} vs {dev.get(n)}" for n, v in runtime.items() if dev.get(n) != v]
    assert not moved, f"requirements-dev.lock moved runtime pins; {FIX}:\n" + "\n".join(moved)


def test_torch_is_the_cpu_build() -> None:
    """Any other torch pin downloads a multi-GB CUDA build."""
    for lock in (RUNTIME, DEV):
        pins, _, _ = read_lock(lock)
        assert str(pins["torch"]) == "2.13.0+cpu", lock.name
        assert not any(n.startswith("nvidia-") for n in pins), f"CUDA packages in {lock.name}"


def test_a_new_dependency_is_reported_with_the_fix(tmp_path: Path) -> None:
    """The message names the package and the command, so the lead knows what to run."""
    lock = tmp_path / "requirements.lock"
    text = RUNTIME.read_text(encoding="utf-8")
    # Drop one locked direct dependency, as if pyproject.toml had just gained it.
    block = re.search(r"\npyyaml==[^\n]*\n(?:[ \t][^\n]*\n)*", text, re.IGNORECASE)
    assert block is not None
    lock.write_text(text.replace(block.group(0), "\n"))
    problems = disagreements(lock, ("models",))
    assert any(p.startswith("pyyaml") and "not in requirements.lock" in p for p in problems)
