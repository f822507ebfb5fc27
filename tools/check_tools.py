#!/usr/bin/env python3
"""Checks, without importing them, that the scripts in tools/ still fit together: each name one script imports from
another, or reads from one it imports whole, is defined there at top level, and each call of such a function passes
arguments its signature takes. CI runs it (.ci/run) because no test runs these scripts, and they need torch, which
CI does not install: a helper's signature changed once and left three benchmark scripts failing before they measured
anything.

    python3 tools/check_tools.py [FOLDER]   # each problem as FILE:LINE: WHAT; exit status 1 if any
"""

import ast
import os
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))


def top_level_names(tree):
    """{name: the FunctionDef, or None for any other top-level binding} of a module."""
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = node
        elif isinstance(node, ast.ClassDef):
            names[node.name] = None
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id] = None
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = None
    return names


def call_problem(function, call):
    """Why `call` does not fit `function`'s signature, or None."""
    args = function.args
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None  # *xs or **kw at the call: its count is not known here
    positional = args.posonlyargs + args.args
    given = len(call.args)
    if given > len(positional) and args.vararg is None:
        return f"{function.name}() takes at most {len(positional)} positional arguments, given {given}"
    keywords = {k.arg for k in call.keywords}
    known = {a.arg for a in positional + args.kwonlyargs}
    unknown = sorted(keywords - known) if args.kwarg is None else []
    if unknown:
        return f"{function.name}() has no parameter {', '.join(unknown)}"
    required = positional[: len(positional) - len(args.defaults)]
    missing = [a.arg for a in required[given:] if a.arg not in keywords]
    missing += [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None and a.arg not in keywords]
    if missing:
        return f"{function.name}() is missing {', '.join(missing)}"
    return None


def problems(folder):
    """(file, line, what) for every import or call between the folder's scripts that does not fit."""
    trees = {}
    for entry in sorted(os.listdir(folder)):
        if entry.endswith(".py"):
            with open(os.path.join(folder, entry)) as f:
                trees[entry[:-3]] = ast.parse(f.read(), filename=entry)
    defined = {module: top_level_names(tree) for module, tree in trees.items()}
    found = []
    for module, tree in trees.items():
        imported = {}  # local name -> the FunctionDef in the sibling script
        modules = {}  # local name -> a sibling script imported whole
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update({a.asname or a.name: a.name for a in node.names if a.name in trees})
            if isinstance(node, ast.ImportFrom) and node.module in trees and node.level == 0:
                for alias in node.names:
                    if alias.name not in defined[node.module]:
                        found.append((module, node.lineno, f"{node.module}.py defines no {alias.name}"))
                    elif defined[node.module][alias.name] is not None:
                        imported[alias.asname or alias.name] = defined[node.module][alias.name]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                sibling = modules[node.value.id]
                if node.attr not in defined[sibling]:
                    found.append((module, node.lineno, f"{sibling}.py defines no {node.attr}"))
            if not isinstance(node, ast.Call):
                continue
            function = None
            if isinstance(node.func, ast.Name):
                function = imported.get(node.func.id)
            elif isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
                sibling = modules.get(node.func.value.id)
                function = defined[sibling].get(node.func.attr) if sibling else None
            why = function and call_problem(function, node)
            if why:
                found.append((module, node.lineno, why))
    return found


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else TOOLS
    found = problems(folder)
    for module, line, what in found:
        print(f"{os.path.join(folder, module)}.py:{line}: {what}")
    print(f"tools: {len(found)} problem(s) in the imports between scripts" if found else "tools: scripts fit together")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
