"""docs/ARCHITECTURE.md against the code: every module is on the map and every module on the
map exists, imports flow launcher → cluster → trainer → data_pipeline (also those inside
functions), trainer/ and data_pipeline/ never import Ray (but for trainer/patches.py's
functions), the modules the CLI validates with are torch-free at import, and README.md
points at the document. Static (ast), no imports of the project: well under a second."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"
# In import order: a package may import those after it, never one before it.
PACKAGES = ("launcher", "cluster", "trainer", "data_pipeline")
NAMED = re.compile(r"(?<![\w/.-])((?:" + "|".join(PACKAGES) + r")/[\w/]*\.py)\b")
# What each package must not import (top-level module names).
FORBIDDEN = {
    "launcher": set(),
    "cluster": {"launcher"},
    "trainer": {"launcher", "cluster", "ray"},
    "data_pipeline": {"launcher", "cluster", "trainer", "ray"},
}
RAY_INSIDE_FUNCTIONS = "trainer/patches.py"  # the one trainer module whose functions may import Ray
# Loaded and validated by the CLI before anything heavy: no torch (nor DeepSpeed, nor Ray) at import.
TORCH_FREE = (
    "trainer/config.py",
    "trainer/hf_names.py",
    "trainer/redaction.py",
    "trainer/model_config.py",
    "trainer/run_folder.py",
    "launcher/cli.py",
    "launcher/config.py",
    "launcher/job.py",
    "launcher/supervise.py",
)
HEAVY = {"torch", "deepspeed", "ray"}
FIX_MAP = "(section 2 of docs/ARCHITECTURE.md; update it in the same commit as the code)"


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def does_something(path: Path) -> bool:
    """False for an empty __init__.py (nothing but perhaps a docstring)."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def modules() -> list[str]:
    """Every module of the four packages, as `package/module.py`, empty __init__.py files left out."""
    found = [
        rel(p)
        for package in PACKAGES
        for p in sorted((REPO / package).rglob("*.py"))
        if "__pycache__" not in p.parts and (p.name != "__init__.py" or does_something(p))
    ]
    assert found, f"no modules found under {', '.join(PACKAGES)} in {REPO}"
    return found


def named_in_doc() -> set[str]:
    assert DOC.is_file(), "docs/ARCHITECTURE.md is missing: it is the team's design document, restore it"
    return set(NAMED.findall(DOC.read_text()))


def test_every_module_is_on_the_map():
    named = named_in_doc()
    missing = [m for m in modules() if m not in named]
    assert not missing, "\n".join(
        f"{m} is not named in docs/ARCHITECTURE.md: add a line `{m}` — what it owns {FIX_MAP}" for m in missing
    )


def test_every_module_on_the_map_exists():
    stale = sorted(n for n in named_in_doc() if not (REPO / n).is_file())
    assert not stale, "\n".join(
        f"docs/ARCHITECTURE.md names {n}, which does not exist: remove its line or give its new name {FIX_MAP}"
        for n in stale
    )


def imports(tree: ast.AST, package: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in `tree`, nested ones too,
    and importlib.import_module / __import__ of a constant name. Relative imports resolve to
    `package`."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((package if node.level else node.module or "", node.lineno, in_function))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, node.lineno, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def direction_problems(path: str, source: str) -> list[str]:
    """What in `source` (the module `path`, e.g. 'trainer/loop.py') breaks the import rules."""
    package = path.split("/")[0]
    problems = []
    for name, line, in_function in imports(ast.parse(source), package):
        top = name.split(".")[0]
        if top not in FORBIDDEN[package]:
            continue
        if top == "ray" and path == RAY_INSIDE_FUNCTIONS and in_function:
            continue
        where = f"{path}:{line} imports {name}"
        if top == "ray" and package == "trainer":
            problems.append(
                f"{where}: trainer/ never imports Ray. Put Ray code in cluster/ (hand trainer/ what it needs as "
                "arguments); a use of Ray's private internals goes inside a function of trainer/patches.py, "
                "called only from cluster/"
            )
        elif top == "ray":
            problems.append(
                f"{where}: data_pipeline/ never imports Ray. Take Ray work as an argument (as prepare's "
                "map_fn, which cluster/local_ray.py makes)"
            )
        else:
            problems.append(
                f"{where}: imports flow launcher → cluster → trainer → data_pipeline, so {package}/ may not import "
                f"{top}/. Move the code into {package}/ or a package after it, or pass it in as an argument "
                "(docs/ARCHITECTURE.md, section 2)"
            )
    return problems


def test_imports_flow_one_way():
    problems = [p for m in modules() for p in direction_problems(m, (REPO / m).read_text())]
    assert not problems, "\n".join(problems)


def test_the_import_check_sees_nested_and_dynamic_imports():
    nested = "def f():\n    from launcher.cli import main\n    import ray\n"
    assert len(direction_problems("data_pipeline/x.py", nested)) == 2
    assert len(direction_problems("trainer/x.py", "import importlib\nimportlib.import_module('ray.train')\n")) == 1
    assert direction_problems("trainer/patches.py", "def f():\n    import ray\n") == []
    assert len(direction_problems("trainer/patches.py", "import ray\n")) == 1
    assert direction_problems("cluster/x.py", "import ray\nfrom trainer import patches\n") == []


def module_file(name: str) -> Path | None:
    """The file of a project module (a package's __init__.py for a package), or None."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if name.split(".")[0] in PACKAGES and candidate.is_file():
            return candidate
    return None


def import_time_imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) of the imports that run when the module is imported: not
    those inside functions, nor under `if TYPE_CHECKING:`."""
    found: list[tuple[str, list[str]]] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((alias.name, []) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                found.append((node.module or "", [alias.name for alias in node.names]))
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef, ast.For, ast.While)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, field, []))
            elif isinstance(node, ast.ExceptHandler):
                visit(node.body)

    visit(tree.body)
    return found


def heavy_chain(start: str) -> list[str] | None:
    """The chain of imports by which importing the module `start` ('trainer/config.py') loads torch,
    DeepSpeed or Ray, or None."""
    seen: set[Path] = set()

    def walk(path: Path, chain: list[str]) -> list[str] | None:
        if path in seen:
            return None
        seen.add(path)
        for name, names in import_time_imports(ast.parse(path.read_text())):
            if name.split(".")[0] in HEAVY:
                return [*chain, name]
            parts = name.split(".")
            # importing a.b.c runs a/__init__.py, a/b/..., and `from a import b` may load a/b.py
            targets = [".".join(parts[: i + 1]) for i in range(len(parts))] + [f"{name}.{n}" for n in names]
            for target in targets:
                file = module_file(target)
                if file is not None and (found := walk(file, [*chain, rel(file)])) is not None:
                    return found
        return None

    return walk(REPO / start, [start])


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_modules_the_cli_validates_with_are_torch_free_at_import(module):
    chain = heavy_chain(module)
    assert chain is None, (
        f"importing {module} loads {chain[-1]} ({' → '.join(chain)}): the CLI loads and validates jobs with it, "
        "and must stay fast. Import that inside the function that needs it (docs/ARCHITECTURE.md, section 2)"
    )


def test_readme_links_the_architecture_document():
    assert "docs/ARCHITECTURE.md" in (REPO / "README.md").read_text(), (
        "README.md does not mention docs/ARCHITECTURE.md: link it where the README describes the layout"
    )


def project_imports(path: str, source: str) -> set[str]:
    """The project modules (dotted: 'trainer.export') that the module `path` imports anywhere in
    `source`, inside functions too: `from trainer import hf` is trainer.hf, `from trainer.export
    import hf_name` is trainer.export, `from data_pipeline import Loader` is the package."""
    name = path[:-3].replace("/", ".").removesuffix(".__init__")
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            targets = [f"{base}.{a.name}" if module_file(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if module_file(t) is not None and t != name)
    return found


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph` (module → the modules it imports): each strongly connected
    component of more than one module, sorted (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return sorted(circles)


def test_no_import_circles_counting_imports_inside_functions():
    """A lazy import inside a function still makes the importing room depend on the imported one:
    a circle means two modules that cannot be understood, tested or moved apart."""
    graph = {m[:-3].replace("/", ".").removesuffix(".__init__"): project_imports(m, (REPO / m).read_text())
             for m in modules()}  # fmt: skip
    circles = import_circles(graph)
    assert not circles, "\n".join(
        f"import circle: {' ↔ '.join(c)}. Move what they share into a module below both (one both import, "
        "importing neither), so imports go one way (docs/ARCHITECTURE.md, section 2)"
        for c in circles
    )


def test_the_circle_check_sees_a_circle_through_a_function_level_import():
    a = project_imports("trainer/hf.py", "def f():\n    from trainer.export import hf_name\n")
    b = project_imports("trainer/export.py", "from trainer import hf\nfrom . import checkpoint\n")
    assert a == {"trainer.export"} and b == {"trainer.hf", "trainer.checkpoint"}
    assert import_circles({"trainer.hf": a, "trainer.export": b}) == [["trainer.export", "trainer.hf"]]
    assert import_circles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
    assert import_circles({"x": {"y"}, "y": set()}) == []


LONGEST = 500  # lines: a file longer than this holds more than one idea; split it along them


def test_no_source_file_is_over_500_lines():
    long = [(m, n) for m in modules() if (n := len((REPO / m).read_text().splitlines())) > LONGEST]
    assert not long, "\n".join(
        f"{m} is {n} lines (at most {LONGEST}): split it along its ideas into modules named on the map "
        "(docs/ARCHITECTURE.md, section 2)"
        for m, n in long
    )
