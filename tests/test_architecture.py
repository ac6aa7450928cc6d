"""The architecture of src/nft_lit as rules a test can check (docs/ARCHITECTURE.md): layers, one-way imports,
no import cycle, framework-free stages, thin Lightning adapters."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "nft_lit"

# Lower layers never import higher ones. Within a layer imports are allowed but must not form a cycle.
LAYERS = {
    "leaf": {
        "losses",
        "prompts",
        "distributed",
        "data",
        "reward",
        "synthetic",
        "word_problems",
        "models",
        "rollout",
        "stats",
        "engine_folder",
        "selection",
    },
    "stage": {"sampler", "iteration", "steps", "evaluation", "analysis"},
    "adapter": {"module", "datamodule", "callbacks"},
    "front end": {
        "cli",
        "compose",
        "console",
        "lightning_cli",
        "launch",
        "runs",
        "report",
        "verify",
        "band",
        "demo.warmup",
    },
}
RANK = {name: i for i, names in enumerate(LAYERS.values()) for name in names}
FRAMEWORKS = ("lightning", "hydra", "omegaconf")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py") if p.name != "__init__.py"}


def _imports(path: Path) -> set[str]:
    """Every module this file imports, at the top or inside functions (a lazy import is still a dependency)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def _package_imports(path: Path) -> set[str]:
    return {m.removeprefix("nft_lit.") for m in _imports(path) if m.startswith("nft_lit.")} & set(MODULES)


def test_every_module_has_a_layer():
    assert set(MODULES) == set(RANK), "add new modules to LAYERS (and docs/ARCHITECTURE.md)"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers_only(name):
    upward = {dep for dep in _package_imports(MODULES[name]) if RANK[dep] > RANK[name]}
    assert not upward, f"{name} ({list(LAYERS)[RANK[name]]}) imports a higher layer: {sorted(upward)}"


def test_no_import_cycle():
    graph = {name: _package_imports(path) for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*stack, node, dep])}"
            if dep not in state:
                visit(dep, [*stack, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("name", sorted(LAYERS["leaf"] | LAYERS["stage"]))
def test_leaves_and_stages_are_framework_free(name):
    used = {m for m in _imports(MODULES[name]) if m.split(".")[0] in FRAMEWORKS}
    assert not used, f"{name} imports {sorted(used)}: only the adapters and front ends may"


def test_no_module_reaches_through_the_trainer_for_the_datamodule():
    offenders = [name for name, path in MODULES.items() if "trainer.datamodule" in path.read_text()]
    assert not offenders


def test_classes_stay_small():
    sizes = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                sizes[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    biggest = max(sizes, key=sizes.get)
    assert sizes[biggest] <= 250, f"{biggest} has {sizes[biggest]} lines"
