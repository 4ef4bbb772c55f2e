"""The package's metadata, requirements and lock file stay in step, and the wheel lists every package."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _locked(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) from a `uv pip compile --generate-hashes` file."""
    text = path.read_text(encoding="utf-8")
    entries = re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})*)", text, re.M)
    return {re.sub(r"\[.*\]", "", n).lower(): (v, g.count("--hash=")) for n, v, g in entries}


def test_the_package_depends_on_exactly_the_runtime_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = dict(d.lower().split("==") for d in project["dependencies"])
    assert declared == _pins(ROOT / "requirements.txt")


def test_the_lock_holds_every_pin_at_its_version_and_every_entry_has_hashes():
    lock = _locked(ROOT / "requirements.lock")
    assert len(lock) > 100  # the whole tree, not only the direct pins
    for req in ("requirements.txt", "requirements-dev.txt"):
        for name, version in _pins(ROOT / req).items():
            assert lock.get(name, ("missing",))[0] == version, f"{req}: {name}=={version}, lock: {lock.get(name)}"
    assert [name for name, (_, hashes) in lock.items() if hashes == 0] == []


def test_the_wheel_lists_every_package_of_the_tree():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("matcher", "jobs")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found <= listed and {"matcher.schemas", "matcher.dags"} <= listed
