"""The shape of the code: imports point down the layers, and no module imports itself back.

    flows, stylepipe.cli                      the commands and the Prefect flows
    stylepipe.ops                             operations: worker processes, the stack, probes
    stylepipe.chain, pipeline                 the one list of stages, in order, and its runner
    stylepipe.stages, champion, session,      the pipeline's stages, what they share, the final
    final, showcase, dashboard_plots          model, its pictures, the study's dashboard plots
    search, train, tracking, registry, data,  the parts the stages wire together
    report, stylize
    nets                                      the networks and losses
    config, errors, files, stores, records,   settings, small helpers, the study's typed records,
    events                                    what happened (for the flows to send on)

Every import counts, including those inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("flows", "stylepipe.cli"),
    ("stylepipe.ops",),
    ("stylepipe.chain", "stylepipe.pipeline"),
    (
        "stylepipe.stages",
        "stylepipe.champion",
        "stylepipe.session",
        "stylepipe.final",
        "stylepipe.speculative",
        "stylepipe.showcase",
        "stylepipe.dashboard_plots",
    ),  # fmt: skip
    (
        "stylepipe.search",
        "stylepipe.train",
        "stylepipe.tracking",
        "stylepipe.registry",
        "stylepipe.data",
        "stylepipe.report",
        "stylepipe.stylize",
    ),  # fmt: skip
    ("stylepipe.nets",),
    (
        "stylepipe.config",
        "stylepipe.sections",
        "stylepipe.errors",
        "stylepipe.files",
        "stylepipe.stores",
        "stylepipe.threads",
        "stylepipe.records",
        "stylepipe.events",
    ),
]
LAYER_OF = {unit: len(LAYERS) - depth for depth, units in enumerate(LAYERS) for unit in units}


def module_names() -> dict[str, Path]:
    found = {}
    for package in ("stylepipe", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = module_names()


def imports_of(path: Path) -> set[str]:
    """The project's modules that this file imports (``from a import b`` names module a.b when
    it is one)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in MODULES else node.module)
    return {name for name in names if name in MODULES}


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def unit_of(module: str) -> str:
    """The layered unit a module belongs to: the longest listed prefix."""
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        if prefix in LAYER_OF:
            return prefix
    raise AssertionError(f"{module} is in no layer of tests/test_house.py: place it")


def test_every_module_has_a_layer():
    for module in MODULES:
        if module not in ("stylepipe", "flows", "flows.__main__"):
            unit_of(module)


@pytest.mark.parametrize("module", [m for m in MODULES if m not in ("stylepipe", "flows")])
def test_imports_point_down_or_across_never_up(module):
    upward = [
        target
        for target in sorted(GRAPH[module])
        if target not in ("stylepipe", "flows") and LAYER_OF[unit_of(target)] > LAYER_OF[unit_of(module)]
    ]
    assert not upward, f"{module} imports {upward} from a layer above it"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules_or_between_units():
    assert _cycles(GRAPH) == []
    units: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        if module in ("stylepipe", "flows", "flows.__main__"):
            continue
        source = unit_of(module)
        units.setdefault(source, set()).update(
            unit_of(t) for t in targets if t not in ("stylepipe", "flows") and unit_of(t) != source
        )
    assert _cycles(units) == []


def test_the_checks_see_a_cycle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "stylepipe.stages" in GRAPH["stylepipe.cli"]  # lazy imports inside functions are seen
    assert LAYER_OF[unit_of("stylepipe.search.objective")] < LAYER_OF[unit_of("stylepipe.stages")]


LIBRARY = ("stylepipe.nets", "stylepipe.data", "stylepipe.train", "stylepipe.search", "stylepipe.stages",
           "stylepipe.session", "stylepipe.chain", "stylepipe.final", "stylepipe.showcase", "stylepipe.tracking",
           "stylepipe.registry", "stylepipe.report", "stylepipe.stylize")  # fmt: skip


def test_the_library_never_imports_ops():
    """Service supervision and the machine's processes (stylepipe/ops) are wired in by the commands."""
    reaching = {module: sorted(t for t in GRAPH[module] if t.startswith("stylepipe.ops"))
                for module in MODULES if module.startswith(LIBRARY)}  # fmt: skip
    assert {module: targets for module, targets in reaching.items() if targets} == {}
    assert "stylepipe.ops.cores" in GRAPH["stylepipe.ops.workers"]  # the check sees ops' own imports


# ------------------------------------------------------------------ one place for each concept

SOURCES = {name: path for name, path in MODULES.items() if not name.startswith("tests")}


def _calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def test_the_stage_order_is_written_once():
    """Only pipeline.py lists the stages: no other module calls two of them (an order)."""
    import stylepipe.pipeline as pipeline
    from stylepipe import stages

    stage_functions = {"stability_edge", "search_trials", "certificate_replays", "confirm", "train_final",
                       "register", "promote", "record_finished", "report", "prepare", "publish_inputs"}  # fmt: skip
    assert all(callable(getattr(stages, name)) for name in stage_functions)
    assert len(pipeline.STAGES) == len(stage_functions)  # each stage function has its one entry
    ordering = {}
    for name, path in SOURCES.items():
        called = {
            _called_name(call)
            for call in _calls(path)
            if isinstance(call.func, ast.Attribute)
            and isinstance(call.func.value, ast.Name)
            and call.func.value.id == "stages"
        }
        if len(called & stage_functions) > 1 and name != "stylepipe.pipeline":
            ordering[name] = sorted(called & stage_functions)
    assert ordering == {}


def test_only_the_store_asks_whether_a_url_is_sqlite():
    allowed = {
        "stylepipe.stores",
        "stylepipe.search.storage",
        "stylepipe.tracking",
    }  # the helpers, the two stores
    asking = {
        name
        for name, path in SOURCES.items()
        if any(_called_name(call) in ("is_sqlite", "sqlite_path") for call in _calls(path))
    }
    assert asking - allowed == set()
    assert "stylepipe.search.storage" in asking  # the check sees the store's own calls


def test_lock_names_come_from_one_enum():
    """A study lock is taken by a ``Lock`` member, never by a bare string."""
    from stylepipe.search.storage import Lock

    bare = []
    for name, path in SOURCES.items():
        for call in _calls(path):
            if _called_name(call) in ("study_lock", "StudyLock", "lock") and any(
                isinstance(arg, ast.Constant) and isinstance(arg.value, str) for arg in call.args
            ):
                bare.append(f"{name}:{call.lineno}")
    assert bare == []
    assert {lock.value for lock in Lock} == {"setup", "inputs", "ask", "edge", "certificate", "replays",
                                             "final ahead", "finish"}  # fmt: skip


def test_study_states_come_from_one_type():
    """States are ``StudyState`` members, set only through ``StudyRecord.set_state``."""
    from stylepipe.search.attributes import StudyRecord, StudyState

    def a_member(call: ast.Call) -> bool:
        first = call.args[0] if call.args else None
        return (
            isinstance(first, ast.Attribute)
            and isinstance(first.value, ast.Name)
            and first.value.id == "StudyState"
        )

    # (data.sources calls a random generator's set_state, not a study's)
    loose = [
        f"{name}:{call.lineno}"
        for name, path in SOURCES.items()
        if name not in ("stylepipe.search.attributes", "stylepipe.data.sources")
        for call in _calls(path)
        if _called_name(call) == "set_state" and not a_member(call)
    ]
    assert loose == []
    study = __import__("optuna").create_study()
    with pytest.raises(ValueError, match="unknown study state"):
        StudyRecord(study).set_state("done")
    assert StudyRecord(study).state is None
    StudyRecord(study).set_state(StudyState.SEARCHING)
    assert StudyRecord(study).state is StudyState.SEARCHING


def test_no_test_module_imports_another_test_module():
    importing = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            hits = [n for n in names if n.split(".")[-1].startswith("test_") and n.startswith("tests")]
            if hits:
                importing[path.name] = hits
    assert importing == {}
