"""The engine's import graph against docs/architecture.md: no circles (function-level imports included), the
sub-packages' import directions, every module on the page, none over 500 lines, no benchmark code in the engine,
no `sys.path` edits outside the tests' configuration and the two entry scripts; and the pool protocol satisfied
by both pools."""
import ast
import os
import re

import pytest

from ccfs_dist.data.pool import InMemoryPool, Pool, TensorPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "ccfs_dist")
MAX_LINES = 500
PLUMBING = {f"ccfs_dist.runtime.{m}" for m in ("dist", "relaunch", "io", "seeds", "progress")}
IN_MEMORY = {"ccfs_dist.data.memory", "ccfs_dist.data.folders", "ccfs_dist.data.distilled"}

# (importers, modules they must not import, why); a name stands for itself and everything under it
RULES = [
    (PLUMBING, {"ccfs_dist.data", "ccfs_dist.training", "ccfs_dist.ccfs", "ccfs_dist.runtime.plan",
                "ccfs_dist.runtime.jobs", "ccfs_dist.runtime.rundir", "ccfs_dist.report", "ccfs_dist.cli"},
     "the runtime's plumbing (processes, ranks, atomic I/O, seeds, progress) knows nothing of what it runs"),
    ({"ccfs_dist.data"}, {"ccfs_dist.training", "ccfs_dist.ccfs", "ccfs_dist.runtime.plan", "ccfs_dist.runtime.jobs",
                          "ccfs_dist.runtime.rundir", "ccfs_dist.report", "ccfs_dist.cli"},
     "data is read and held without knowing what trains on it or why"),
    ({"ccfs_dist.data.shards"}, {"ccfs_dist.data.sources"},
     "the choice by data.source (sources) sits above both sources"),
    (IN_MEMORY, {"ccfs_dist.data.shards", "ccfs_dist.data.sources"},
     "the in-memory sources and the shards share only images and pool; the dispatch sits above both"),
    ({"ccfs_dist.data.shards.loader", "ccfs_dist.data.shards.reader"}, IN_MEMORY | {"ccfs_dist.data.shards.writer"},
     "what a loader worker's fork server imports leaves the writer and the in-memory sources out"),
    ({"ccfs_dist.data.shards.loader"}, {f"ccfs_dist.data.shards.{m}" for m in ("tar", "index", "writer", "reader")},
     "the loader's workers import no other shard module"),
    ({"ccfs_dist.ccfs.selection", "ccfs_dist.ccfs.difficulty"},
     {"ccfs_dist.data", "ccfs_dist.training", "ccfs_dist.runtime.dist", "ccfs_dist.runtime.plan",
      "ccfs_dist.runtime.jobs", "ccfs_dist.runtime.rundir", "ccfs_dist.ccfs.curriculum"},
     "the selection rules and the difficulty directions are pure functions of arrays (and score files)"),
    ({"ccfs_dist.training"}, {"ccfs_dist.ccfs.curriculum", "ccfs_dist.ccfs.selection", "ccfs_dist.runtime.jobs",
                              "ccfs_dist.report", "ccfs_dist.cli"},
     "a training is what the curriculum and the jobs run; it never calls back up"),
    ({"ccfs_dist.runtime", "ccfs_dist.training", "ccfs_dist.data", "ccfs_dist.report", "ccfs_dist.config",
      "ccfs_dist.errors"}, {"ccfs_dist.ccfs.curriculum", "ccfs_dist.cli"},
     "only the command line starts the curriculum"),
    ({"ccfs_dist"}, {"ccfs_dist.bench"}, "the engine never imports its benchmarks"),
]

# (module, engine modules it must import): the two sources share images.py and pool.py; shards are
# written from any in-memory source
REQUIRED = [
    ("ccfs_dist.data.memory", {"ccfs_dist.data.images", "ccfs_dist.data.pool"}),
    ("ccfs_dist.data.shards.reader", {"ccfs_dist.data.images", "ccfs_dist.data.pool"}),
    ("ccfs_dist.data.shards.writer", {"ccfs_dist.data.memory", "ccfs_dist.data.folders"}),
    ("ccfs_dist.data.sources", {"ccfs_dist.data.pool"}),
]


def under(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def module_files():
    """{dotted module name: path} of every module in the package (a package by its __init__.py)."""
    found = {}
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
                found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def engine_imports(source, module, modules, is_package=False):
    """{module} this source imports anywhere in it (also inside functions): `ccfs_dist...` modules by their
    dotted name (`from p import x` counts x when p.x is a module, else p), relative ones resolved against the
    file's package; anything else as "<top>" + its top name."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base == "ccfs_dist" or base.startswith("ccfs_dist."):
                for a in node.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
            else:
                found.add("<top>" + base.split(".")[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                found.add(a.name if a.name.startswith("ccfs_dist") else "<top>" + a.name.split(".")[0])
    return found


def package_graph():
    """{module: the engine modules and outside tops it imports}."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        with open(path) as f:
            graph[name] = engine_imports(f.read(), name, files, is_package=path.endswith("__init__.py"))
    return files, graph


def find_cycle(graph, modules):
    """One import circle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m] & modules):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(modules):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_the_checker_sees_function_level_and_relative_imports_and_circles():
    modules = {"ccfs_dist.data", "ccfs_dist.data.pool", "ccfs_dist.runtime", "ccfs_dist.runtime.io",
               "ccfs_dist.runtime.seeds"}
    src = "import os\nfrom ccfs_dist.runtime import io, seeds\ndef f():\n    from .shards import load_shards\n" \
          "    from ccfs_dist.data import x\n    import ccfs_dist.data.pool\n    from .. import errors\n"
    assert engine_imports(src, "ccfs_dist.data.sources", modules) == {
        "<top>os", "ccfs_dist.runtime.io", "ccfs_dist.runtime.seeds", "ccfs_dist.data.shards", "ccfs_dist.data",
        "ccfs_dist.data.pool", "ccfs_dist"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}, {"a", "b", "c"}) is None
    assert under("ccfs_dist.data.shards.tar", {"ccfs_dist.data"}) and not under("ccfs_dist.database", {"ccfs_dist.data"})


def test_engine_has_no_import_circles():
    files, graph = package_graph()
    cycle = find_cycle(graph, set(files))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("importers, forbidden, why", RULES, ids=[r[2][:40] for r in RULES])
def test_sub_packages_import_in_one_direction(importers, forbidden, why):
    files, graph = package_graph()
    selected = [m for m in files if under(m, importers) or m + ".__init__" in importers]   # p.__init__: p alone
    assert selected, f"the rule names no module: {importers}"
    wrong = sorted(f"{m} imports {n}" for m in selected if not under(m, forbidden)    # inside: its own business
                   for n in graph[m] if under(n, forbidden))
    assert not wrong, f"{why}: " + "; ".join(wrong)


@pytest.mark.parametrize("module, required", REQUIRED, ids=[r[0] for r in REQUIRED])
def test_the_sources_share_images_and_pool(module, required):
    files, graph = package_graph()
    assert module in files and required <= graph[module], f"{module} no longer imports {required - graph.get(module, set())}"


def test_engine_does_not_import_launch_scripts():
    launch = {"<top>" + f[:-3] for f in os.listdir(os.path.join(ROOT, "launch")) if f.endswith(".py")}
    for m, imports in package_graph()[1].items():
        assert not imports & (launch | {"<top>launch", "<top>bench"}), f"{m} imports a launch/ script"


def test_no_module_over_500_lines():
    paths = [p for p in module_files().values()]
    paths += [os.path.join(ROOT, "launch", f) for f in os.listdir(os.path.join(ROOT, "launch")) if f.endswith(".py")]
    long = {}
    for path in paths:
        with open(path) as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long[os.path.relpath(path, ROOT)] = n
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_no_sys_path_edits_but_in_the_test_configuration_and_the_entry_scripts():
    allowed = {"tests/conftest.py", "launch/ccfs.py", "launch/scores.py"}
    edit = re.compile(r"\bsys\.path(\s*(\[[^]]*\])?\s*[+]?=|\.(insert|append|extend)\b)")
    found = []
    for folder in ("ccfs_dist", "launch", "tests"):
        for where, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in files:
                rel = os.path.relpath(os.path.join(where, f), ROOT)
                if f.endswith(".py") and rel not in allowed:
                    with open(os.path.join(where, f)) as src:
                        found += [f"{rel}:{i}" for i, line in enumerate(src, 1) if edit.search(line)]
    assert not found, "sys.path edited in " + ", ".join(found)


def architecture_table():
    """{path under ccfs_dist/: sub-package heading} from docs/architecture.md's module tables."""
    listed, section = {}, None
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        for line in f:
            heading = re.match(r"^### `ccfs_dist/([\w/]*)`", line)
            if heading:
                section = heading[1].rstrip("/")
            row = re.match(r"^\| `([\w/]+\.py)` \|", line)
            if row:
                listed[row[1]] = section
    return listed


def test_architecture_page_maps_every_module():
    """docs/architecture.md lists every module with code, under the heading of its sub-package; a package's
    __init__.py that holds only its docstring is its heading."""
    listed = architecture_table()
    expected = {}
    for name, path in module_files().items():
        with open(path) as f:
            body = ast.parse(f.read()).body
        docstring_only = len(body) <= 1 and all(isinstance(n, ast.Expr) for n in body)
        if not (path.endswith("__init__.py") and docstring_only):
            rel = os.path.relpath(path, PACKAGE).replace(os.sep, "/")
            expected[rel] = os.path.dirname(rel)
    assert set(listed) == set(expected), f"missing: {set(expected) - set(listed)}; gone: {set(listed) - set(expected)}"
    wrong = {rel: section for rel, section in listed.items() if section != expected[rel]}
    assert not wrong, f"listed under another sub-package's heading: {wrong}"


def test_both_pools_satisfy_the_protocol(tmp_path):
    import torch

    from ccfs_dist.data.shards.reader import ShardPool
    from ccfs_dist.data.shards.writer import write_shards
    split = TensorPool(torch.zeros(6, 1, 8, 8, dtype=torch.uint8), torch.arange(6) % 2)
    assert isinstance(split, Pool) and isinstance(split, InMemoryPool) and split.in_memory
    write_shards({"source": "digits"}, tmp_path, split="test", per_shard=200, workers=1, log=lambda *a: None)
    streamed = ShardPool(tmp_path / "test.json")
    assert isinstance(streamed, Pool) and not isinstance(streamed, InMemoryPool) and not streamed.in_memory
    # the same fetch signature: keyword accelerator and batch_size on both
    for pool in (split, streamed):
        x, y = pool.fetch([3, 1], accelerator=None, batch_size=2)
        assert x.shape == (2,) + pool.shape and torch.equal(y, pool.labels[[3, 1]])


@pytest.mark.parametrize("name", ["fetch", "batches"])
def test_pool_methods_take_the_same_arguments(name):
    import inspect

    from ccfs_dist.data.shards.reader import ShardPool
    declared = list(inspect.signature(getattr(Pool, name)).parameters)
    for cls in (TensorPool, ShardPool):
        assert list(inspect.signature(getattr(cls, name)).parameters) == declared, cls.__name__
