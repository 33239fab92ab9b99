"""Static checks of the Slicer module: what desktop Slicer would load, checked without it."""

import ast
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

MODULE = Path(__file__).resolve().parents[2]
SOURCE = (MODULE / "InstructX2X.py").read_text()
UI = ElementTree.parse(MODULE / "Resources" / "UI" / "InstructX2X.ui")


def widgets() -> dict[str, str]:
    return {w.attrib["name"]: w.attrib["class"] for w in UI.iter("widget")}


def text(element: ElementTree.Element, path: str) -> str:
    """The text of ``element``'s child at ``path``, which must be there."""
    child = element.find(path)
    assert child is not None and child.text is not None, path
    return child.text


def cmake_value(cmake: str, pattern: str) -> str:
    """The first group of ``pattern``, which must match in ``cmake``."""
    match = re.search(pattern, cmake)
    assert match, pattern
    return match.group(1)


def test_every_widget_the_code_touches_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    assert used and used <= set(widgets()), sorted(used - set(widgets()))


def test_every_slicer_parameter_name_is_a_parameter_node_field():
    bound = {
        text(prop, "string")
        for widget in UI.iter("widget")
        for prop in widget.findall("property")
        if prop.get("name") == "SlicerParameterName"
    }
    tree = ast.parse(SOURCE)
    wrapper = next(
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == "InstructX2XParameterNode"
    )
    fields = {
        item.target.id
        for item in wrapper.body
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
    }
    assert bound and bound <= fields, sorted(bound - fields)
    assert fields - bound == set(), "every setting has a widget"


def test_each_bound_combo_lists_exactly_its_parameters_choices():
    """The parameter node binds a QComboBox by its text: an item that is not a choice, or a
    choice with no item, cannot be shown or chosen. Choices of a panel enum are its labels."""
    from InstructX2XModuleLib import session

    tree = ast.parse(SOURCE)
    wrapper = next(
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == "InstructX2XParameterNode"
    )
    choices = {}
    for item in wrapper.body:
        if not isinstance(item, ast.AnnAssign) or "Choice(" not in ast.unparse(item.annotation):
            continue
        assert isinstance(item.target, ast.Name)
        call = next(
            n
            for n in ast.walk(item.annotation)
            if isinstance(n, ast.Call) and ast.unparse(n.func) == "Choice"
        )
        argument = call.args[0]
        if isinstance(argument, ast.List):
            choices[item.target.id] = [ast.literal_eval(element) for element in argument.elts]
        else:  # Choice(SomeChoice.labels()): the panels' enum in session
            choices[item.target.id] = getattr(session, ast.unparse(argument).split(".")[0]).labels()
    combos = {}
    for widget in UI.iter("widget"):
        bound = [prop for prop in widget.findall("property") if prop.get("name") == "SlicerParameterName"]
        if widget.get("class") == "QComboBox" and bound:
            combos[text(bound[0], "string")] = [
                text(item, "property/string") for item in widget.findall("item")
            ]
    assert "backend" in choices and set(combos) == set(choices)
    for name, labels in choices.items():
        assert combos[name] == labels, name


def test_the_module_file_holds_only_module_widget_logic_and_test_classes():
    classes = [node.name for node in ast.parse(SOURCE).body if isinstance(node, ast.ClassDef)]
    assert classes == [
        "InstructX2X",
        "InstructX2XParameterNode",
        "InstructX2XWidget",
        "InstructX2XLogic",
        "InstructX2XTest",
    ]


def test_cmakelists_lists_every_script_and_resource():
    cmake = (MODULE / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "InstructX2X")
    listed = set(re.findall(r"^\s+(\S+\.(?:py|ui|png|txt))\s*$", cmake, flags=re.M))
    on_disk = {
        str(p.relative_to(MODULE))
        for p in MODULE.rglob("*")
        if p.suffix in (".py", ".ui", ".png", ".txt")
        and "__pycache__" not in p.parts
        and p.name != "CMakeLists.txt"
        and "web" not in p.parts  # the browser panel: pip, not the extension
        and "Testing" not in p.parts  # the module's pytest tests: run from the repository, not shipped
        and not any(part.endswith(".egg-info") for part in p.parts)
    }
    assert listed == on_disk
    assert "WITH_GENERIC_TESTS" in cmake and "slicerMacroBuildScriptedModule" in cmake
    top = (MODULE.parent / "CMakeLists.txt").read_text()
    # the module installs its own worker packages: no extension dependency (PyTorch's included)
    assert "add_subdirectory(InstructX2X)" in top and re.search(r'EXTENSION_DEPENDS "NA"', top)


def test_module_files_parse_as_python_3_9():
    for path in [MODULE / "InstructX2X.py", *(MODULE / "InstructX2XModuleLib").glob("*.py")]:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


def top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module is not None  # an absolute import names its module
            names.add(node.module.split(".")[0])
    return names


def test_importing_the_module_loads_neither_torch_nor_the_library():
    heavy = {"torch", "diffusers", "transformers", "instructx2x", "numpy", "PIL", "pydicom"}
    assert not top_level_imports(MODULE / "InstructX2X.py") & heavy
    lib = MODULE / "InstructX2XModuleLib"
    assert not top_level_imports(lib / "worker.py") & (heavy | {"slicer", "qt", "vtk"})
    assert not top_level_imports(lib / "scene.py") & (heavy - {"numpy"} | {"qt"})


def test_ui_file_is_a_slicer_module_panel():
    root = UI.getroot()
    assert text(root, "class") == "InstructX2X"
    kinds = widgets()
    assert kinds["segmentEditorWidget"] == "qMRMLSegmentEditorWidget"
    assert kinds["inputSelector"] == "qMRMLNodeComboBox" and kinds["tauSlider"] == "ctkSliderWidget"
    assert "NOT FOR DIAGNOSIS" in ElementTree.tostring(root, encoding="unicode")


def ui_property(widget: str, name: str) -> str | None:
    """The text of a widget's property in the .ui (None when unset)."""
    element = next(w for w in UI.iter("widget") if w.get("name") == widget)
    prop = next((p for p in element.findall("property") if p.get("name") == name), None)
    return None if prop is None else "".join(prop.itertext()).strip()


def test_tau_is_applied_when_the_slider_is_released_not_while_dragged():
    """With tracking on, every step of a drag sends a re-threshold to the worker."""
    assert ui_property("tauSlider", "tracking") == "false"


def test_the_before_after_button_starts_on_after():
    """A result opens on the counterfactual ("after"); the button shows it pressed."""
    assert ui_property("beforeAfterButton", "checkable") == "true"
    assert ui_property("beforeAfterButton", "checked") == "true"


def test_the_extension_screenshots_and_contributors_are_as_the_extensions_index_wants():
    """Slicer's extension index shows EXTENSION_SCREENSHOTURLS (space-separated) and lists
    EXTENSION_CONTRIBUTORS as "Name (Affiliation)", comma-separated."""
    top = (MODULE.parent / "CMakeLists.txt").read_text()
    homepage = cmake_value(top, r'EXTENSION_HOMEPAGE "https://github.com/([^/"]+/[^/"]+)"')
    urls = cmake_value(top, r'EXTENSION_SCREENSHOTURLS "([^"]*)"').split()
    assert urls
    for url in urls:
        match = re.fullmatch(r"https://raw\.githubusercontent\.com/([^/]+/[^/]+)/main/(.+\.png)", url)
        assert match and match.group(1) == homepage and (MODULE.parent / match.group(2)).is_file(), url
    contributors = cmake_value(top, r'EXTENSION_CONTRIBUTORS "([^"]+)"')
    assert all(re.fullmatch(r"[^(),]+ \([^()]+\)", name.strip()) for name in contributors.split(","))


def test_the_extension_icon_url_names_the_modules_icon_in_this_repository():
    top = (MODULE.parent / "CMakeLists.txt").read_text()
    homepage = cmake_value(top, r'EXTENSION_HOMEPAGE "https://github.com/([^/"]+/[^/"]+)"')
    url = cmake_value(top, r'EXTENSION_ICONURL "([^"]+)"')
    match = re.fullmatch(r"https://raw\.githubusercontent\.com/([^/]+/[^/]+)/main/(.+\.png)", url)
    assert match and match.group(1) == homepage, url
    assert (MODULE.parent / match.group(2)).is_file(), match.group(2)
    assert (MODULE.parent / match.group(2)).resolve() == (
        MODULE / "Resources" / "Icons" / "InstructX2X.png"
    ).resolve()


def function(name: str, tree: ast.AST | None = None) -> ast.FunctionDef:
    """The module file's function or method ``name``."""
    return next(
        node
        for node in ast.walk(tree or ast.parse(SOURCE))
        if isinstance(node, ast.FunctionDef) and node.name == name
    )


def calls(node: ast.AST, name: str) -> list[ast.Call]:
    """Calls in ``node`` whose callee's source ends with ``name``, in source order."""
    found = [n for n in ast.walk(node) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith(name)]
    return sorted(found, key=lambda n: (n.lineno, n.col_offset))


def test_the_completer_has_a_parent():
    """setCompleter does not take ownership: a completer without a parent is deleted by PythonQt
    with its Python wrapper, and completion stops."""
    (completer,) = calls(function("_fillHelper"), "qt.QCompleter")
    assert len(completer.args) == 2 and ast.unparse(completer.args[1]) == "self.ui.instructionEdit"


def test_a_worker_error_dialog_is_shown_with_the_timer_stopped():
    """A modal dialog inside the timer's slot runs the event loop: with the timer running, the
    slot runs again and shows the same error again."""
    timer = function("onTimer")
    (shown,) = calls(timer, "errorDisplay")
    loops = [n for n in ast.walk(timer) if isinstance(n, ast.For) and ast.unparse(n.iter) == "events"]
    assert loops and not any(shown in ast.walk(loop) for loop in loops)
    stops = [c for c in calls(timer, "self.timer.stop") if c.lineno < shown.lineno]
    assert stops, "the timer is stopped before the dialog"
    guard = next(n for n in ast.walk(timer) if isinstance(n, ast.If) and shown in ast.walk(n))
    assert any(c in ast.walk(guard) for c in stops)


def test_reload_reloads_the_worker_before_packages_and_the_session_last():
    """packages' PackageSetError subclasses worker's WorkerError: reloaded first, packages
    would keep subclassing the old class."""
    key = next(
        k.value for k in ast.walk(function("onReload")) if isinstance(k, ast.keyword) and k.arg == "key"
    )
    order = sorted(
        [
            "InstructX2XModuleLib.packages",
            "InstructX2XModuleLib.session",
            "InstructX2XModuleLib.scene",
            "InstructX2XModuleLib.worker",
            "InstructX2XModuleLib.model_install",
        ],
        key=eval(compile(ast.Expression(key), "onReload", "eval")),
    )
    assert order[0].endswith(".worker") and order[-1].endswith(".session")


def test_the_install_dialog_is_application_modal_and_the_self_test_installs_only_when_opted_in():
    install = function("ensureDependencies")
    (dialog,) = calls(install, "createProgressDialog")
    assert {k.arg: ast.unparse(k.value) for k in dialog.keywords}[
        "windowModality"
    ] == "qt.Qt.ApplicationModal"
    assert "testingEnabled and os.environ.get(SELFTEST_INSTALL) == '1'" in ast.unparse(install)
    selftest = ast.unparse(function("test_edit_and_export"))
    assert "workerPackagesStatus()" in selftest and "SELFTEST_INSTALL" in selftest and "finally:" in selftest


def test_the_package_set_lies_beside_the_revisions_settings():
    assert "slicerRevisionUserSettingsFilePath" in ast.unparse(function("workerPackagesFolder"))


def test_leaving_or_reloading_releases_the_editor_and_a_reload_while_shown_enters_again():
    """Slicer's reloadScriptedModule hides the old widget and calls its cleanup(), then setup()
    of the new one, never exit() or enter() (qSlicerScriptedLoadableModuleWidget::reload): the
    old editor must let go of its effect, shortcuts and view observations in cleanup() as in
    exit(), and the new one must enter when the module is shown."""
    release = function("_releaseEditor")
    assert [ast.unparse(c) for c in calls(release, "")] == [
        "editor.setActiveEffect(None)",
        "editor.uninstallKeyboardShortcuts()",
        "editor.removeViewObservations()",
    ]
    for method in ("cleanup", "exit"):
        assert calls(function(method), "self._releaseEditor"), method
    entered = next(
        n
        for n in ast.walk(function("setup"))
        if isinstance(n, ast.If) and ast.unparse(n.test) == "self.parent.isEntered"
    )
    assert calls(entered, "self.enter")
