"""The package's layering, checked by parsing the imports of every file (no import is run).

* the nvjax modules import each other without circles;
* no nvjax import inside a function, except in ``nvjax/cli.py`` (start-up time of ``--help``);
* no private name (``_name``) of one module is used by another module, an experiment or a test;
  a private *module* (``nvjax._io``) is imported only by nvjax itself and by its own test file;
* every module's docstring names the nvjax modules it imports.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "nvjax")
MODULES = sorted(f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py")


def _files():
    out = [(os.path.join(PKG, m + ".py"), "nvjax", m) for m in MODULES]
    for d in ("experiments", "tests"):
        for f in sorted(os.listdir(os.path.join(ROOT, d))):
            if f.endswith(".py"):
                out.append((os.path.join(ROOT, d, f), d, f[:-3]))
    return out


def _nvjax_imports(node, in_pkg):
    """[(module, name or None, alias)] for an import of nvjax code; module '' is the package."""
    out = []
    if isinstance(node, ast.ImportFrom):
        mod = node.module or ""
        if node.level == 1 and in_pkg:
            base = mod
        elif node.level == 0 and (mod == "nvjax" or mod.startswith("nvjax.")):
            base = mod[len("nvjax."):] if mod != "nvjax" else ""
        else:
            return out
        for a in node.names:
            if base:
                out.append((base.split(".")[0], a.name, a.asname or a.name))
            else:
                out.append((a.name, None, a.asname or a.name))
    elif isinstance(node, ast.Import):
        for a in node.names:
            if a.name == "nvjax" or a.name.startswith("nvjax."):
                parts = a.name.split(".")
                out.append((parts[1] if len(parts) > 1 else "", None, a.asname or parts[0]))
    return out


def _scan(path, kind):
    tree = ast.parse(open(path, encoding="utf-8").read())
    imports, local, private, aliases = set(), [], [], {}
    in_pkg = kind == "nvjax"
    for node in ast.walk(tree):
        for mod, name, alias in _nvjax_imports(node, in_pkg):
            if mod in MODULES or mod == "":
                imports.add(mod) if mod else None
            if name is None:
                aliases[alias] = mod
            else:
                if name.startswith("_") and not name.startswith("__"):
                    private.append((node.lineno, f"{mod}.{name}"))
                if mod == "" and name in MODULES:
                    imports.add(name)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)) and _nvjax_imports(sub, in_pkg):
                    local.append(sub.lineno)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            private.append((node.lineno, f"{aliases[node.value.id]}.{node.attr}"))
    return tree, imports, local, private


SCANS = {path: (kind, name) + _scan(path, kind) for path, kind, name in _files()}


def test_no_import_circles():
    graph = {name: imports - {name} for (kind, name, _, imports, _, _) in SCANS.values()
             if kind == "nvjax"}
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = 1
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack + [v])
        state[u] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import circles: {cycles}"


def test_no_function_local_nvjax_imports_outside_cli():
    bad = [f"{os.path.relpath(p, ROOT)}:{line}" for p, (kind, name, _, _, local, _) in SCANS.items()
           for line in local if not (kind == "nvjax" and name == "cli")]
    assert not bad, f"function-local nvjax imports: {bad}"


def test_no_private_name_crosses_a_module():
    bad = []
    for p, (kind, name, _, _, _, private) in SCANS.items():
        for line, what in private:
            mod, attr = what.split(".", 1)
            if kind == "nvjax" and mod == name:
                continue
            bad.append(f"{os.path.relpath(p, ROOT)}:{line} uses {what}")
    assert not bad, "private names used outside their module:\n" + "\n".join(bad)


def test_private_modules_only_inside_the_package_and_their_tests():
    bad = []
    for p, (kind, name, _, imports, _, _) in SCANS.items():
        for mod in imports:
            if mod.startswith("_") and kind != "nvjax" and name != f"test{mod}":
                bad.append(f"{os.path.relpath(p, ROOT)} imports nvjax.{mod}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", MODULES)
def test_module_docstring_names_its_imports(module):
    kind, name, tree, imports, _, _ = SCANS[os.path.join(PKG, module + ".py")]
    doc = ast.get_docstring(tree) or ""
    assert "import" in doc.lower(), f"nvjax/{module}.py: the docstring must say what the module imports"
    missing = [m for m in sorted(imports - {module}) if f"``{m}``" not in doc
               and f":mod:`nvjax.{m}`" not in doc]
    assert not missing, f"nvjax/{module}.py imports {missing} without naming them in its docstring"
