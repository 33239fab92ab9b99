#!/usr/bin/env python3
"""Write the API the InstructX2X Slicer module relies on, at each supported Slicer release, as JSON.

Desktop 3D Slicer cannot be installed on a build machine, so the module is checked against
manifests read from Slicer's own sources (``InstructX2X/Testing/Python/test_slicer_api_conformance.py``). For each
supported release tag this script reads, with ``git show``, from a clone of Slicer/Slicer:

- the functions, classes and parameters of the Python modules the panel calls
  (``slicer.util``, ``slicer.i18n``, ``slicer.packaging`` where it exists,
  ``slicer.ScriptedLoadableModule``, ``DICOMLib.DICOMUtils``);
- the names ``slicer.parameterNodeWrapper`` exports, the methods it adds to a wrapped class,
  and its GUI connectors (which widget classes bind to which Python types);
- the Python hooks the C++ scripted-module classes call (``setup``, ``enter``, ``exit`` ...);
- the Qt properties, signals, public slots and ``Q_INVOKABLE`` methods of each Slicer or CTK
  widget class named in the module's ``.ui`` file and of their Slicer/CTK bases, read from
  the headers (CTK at the commit the release's ``SuperBuild/External_CTK.cmake`` pins);

and, from a clone of fepegar/SlicerPyTorch, the PyTorchUtils logic class. Plain Qt classes are
not in these repositories: ``InstructX2X/Testing/Python/slicer_api/qt-5.15.json`` lists them by hand.

Usage::

    python scripts/slicer_api_manifest.py --slicer SLICER_GIT_DIR --ctk CTK_GIT_DIR \
        --pytorch SLICERPYTORCH_GIT_DIR [--output InstructX2X/Testing/Python/slicer_api]

Each argument is a git directory (a bare clone works). The output is one
``slicer-<tag>.json`` per supported tag; the files are committed and the test reads them.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "InstructX2X" / "Resources" / "UI" / "InstructX2X.ui"
# The releases the module supports: each must pass the conformance test.
SUPPORTED_TAGS = ("v5.6.2", "v5.8.1", "v5.10.0", "v5.12.3")
PYTHON_MODULES = {
    "slicer.util": "Base/Python/slicer/util.py",
    "slicer.i18n": "Base/Python/slicer/i18n.py",
    "slicer.packaging": "Base/Python/slicer/packaging.py",
    "slicer.ScriptedLoadableModule": "Base/Python/slicer/ScriptedLoadableModule.py",
    "DICOMLib.DICOMUtils": "Modules/Scripted/DICOMLib/DICOMUtils.py",
}
WRAPPER_DIR = "Base/Python/slicer/parameterNodeWrapper"
HOOK_SOURCES = {
    "ScriptedLoadableModule": "Base/QTGUI/qSlicerScriptedLoadableModule.cxx",
    "ScriptedLoadableModuleWidget": "Base/QTGUI/qSlicerScriptedLoadableModuleWidget.cxx",
}
PYTORCH_UTILS = "PyTorchUtils/PyTorchUtils.py"
CTK_PIN = "SuperBuild/External_CTK.cmake"
# C++ words that end a parameter's type, so they are never taken for its name
TYPE_WORDS = {"int", "char", "short", "long", "double", "float", "bool", "unsigned", "signed", "void"}


class ManifestError(RuntimeError):
    """A source the manifest needs is missing or cannot be read."""


# -- git ---------------------------------------------------------------------------------------


def git(git_dir: Path, *args: str) -> str:
    """Run git on ``git_dir`` and return its standard output."""
    completed = subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True, text=True)
    if completed.returncode != 0:
        raise ManifestError(f"git {' '.join(args)} in {git_dir}: {completed.stderr.strip()}")
    return completed.stdout


def show(git_dir: Path, revision: str, path: str) -> str | None:
    """The file at ``revision``, or None where it does not exist."""
    completed = subprocess.run(
        ["git", "--git-dir", str(git_dir), "show", f"{revision}:{path}"], capture_output=True, text=True
    )
    return completed.stdout if completed.returncode == 0 else None


def commit_of(git_dir: Path, revision: str) -> str:
    completed = subprocess.run(
        ["git", "--git-dir", str(git_dir), "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise ManifestError(f"{revision} is no tag or commit of {git_dir}")
    return completed.stdout.strip()


def headers_by_name(git_dir: Path, revision: str) -> dict[str, str]:
    """``{file name: path}`` of every C++ header at ``revision`` (the first path wins)."""
    found: dict[str, str] = {}
    for path in git(git_dir, "ls-tree", "-r", "--name-only", revision).splitlines():
        if path.endswith(".h"):
            found.setdefault(path.rsplit("/", 1)[-1], path)
    return found


# -- Python sources ------------------------------------------------------------------------------


def signature(function: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> dict:
    """Parameters (name, kind, whether it has a default) and decorators of a def or lambda."""
    arguments = function.args
    positional = [*arguments.posonlyargs, *arguments.args]
    first_default = len(positional) - len(arguments.defaults)
    params = []
    for index, argument in enumerate(positional):
        kind = "positional_only" if index < len(arguments.posonlyargs) else "positional_or_keyword"
        params.append({"name": argument.arg, "kind": kind, "default": index >= first_default})
    if arguments.vararg is not None:
        params.append({"name": arguments.vararg.arg, "kind": "var_positional", "default": False})
    for argument, default in zip(arguments.kwonlyargs, arguments.kw_defaults):
        params.append({"name": argument.arg, "kind": "keyword_only", "default": default is not None})
    if arguments.kwarg is not None:
        params.append({"name": arguments.kwarg.arg, "kind": "var_keyword", "default": False})
    decorators = sorted(
        {ast.unparse(d).split("(")[0].rsplit(".", 1)[-1] for d in getattr(function, "decorator_list", [])}
    )
    return {"params": params, "decorators": decorators}


def _statements(body: list[ast.stmt]):
    """The statements of a body, those under ``if``/``try``/``with`` included (definitions
    made only on some platforms or versions count as present)."""
    for statement in body:
        yield statement
        if isinstance(statement, ast.If):
            yield from _statements(statement.body)
            yield from _statements(statement.orelse)
        elif isinstance(statement, ast.Try):
            for block in (
                statement.body,
                statement.orelse,
                statement.finalbody,
                *[handler.body for handler in statement.handlers],
            ):
                yield from _statements(block)
        elif isinstance(statement, ast.With):
            yield from _statements(statement.body)


def describe_class(node: ast.ClassDef) -> dict:
    """Bases, methods (with signatures) and attributes (class-level and ``self.x =``) of a class."""
    methods, attributes = {}, set()
    for statement in _statements(node.body):
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            methods[statement.name] = signature(statement)
            for inner in ast.walk(statement):
                targets = (
                    inner.targets
                    if isinstance(inner, ast.Assign)
                    else ([inner.target] if isinstance(inner, (ast.AnnAssign, ast.AugAssign)) else [])
                )
                for target in targets:
                    for leaf in ast.walk(target):
                        if (
                            isinstance(leaf, ast.Attribute)
                            and isinstance(leaf.value, ast.Name)
                            and leaf.value.id == "self"
                        ):
                            attributes.add(leaf.attr)
        elif isinstance(statement, ast.Assign):
            attributes |= {t.id for t in statement.targets if isinstance(t, ast.Name)}
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            attributes.add(statement.target.id)
    return {
        "bases": [ast.unparse(base) for base in node.bases],
        "methods": methods,
        "attributes": sorted(attributes - set(methods)),
    }


def describe_module(source: str) -> dict:
    """Functions, classes and other top-level names (imports, constants) of a Python module."""
    tree = ast.parse(source)
    functions, classes, names = {}, {}, set()
    for statement in _statements(tree.body):
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions[statement.name] = signature(statement)
        elif isinstance(statement, ast.ClassDef):
            classes[statement.name] = describe_class(statement)
        elif isinstance(statement, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in statement.names}
        elif isinstance(statement, ast.Assign):
            names |= {
                leaf.id
                for target in statement.targets
                for leaf in ast.walk(target)
                if isinstance(leaf, ast.Name)
            }
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            names.add(statement.target.id)
    names -= set(functions) | set(classes) | {"*"}
    return {"functions": functions, "classes": classes, "names": sorted(names)}


def module_all(source: str) -> list[str] | None:
    """A module's ``__all__`` (a literal list or tuple of strings), or None."""
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in statement.targets
        ):
            return [element.value for element in statement.value.elts]
    return None


def parameter_node_wrapper(git_dir: Path, tag: str) -> dict:
    """What ``slicer.parameterNodeWrapper`` exports, what it adds to a wrapped class, and its
    GUI connectors."""
    init = show(git_dir, tag, f"{WRAPPER_DIR}/__init__.py")
    if init is None:
        raise ManifestError(f"{tag} has no {WRAPPER_DIR}/__init__.py")
    exports, sources = {}, {}
    for statement in ast.parse(init).body:
        if not (isinstance(statement, ast.ImportFrom) and statement.level == 1):
            continue
        source = show(git_dir, tag, f"{WRAPPER_DIR}/{statement.module}.py")
        if source is None:
            raise ManifestError(f"{tag}: {WRAPPER_DIR}/{statement.module}.py is imported but missing")
        sources[statement.module] = source
        described = describe_module(source)
        if statement.names[0].name == "*":
            names = module_all(source)
            if names is None:
                names = [
                    n
                    for n in [*described["functions"], *described["classes"], *described["names"]]
                    if not n.startswith("_")
                ]
        else:
            names = [alias.asname or alias.name for alias in statement.names]
        for name in names:
            if name in described["functions"]:
                exports[name] = {"kind": "function", **described["functions"][name]}
            elif name in described["classes"]:
                init_method = described["classes"][name]["methods"].get("__init__")
                exports[name] = {"kind": "class", **(init_method or _dataclass_init(source, name))}
            else:
                exports[name] = {"kind": "name"}
    return {
        "exports": exports,
        "wrapper_methods": _wrapper_methods(sources["wrapper"]),
        "connectors": gui_connectors(sources["guiConnectors"]),
    }


def _dataclass_init(source: str, name: str) -> dict:
    """The ``__init__`` parameters of a class without one (a dataclass: its annotated fields)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == name:
            fields = [
                item
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            ]
            params = [{"name": "self", "kind": "positional_or_keyword", "default": False}]
            params += [
                {"name": f.target.id, "kind": "positional_or_keyword", "default": f.value is not None}
                for f in fields
            ]
            return {"params": params, "decorators": []}
    raise ManifestError(f"class {name} not found")


def _wrapper_methods(source: str) -> dict:
    """``{name: signature}`` of what ``_processClass`` sets on a wrapped class
    (``setattr(classtype, "connectGui", _connectGui)``; a lambda's own parameters; None where
    the value is built by a call). A parameter named like one of them is refused."""
    described = describe_module(source)["functions"]
    methods = {}
    for node in ast.walk(ast.parse(source)):
        if not (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("setattr", "checkedSetAttr")
            and len(node.args) == 3
            and ast.unparse(node.args[0]) == "classtype"
            and isinstance(node.args[1], ast.Constant)
        ):
            continue
        value = node.args[2]
        if isinstance(value, ast.Name) and value.id in described:
            methods[node.args[1].value] = described[value.id]
        elif isinstance(value, ast.Lambda):
            methods[node.args[1].value] = signature(value)
        else:
            methods[node.args[1].value] = None
    return methods


def gui_connectors(source: str) -> list[dict]:
    """Each registered connector's widget classes, Python types and required annotations, read
    from its ``canRepresent`` (``type(widget) in (...)``, ``unannotatedType(datatype) == ...``)
    and ``create`` (``findFirstAnnotation(..., validators.X)`` that raises when None)."""
    connectors = []
    for node in ast.parse(source).body:
        if not (
            isinstance(node, ast.ClassDef)
            and any(ast.unparse(d) == "parameterNodeGuiConnector" for d in node.decorator_list)
        ):
            continue
        methods = {item.name: item for item in node.body if isinstance(item, ast.FunctionDef)}
        widgets, types = set(), set()
        for inner in ast.walk(methods["canRepresent"]):
            if isinstance(inner, ast.Compare):
                left = ast.unparse(inner.left)
                values = []
                for comparator in inner.comparators:
                    values += (
                        [ast.unparse(e) for e in comparator.elts]
                        if isinstance(comparator, (ast.Tuple, ast.List, ast.Set))
                        else [ast.unparse(comparator)]
                    )
                if left == "type(widget)":
                    widgets.update(values)
                elif left == "unannotatedType(datatype)":
                    types.update(values)
            elif isinstance(inner, ast.Call):
                call = ast.unparse(inner.func)
                if call == "issubclass" and ast.unparse(inner.args[0]) == "unannotatedType(datatype)":
                    types.add(ast.unparse(inner.args[1]))
                elif call.endswith("isNodeOrUnionOfNodes"):
                    types.add("vtkMRMLNode")
                elif call.endswith("isParameterPack"):
                    types.add("parameterPack")
        connectors.append(
            {
                "name": node.name,
                "widgets": sorted(w.rsplit(".", 1)[-1] for w in widgets),
                "types": sorted(types),
                "required_annotations": _required_annotations(methods["create"]),
            }
        )
    return connectors


def _required_annotations(create: ast.FunctionDef) -> list[str]:
    """Validators that ``create`` looks up and refuses to go without."""
    found: dict[str, str] = {}
    required = []
    for statement in ast.walk(create):
        if (
            isinstance(statement, ast.Assign)
            and isinstance(statement.value, ast.Call)
            and ast.unparse(statement.value.func).endswith("findFirstAnnotation")
            and len(statement.value.args) == 2
            and isinstance(statement.targets[0], ast.Name)
        ):
            found[statement.targets[0].id] = ast.unparse(statement.value.args[1]).rsplit(".", 1)[-1]
        elif (
            isinstance(statement, ast.If)
            and isinstance(statement.test, ast.Compare)
            and isinstance(statement.test.ops[0], ast.Is)
            and ast.unparse(statement.test.comparators[0]) == "None"
            and isinstance(statement.test.left, ast.Name)
            and statement.test.left.id in found
            and any(isinstance(s, ast.Raise) for s in statement.body)
        ):
            required.append(found[statement.test.left.id])
    return sorted(required)


def scripted_hooks(source: str) -> list[str]:
    """The Python method names a C++ scripted-module class calls (``declareMethod``)."""
    return sorted(set(re.findall(r'declareMethod\(\s*\w+::\w+\s*,\s*"(\w+)"\s*\)', source)))


# -- C++ headers -----------------------------------------------------------------------------------


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"^\s*#[^\n]*", "", text, flags=re.M)


def _closing(text: str, start: int, opening: str, closing: str) -> int:
    """The index of the bracket closing the one at ``start``."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == opening:
            depth += 1
        elif text[index] == closing:
            depth -= 1
            if depth == 0:
                return index
    raise ManifestError(f"unbalanced {opening}{closing}")


def _split_top_level(text: str, separator: str = ",") -> list[str]:
    parts, depth, current = [], 0, ""
    for character in text:
        if character in "<({[":
            depth += 1
        elif character in ">)}]":
            depth -= 1
        if character == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += character
    if current.strip():
        parts.append(current)
    return parts


def normalize_type(text: str) -> str:
    """A parameter's type as Qt's normalized signatures write it (no name, no default,
    ``const T&`` and ``const T`` as ``T``, no spaces around ``*`` and ``&``)."""
    text = " ".join(_split_top_level(text, "=")[0].split())
    match = re.match(r"^(.*?[\w>*&\s])\s*\b([A-Za-z_]\w*)$", text)
    if (
        match
        and match.group(2) not in TYPE_WORDS
        and match.group(1).strip()
        not in ("const", "unsigned", "signed", "volatile", "struct", "enum", "class")
    ):
        text = match.group(1).strip()
    text = re.sub(r"\s*([*&])", r"\1", text)
    if re.fullmatch(r"const [^*]+&", text):
        text = text[len("const ") : -1]
    elif re.fullmatch(r"[^*]+ const&", text):
        text = text[: -len(" const&")]
    elif text.startswith("const ") and not text.endswith(("*", "&")):
        text = text[len("const ") :]
    return text.replace(" >", ">").strip()


def normalize_signature(text: str) -> str:
    """``name(type,type)`` as Qt normalizes it; also used for the strings Python connects."""
    name, _, rest = text.strip().partition("(")
    params = rest.rsplit(")", 1)[0]
    types = [normalize_type(p) for p in _split_top_level(params) if p.strip() and p.strip() != "void"]
    return f"{name.strip()}({','.join(types)})"


def _declaration(statement: str) -> tuple[str, list[tuple[str, bool]]] | None:
    """``(name, [(type, has default)])`` of a member function declaration, else None."""
    statement = " ".join(statement.split())
    start = statement.find("(")
    if start <= 0 or statement.startswith(("typedef", "using", "friend", "enum", "template")):
        return None
    match = re.search(r"([~A-Za-z_]\w*)\s*$", statement[:start])
    if match is None or "operator" in statement[:start]:
        return None
    end = _closing(statement, start, "(", ")")
    params = [
        (normalize_type(p), len(_split_top_level(p, "=")) > 1)
        for p in _split_top_level(statement[start + 1 : end])
        if p.strip() and p.strip() != "void"
    ]
    return match.group(1), params


def _signatures(name: str, params: list[tuple[str, bool]]) -> list[str]:
    """Every signature moc makes of a declaration: one per number of defaulted arguments left out."""
    required = sum(1 for _, has_default in params if not has_default)
    return [f"{name}({','.join(t for t, _ in params[:count])})" for count in range(required, len(params) + 1)]


def parse_header(text: str, class_name: str) -> dict:
    """Base class, properties, signals, public slots and public ``Q_INVOKABLE`` methods of
    ``class_name`` as its header declares them."""
    text = _strip_comments(text)
    match = re.search(
        r"\bclass\s+(?:[A-Z][A-Z0-9_]*\s+)?" + re.escape(class_name) + r"\s*(?::([^{;]*))?\{", text
    )
    if match is None:
        raise ManifestError(f"class {class_name} is not declared in its header")
    bases = re.findall(r"public\s+([\w:]+)", match.group(1) or "")
    body_start = match.end() - 1
    body = text[body_start + 1 : _closing(text, body_start, "{", "}")]

    properties = {}
    for found in re.finditer(r"\bQ_PROPERTY\s*\(", body):
        inner = body[found.end() : _closing(body, found.end() - 1, "(", ")")]
        words = inner.split()
        for index, word in enumerate(words):
            if word in ("READ", "MEMBER"):
                properties[words[index - 1]] = {
                    "type": " ".join(words[: index - 1]),
                    "writable": "WRITE" in words or word == "MEMBER",
                }
                break
    # drop macros with arguments and function bodies, then read the access sections
    cleaned = body
    while True:
        found = re.search(r"\b(?:Q_[A-Z_]+|QVTK_OBJECT|CTK_[A-Z_]+)\s*\(", cleaned)
        if found is None:
            break
        end = _closing(cleaned, found.end() - 1, "(", ")")
        cleaned = cleaned[: found.start()] + " " + cleaned[end + 1 :]
    cleaned = re.sub(r"\b(?:Q_OBJECT|QVTK_OBJECT|Q_GADGET)\b", " ", cleaned)
    while "{" in cleaned:
        start = cleaned.index("{")
        cleaned = cleaned[:start] + ";" + cleaned[_closing(cleaned, start, "{", "}") + 1 :]

    signals, slots, invokables = set(), set(), set()
    section = "private"
    for piece in re.split(
        r"\b((?:public|protected|private)\s*(?:slots|Q_SLOTS)?\s*:|(?:signals|Q_SIGNALS)\s*:)", cleaned
    ):
        label = " ".join(piece.replace(":", " ").split())
        if re.fullmatch(r"(public|protected|private)( slots| Q_SLOTS)?|signals|Q_SIGNALS", label):
            section = label.replace("Q_SLOTS", "slots").replace("Q_SIGNALS", "signals")
            continue
        for statement in piece.split(";"):
            invokable = "Q_INVOKABLE" in statement.split()
            declaration = _declaration(statement.replace("Q_INVOKABLE", " "))
            if declaration is None or declaration[0] in (class_name, f"~{class_name}"):
                continue
            signatures = _signatures(*declaration)
            if section == "signals":
                signals.update(signatures)
            elif section == "public slots":
                slots.update(signatures)
            elif invokable and section == "public":
                invokables.update(signatures)
    return {
        "base": bases[0] if bases else None,
        "properties": properties,
        "signals": sorted(signals),
        "slots": sorted(slots),
        "invokables": sorted(invokables),
    }


def ui_classes(ui_file: Path) -> set[str]:
    """The widget classes a .ui file instantiates (the top-level one included)."""
    return {widget.get("class") for widget in ElementTree.parse(ui_file).iter("widget")}


def widget_classes(slicer: Path, tag: str, ctk: Path, ctk_commit: str, names: set[str]) -> dict:
    """Header facts for ``names`` and their Slicer/CTK bases; a class found in neither tree
    (a Qt class) ends the chain."""
    trees = [(slicer, tag, headers_by_name(slicer, tag)), (ctk, ctk_commit, headers_by_name(ctk, ctk_commit))]
    found, pending = {}, sorted(names)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        for git_dir, revision, headers in trees:
            if f"{name}.h" in headers:
                described = parse_header(show(git_dir, revision, headers[f"{name}.h"]), name)
                described["header"] = ("Slicer " if git_dir == slicer else "CTK ") + headers[f"{name}.h"]
                found[name] = described
                if described["base"]:
                    pending.append(described["base"])
                break
    return found


# -- manifest ------------------------------------------------------------------------------------


def ctk_commit_for(slicer: Path, tag: str) -> str:
    """The CTK commit a Slicer release builds with."""
    pin = show(slicer, tag, CTK_PIN)
    match = re.search(r'Slicer_\$\{proj\}_GIT_TAG\s*"([0-9a-f]{40})"', pin or "")
    if match is None:
        raise ManifestError(f"{tag}: no CTK commit in {CTK_PIN}")
    return match.group(1)


def manifest(slicer: Path, ctk: Path, pytorch: Path, tag: str, ui_file: Path = UI_FILE) -> dict:
    """Everything the conformance test checks, for one Slicer release."""
    slicer_commit = commit_of(slicer, tag)  # the tag must exist before anything is read at it
    ctk_commit = ctk_commit_for(slicer, tag)
    modules = {}
    for name, path in PYTHON_MODULES.items():
        source = show(slicer, tag, path)
        if source is not None:  # slicer.packaging exists only in newer releases
            modules[name] = {"path": path, **describe_module(source)}
    pytorch_source = show(pytorch, "HEAD", PYTORCH_UTILS)
    if pytorch_source is None:
        raise ManifestError(f"{PYTORCH_UTILS} is not in {pytorch}")
    modules["PyTorchUtils"] = {"path": PYTORCH_UTILS, **describe_module(pytorch_source)}
    hooks = {}
    for class_name, path in HOOK_SOURCES.items():
        source = show(slicer, tag, path)
        if source is None:
            raise ManifestError(f"{tag} has no {path}")
        hooks[class_name] = scripted_hooks(source)
    return {
        "slicer": {"tag": tag, "commit": slicer_commit},
        "ctk": {"commit": ctk_commit, "pinned_in": CTK_PIN},
        "slicerpytorch": {"commit": commit_of(pytorch, "HEAD")},
        "python": modules,
        "parameterNodeWrapper": parameter_node_wrapper(slicer, tag),
        "scripted_hooks": hooks,
        "widgets": widget_classes(slicer, tag, ctk, ctk_commit, ui_classes(ui_file)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slicer", type=Path, required=True, help="git directory of Slicer/Slicer")
    parser.add_argument("--ctk", type=Path, required=True, help="git directory of commontk/CTK")
    parser.add_argument("--pytorch", type=Path, required=True, help="git directory of fepegar/SlicerPyTorch")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "InstructX2X" / "Testing" / "Python" / "slicer_api"
    )
    parser.add_argument("--tags", nargs="+", default=list(SUPPORTED_TAGS))
    args = parser.parse_args(argv)
    try:
        for git_dir in (args.slicer, args.ctk, args.pytorch):
            if (
                subprocess.run(
                    ["git", "--git-dir", str(git_dir), "rev-parse", "--git-dir"], capture_output=True
                ).returncode
                != 0
            ):
                raise ManifestError(f"{git_dir} is not a git directory")
        manifests = {tag: manifest(args.slicer, args.ctk, args.pytorch, tag) for tag in args.tags}
    except ManifestError as error:
        print(f"slicer_api_manifest: {error}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    for tag, content in manifests.items():
        path = args.output / f"slicer-{tag}.json"
        path.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
        print(
            f"{path}: {len(content['widgets'])} widget classes, "
            f"{sum(len(m['functions']) for m in content['python'].values())} functions"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
