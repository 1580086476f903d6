"""The repository's shape, from the source alone (ast, nothing imported): no import cycles among the project's
modules, nobody imports a script, the top level holds the scripts plus model.py and configurator.py, model.py
stays pure math, no library module is named like a script, imports in
chat_gpt2/ follow the module map of chat_gpt2/__init__.py, and no function is longer than MAX_FUNCTION_LINES.

Every import counts, function-level ones included (a lazy import still ties the modules together). The project's
files are every .py under the repository but tests/, virtual environments and hidden folders: the root scripts,
model.py, configurator.py, chat_gpt2/, config/, data/demo/generate.py, tools/."""
import ast
import os
import re

import pytest

from helpers import REPO

SCRIPTS = ("prepare", "train", "sample", "eval", "export", "bench", "serve", "classify")
TOP_LEVEL = ("model", "configurator")  # library modules at the top, the project's face; the rest is in PACKAGE
PACKAGE = "chat_gpt2"
MAX_FUNCTION_LINES = 60  # from the `def` line to the function's last line
# model.py is the network alone: no downloads, file formats, temporary files or operating-system reads
MODEL_FORBIDDEN = ("huggingface_hub", "safetensors", "tempfile", "shutil", "os", "pathlib", "glob", "io",
                   "subprocess", "ctypes")
SKIP_DIRS = {"tests", "__pycache__", "node_modules", "venv", "env"}


def project_files(root=REPO):
    """{module name: path}: `train`, `model`, `chat_gpt2.engine`, `chat_gpt2` (its __init__), `data.demo.generate`, ..."""
    modules = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in files:
            if name.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = os.path.join(folder, name)
    return modules


def is_package(path):
    return os.path.basename(path) == "__init__.py"


def imports(tree, module, package, known):
    """[(imported project module or raw top-level name, line, inside a function)] of a parsed module, every import
    statement included (module level, in functions, in classes), plus importlib.import_module("x") / __import__("x")
    with a literal name. Names that are not project modules are kept as their top-level name (e.g. `torch`)."""
    found = []

    def resolve(name):
        """The project module name refers to (the longest known prefix), else its top-level name."""
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in known:
                return ".".join(parts[:n])
        return parts[0]

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((resolve(a.name), child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                    base = ".".join(base + ([child.module] if child.module else []))
                else:
                    base = child.module
                for a in child.names:
                    target = f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                    found.append((resolve(target), child.lineno, in_function))
            elif (isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)
                  and (isinstance(child.func, ast.Name) and child.func.id == "__import__"
                       or isinstance(child.func, ast.Attribute) and child.func.attr == "import_module")):
                found.append((resolve(child.args[0].value), child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def package_of(module, path):
    return module if is_package(path) else module.rpartition(".")[0]


def import_graph(modules):
    """{module: [(imported project module, line, inside a function)]} over the project's own modules only."""
    graph = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        graph[module] = [(t, line, fn) for t, line, fn in imports(tree, module, package_of(module, path), modules)
                         if t in modules and t != module]
    return graph


def find_cycles(graph):
    """Every strongly connected group of more than one module (Tarjan), as a sorted list of module names."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or any(t == v for t, _, _ in graph.get(v, ())):
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(groups)


def describe(graph, group):
    """The edges inside a cycle, `a:12 -> b (in a function)`, for the failure message."""
    return [f"{a}:{line} -> {b}{' (in a function)' if fn else ''}" for a in group
            for b, line, fn in graph[a] if b in group]


def module_map():
    """The library's modules (`model`, `chat_gpt2.engine`, ...) in the order chat_gpt2/__init__.py's docstring
    lists them."""
    with open(os.path.join(REPO, PACKAGE, "__init__.py"), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    names = [m.group(1) for m in re.finditer(r"^    (\w+)\s{2,}\S", doc, re.M)]
    return [name if name in TOP_LEVEL else f"{PACKAGE}.{name}" for name in names]


def long_functions(limit=MAX_FUNCTION_LINES):
    """['path:line name (N lines)'] of the functions in chat_gpt2/ and the root scripts longer than limit."""
    found = []
    for module, path in sorted(project_files().items()):
        if "." in module and not module.startswith(f"{PACKAGE}."):
            continue  # config/, data/, tools/: not the library or a script
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name} ({length} lines)")
    return found


@pytest.fixture(scope="module")
def modules():
    found = project_files()
    assert {PACKAGE, "model", "configurator", "train", "sample", "prepare"} <= set(found)  # the walk sees the project
    return found


@pytest.fixture(scope="module")
def graph(modules):
    return import_graph(modules)


# ---------------------------------------------------------------------------------------------------------------
# The checks


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join("  " + "; ".join(describe(graph, c)) for c in cycles)


def test_no_module_imports_a_script(modules):
    offenders = []
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for target, line, _ in imports(tree, module, package_of(module, path), modules):
            if target in SCRIPTS:  # a root script, or one that is not written yet
                offenders.append(f"{os.path.relpath(path, REPO)}:{line} imports {target}")
    assert not offenders, "scripts are entry points, not libraries (move the shared code into chat_gpt2/):\n" \
        + "\n".join(offenders)


def test_top_level_holds_the_scripts_model_and_configurator():
    names = {n[:-3] for n in os.listdir(REPO) if n.endswith(".py")}
    assert names == set(SCRIPTS) | set(TOP_LEVEL), f"top-level modules: {sorted(names)}"


def test_model_is_pure_math(modules):
    path = modules["model"]
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source, path)
    found = {t for t, _, _ in imports(tree, "model", "", modules)}
    assert not found & set(MODEL_FORBIDDEN), f"model.py imports {sorted(found & set(MODEL_FORBIDDEN))}"
    opens = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "open"]
    assert not opens, f"model.py opens files (lines {opens})"
    assert "/proc" not in source and "/sys/" not in source


def test_no_library_module_is_named_like_a_script():
    folder = os.path.join(REPO, PACKAGE)
    names = {n[:-3] if n.endswith(".py") else n for n in os.listdir(folder)}
    assert not names & set(SCRIPTS), f"{PACKAGE}/ holds {sorted(names & set(SCRIPTS))}: a script's name"


def test_library_imports_follow_the_module_map(graph):
    order = module_map()
    assert len(order) >= 15 and "model" in order and f"{PACKAGE}.engine" in order  # the map was read
    rank = {name: i for i, name in enumerate(order)}
    problems = [f"{m} is missing from the map in {PACKAGE}/__init__.py" for m in sorted(graph)
                if (m.startswith(f"{PACKAGE}.") or m in TOP_LEVEL) and m not in rank]
    problems += [f"{m} is in the map but not in the repository" for m in order if m not in graph]
    problems += [f"{a}:{line} -> {b} (listed below it)" for a in sorted(rank) for b, line, _ in graph.get(a, ())
                 if b in rank and rank[b] >= rank[a]]
    assert not problems, "\n".join(problems)


def test_no_function_longer_than_the_limit():
    assert not long_functions(), f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long_functions())


# ---------------------------------------------------------------------------------------------------------------
# The checker itself catches what it is meant to (on made-up sources)


def fake_project(tmp_path, files):
    for name, source in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return project_files(str(tmp_path))


def test_checker_sees_a_cycle_through_a_function_level_import(tmp_path):
    modules = fake_project(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import thing\n",
        "pkg/b.py": "import os\n\ndef thing():\n    from pkg import c\n    return c\n",
        "pkg/c.py": "def f():\n    from . import a\n",
        "pkg/d.py": "from . import b\n",
        "tool.py": "import pkg.d\nimport importlib\nimportlib.import_module('train')\n",
        "train.py": "",
    })
    graph = import_graph(modules)
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert ("pkg.c", 4, True) in graph["pkg.b"] and ("pkg.a", 2, True) in graph["pkg.c"]
    assert "pkg.c:2 -> pkg.a (in a function)" in describe(graph, ["pkg.a", "pkg.b", "pkg.c"])
    assert {t for t, _, _ in graph["tool"]} == {"pkg.d", "train"}  # import_module('train') counts too
    assert ("os", 1, False) in imports(ast.parse("import os.path\n"), "x", "", modules)


def test_checker_measures_functions_from_def_to_end():
    source = "def f():\n" + "    x = 1\n" * 59 + "\n\ndef g():\n    pass\n"
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(ast.parse(source))
               if isinstance(n, ast.FunctionDef)}
    assert lengths == {"f": 60, "g": 2}


# ---------------------------------------------------------------------------------------------------------------
# The docs


def test_architecture_table_lists_the_module_map_and_the_scripts():
    """docs/architecture.md's module table names exactly the modules of chat_gpt2/__init__.py's map and the
    scripts (its rows: | `name.py` | ... |)."""
    with open(os.path.join(REPO, "docs", "architecture.md"), encoding="utf-8") as f:
        table = f.read().split("## The modules", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `(\w+)\.py` \|", table, re.M)
    expected = [name.rsplit(".", 1)[-1] for name in module_map()] + list(SCRIPTS)
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({n for n in listed if listed.count(n) > 1})}"
    assert set(listed) == set(expected), (f"missing: {sorted(set(expected) - set(listed))}, "
                                          f"not in the map: {sorted(set(listed) - set(expected))}")
