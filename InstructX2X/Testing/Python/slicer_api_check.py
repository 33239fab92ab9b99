"""Check the Slicer module's Python and .ui against one Slicer release's API manifest.

The manifests (``slicer_api/slicer-<tag>.json`` beside this file, written by
``scripts/slicer_api_manifest.py`` from Slicer's, CTK's and SlicerPyTorch's sources) and the
hand-written Qt 5.15 and VTK 9 lists (``slicer_api/qt-5.15.json``, ``slicer_api/vtk-9.json``)
say what exists; this module
reads the panel's source with ``ast`` and its .ui with ``xml.etree`` and lists every use that a
release does not have:

- calls of and names from ``slicer.util``, ``slicer.i18n``, ``slicer.packaging``,
  ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``, ``DICOMLib.DICOMUtils``
  and ``PyTorchUtils``: the name, the number of positional arguments, every keyword and
  every required parameter. A call inside ``if hasattr(<module>, "<name>"):`` is checked only
  against releases that have ``<module>.<name>`` (and its ``else`` against the others);
- members the module's classes take from their Slicer bases (``self.layout``, ``super()``...)
  and the lifecycle hooks they define (``enter``, ``exit``...);
- on the .ui's widgets (through ``self.ui.<name>``, local aliases, the loaded top-level widget
  and ``qt`` objects kept on ``self``): properties read or set, methods called, and signals
  connected, by ``connect("signal(types)", ...)`` (the normalized signature must exist) or by
  ``.signal.connect(...)`` (refused where the name has overloads with other argument types:
  which overload PythonQt picks is not defined);
- members used on objects whose class the source shows, in every function and method:
  ``slicer.app`` (qSlicerApplication), ``slicer.dicomDatabase`` (ctkDICOMDatabase),
  ``slicer.mrmlScene`` (vtkMRMLScene), ``self.parent`` in a scripted module or module widget,
  what a slot, invokable or VTK method returns (``slicer.app.commandOptions()``), what
  ``slicer.util`` returns (``createProgressDialog``: a QProgressDialog), nodes made or looked up
  by class name (``AddNewNodeByClass("vtkMRMLSegmentationNode")``, ``getNodesByClass``),
  ``qt.<Class>(...)`` and ``qt.<Class>.<static>()``; followed through local names bound only
  to one such type (and lists only appended one). Qt objects are held to their properties,
  signals, slots, invokables, decorator methods and listed functions, VTK objects to their
  public methods and enum values. A name whose class cannot be told is not checked;
- ``slicer.vtkMRML<Name>`` and the class names given to ``AddNewNodeByClass`` and the like:
  each must be an MRML class of the manifest;
- the keywords of a function that sets its ``**kwargs`` as properties of the Qt object it
  returns (``createProgressDialog``): each must be a writable property of that class;
- in the .ui: every property set on a widget, every designer connection, and every
  ``SlicerParameterName`` binding (a GUI connector must bind that widget class to the
  parameter's type, with the annotations the connector requires).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path

API_DIR = Path(__file__).resolve().parent / "slicer_api"
SUPPORTED_TAGS = ("v5.6.2", "v5.8.1", "v5.10.0", "v5.12.3")
CHECKED_MODULES = (
    "slicer.util",
    "slicer.i18n",
    "slicer.packaging",
    "slicer.ScriptedLoadableModule",
    "slicer.parameterNodeWrapper",
    "DICOMLib.DICOMUtils",
    "PyTorchUtils",
)
# Widget methods Slicer's scripted widgets expect the panel to define
LIFECYCLE_HOOKS = ("setup", "enter", "exit", "cleanup", "onReload")
# What a name refers to in Slicer's Python: its class (the manifest's Qt or VTK classes)
RECEIVERS = {
    "slicer.app": "qSlicerApplication",
    "slicer.dicomDatabase": "ctkDICOMDatabase",
    "slicer.mrmlScene": "vtkMRMLScene",
}
# ``self.parent`` of a class deriving from these slicer.ScriptedLoadableModule classes
PARENT_CLASSES = {
    "ScriptedLoadableModule": "qSlicerScriptedLoadableModule",
    "ScriptedLoadableModuleWidget": "qSlicerScriptedLoadableModuleWidget",
}
# qt names that are namespaces of enum values, not classes (their values are not checked)
QT_NAMESPACES = {"Qt"}
# Scene methods that return a node of the class named by their first argument
NODES_BY_CLASS = {
    ("vtkMRMLScene", "AddNewNodeByClass"),
    ("vtkMRMLScene", "AddNewNodeByClassWithID"),
    ("vtkMRMLScene", "CreateNodeByClass"),
    ("vtkMRMLScene", "GetFirstNodeByClass"),
}
# Functions that return a list of the nodes of the class named by their first argument
NODE_LISTS = {"slicer.util.getNodesByClass"}
POSITIONAL = ("positional_only", "positional_or_keyword")


def _load_manifest_script():
    """``scripts/slicer_api_manifest.py``, whose rules normalized the manifests' signatures: the
    module's calls are normalized by the same function."""
    path = Path(__file__).resolve().parents[3] / "scripts" / "slicer_api_manifest.py"
    spec = importlib.util.spec_from_file_location("slicer_api_manifest", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


normalize_type = _load_manifest_script().normalize_type


def normalize_signature(text: str) -> str:
    name, _, rest = text.strip().partition("(")
    params = [p for p in rest.rsplit(")", 1)[0].split(",") if p.strip() and p.strip() != "void"]
    return f"{name.strip()}({','.join(normalize_type(p) for p in params)})"


class Api:
    """One release's manifest joined with the Qt 5.15 list."""

    def __init__(self, manifest: dict, qt: dict, vtk: dict) -> None:
        self.manifest = manifest
        self.tag = manifest["slicer"]["tag"]
        self.qt = qt["classes"]
        self.spacer_properties = qt["spacer_properties"]
        self.vtk = {**vtk["classes"], **manifest["vtk"]}
        self._chains: dict = {}

    @classmethod
    def load(cls, tag: str, directory: Path = API_DIR) -> Api:
        qt = json.loads((directory / "qt-5.15.json").read_text())
        vtk = json.loads((directory / "vtk-9.json").read_text())
        return cls(json.loads((directory / f"slicer-{tag}.json").read_text()), qt, vtk)

    # -- Python modules -------------------------------------------------------------------
    def module(self, name: str) -> dict | None:
        """``{"functions", "classes", "names"}`` of a checked module, None where the release
        has none (``slicer.parameterNodeWrapper`` as its exports)."""
        if name == "slicer.parameterNodeWrapper":
            exports = self.manifest["parameterNodeWrapper"]["exports"]
            return {
                "functions": {k: v for k, v in exports.items() if v["kind"] == "function"},
                "classes": {
                    k: {"methods": {"__init__": v}, "bases": [], "attributes": []}
                    for k, v in exports.items()
                    if v["kind"] == "class"
                },
                "names": [k for k, v in exports.items() if v["kind"] == "name"],
            }
        return self.manifest["python"].get(name)

    def class_members(self, module: str, name: str) -> tuple[dict, set[str]]:
        """Methods (with signatures) and attributes of a manifest class and its manifest bases;
        a ``unittest.TestCase`` base adds its members (signatures unchecked: None)."""
        described = (self.module(module) or {}).get("classes", {}).get(name)
        if described is None:
            return {}, set()
        methods, attributes = dict(described["methods"]), set(described["attributes"])
        for base in described["bases"]:
            if base == "unittest.TestCase":
                methods.update({member: None for member in dir(unittest.TestCase) if member not in methods})
                continue
            inherited, inherited_attributes = self.class_members(module, base.rsplit(".", 1)[-1])
            methods = {**inherited, **methods}
            attributes |= inherited_attributes
        return methods, attributes

    def hooks(self, class_name: str) -> set[str]:
        return set(self.manifest["scripted_hooks"].get(class_name, []))

    # -- widgets -----------------------------------------------------------------------------
    def chain(self, class_name: str) -> list[tuple[str, dict, bool]] | None:
        """``[(class, facts, is_qt)]`` from the class up to QObject, None if a link is unknown."""
        if class_name not in self._chains:
            self._chains[class_name] = self._chain(class_name)
        return self._chains[class_name]

    def _chain(self, class_name: str) -> list[tuple[str, dict, bool]] | None:
        chain, name = [], class_name
        while name is not None:
            if name in self.manifest["qobjects"]:
                facts, is_qt = self.manifest["qobjects"][name], False
            elif name in self.qt:
                facts, is_qt = self.qt[name], True
            else:
                return None
            chain.append((name, facts, is_qt))
            name = facts["base"]
        return chain

    def known_chain(self, class_name: str) -> list[tuple[str, dict, bool]]:
        """``chain`` of a class the manifest and Qt list know to QObject (callers check that first)."""
        chain = self.chain(class_name)
        if chain is None:
            raise KeyError(f"{class_name} is in neither the manifest nor the Qt list")
        return chain

    def properties(self, class_name: str) -> dict:
        found = {}
        for _, facts, _ in reversed(self.known_chain(class_name)):
            found.update(facts["properties"])
        return found

    def signals(self, class_name: str) -> set[str]:
        return {s for _, facts, _ in self.known_chain(class_name) for s in facts["signals"]}

    def slots(self, class_name: str) -> set[str]:
        return {s for _, facts, _ in self.known_chain(class_name) for s in facts["slots"]}

    def callables(self, class_name: str) -> set[str]:
        """Names callable from Python: slots, invokables and the methods PythonQt decorators
        add, and on Qt classes the listed public functions and the setters of writable
        properties."""
        names = set()
        for name, facts, is_qt in self.known_chain(class_name):
            names |= {s.split("(")[0] for s in [*facts["slots"], *facts.get("invokables", [])]}
            names |= set(self.manifest["decorators"].get(name, []))
            if is_qt:
                names |= set(facts["methods"])
                names |= {
                    "set" + p[0].upper() + p[1:] for p, f in facts["properties"].items() if f["writable"]
                }
        return names

    def returns(self, class_name: str, member: str) -> str | None:
        """The class a slot, invokable or VTK method returns (a pointer to it), None where
        unknown."""
        chain = self.chain(class_name) or self.vtk_chain(class_name) or []
        for _, facts, _ in chain:
            if member in facts.get("returns", {}):
                return facts["returns"][member]
        return None

    def kind(self, class_name: str) -> str | None:
        """``"qt"`` for a class whose chain the manifest and Qt list know to QObject (or to a
        Qt class without bases), ``"vtk"`` for one known to vtkObjectBase, else None."""
        if self.chain(class_name) is not None:
            return "qt"
        if self.vtk_chain(class_name) is not None:
            return "vtk"
        return None

    def vtk_chain(self, class_name: str) -> list[tuple[str, dict, bool]] | None:
        """``[(class, facts, False)]`` from a VTK class up to vtkObjectBase, None if a link is unknown."""
        chain, name = [], class_name
        while name is not None:
            if name not in self.vtk:
                return None
            chain.append((name, self.vtk[name], False))
            name = self.vtk[name]["base"]
        return chain

    def vtk_members(self, class_name: str) -> set[str]:
        """Public methods (macro-made ones included) and enum values of a VTK class and its bases
        (one known to vtkObjectBase: callers check that first)."""
        chain = self.vtk_chain(class_name)
        if chain is None:
            raise KeyError(f"{class_name} is not known to vtkObjectBase")
        return {m for _, facts, _ in chain for m in [*facts["methods"], *facts["constants"]]}

    def connectors(self) -> list[dict]:
        return self.manifest["parameterNodeWrapper"]["connectors"]

    def reserved_parameter_names(self) -> set[str]:
        return set(self.manifest["parameterNodeWrapper"]["wrapper_methods"])


# -- calls ---------------------------------------------------------------------------------------


def check_call(call: ast.Call, signature: dict, drop_first: bool, what: str) -> list[str]:
    """Whether ``call`` binds to ``signature`` (``drop_first``: called on an instance)."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return [f"{what}: * or ** arguments cannot be checked; pass them by name"]
    params = signature["params"][1:] if drop_first else signature["params"]
    positional = [p for p in params if p["kind"] in POSITIONAL]
    kinds = {p["kind"] for p in params}
    problems, bound = [], set()
    if len(call.args) > len(positional) and "var_positional" not in kinds:
        problems.append(f"{what}: {len(call.args)} positional arguments, it takes {len(positional)}")
    bound |= {p["name"] for p in positional[: len(call.args)]}
    for keyword in call.keywords:
        match = next(
            (
                p
                for p in params
                if p["name"] == keyword.arg and p["kind"] in ("positional_or_keyword", "keyword_only")
            ),
            None,
        )
        if match is None:
            if "var_keyword" not in kinds:
                problems.append(f"{what}: no parameter {keyword.arg!r}")
        elif keyword.arg in bound:
            problems.append(f"{what}: {keyword.arg!r} given twice")
        else:
            bound.add(keyword.arg)
    for p in params:
        if p["kind"] in (*POSITIONAL, "keyword_only") and not p["default"] and p["name"] not in bound:
            problems.append(f"{what}: required parameter {p['name']!r} not given")
    return problems


def _parents(tree: ast.AST) -> dict:
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _aliases(tree: ast.AST) -> dict[str, str]:
    """``{local name: dotted origin}`` from every import in the file."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` of a Name/Attribute chain with the first name's import origin substituted."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def split_module(name: str) -> tuple[str, str] | None:
    """``(checked module, rest)`` of a dotted name, or None."""
    for module in sorted(CHECKED_MODULES, key=len, reverse=True):
        if name.startswith(module + "."):
            return module, name[len(module) + 1 :]
    return None


class SourceChecker:
    """Every problem of one module source against one release."""

    def __init__(self, source: str, ui: ElementTree.ElementTree[ElementTree.Element], api: Api) -> None:
        self.tree = ast.parse(source)
        self.api = api
        self.aliases = _aliases(self.tree)
        self.parents = _parents(self.tree)
        self.widgets = {w.attrib["name"]: w.attrib["class"] for w in ui.iter("widget")}
        root = ui.getroot().find("widget")
        assert root is not None, "a .ui file holds its top-level widget"
        self.root_class = root.attrib["class"]
        self.problems: list[str] = []

    def report(self, node: ast.AST, message: str) -> None:
        self.problems.append(f"{self.api.tag}: line {getattr(node, 'lineno', '?')}: {message}")

    def run(self) -> list[str]:
        self._visit(self.tree.body, {})
        for node in self.tree.body:
            if isinstance(node, ast.ClassDef):
                self._check_class(node)
        self._check_receivers()
        return self.problems

    # -- walking, with hasattr guards --------------------------------------------------------
    def _guard(self, test: ast.AST) -> bool | None:
        """For ``hasattr(<module>, "<name>")`` on a checked module: whether this release has it."""
        if (
            isinstance(test, ast.Call)
            and isinstance(test.func, ast.Name)
            and test.func.id == "hasattr"
            and len(test.args) == 2
            and isinstance(test.args[1], ast.Constant)
            and isinstance(test.args[1].value, str)
        ):
            base = dotted(test.args[0], self.aliases)
            if base is not None:
                name = f"{base}.{test.args[1].value}"
                if name in CHECKED_MODULES:
                    return self.api.module(name) is not None
                found = split_module(name)
                if found is not None:
                    module = self.api.module(found[0]) or {}
                    return any(found[1] in module.get(k, ()) for k in ("functions", "classes", "names"))
        return None

    def _visit(self, body: list[ast.stmt], variables: dict) -> None:
        for statement in body:
            if isinstance(statement, ast.If):
                guarded = self._guard(statement.test)
                self._expressions(statement.test, variables)
                if guarded is not False:
                    self._visit(statement.body, variables)
                if guarded is not True:
                    self._visit(statement.orelse, variables)
                continue
            if isinstance(statement, ast.ClassDef):
                self._visit(statement.body, {})
                continue
            if isinstance(statement, ast.ImportFrom) and statement.level == 0:
                for alias in statement.names:
                    self._check_import(statement, f"{statement.module}.{alias.name}")
                continue
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for decorator in statement.decorator_list:
                    self._expressions(decorator, variables)
                self._visit(statement.body, {})
                continue
            if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Call):
                found = self._class_of(statement.value.func)
                if found is not None:
                    for target in statement.targets:
                        if isinstance(target, ast.Name):
                            variables[target.id] = found
            # nested blocks (for, while, with, try) are walked with the same variables
            nested = [
                getattr(statement, field)
                for field in ("body", "orelse", "finalbody")
                if isinstance(getattr(statement, field, None), list)
            ]
            nested += [handler.body for handler in getattr(statement, "handlers", [])]
            for field, value in ast.iter_fields(statement):
                if field in ("body", "orelse", "finalbody", "handlers"):
                    continue
                for child in value if isinstance(value, list) else [value]:
                    if isinstance(child, ast.AST):
                        self._expressions(child, variables)
            for block in nested:
                self._visit(block, variables)

    def _expressions(self, node: ast.AST, variables: dict) -> None:
        for inner in ast.walk(node):
            if isinstance(inner, ast.Attribute) and not isinstance(self.parents.get(inner), ast.Attribute):
                self._check_reference(inner, variables)
            elif isinstance(inner, ast.Name) and inner.id in self.aliases:
                origin = self.aliases[inner.id]
                if split_module(origin) and not isinstance(self.parents.get(inner), ast.Attribute):
                    self._check_reference(inner, variables)

    # -- module names and calls -------------------------------------------------------------
    def _class_of(self, function: ast.AST) -> tuple[str, str] | None:
        """``(module, class)`` when ``function`` names a class of a checked module."""
        origin = dotted(function, self.aliases)
        found = split_module(origin) if origin else None
        if found is None or "." in found[1]:
            return None
        module = self.api.module(found[0])
        return found if module is not None and found[1] in module["classes"] else None

    def _check_import(self, node: ast.ImportFrom, name: str) -> None:
        if name in CHECKED_MODULES:
            if self.api.module(name) is None:
                self.report(node, f"{name} does not exist in Slicer {self.api.tag}")
            return
        found = split_module(name)
        if found is None:
            return
        module = self.api.module(found[0])
        if module is None or not any(found[1] in module[k] for k in ("functions", "classes", "names")):
            self.report(node, f"{name} does not exist in Slicer {self.api.tag}")

    def _check_reference(self, node: ast.AST, variables: dict) -> None:
        """A dotted name as a whole (``slicer.util.f``), possibly called."""
        name = dotted(node, self.aliases)
        call = self.parents.get(node)
        call = call if isinstance(call, ast.Call) and call.func is node else None
        if name is None:
            # a method on an instance: PyTorchUtils.PyTorchUtilsLogic().installTorch(...)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call):
                found = self._class_of(node.value.func)
                if found is not None:
                    self._check_member(found, node.attr, node, call, instance=True)
            return
        head = name.split(".")[0]
        if head in variables and name.count(".") == 1:
            self._check_member(variables[head], name.split(".")[1], node, call, instance=True)
            return
        found = split_module(name)
        if found is None:
            if name in CHECKED_MODULES and self.api.module(name) is None:
                self.report(node, f"{name} does not exist in Slicer {self.api.tag}")
            return
        module_name, rest = found
        module = self.api.module(module_name)
        if module is None:
            self.report(node, f"{module_name} does not exist in Slicer {self.api.tag}")
            return
        first, _, member = rest.partition(".")
        if first in module["functions"]:
            if member:
                return  # an attribute of a function: nothing to check
            if call is not None:
                for problem in check_call(call, module["functions"][first], False, f"{module_name}.{first}"):
                    self.report(node, problem)
                self._check_property_keywords(
                    call, module["functions"][first], f"{module_name}.{first}", node
                )
        elif first in module["classes"]:
            if member:
                self._check_member((module_name, first), member.split(".")[0], node, call, instance=False)
            elif call is not None:
                methods, _ = self.api.class_members(module_name, first)
                if methods.get("__init__"):
                    for problem in check_call(call, methods["__init__"], True, f"{module_name}.{first}()"):
                        self.report(node, problem)
        elif first not in module["names"]:
            self.report(node, f"{module_name}.{first} does not exist in Slicer {self.api.tag}")

    def _check_property_keywords(self, call: ast.Call, signature: dict, what: str, node: ast.AST) -> None:
        """A function that sets its ``**kwargs`` as properties of the Qt object it returns
        (``slicer.util.createProgressDialog``) ignores a keyword that is none: each must be a
        writable property of that class."""
        class_name = signature.get("returns")
        if (
            not signature.get("kwargs_set_as_properties")
            or class_name is None
            or self.api.kind(class_name) != "qt"
        ):
            return
        named = {p["name"] for p in signature["params"] if p["kind"] != "var_keyword"}
        properties = self.api.properties(class_name)
        for keyword in call.keywords:
            if keyword.arg is not None and keyword.arg not in named:
                if not properties.get(keyword.arg, {}).get("writable"):
                    self.report(
                        node,
                        f"{what}: {keyword.arg} is no writable property of {class_name} in Slicer {self.api.tag}",
                    )

    def _check_member(
        self, owner: tuple[str, str], member: str, node: ast.AST, call: ast.Call | None, instance: bool
    ) -> None:
        module_name, class_name = owner
        methods, attributes = self.api.class_members(module_name, class_name)
        what = f"{module_name}.{class_name}.{member}"
        if member in methods:
            signature = methods[member]
            if call is not None and signature is not None:
                static = "staticmethod" in signature["decorators"]
                for problem in check_call(call, signature, instance and not static, what):
                    self.report(node, problem)
        elif member not in attributes:
            self.report(node, f"{what} does not exist in Slicer {self.api.tag}")

    # -- typed receivers: slicer.app, slicer.dicomDatabase, self.parent, MRML nodes... --------
    def _check_receivers(self) -> None:
        """Members used on objects whose class the source shows (see ``RECEIVERS``), in every
        function and method; names bound to anything else, or bound more than one way, are
        not followed."""
        for leaf in ast.walk(self.tree):
            if (
                isinstance(leaf, ast.Attribute)
                and dotted(leaf, self.aliases) == f"qt.{leaf.attr}"
                and leaf.attr not in QT_NAMESPACES
                and self.api.kind(leaf.attr) != "qt"
            ):
                self.report(leaf, f"qt.{leaf.attr} is no class of the Qt list (slicer_api/qt-5.15.json)")
            named = self._named_mrml_class(leaf)
            if named is not None and self.api.kind(named) != "vtk":
                self.report(
                    leaf,
                    f"{named} is no MRML class in Slicer {self.api.tag} (a newly named one needs the manifests regenerated)",
                )
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._check_scope(node, None)
            elif isinstance(node, ast.ClassDef):
                parent = self._parent_class(node)
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self._check_scope(item, parent)

    def _named_mrml_class(self, node: ast.AST) -> str | None:
        """The MRML class ``slicer.vtkMRML<Name>`` names, or the class name a scene method or
        ``getNodesByClass`` is given as a string (``AddNewNodeByClass("vtkMRMLSliceNode")``)."""
        if isinstance(node, ast.Attribute) and node.attr.startswith("vtkMRML"):
            return node.attr if dotted(node, self.aliases) == f"slicer.{node.attr}" else None
        if not (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            return None
        name = dotted(node.func, self.aliases) or ""
        scene, _, method = name.rpartition(".")
        if name in NODE_LISTS or (scene == "slicer.mrmlScene" and ("vtkMRMLScene", method) in NODES_BY_CLASS):
            return node.args[0].value
        return None

    def _parent_class(self, node: ast.ClassDef) -> str | None:
        """The Qt class of ``self.parent`` in a class deriving from a scripted-module base
        (None where the class assigns ``self.parent`` itself)."""
        if any(
            isinstance(leaf, ast.Attribute)
            and isinstance(leaf.ctx, ast.Store)
            and isinstance(leaf.value, ast.Name)
            and leaf.value.id == "self"
            and leaf.attr == "parent"
            for leaf in ast.walk(node)
        ):
            return None
        for module, name in self._bases(node):
            if module == "slicer.ScriptedLoadableModule" and name in PARENT_CLASSES:
                return PARENT_CLASSES[name]
        return None

    def _check_scope(self, function: ast.AST, parent: str | None) -> None:
        env = self._receiver_names(function, parent)
        for leaf in ast.walk(function):
            if not isinstance(leaf, ast.Attribute) or leaf.attr.startswith("__"):
                continue
            found = self._type(leaf.value, env, parent)
            if found is None:
                continue
            kind, class_name = found
            if kind == "object" and self.api.kind(class_name) == "qt":
                self._check_widget_member(leaf, class_name)
            elif kind == "object" and self.api.kind(class_name) == "vtk":
                if not isinstance(leaf.ctx, ast.Store) and leaf.attr not in self.api.vtk_members(class_name):
                    self.report(
                        leaf, f"{class_name}.{leaf.attr} is no method or constant in Slicer {self.api.tag}"
                    )
            elif kind == "class":
                call = self.parents.get(leaf)
                if (
                    isinstance(call, ast.Call)
                    and call.func is leaf
                    and leaf.attr not in self.api.callables(class_name)
                ):
                    self.report(leaf, f"qt.{class_name}.{leaf.attr}() is no static or listed function")

    def _type(self, node: ast.AST, env: dict, parent: str | None) -> tuple[str, str] | None:
        """``("object", class)``, ``("list", class of its items)`` or ``("class", Qt class)``
        of an expression, None where it cannot be told."""
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and node.attr == "parent"
        ):
            return ("object", parent) if parent is not None else None
        head = node
        while isinstance(head, ast.Attribute):
            head = head.value
        if isinstance(head, ast.Name) and (head.id in env or head.id not in self.aliases):
            # a local name (a module's name bound in the function is no module there)
            return env.get(node.id) if isinstance(node, ast.Name) else None
        name = dotted(node, self.aliases)
        if name in RECEIVERS:
            return "object", RECEIVERS[name]
        if name is not None and re.fullmatch(r"qt\.\w+", name) and self.api.kind(name[3:]) == "qt":
            return "class", name[3:]
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            found = self._type(node.value, env, parent)
            return ("object", found[1]) if found is not None and found[0] == "list" else None
        if isinstance(node, ast.Call):
            return self._call_type(node, env, parent)
        return None

    def _call_type(self, call: ast.Call, env: dict, parent: str | None) -> tuple[str, str] | None:
        name = dotted(call.func, self.aliases) or ""
        class_named = (
            call.args[0].value
            if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)
            else None
        )
        if name in NODE_LISTS:
            return ("list", class_named) if class_named is not None and self.api.kind(class_named) else None
        found = split_module(name)
        if found is not None:
            function = (self.api.module(found[0]) or {}).get("functions", {}).get(found[1])
            returned = function.get("returns") if function else None
            return ("object", returned) if returned is not None and self.api.kind(returned) else None
        constructed = self._type(call.func, env, parent)
        if constructed is not None and constructed[0] == "class":
            return "object", constructed[1]
        if not isinstance(call.func, ast.Attribute):
            return None
        owner = self._type(call.func.value, env, parent)
        if owner is None or owner[0] != "object":
            return None
        if (owner[1], call.func.attr) in NODES_BY_CLASS:
            return ("object", class_named) if class_named is not None and self.api.kind(class_named) else None
        returned = self.api.returns(owner[1], call.func.attr)
        return ("object", returned) if returned is not None and self.api.kind(returned) else None

    def _receiver_names(self, function: ast.AST, parent: str | None) -> dict[str, tuple[str, str] | None]:
        """``{name: type}`` of every name bound in ``function`` (its inner functions included):
        a type where it is bound only to expressions of one type, or only to ``[]`` with items
        of one type appended (and passed to nothing but ``bool`` and ``len``); else None."""
        bindings: dict[str, list] = {}

        def unknown(target: ast.AST) -> None:
            """The names a target binds (an attribute or item stored to binds none)."""
            if isinstance(target, ast.Name):
                bindings.setdefault(target.id, []).append(None)
            elif isinstance(target, (ast.Tuple, ast.List)):
                for element in target.elts:
                    unknown(element)
            elif isinstance(target, ast.Starred):
                unknown(target.value)

        for node in ast.walk(function):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)):
                targets = getattr(node, "targets", [getattr(node, "target", None)])
                for target in targets:
                    if isinstance(target, ast.Name) and node.value is not None:
                        bindings.setdefault(target.id, []).append(("value", node.value))
                    elif (
                        isinstance(target, ast.Tuple)
                        and isinstance(node.value, ast.Tuple)
                        and len(target.elts) == len(node.value.elts)
                        and all(isinstance(t, ast.Name) for t in target.elts)
                    ):
                        for element, value in zip(target.elts, node.value.elts):
                            if isinstance(element, ast.Name):  # each is (checked above)
                                bindings.setdefault(element.id, []).append(("value", value))
                    else:
                        unknown(target)
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                if isinstance(node.target, ast.Name):
                    bindings.setdefault(node.target.id, []).append(("item", node.iter))
                else:
                    unknown(node.target)
            elif isinstance(node, (ast.AugAssign, ast.Delete)):
                for target in getattr(node, "targets", [getattr(node, "target", None)]):
                    unknown(target)
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                unknown(node.optional_vars)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                bindings.setdefault(node.name, []).append(None)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                arguments = node.args
                for argument in [
                    *arguments.posonlyargs,
                    *arguments.args,
                    *arguments.kwonlyargs,
                    arguments.vararg,
                    arguments.kwarg,
                ]:
                    if argument is not None:
                        bindings.setdefault(argument.arg, []).append(None)
                if not isinstance(node, ast.Lambda) and node is not function:
                    bindings.setdefault(node.name, []).append(None)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    name = (alias.asname or alias.name).split(".")[0]
                    if name not in self.aliases:  # importing a module again binds the same module
                        bindings.setdefault(name, []).append(None)
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                for name in node.names:
                    bindings.setdefault(name, []).append(None)
        env: dict[str, tuple[str, str] | None] = dict.fromkeys(bindings)
        for _ in range(len(bindings) + 1):
            updated = {}
            for name, found in bindings.items():
                typed = {self._binding_type(b, env, parent, function, name) for b in found}
                updated[name] = typed.pop() if len(typed) == 1 else None
            if updated == env:
                break
            env = updated
        return env

    def _binding_type(self, binding, env: dict, parent: str | None, function: ast.AST, name: str):
        if binding is None:
            return None
        how, value = binding
        if how == "item":
            if isinstance(value, (ast.Tuple, ast.List)):
                items = {self._type(element, env, parent) for element in value.elts}
                found = items.pop() if len(items) == 1 else None
                return found if found is not None and found[0] == "object" else None
            found = self._type(value, env, parent)
            return ("object", found[1]) if found is not None and found[0] == "list" else None
        if isinstance(value, ast.List) and not value.elts:
            return self._appended_type(function, name, env, parent)
        return self._type(value, env, parent)

    def _appended_type(self, function: ast.AST, name: str, env: dict, parent: str | None):
        """``("list", class)`` for a list only appended items of one type, else None."""
        items = set()
        for leaf in ast.walk(function):
            if isinstance(leaf, ast.Name) and leaf.id == name:
                use = self.parents.get(leaf)
                if isinstance(use, ast.Attribute):
                    call = self.parents.get(use)
                    if use.attr != "append" or not (isinstance(call, ast.Call) and len(call.args) == 1):
                        return None
                    found = self._type(call.args[0], env, parent)
                    items.add(found[1] if found is not None and found[0] == "object" else None)
                elif (
                    isinstance(use, ast.Call)
                    and leaf in use.args
                    and dotted(use.func, {}) not in ("bool", "len")
                ):
                    return None
                elif isinstance(use, ast.Subscript) and not isinstance(use.ctx, ast.Load):
                    return None
        return ("list", items.pop()) if len(items) == 1 and None not in items else None

    # -- classes: base members, hooks, widgets ------------------------------------------------
    def _bases(self, node: ast.ClassDef) -> list[tuple[str, str]]:
        bases = []
        for base in node.bases:
            found = split_module(dotted(base, self.aliases) or "")
            if found is not None:
                bases.append(found)
        return bases

    def _check_class(self, node: ast.ClassDef) -> None:
        bases = self._bases(node)
        own_methods = {
            item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        own_attributes = {
            leaf.attr
            for leaf in ast.walk(node)
            if isinstance(leaf, ast.Attribute)
            and isinstance(leaf.value, ast.Name)
            and leaf.value.id == "self"
            and isinstance(leaf.ctx, ast.Store)
        }
        inherited: dict = {}
        inherited_attributes: set[str] = set()
        for base in bases:
            methods, attributes = self.api.class_members(*base)
            inherited.update(methods)
            inherited_attributes |= attributes
        if bases:
            hooks = set().union(*(self.api.hooks(name) for _, name in bases))
            for name in own_methods & set(LIFECYCLE_HOOKS):
                if name not in hooks and name not in inherited:
                    self.report(
                        node, f"{node.name}.{name} is no hook of its Slicer base classes in {self.api.tag}"
                    )
            for leaf in ast.walk(node):
                if (
                    isinstance(leaf, ast.Attribute)
                    and isinstance(leaf.value, ast.Name)
                    and leaf.value.id == "self"
                    and leaf.attr not in own_methods | own_attributes
                ):
                    if leaf.attr in inherited:
                        call = self.parents.get(leaf)
                        if (
                            isinstance(call, ast.Call)
                            and call.func is leaf
                            and inherited[leaf.attr] is not None
                        ):
                            for problem in check_call(call, inherited[leaf.attr], True, f"self.{leaf.attr}"):
                                self.report(leaf, problem)
                    elif leaf.attr not in inherited_attributes:
                        self.report(
                            leaf,
                            f"self.{leaf.attr} is defined neither by {node.name} nor by its Slicer bases",
                        )
                elif (
                    isinstance(leaf, ast.Call)
                    and isinstance(leaf.func, ast.Attribute)
                    and isinstance(leaf.func.value, ast.Call)
                    and isinstance(leaf.func.value.func, ast.Name)
                    and leaf.func.value.func.id == "super"
                ):
                    name = leaf.func.attr
                    if name not in inherited:
                        self.report(leaf, f"super().{name} does not exist in Slicer {self.api.tag}")
                    elif inherited[name] is not None:
                        for problem in check_call(leaf, inherited[name], True, f"super().{name}"):
                            self.report(leaf, problem)
        self._check_widget_uses(node)

    def _widget_classes(self, node: ast.AST, aliases: dict, qt_members: dict) -> set[str]:
        """The .ui/Qt classes an expression refers to (empty: not a known widget)."""
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
            and node.value.attr == "ui"
        ):
            if node.attr not in self.widgets:
                self.report(node, f"self.ui.{node.attr} is not a widget of the .ui file")
                return set()
            return {self.widgets[node.attr]}
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return set(qt_members.get(node.attr, ()))
        if isinstance(node, ast.Name):
            return set(aliases.get(node.id, ()))
        return set()

    def _check_widget_uses(self, class_node: ast.ClassDef) -> None:
        qt_members: dict[str, set[str]] = {}
        for leaf in ast.walk(class_node):
            if isinstance(leaf, ast.Assign) and isinstance(leaf.value, ast.Call):
                origin = dotted(leaf.value.func, self.aliases) or ""
                if origin.startswith("qt.") and origin[3:] in self.api.qt:
                    for target in leaf.targets:
                        if (
                            isinstance(target, ast.Attribute)
                            and isinstance(target.value, ast.Name)
                            and target.value.id == "self"
                        ):
                            qt_members.setdefault(target.attr, set()).add(origin[3:])
        for function in [
            n for n in ast.walk(class_node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]:
            aliases = self._local_widget_aliases(function, qt_members)
            for leaf in ast.walk(function):
                if isinstance(leaf, ast.Attribute):
                    for class_name in self._widget_classes(leaf.value, aliases, qt_members):
                        self._check_widget_member(leaf, class_name)

    def _local_widget_aliases(self, function: ast.AST, qt_members: dict) -> dict[str, set[str]]:
        aliases: dict[str, set[str]] = {}
        for leaf in ast.walk(function):
            pairs = []
            if isinstance(leaf, ast.Assign):
                for target in leaf.targets:
                    if isinstance(target, ast.Tuple) and isinstance(leaf.value, ast.Tuple):
                        pairs += list(zip(target.elts, leaf.value.elts))
                    else:
                        pairs.append((target, leaf.value))
            elif isinstance(leaf, ast.For) and isinstance(leaf.iter, (ast.Tuple, ast.List)):
                pairs += [(leaf.target, element) for element in leaf.iter.elts]
            for target, value in pairs:
                if not isinstance(target, ast.Name):
                    continue
                classes = self._widget_classes(value, aliases, qt_members)
                if isinstance(value, ast.Call) and dotted(value.func, self.aliases) == "slicer.util.loadUI":
                    classes = {self.root_class}
                if classes:
                    aliases.setdefault(target.id, set()).update(classes)
        return aliases

    def _check_widget_member(self, node: ast.Attribute, class_name: str) -> None:
        if self.api.chain(class_name) is None:
            self.report(node, f"widget class {class_name} is in neither the manifest nor the Qt list")
            return
        member, parent = node.attr, self.parents.get(node)
        properties = self.api.properties(class_name)
        signals = self.api.signals(class_name)
        what = f"{class_name}.{member}"
        if isinstance(parent, ast.Call) and parent.func is node:
            if member in ("connect", "disconnect"):
                if (
                    parent.args
                    and isinstance(parent.args[0], ast.Constant)
                    and isinstance(parent.args[0].value, str)
                ):
                    signal = normalize_signature(parent.args[0].value)
                    if signal not in signals:
                        self.report(node, f"{class_name} has no signal {signal} in Slicer {self.api.tag}")
                else:
                    self.report(node, f'{what}: name the signal as a string, e.g. "clicked(bool)"')
            elif member not in self.api.callables(class_name):
                self.report(node, f"{what}() is no slot, invokable or listed method in Slicer {self.api.tag}")
        elif isinstance(parent, ast.Attribute) and parent.attr in ("connect", "disconnect"):
            overloads = sorted(s for s in signals if s.split("(")[0] == member)
            if not overloads:
                self.report(node, f"{class_name} has no signal {member} in Slicer {self.api.tag}")
            else:
                longest = max(overloads, key=len)[:-1]
                if any(not longest.startswith(s[:-1]) for s in overloads):
                    self.report(node, f"{what} has overloads {overloads}: connect one by its signature")
        elif isinstance(node.ctx, ast.Store):
            if member not in properties or not properties[member]["writable"]:
                self.report(node, f"{what} is no writable property in Slicer {self.api.tag}")
        elif (
            member not in properties
            and member not in self.api.callables(class_name)
            and member not in {s.split("(")[0] for s in signals}
        ):
            self.report(node, f"{what} is no property, signal or method in Slicer {self.api.tag}")


# -- .ui -------------------------------------------------------------------------------------------


def parameter_types(source: str, class_name: str) -> dict[str, tuple[str, list[str]]]:
    """``{field: (type, [annotation names])}`` of a parameterNodeWrapper class."""
    tree = ast.parse(source)
    wrapper = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)
    fields = {}
    for item in wrapper.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        annotation, extras = item.annotation, []
        if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value).endswith("Annotated"):
            assert isinstance(annotation.slice, ast.Tuple)  # Annotated[type, extra, ...]
            elements = annotation.slice.elts
            annotation = elements[0]
            extras = [ast.unparse(e).split("(")[0].rsplit(".", 1)[-1] for e in elements[1:]]
        name = ast.unparse(annotation).rsplit(".", 1)[-1]
        fields[item.target.id] = ("vtkMRMLNode" if name.startswith("vtkMRML") else name, extras)
    return fields


def text(element: ElementTree.Element, path: str) -> str:
    """The text of ``element``'s child at ``path``, which a .ui file has there."""
    child = element.find(path)
    if child is None or child.text is None:
        raise ValueError(f"a <{element.tag}> without <{path}> text")
    return child.text


def check_ui(
    ui: ElementTree.ElementTree[ElementTree.Element], api: Api, fields: dict[str, tuple[str, list[str]]]
) -> list[str]:
    """Properties, designer connections and parameter bindings of the .ui in one release."""
    problems = []
    widgets = {w.attrib["name"]: w.attrib["class"] for w in ui.iter("widget")}
    for widget in ui.iter("widget"):
        name, class_name = widget.attrib["name"], widget.attrib["class"]
        if api.chain(class_name) is None:
            problems.append(
                f"{api.tag}: {name}: widget class {class_name} is in neither the manifest nor the Qt list"
            )
            continue
        properties = api.properties(class_name)
        for prop in widget.findall("property"):
            if prop.get("stdset") == "0":
                continue  # a dynamic property (SlicerParameterName)
            facts = properties.get(prop.get("name"))
            if facts is None or not facts["writable"]:
                problems.append(
                    f"{api.tag}: {name}: {class_name} has no writable property {prop.get('name')}"
                )
        bound = [
            text(p, "string") for p in widget.findall("property") if p.get("name") == "SlicerParameterName"
        ]
        for parameter in bound:
            problems += _check_binding(api, name, class_name, parameter, fields)
    for spacer in ui.iter("spacer"):
        for prop in spacer.findall("property"):
            if prop.get("name") not in api.spacer_properties:
                problems.append(f"{api.tag}: spacer {spacer.get('name')}: no property {prop.get('name')}")
    for connection in ui.iter("connection"):
        sender, receiver = text(connection, "sender"), text(connection, "receiver")
        signal = normalize_signature(text(connection, "signal"))
        slot = normalize_signature(text(connection, "slot"))
        if signal not in api.signals(widgets[sender]):
            problems.append(f"{api.tag}: connection: {widgets[sender]} has no signal {signal}")
        if slot not in api.slots(widgets[receiver]):
            problems.append(f"{api.tag}: connection: {widgets[receiver]} has no slot {slot}")
    return problems


def _check_binding(api: Api, widget: str, class_name: str, parameter: str, fields: dict) -> list[str]:
    if parameter not in fields:
        return [f"{api.tag}: {widget}: SlicerParameterName {parameter} is no parameter"]
    if parameter in api.reserved_parameter_names():
        return [f"{api.tag}: parameter {parameter} is a name the parameterNodeWrapper reserves"]
    python_type, annotations = fields[parameter]
    for connector in api.connectors():
        if class_name in connector["widgets"] and python_type in connector["types"]:
            missing = set(connector["required_annotations"]) - set(annotations)
            if missing:
                return [
                    f"{api.tag}: {widget}: {connector['name']} needs the {sorted(missing)} annotation "
                    f"on {parameter}"
                ]
            return []
    return [f"{api.tag}: {widget}: no GUI connector binds a {class_name} to {python_type} ({parameter})"]


def check(
    source: str, ui: ElementTree.ElementTree[ElementTree.Element], api: Api, parameter_class: str
) -> list[str]:
    """Every problem of the module's source and .ui in one release."""
    return [
        *SourceChecker(source, ui, api).run(),
        *check_ui(ui, api, parameter_types(source, parameter_class)),
    ]
