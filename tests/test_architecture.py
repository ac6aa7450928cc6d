"""The architecture of src/nft_lit as rules a test can check (docs/ARCHITECTURE.md): layers, one-way imports,
no import cycle, framework-free stages, thin Lightning adapters, size limits
(modules, functions, classes, cli.py)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "nft_lit"

# Lower layers never import higher ones. Within a layer imports are allowed but must not form a cycle.
LAYERS = {
    "leaf": {
        "losses",  # the package's __init__: re-exports of its submodules
        "losses.base",
        "losses.nft",
        "losses.grpo",
        "losses.infonca",
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
        "answers",
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
        "provenance",
        "report",
        "report_stats",
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


MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250
MAX_CLI_LINES = 300  # the front end parses, calls compose and reports; the work lives in the layers below


def _span(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> int:
    """Lines of a definition, decorators, signature and docstring included."""
    first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
    return node.end_lineno - first + 1


def _definitions(path: Path, kinds: tuple[type, ...]) -> dict[str, int]:
    """Qualified name (``Class.method``, ``outer.inner``) -> lines, for every definition of ``kinds`` in the file."""
    sizes: dict[str, int] = {}

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = f"{scope}.{child.name}" if scope else child.name
                if isinstance(child, kinds):
                    sizes[inner] = _span(child)
            visit(child, inner)

    visit(ast.parse(path.read_text()), "")
    return sizes


def _offenders(sizes: dict[str, int], limit: int) -> str:
    return ", ".join(f"{name} ({lines} lines)" for name, lines in sorted(sizes.items()) if lines > limit)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines (at most {MAX_MODULE_LINES}): split it by concept"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_functions_stay_small(name):
    offenders = _offenders(_definitions(MODULES[name], (ast.FunctionDef, ast.AsyncFunctionDef)), MAX_FUNCTION_LINES)
    assert not offenders, f"{name}: functions over {MAX_FUNCTION_LINES} lines: {offenders}; extract helpers"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_classes_stay_small(name):
    offenders = _offenders(_definitions(MODULES[name], (ast.ClassDef,)), MAX_CLASS_LINES)
    assert not offenders, f"{name}: classes over {MAX_CLASS_LINES} lines: {offenders}"


def test_the_cli_stays_a_thin_front_end():
    lines = len(MODULES["cli"].read_text().splitlines())
    assert lines <= MAX_CLI_LINES, f"cli.py has {lines} lines (at most {MAX_CLI_LINES}): move the work to compose"


def _public_definitions(path: Path) -> set[str]:
    """Top-level classes, functions and assigned names of a module that do not start with an underscore."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {name for name in names if not name.startswith("_")}


def test_the_losses_package_re_exports_every_public_name():
    """``_target_: nft_lit.losses.NFTLoss`` (configs, run configs stored in checkpoints written before the split)
    and ``from nft_lit.losses import X`` resolve through ``losses/__init__.py``."""
    tree = ast.parse(MODULES["losses"].read_text())
    exported = next(
        {ast.literal_eval(element) for element in node.value.elts}
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
    )
    defined = set().union(*(_public_definitions(MODULES[n]) for n in MODULES if n.startswith("losses.")))
    assert defined == exported, (
        f"missing from __all__: {sorted(defined - exported)}; stale: {sorted(exported - defined)}"
    )
