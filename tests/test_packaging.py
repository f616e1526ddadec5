"""pyproject.toml declares what the package imports, under a distribution name of its own."""

import ast
import sys
import tomllib

from conftest import ROOT

# Import names whose distribution is named otherwise.
DISTRIBUTION = {"PIL": "pillow", "torch_fidelity": "torch-fidelity", "yaml": "pyyaml"}


def imported_packages() -> set[str]:
    names = set()
    for path in (ROOT / "diffusion").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n != "diffusion" and n not in sys.stdlib_module_names}


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {dep.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower().replace("_", "-")
                for dep in project["dependencies"]}
    missing = {DISTRIBUTION.get(n, n).lower().replace("_", "-") for n in imported_packages()} - declared
    assert not missing, f"imported by diffusion/ but not in pyproject.toml's dependencies: {sorted(missing)}"


def test_the_distribution_is_not_pypis_other_diffusion_and_torch_patch_releases_are_allowed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] != "diffusion"
    torch = next(d for d in project["dependencies"] if d.startswith("torch>") or d.startswith("torch<"))
    assert "<2.15" in torch and "<=" not in torch
