"""The engine's import graph: no circles (function-level imports included), no benchmark code, and the pool
protocol satisfied by both pools."""
import ast
import os
import re

import pytest

from ccfs_dist.data.pool import InMemoryPool, Pool, TensorPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "ccfs_dist")


def engine_imports(source):
    """{module this source imports} for every import statement anywhere in it (also inside functions):
    package-relative ones by their module name, `ccfs_dist.x` likewise, anything else by its top name."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:                               # from .x import y / from . import x, y
                found |= {module.split(".")[0]} if module else {a.name for a in node.names}
            elif module == "ccfs_dist":
                found |= {a.name for a in node.names}
            elif module.startswith("ccfs_dist."):
                found.add(module.split(".")[1])
            else:
                found.add("<top>" + module.split(".")[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                name = a.name.split(".")
                found.add(name[1] if name[0] == "ccfs_dist" and len(name) > 1 else "<top>" + name[0])
    return found


def package_graph():
    modules = {f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py")}
    graph = {}
    for m in sorted(modules):
        with open(os.path.join(PACKAGE, m + ".py")) as f:
            graph[m] = engine_imports(f.read())
    return modules, graph


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


def test_the_checker_sees_function_level_imports_and_circles():
    src = "import os\nfrom . import io, seeds\ndef f():\n    from .shard_reader import load_shards\n" \
          "    from ccfs_dist.data.memory import x\n    import ccfs_dist.data.pool\n"
    assert engine_imports(src) == {"<top>os", "io", "seeds", "shard_reader", "memory", "pool"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}, {"a", "b", "c"}) is None


def test_engine_has_no_import_circles():
    modules, graph = package_graph()
    in_memory = {"memory", "folders", "distilled"}
    shards = {"shard_tar", "shard_index", "shard_writer", "shard_reader", "shard_loader"}
    assert in_memory | shards | {"images", "pool", "sources"} <= modules
    cycle = find_cycle(graph, modules)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
    # the two sources share images.py and pool.py; the dispatch by data.source sits above both
    assert not any(graph[m] & (shards | {"sources"}) for m in in_memory)
    assert not any("sources" in graph[m] for m in shards)
    assert {"images", "pool"} <= graph["memory"] and {"images", "pool"} <= graph["shard_reader"]
    assert {"memory", "folders"} <= graph["shard_writer"]          # shards are written from any source
    # what a loader worker's fork server imports (shard_loader, shard_reader) leaves the writer and the
    # in-memory sources out
    assert not (graph["shard_loader"] | graph["shard_reader"]) & (in_memory | {"shard_writer"})
    assert not graph["shard_loader"] & shards


def test_engine_does_not_import_benchmarks_or_launch_scripts():
    modules, graph = package_graph()
    launch = {f[:-3] for f in os.listdir(os.path.join(ROOT, "launch")) if f.endswith(".py")}
    for m, imports in graph.items():
        assert not imports & {"<top>launch", "<top>bench"}, f"ccfs_dist/{m}.py imports a launch/ module"
        assert not (imports - modules) & launch, f"ccfs_dist/{m}.py imports {(imports - modules) & launch}"
    assert "bench" not in modules


def test_architecture_page_names_every_module():
    """docs/architecture.md's module table lists exactly the package's modules."""
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        listed = set(re.findall(r"^\| `(\w+)\.py` \|", f.read(), flags=re.M))
    modules, _ = package_graph()
    assert listed == modules - {"__init__"}


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
