"""envs/stimsynth.yaml, the conda environment of every rule, says what pyproject.toml
says: the same runtime dependencies under the same version constraints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
ENV_FILE = REPO / "envs" / "stimsynth.yaml"

# PyPI names whose conda-forge package is named otherwise. The -base and -minimal
# packages are the libraries without extras (GUI back-ends; Snakemake's plugins),
# which is what pip installs too.
CONDA_NAMES = {
    "torch": "pytorch",
    "matplotlib": "matplotlib-base",
    "snakemake": "snakemake-minimal",
}
# Conda packages of the environment that are no dependency of stimsynth's.
TOOLS = {"python", "pip"}


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as stream:
        return tomllib.load(stream)


def runtime_requirements() -> dict[str, SpecifierSet]:
    """pyproject's runtime dependencies, by their name in the environment file."""
    requirements = {}
    for line in pyproject()["project"]["dependencies"]:
        requirement = Requirement(line)
        assert not requirement.marker and not requirement.extras, (
            f"{line}: say how the conda environment covers markers and extras"
        )
        name = canonicalize_name(requirement.name)
        requirements[CONDA_NAMES.get(name, name)] = requirement.specifier
    return requirements


def conda_specifier(spec: str) -> tuple[str, SpecifierSet]:
    """Name and version constraint of a conda match spec such as ``zarr >=3.0,<4``.

    Examples
    --------
    >>> conda_specifier("zarr >=3.0,<4")
    ('zarr', <SpecifierSet('<4,>=3.0')>)
    >>> conda_specifier("python=3.11")
    ('python', <SpecifierSet('==3.11.*')>)
    """
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", spec.strip())
    assert match, f"not a conda package spec: {spec!r}"
    name, constraint = match.groups()
    constraint = constraint.replace(" ", "")
    assert "|" not in constraint and "[" not in constraint, (
        f"{spec!r}: only comma-separated version comparisons are checked"
    )
    # In conda, "=1.2" means any 1.2.x release.
    parts = [
        f"=={part[1:]}.*" if re.fullmatch(r"=[^=].*", part) else part
        for part in constraint.split(",")
        if part
    ]
    return canonicalize_name(name), SpecifierSet(",".join(parts))


def environment() -> tuple[dict[str, SpecifierSet], list[str]]:
    """The environment file's packages (conda and pip) and its pip options."""
    env = yaml.safe_load(ENV_FILE.read_text())
    packages, options = {}, []
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            for line in entry["pip"]:
                if line.startswith("-"):
                    options.append(line)
                    continue
                requirement = Requirement(line)
                packages[canonicalize_name(requirement.name)] = requirement.specifier
        else:
            name, specifier = conda_specifier(entry)
            packages[name] = specifier
    return packages, options


def test_the_environment_has_every_runtime_dependency_under_its_constraint():
    packages, _ = environment()
    for name, specifier in runtime_requirements().items():
        assert name in packages, f"{ENV_FILE.name} lacks {name} ({specifier})"
        assert packages[name] == specifier, (
            f"{name}: pyproject.toml asks for {specifier or 'any version'}, "
            f"{ENV_FILE.name} for {packages[name] or 'any version'}"
        )


def test_the_environment_has_nothing_pyproject_does_not_ask_for():
    packages, _ = environment()
    extra = set(packages) - set(runtime_requirements()) - TOOLS
    assert not extra, f"{ENV_FILE.name} has packages pyproject.toml does not: {extra}"


def test_the_environment_has_the_python_pyproject_requires():
    packages, _ = environment()
    assert packages["python"] == SpecifierSet(pyproject()["project"]["requires-python"])


def test_the_environment_installs_stimsynth_itself():
    _, options = environment()
    assert any(option.startswith("-e ") for option in options), options
