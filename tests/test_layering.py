"""The walls the design draws between the parts, checked on every import.

- services/common imports nothing from services.generation, services.telemetry, gateway or the launcher;
- generation and telemetry never import each other: they share only pb/ and services/common;
- the gateway imports no service's insides (services.common and pb/ only), it reaches them over gRPC;
- the launcher (services/stack.py, services/supervisor.py) starts the parts by module name and imports
  only services/common.

Every `import`, `from ... import` (relative ones resolved, those inside functions too) and
`importlib.import_module("...")` with a literal name is read with `ast`.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Where a file lives -> the first-party packages it must not import.
# First-party: what these prefixes name; anything else (pb, grpc, torch, ...) is outside the walls.
FIRST_PARTY = ("services", "gateway")
LAUNCHER = ("services.stack", "services.supervisor")
LAYERS: dict[str, tuple[str, ...]] = {
    "services/common": ("services.generation", "services.telemetry", "gateway", *LAUNCHER),
    "services/generation": ("services.telemetry", "gateway", *LAUNCHER),
    "services/telemetry": ("services.generation", "gateway", *LAUNCHER),
    "gateway": ("services.generation", "services.telemetry", *LAUNCHER),
    "services": ("services.generation", "services.telemetry", "gateway"),  # the launcher: services/*.py
}


@dataclass(frozen=True)
class Crossing:
    path: str
    line: int
    imported: str
    forbidden: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.imported} (crosses into {self.forbidden})"


def layer_of(relative: Path) -> str | None:
    """The most specific layer holding the file; the launcher layer only for files directly under services/."""
    folder = relative.parent.as_posix()
    for layer in sorted(LAYERS, key=len, reverse=True):
        if folder == layer or folder.startswith(layer + "/"):
            if layer == "services" and folder != "services":
                return None  # a package under services/ that no rule names yet
            return layer
    return None


def module_of(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `source`, relative ones made absolute."""
    found: list[tuple[int, str]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            # `from services import generation` imports a module too: check each name joined on.
            found.extend((node.lineno, f"{prefix}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
    return found


def _is_import_module(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def crossings(root: Path) -> tuple[list[Crossing], list[str]]:
    """Every import that breaks a wall, and every first-party file no layer covers."""
    broken: list[Crossing] = []
    unplaced: list[str] = []
    for top in FIRST_PARTY:
        for path in sorted((root / top).rglob("*.py")):
            relative = path.relative_to(root)
            layer = layer_of(relative)
            if layer is None:
                unplaced.append(relative.as_posix())
                continue
            module = module_of(relative)
            for line, name in imported_names(path.read_text(), module, path.name == "__init__.py"):
                for forbidden in LAYERS[layer]:
                    if _within(name, forbidden):
                        broken.append(Crossing(relative.as_posix(), line, name, forbidden))
    return broken, unplaced


def test_no_import_crosses_a_wall() -> None:
    broken, unplaced = crossings(ROOT)
    assert not broken, "imports that cross the layering walls:\n" + "\n".join(map(str, broken))
    assert not unplaced, f"files no layering rule covers (add them to LAYERS): {unplaced}"


def test_the_walk_sees_the_product() -> None:
    # A walk that read nothing would pass the test above: make sure it reads the real tree.
    names = {name for _, name in imported_names((ROOT / "services/generation/server.py").read_text(),
                                                "services.generation.server", False)}
    assert "services.common.config.GenerationConfig" in names
    assert len(list((ROOT / "services").rglob("*.py"))) > 30


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for top in FIRST_PARTY:
        (tmp_path / top).mkdir(exist_ok=True)
    return tmp_path


@pytest.mark.parametrize(
    ("path", "source", "forbidden"),
    [
        ("services/common/metrics.py", "from services.generation.pipeline.records import STAGES\n",
         "services.generation"),
        ("services/generation/telemetry_client.py", "from services.telemetry.convert import device_sample\n",
         "services.telemetry"),
        ("services/generation/pipeline/x.py", "from ...telemetry import convert\n", "services.telemetry"),
        ("services/generation/x.py", "def f():\n    from services import telemetry\n", "services.telemetry"),
        ("services/telemetry/x.py", "import services.generation.jobs as jobs\n", "services.generation"),
        ("gateway/app.py", "from services.generation.convert import STAGE_ENUM\n", "services.generation"),
        ("gateway/x.py", "import importlib\nm = importlib.import_module('services.telemetry.store')\n",
         "services.telemetry"),
        ("services/stack.py", "from services.generation import server\n", "services.generation"),
        ("services/common/x.py", "from gateway.views import job_view\n", "gateway"),
    ],
)
def test_each_kind_of_crossing_is_caught(tmp_path: Path, path: str, source: str, forbidden: str) -> None:
    broken, _ = crossings(_tree(tmp_path, {path: source}))
    assert [c.forbidden for c in broken] == [forbidden], broken


def test_allowed_imports_pass(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "services/generation/x.py": "from pb.orfeas.telemetry.v1 import telemetry_pb2\n"
                                    "from services.common import metrics\nfrom . import jobs\n",
        "services/telemetry/x.py": "from services.common.stages import STAGES\nfrom .records import Summary\n",
        "gateway/x.py": "from services.common.config import GatewayConfig\nimport grpc\n",
        "services/stack.py": "from services.common.config import SecurityConfig\n",
    })
    assert crossings(root) == ([], [])


def test_a_new_package_under_services_needs_a_rule(tmp_path: Path) -> None:
    _, unplaced = crossings(_tree(tmp_path, {"services/scheduler/x.py": "import os\n"}))
    assert unplaced == ["services/scheduler/x.py"]


def test_stage_names_come_from_the_contract() -> None:
    from pb.orfeas.generation.v1 import generation_pb2 as pb
    from services.common import metrics
    from services.common.stages import STAGES, stage_number
    from services.generation.pipeline import records

    assert metrics.STAGES is STAGES and records.STAGES is STAGES
    assert [stage_number(s) for s in STAGES] == [v.number for v in pb.Stage.DESCRIPTOR.values if v.number]
    assert STAGES == ("image_loading", "image_preprocessing", "shape_generation", "texture_synthesis", "mesh_export")
