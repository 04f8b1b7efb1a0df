"""The pack has one import identity, `fluxworks`: inside it modules import their siblings relatively; dev
tools, benchmarks and tests import `fluxworks.<subpackage>`. A second identity (a top-level `flux_models`
next to `fluxworks.flux_models`) would give two copies of every class, and `isinstance` checks would fail."""

import ast
from pathlib import Path

from tests.paths import REPO

PACK_PACKAGES = {"flux_models", "flux_sampler", "flux_speed", "flux_lora", "flux_controlnet", "flux_training",
                 "flux_parallel", "nodes"}
OUTSIDE = ("tests", "devtools", "bench", "evaluation", "training")


def imported_names(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in (Path(REPO) / folder).rglob("*.py")]


def test_no_top_level_imports_of_pack_packages():
    # `nodes` outside the pack is ComfyUI's own module, which tests may import on purpose.
    bad = [f"{p.relative_to(REPO)}:{line}: {name}" for p in python_files(*OUTSIDE)
           for line, name in imported_names(p) if name.split(".")[0] in PACK_PACKAGES - {"nodes"}]
    assert not bad, "import these as fluxworks.<package>: " + "; ".join(bad)


def test_pack_modules_import_siblings_relatively():
    pack = [p for name in PACK_PACKAGES for p in (Path(REPO) / name).rglob("*.py")]
    bad = [f"{p.relative_to(REPO)}:{line}: {name}" for p in pack for line, name in imported_names(p)
           if name.split(".")[0] in PACK_PACKAGES | {"fluxworks"}]
    assert not bad, "use relative imports inside the pack: " + "; ".join(bad)


def test_nobody_loads_the_pack_by_file_location():
    offenders = [str(p.relative_to(REPO)) for p in python_files(*OUTSIDE, *PACK_PACKAGES)
                 if "spec_from_file_location(\"fluxworks\"" in p.read_text(encoding="utf-8")]
    assert not offenders
