"""The package's structure: every import points down a layer (or stays in its own), there is no import
loop, and an editor is added by one file plus its hyperparameter YAML (the registry finds it)."""

import ast
from pathlib import Path

import pytest

from lme_sim.models import LoadedModel

PACKAGE = Path(__file__).resolve().parents[1] / "lme_sim"

# bottom first; a module may import from its own layer and the ones below it, never from above
LAYERS = [
    [
        "lme_sim",
        "paths",
        "cases",
        "config",
        "arch",
        "random_models",
        "tokens",
        "weights",
        "linalg",
        "hooks",
        "sysinfo",
        "sizing",
        "storage",
    ],
    ["world", "catalog", "data", "stream", "smollm2", "backbone", "suffix"],
    ["world_model", "models", "scoring"],
    ["metrics", "general_ability", "vllm_scorer", "analysis", "report", "corpus"],
    ["editors"],
    ["scenario"],
    ["preflight"],
    ["runtime"],
    ["bench", "bench_tables"],
    ["cli"],
]


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    short = module.split(".")[1] if module != "lme_sim" else "lme_sim"
    for i, names in enumerate(LAYERS):
        if short in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py: add it to LAYERS")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """lme_sim modules imported by the file (top level and inside functions; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    me = _name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in modules and m != me}


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_name(f) for f in files}
    return {_name(f): _imports(f, modules) for f in files}


def test_every_import_points_down():
    up = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, deps in _graph().items()
        for b in deps
        if _layer(b) > _layer(a)
    ]
    assert not up, "\n".join(up)


def test_no_import_loops():
    graph, loops = _graph(), []
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                loops.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not loops, "\n".join(loops)


def test_one_function_adds_a_delta_to_a_weight():
    """Every change of a weight goes through lme_sim.weights.add_delta (with its bf16 master copy): no
    other in-place add of a tensor anywhere in the package."""
    import re

    adds = [
        f"{p.relative_to(PACKAGE.parent)}:{i}"
        for p in PACKAGE.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"(?<!index)\.add_\(", line)
    ]
    assert adds and all(a.startswith("lme_sim/weights.py:") for a in adds), adds


def test_no_value_is_pasted_into_sql():
    """Queries take parameters: no SQL built with an f-string, ``+`` or ``%`` from a value is executed.
    Names from the schema (a table, a view, a WHERE clause written here) may be formatted in; so may
    the file of a ``COPY ... TO``, which DuckDB takes as no parameter."""
    allowed = {"table", "where", "name", "option", "path", "cols", "sql"}
    calls = {"execute", "query", "read_only_query", "sql"}
    bad = []
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if not (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) in calls
            ):
                continue
            for arg in node.args[:2]:
                if isinstance(arg, ast.JoinedStr):
                    names = {ast.unparse(v.value) for v in arg.values if isinstance(v, ast.FormattedValue)}
                    if names - allowed:
                        bad.append(
                            f"{p.relative_to(PACKAGE.parent)}:{node.lineno}: {sorted(names - allowed)}"
                        )
                elif isinstance(arg, ast.BinOp):
                    bad.append(f"{p.relative_to(PACKAGE.parent)}:{node.lineno}: SQL built with an operator")
    assert not bad, "\n".join(bad)


def test_long_signatures_are_called_by_keyword():
    """A function of more than 6 parameters takes at most 5 of them by position; the rest are
    keyword-only, so a long call names what it passes (torchtune's keyword-only calls). Exempt: click
    commands (click passes one keyword per option) and ``torch.autograd.Function.forward`` (its
    inputs must be positional to be differentiated)."""
    bad = []
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            positional = [x.arg for x in a.posonlyargs + a.args if x.arg not in ("self", "cls", "ctx")]
            if len(positional) + len(a.kwonlyargs) <= 6 or len(positional) <= 5:
                continue
            decorators = {ast.unparse(d).split("(")[0] for d in node.decorator_list}
            if any(d.endswith(".command") or d.startswith("click.") for d in decorators):
                continue
            if node.name == "forward" and "staticmethod" in decorators:
                continue
            bad.append(
                f"{p.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {len(positional)} positional"
            )
    assert not bad, "\n".join(bad)


@pytest.fixture
def tiny_editor(tmp_path):
    """A test-only editor, registered from here: one class, one hparams YAML."""
    from lme_sim.editors import EDITORS, Editor, EditResult, register
    from lme_sim.editors.hparams import HParams

    yaml_file = tmp_path / "nudge.yaml"
    yaml_file.write_text("default: {step: 0.5}\nworld: {layers: [1]}\n")

    class NudgeHParams(HParams):
        step: float = 1.0

    @register
    class Nudge(Editor):
        method = "nudge"
        hparams_class = NudgeHParams

        @classmethod
        def hparams_file(cls):
            return yaml_file

        def edit(self, cases):
            return EditResult({})

    yield Nudge
    EDITORS.pop("nudge")


def test_a_new_editor_is_one_class_and_one_yaml(tiny_editor, tmp_path, small_world):
    from click.testing import CliRunner

    from lme_sim.cli import main
    from lme_sim.editors import make_editor

    scn = tmp_path / "s.yaml"
    scn.write_text(
        "name: s\nmodel: world:small\ndata: {n_edits: 10}\neditor: {method: nudge, hparams: {step: 2}}\n"
    )
    out = CliRunner().invoke(main, ["validate", str(scn)])
    assert out.exit_code == 0 and "ok (nudge on world:small" in out.output, out.output
    scn.write_text("name: s\nmodel: world:small\neditor: {method: nudge, hparams: {steps: 2}}\n")
    out = CliRunner().invoke(main, ["validate", str(scn)])
    assert out.exit_code == 2 and "field 'editor.hparams.steps'" in out.output
    editor = make_editor("nudge", LoadedModel("world:small", small_world[0], small_world[1]))
    assert editor.hp.step == 0.5 and editor.hp.layers == [1]
