"""The codebase's shape: data flows one way, `models/` is a leaf, no module grows past ~600 lines,
and the README's results summary agrees with the pages it links.

  python tests/test_architecture.py      # prints every project module's project imports

Reads every module's imports with `ast` (module-level and function-level alike), so an import
hidden inside a function counts as much as one at the top.
"""
import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("data_pipeline", "semantica_jax", "semantica_study")
# Which packages each package may import (data flows shards -> pairs -> train -> eval -> study).
ALLOWED = {
    "data_pipeline": {"data_pipeline"},
    "semantica_jax": {"data_pipeline", "semantica_jax"},
    "semantica_study": {"data_pipeline", "semantica_jax", "semantica_study"},
}


def _modules() -> dict[str, str]:
    mods = {}
    for package in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(REPO, package)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), REPO)[:-3].replace(os.sep, ".")
                    mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps.update(t for t in map(resolve, names) if t and t != mod)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_packages_import_only_upstream():
    bad = [(m, d) for m, deps in import_graph().items() for d in deps
           if d.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert bad == []


def test_models_import_only_their_own_layers():
    bad = [(m, d) for m, deps in import_graph().items() if m.startswith("semantica_jax.models")
           for d in deps if not d.startswith("semantica_jax.models")]
    assert bad == []


def test_no_module_holds_several_concepts_by_size():
    """A module past ~600 lines is a sign that it holds several concepts: split it by concept."""
    long = {m: n for m, path in _modules().items() if m.split(".")[0] in ("semantica_jax", "data_pipeline")
            for n in [sum(1 for _ in open(path))] if n > 650}
    assert long == {}


def test_readme_results_agree_with_the_pages_they_link():
    """Every figure of the README's results table appears on a page its row links to (the dated
    page is the source; the README only summarises it)."""
    import re

    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("\n## Results\n"):]
    section = section[:section.index("\n## ", 1)]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| what")]
    assert len(rows) >= 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        pages = re.findall(r"\]\(([^)#]+)", cells[-1])
        assert pages, row
        text = " ".join(open(os.path.join(REPO, p)).read() for p in pages)
        missing = [x for x in re.findall(r"\d+\.\d+", cells[1]) if x not in text]
        assert missing == [], f"{cells[0][:40]}...: {missing} not in {pages}"


if __name__ == "__main__":
    g = import_graph()
    for m in sorted(g):
        print(f"{m:40s} -> {', '.join(sorted(g[m])) or '-'}")
    print("cycles:", cycles(g) or "none")
    sys.exit(1 if cycles(g) else 0)
