"""The package's floors (STYLE.md): imports run downwards only.

    0  losses/, modules/, data/, constants, logging_utils, safe_load   plain PyTorch / data code, no fairseq
    1  models/, criterions/, optim/                                    fairseq registrations over floor 0
    2  tasks/, trainer, fsdp2, fault_tolerance, distributed_cpu, inference/  training; decoding
    3  checkpoint, convert                                             loading (converting) any checkpoint
    4  eval/, api, demo and the command-line tools                     what users run

Every import statement of every module is read from its source (function-level ones included, so a lazy import
cannot hide an upward one), resolved to a package module and checked against the floor table, plus the rules the
issue names explicitly: ``modules/`` and ``losses/`` import no fairseq; ``data/`` imports nothing from the synthetic
world generator except its word lists."""

import ast
import os

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "unilm_vl")
FLOORS = [
    (0, ("losses", "modules", "data", "constants", "logging_utils", "safe_load", "cli")),
    (1, ("models", "criterions", "optim")),
    (2, ("tasks", "trainer", "fsdp2", "fault_tolerance", "distributed_cpu", "inference")),
    (3, ("checkpoint", "convert")),  # convert: checkpoint reads HF directories through it
    (
        4,
        (
            "eval",
            "api",
            "demo",
            "consolidate",
            "export_open_clip",
            "wise_ft",
            "kosmos2_infer",
            "generate",
            "train",
            "plot_log",
            "__init__",
        ),
    ),
]
GENERATOR = "unilm_vl.data.synthetic"
FORBIDDEN = [  # (importer prefix, imported prefix) pairs the issue names that the floors alone allow
    ("unilm_vl.models", "unilm_vl.criterions"),
    ("unilm_vl.eval", "unilm_vl.tasks"),
]


def floor_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for floor, names in FLOORS:
        if top in names:
            return floor
    raise AssertionError(f"{module} is on no floor: add it to tests/test_layering.py's table")


def package_modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                yield rel[: -len(".__init__")] if rel.endswith(".__init__") else rel, path


def imports_of(module: str, path: str):
    """``(imported module, line)`` of every import in the file, relative imports resolved."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is not None:
                yield target, node.lineno
            for alias in node.names:  # from pkg import x, x a submodule -> that submodule too
                sub = os.path.join(REPO, *f"{target}.{alias.name}".split("."))
                if os.path.isdir(sub) or os.path.isfile(sub + ".py"):
                    yield f"{target}.{alias.name}", node.lineno


MODULES = sorted(package_modules())


def test_every_module_is_on_a_floor():
    for module, _ in MODULES:
        floor_of(module)


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_run_downwards(module, path):
    own = floor_of(module)
    upward, fairseq_in_floor0, generator, forbidden = [], [], [], []
    for target, line in imports_of(module, path):
        if target == "unilm_vl" or target.startswith("unilm_vl."):
            if target == "unilm_vl":
                continue  # the package itself (its __init__ registers everything): only tools import it
            if floor_of(target) > own:
                upward.append(f"line {line}: {target} (floor {floor_of(target)} > {own})")
            forbidden += [
                f"line {line}: {target}"
                for importer, imported in FORBIDDEN
                if module.startswith(importer) and target.startswith(imported)
            ]
            if (
                module.startswith("unilm_vl.data.")
                and not module.startswith(GENERATOR)
                and target.startswith(GENERATOR)
                and target != f"{GENERATOR}.vocabulary"
            ):
                generator.append(f"line {line}: {target}")
        elif (
            own == 0
            and (module.startswith("unilm_vl.modules") or module.startswith("unilm_vl.losses"))
            and (target == "fairseq" or target.startswith("fairseq."))
        ):
            fairseq_in_floor0.append(f"line {line}: {target}")
    assert not upward, f"{module} imports a floor above its own: {upward}"
    assert not fairseq_in_floor0, f"{module} (modules/, losses/) imports fairseq: {fairseq_in_floor0}"
    assert not generator, f"{module} (data/) imports the synthetic world generator: {generator}"
    assert not forbidden, f"{module} imports a package the layering forbids it: {forbidden}"


def test_the_table_catches_an_upward_import(tmp_path):
    """The checker itself: a floor-0 file importing a task, and a loss importing fairseq, are found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ..tasks import kosmos2\n    import fairseq.data\n")
    found = list(imports_of("unilm_vl.modules.bad", str(bad)))
    assert ("unilm_vl.tasks.kosmos2", 2) in found and ("fairseq.data", 3) in found
    assert floor_of("unilm_vl.tasks.kosmos2") > floor_of("unilm_vl.modules.bad")


def test_the_explicit_rules_catch_what_floors_allow():
    """models/ -> criterions/ and eval/ -> tasks/ are on allowed floors but forbidden by name."""
    pairs = [
        (m, t)
        for m, t in [
            ("unilm_vl.models.cosa", "unilm_vl.criterions.cosa"),
            ("unilm_vl.eval.refcoco", "unilm_vl.tasks.kosmos2"),
        ]
        if any(m.startswith(a) and t.startswith(b) for a, b in FORBIDDEN)
    ]
    assert len(pairs) == 2 and floor_of("unilm_vl.eval.refcoco") > floor_of("unilm_vl.tasks.kosmos2")
