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
        "rollout",  # the package's __init__: re-exports of its submodules
        "rollout.engine",
        "rollout.hf_engine",
        "rollout.vllm_engine",
        "rollout.gap",
        "metrics",
        "stats",
        "engine_folder",
        "selection",
    },
    "stage": {"sampler", "iteration", "steps", "driver", "evaluation", "analysis"},
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
        "demo",
        "demo.warmup",
    },
}
RANK = {name: i for i, names in enumerate(LAYERS.values()) for name in names}
FRAMEWORKS = ("lightning", "hydra", "omegaconf")


def _module_name(path: Path) -> str:
    """Dotted name under nft_lit: ``demo/warmup.py`` -> "demo.warmup"; a subpackage's ``__init__.py`` is the
    package ("rollout"), so ``from nft_lit.rollout import X`` is a dependency the layer rules see."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py") if p != SRC / "__init__.py"}


def _imports(path: Path) -> set[str]:
    """Every module this file imports, at the top or inside functions (a lazy import is still a dependency)."""
    out = set()
    package = ["nft_lit", *path.relative_to(SRC).parent.parts]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: against this file's package
                module = ".".join([*package[: len(package) - node.level + 1], *([module] if module else [])])
            out.add(module)
            # `from nft_lit import metrics` imports a module too (names that are not modules are filtered later)
            out.update(f"{module}.{alias.name}" for alias in node.names)
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


def _is_trainer(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "trainer") or (
        isinstance(node, ast.Attribute) and node.attr == "trainer"
    )


def _trainer_reads(path: Path) -> list[tuple[str, str]]:
    """(attribute, enclosing class/function) of every read from a trainer: ``trainer.X``, ``self.trainer.X``,
    ``getattr(self.trainer, "X", ...)`` / ``hasattr`` ("?" when the name is not a literal)."""
    reads: list[tuple[str, str]] = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = f"{scope}.{child.name}" if scope else child.name
            if isinstance(child, ast.Attribute) and _is_trainer(child.value):
                reads.append((child.attr, inner))
            elif (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Name)
                and child.func.id in ("getattr", "hasattr")
                and child.args
                and _is_trainer(child.args[0])
            ):
                name = child.args[1] if len(child.args) > 1 else None
                reads.append((name.value if isinstance(name, ast.Constant) else "?", inner))
            visit(child, inner)

    visit(ast.parse(path.read_text()), "")
    return reads


@pytest.mark.parametrize("name", sorted(LAYERS["leaf"] | LAYERS["stage"]))
def test_leaves_and_stages_never_touch_a_trainer(name):
    """Stages get their inputs as arguments: not one ``trainer`` (name, argument or attribute) in them."""
    tree = ast.parse(MODULES[name].read_text())
    named = [
        node.lineno
        for node in ast.walk(tree)
        if (isinstance(node, ast.Name) and node.id == "trainer")
        or (isinstance(node, ast.arg) and node.arg == "trainer")
        or (isinstance(node, ast.Attribute) and node.attr == "trainer")
    ]
    assert not named and not _trainer_reads(MODULES[name]), f"{name} uses a trainer (lines {named})"


def test_no_module_reaches_through_the_trainer_for_the_datamodule():
    offenders = [name for name, path in MODULES.items() if "trainer.datamodule" in path.read_text()]
    offenders += [name for name, path in MODULES.items() if any(a == "datamodule" for a, _ in _trainer_reads(path))]
    assert not offenders


def test_the_policy_is_read_from_the_trainer_once_in_the_datamodule_refresh():
    """The one back-channel: ``RolloutDataModule.train_dataloader`` reads the policy it hands the iteration stage;
    everything else reaches the policy as an argument."""
    reads = [
        (name, scope)
        for name, path in MODULES.items()
        for attr, scope in _trainer_reads(path)
        if attr in ("lightning_module", "?")
    ]
    assert reads in ([], [("datamodule", "RolloutDataModule.train_dataloader")]), reads


def test_the_datamodule_reads_only_its_loop_settings_from_the_trainer():
    """The epoch (which iteration), the policy (once) and the reload setting it checks; no progress bar or
    other callback (phases go out through the stage's ``on_phase`` hook)."""
    read = {attr for attr, _ in _trainer_reads(MODULES["datamodule"])}
    assert read <= {"current_epoch", "lightning_module", "reload_dataloaders_every_n_epochs"}, read


def test_classes_stay_small():
    sizes = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                sizes[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    biggest = max(sizes, key=sizes.get)
    assert sizes[biggest] <= 250, f"{biggest} has {sizes[biggest]} lines"
