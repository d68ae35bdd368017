"""The package metadata (pyproject.toml) declares the runtime dependencies, and the set-up's environment satisfies
every one of them: `pip install` of the package brings what it imports (issue: packaging)."""

import ast
import os
import sys
from importlib import metadata

import pytest
import tomllib
from packaging.requirements import Requirement

from conftest import REPO

PYPROJECT = os.path.join(REPO, "pyproject.toml")
# distributions the package itself imports at run time -> the top-level modules it imports from them
IMPORTED = {
    "torch": "torch",
    "open_clip_torch": "open_clip",
    "webdataset": "webdataset",
    "sentencepiece": "sentencepiece",
    "tiktoken": "tiktoken",
    "pillow": "PIL",
    "tqdm": "tqdm",
    "fairscale": "fairscale",
    "timm": "timm",
    "numpy": "numpy",
    "omegaconf": "omegaconf",
    "hydra-core": "hydra",
    "pycocoevalcap": "pycocoevalcap",
    "matplotlib": "matplotlib",
}
# imported by unilm_vl but deliberately not declared: scripts/install.sh installs them (see pyproject.toml)
INSTALLED_BY_SCRIPT = {"fairseq-fixed", "torchscale"}


def project():
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["project"]


def test_runtime_dependencies_are_declared_and_satisfied():
    requirements = {Requirement(r).name.lower(): Requirement(r) for r in project()["dependencies"]}
    for dist in IMPORTED:
        assert dist in requirements, f"pyproject.toml does not declare {dist}"
    for name, req in requirements.items():
        version = metadata.version(name)  # raises PackageNotFoundError when the set-up did not install it
        assert req.specifier.contains(version, prereleases=True), f"{name} {version} does not satisfy {req}"


def test_every_third_party_import_of_the_package_is_declared_or_installed_by_the_script():
    """Every top-level module that unilm_vl/ imports is the standard library, the package itself, a declared
    dependency, an optional extra, or one of the two the install script handles."""
    declared = {Requirement(r).name.lower() for r in project()["dependencies"]}
    for extra in project()["optional-dependencies"].values():
        declared |= {Requirement(r).name.lower() for r in extra}
    provides = metadata.packages_distributions()
    missing = set()
    for root, _, files in os.walk(os.path.join(REPO, "unilm_vl")):
        for name in (f for f in files if f.endswith(".py")):
            tree = ast.parse(open(os.path.join(root, name), encoding="utf-8").read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    tops = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                for top in tops:
                    if top in sys.stdlib_module_names or top in ("unilm_vl", "_timing"):
                        continue
                    dists = {d.lower() for d in provides.get(top, [top])}
                    if not dists & (declared | INSTALLED_BY_SCRIPT):
                        missing.add(f"{top} ({', '.join(sorted(dists))})")
    assert not missing, f"imported by unilm_vl/ but declared nowhere: {sorted(missing)}"


def test_the_editable_install_is_pep660_not_setup_py_develop():
    """No legacy `setup.py develop` install (pip's deprecation warning): the package is installed from
    pyproject.toml's build backend; there is no setup.py."""
    assert not os.path.exists(os.path.join(REPO, "setup.py"))
    dist = metadata.distribution("unilm_vl")
    direct = dist.read_text("direct_url.json")
    if direct is None:
        pytest.skip("unilm_vl is not pip-installed in this environment (run scripts/install.sh)")
    assert '"editable": true' in direct.replace(" ", "").replace('"editable":true', '"editable": true')
    assert dist.read_text("RECORD") and any("__editable__" in line for line in dist.read_text("RECORD").splitlines())
