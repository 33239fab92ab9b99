"""The Slicer module against the API of every supported Slicer release (no Slicer needed).

The manifests in ``slicer_api`` (beside this file) are read from Slicer's, CTK's and SlicerPyTorch's own
sources by ``scripts/slicer_api_manifest.py``; ``slicer_api_check`` reads the module with
``ast`` and its .ui with ``xml.etree`` and lists what a release lacks.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import types
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import slicer_api_check as conformance

ROOT = Path(__file__).resolve().parents[3]
MODULE = ROOT / "InstructX2X" / "InstructX2X.py"
UI_FILE = ROOT / "InstructX2X" / "Resources" / "UI" / "InstructX2X.ui"
PARAMETERS = "InstructX2XParameterNode"


def source() -> str:
    return MODULE.read_text()


def ui(text: str | None = None) -> ElementTree.ElementTree[ElementTree.Element]:
    if text is None:
        return ElementTree.parse(UI_FILE)
    return ElementTree.ElementTree(ElementTree.fromstring(text))


@pytest.fixture(scope="module")
def apis() -> dict:
    return {tag: conformance.Api.load(tag) for tag in conformance.SUPPORTED_TAGS}


def test_a_manifest_for_each_supported_release_read_at_that_release():
    assert generator().SUPPORTED_TAGS == conformance.SUPPORTED_TAGS
    on_disk = sorted(p.name for p in conformance.API_DIR.glob("slicer-*.json"))
    assert on_disk == sorted(f"slicer-{tag}.json" for tag in conformance.SUPPORTED_TAGS)
    ui_classes = {w.attrib["class"] for w in ui().iter("widget")}
    for tag in conformance.SUPPORTED_TAGS:
        manifest = json.loads((conformance.API_DIR / f"slicer-{tag}.json").read_text())
        assert manifest["slicer"]["tag"] == tag and len(manifest["slicer"]["commit"]) == 40
        assert len(manifest["ctk"]["commit"]) == 40
        # every .ui class is known: Slicer/CTK ones from the headers, the rest from the Qt list
        api = conformance.Api.load(tag)
        assert all(api.chain(name) is not None for name in ui_classes), tag
        assert {name for name in ui_classes if name.startswith(("qMRML", "ctk"))} <= set(manifest["qobjects"])


@pytest.mark.parametrize("tag", conformance.SUPPORTED_TAGS)
def test_the_module_and_its_ui_use_only_what_the_release_has(apis, tag):
    assert conformance.check(source(), ui(), apis[tag], PARAMETERS) == []


def test_the_widget_defines_the_lifecycle_slicer_calls(apis):
    tree = ast.parse(source())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "InstructX2XWidget")
    defined = {n.name for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert set(conformance.LIFECYCLE_HOOKS) <= defined
    for api in apis.values():  # each is a C++ hook or a base-class method in every release
        base, _ = api.class_members("slicer.ScriptedLoadableModule", "ScriptedLoadableModuleWidget")
        assert set(conformance.LIFECYCLE_HOOKS) <= api.hooks("ScriptedLoadableModuleWidget") | set(base)


# Each row breaks one use, in a copy of the source or the .ui, and names the problem the
# check must report against the oldest supported release: the check is shown to fail where
# the module would fail in Slicer.
OLDEST = conformance.SUPPORTED_TAGS[0]
SOURCE_BREAKS = [
    ("waitCursor=True", "waitcursor=True", "slicer.util.tryWithErrorDisplay: no parameter 'waitcursor'"),
    (
        "slicer.util.setSliceViewerLayers(",
        "slicer.util.setSliceViewerLayer(",
        "slicer.util.setSliceViewerLayer does not exist",
    ),
    ("copyFiles=True", "copy_files=True", "DICOMLib.DICOMUtils.importDicom: no parameter 'copy_files'"),
    (
        'slicer.util.selectModule("DICOM")',
        "slicer.util.selectModule()",
        "slicer.util.selectModule: required parameter 'module' not given",
    ),
    (
        '"currentNodeChanged(vtkMRMLNode*)"',
        '"currentNodeChanged(vtkMRMLScalarVolumeNode*)"',
        "qMRMLNodeComboBox has no signal currentNodeChanged(vtkMRMLScalarVolumeNode*)",
    ),
    (
        'self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)',
        "self.ui.inputSelector.currentNodeChanged.connect(self.onInputChanged)",
        "qMRMLNodeComboBox.currentNodeChanged has overloads",
    ),
    (
        "editor.removeViewObservations()",
        "editor.removeViewObservers()",
        "qMRMLSegmentEditorWidget.removeViewObservers() is no slot",
    ),
    (
        "self.ui.progressBar.value = 0",
        "self.ui.progressBar.text = 0",
        "QProgressBar.text is no writable property",
    ),
    ("super().getParameterNode()", "super().parameterNode()", "super().parameterNode does not exist"),
    ("self.resourcePath(", "self.resourcesPath(", "self.resourcesPath is defined neither"),
]


@pytest.mark.parametrize("old,new,reported", SOURCE_BREAKS)
def test_a_broken_call_signal_or_member_is_reported(apis, old, new, reported):
    text = source()
    assert old in text, f"the module no longer contains {old!r}: update the row"
    problems = conformance.check(text.replace(old, new, 1), ui(), apis[OLDEST], PARAMETERS)
    assert any(reported in p for p in problems), problems


# Each row renames one member used on an object whose class the check tells from the source
# (slicer.app, its commandOptions(), self.parent, slicer.dicomDatabase, createProgressDialog's
# dialog, qt classes, MRML nodes and the scene): every supported release must report it.
RECEIVER_BREAKS = [
    (
        "slicer.app.slicerRevisionUserSettingsFilePath",
        "slicer.app.slicerRevisionUserSettingsPath",
        "qSlicerApplication.slicerRevisionUserSettingsPath is no property, signal or method",
    ),
    (
        "slicer.app.majorVersion",
        "slicer.app.majorVer",
        "qSlicerApplication.majorVer is no property, signal or method",
    ),
    (
        "slicer.app.processEvents()",
        "slicer.app.processEvent()",
        "qSlicerApplication.processEvent() is no slot",
    ),
    (
        "slicer.app.commandOptions().testingEnabled",
        "slicer.app.commandOptions().testingEnable",
        "qSlicerCommandOptions.testingEnable is no property, signal or method",
    ),
    (
        "slicer.app.commandOptions()",
        "slicer.app.commandOption()",
        "qSlicerApplication.commandOption() is no slot",
    ),
    (
        "if self.parent.isEntered:",
        "if self.parent.isEnterd:",
        "qSlicerScriptedLoadableModuleWidget.isEnterd is no property, signal or method",
    ),
    (
        "self.parent.helpText =",
        "self.parent.helpTxt =",
        "qSlicerScriptedLoadableModule.helpTxt is no writable property",
    ),
    (
        "database.fileForInstance",
        "database.fileForInstanc",
        "ctkDICOMDatabase.fileForInstanc is no property, signal or method",
    ),
    (
        "dialogs[0].wasCanceled",
        "dialogs[0].wasCancelled",
        "QProgressDialog.wasCancelled is no property, signal or method",
    ),
    (
        "dialogs[0].setCancelButton(None)",
        "dialogs[0].setCancelBtn(None)",
        "QProgressDialog.setCancelBtn() is no slot",
    ),
    ("dialogs[0].labelText =", "dialogs[0].labelTxt =", "QProgressDialog.labelTxt is no writable property"),
    (
        "progress.setCancelButton(None)",
        "progress.setCancelBtn(None)",
        "QProgressDialog.setCancelBtn() is no slot",
    ),
    (
        "labelText=label, maximum=0, windowModality=",
        "labelText=label, maximum=0, windowModal=",
        "slicer.util.createProgressDialog: windowModal is no writable property of QProgressDialog",
    ),
    (
        "qt.QFileDialog.getExistingDirectory(",
        "qt.QFileDialog.getExistingDir(",
        "qt.QFileDialog.getExistingDir() is no static or listed function",
    ),
    (
        "qt.QApplication.setOverrideCursor(",
        "qt.QApplication.setOverideCursor(",
        "qt.QApplication.setOverideCursor() is no static or listed function",
    ),
    (
        "qt.QApplication.restoreOverrideCursor()",
        "qt.QApplication.restoreOverideCursor()",
        "qt.QApplication.restoreOverideCursor() is no static or listed function",
    ),
    ("qt.QCursor(", "qt.QCursr(", "qt.QCursr is no class of the Qt list"),
    (
        "sliceNode.SetUseLabelOutline(True)",
        "sliceNode.SetUseLabelOutlines(True)",
        "vtkMRMLSliceNode.SetUseLabelOutlines is no method or constant",
    ),
    (
        "segmentation.SetReferenceImageGeometryParameterFromVolumeNode(",
        "segmentation.SetReferenceGeometryFromVolumeNode(",
        "vtkMRMLSegmentationNode.SetReferenceGeometryFromVolumeNode is no method or constant",
    ),
    (
        "segmentation.CreateDefaultDisplayNodes()",
        "segmentation.CreateDefaultDisplayNode()",
        "vtkMRMLSegmentationNode.CreateDefaultDisplayNode is no method or constant",
    ),
    (
        "slicer.mrmlScene.StartCloseEvent",
        "slicer.mrmlScene.StartClosingEvent",
        "vtkMRMLScene.StartClosingEvent is no method or constant",
    ),
    (
        "slicer.vtkMRMLScalarVolumeNode",
        "slicer.vtkMRMLScalarVolumNode",
        "vtkMRMLScalarVolumNode is no MRML class",
    ),
    (
        'getNodesByClass("vtkMRMLSliceNode")',
        'getNodesByClass("vtkMRMLSlicesNode")',
        "vtkMRMLSlicesNode is no MRML class",
    ),
    ('"vtkMRMLSegmentationNode", _(', '"vtkMRMLSegmentNode", _(', "vtkMRMLSegmentNode is no MRML class"),
    (
        'AddEmptySegment("edit")',
        'AddEmptySegments("edit")',
        "vtkSegmentation.AddEmptySegments is no method or constant",
    ),
]


@pytest.mark.parametrize("old,new,reported", RECEIVER_BREAKS)
def test_a_renamed_member_of_a_typed_receiver_is_reported_for_every_release(apis, old, new, reported):
    text = source()
    assert old in text, f"the module no longer contains {old!r}: update the row"
    for tag, api in apis.items():
        problems = conformance.check(text.replace(old, new, 1), ui(), api, PARAMETERS)
        assert any(reported in p for p in problems), (tag, problems)


def test_the_receivers_classes_are_known_in_every_release(apis):
    """Each class the check types a receiver as resolves in every manifest (else its uses
    would go unchecked), the vtkMRML classes the module names included."""
    named = set(re.findall(r"\b(vtkMRML\w+)", source()))
    classes = {*conformance.RECEIVERS.values(), *conformance.PARENT_CLASSES.values()}
    for tag, api in apis.items():
        assert {name: api.kind(name) for name in classes | {"qSlicerCommandOptions"}} == {
            name: "qt" if name.startswith(("q", "ctk")) else "vtk"
            for name in classes | {"qSlicerCommandOptions"}
        }, tag
        assert all(api.kind(name) == "vtk" for name in named | {"vtkSegmentation"}), tag
        assert api.returns("qSlicerApplication", "commandOptions") == "qSlicerCommandOptions", tag
        assert (
            api.module("slicer.util")["functions"]["createProgressDialog"]["returns"] == "QProgressDialog"
        ), tag


RECEIVERS_UNTOLD = """
import qt
import slicer


def either(flag, other):
    application = slicer.app if flag else other
    application.noSuchMember()
    database = slicer.dicomDatabase
    database = other
    database.noSuchMember()
    for node in (slicer.mrmlScene, other):
        node.NoSuchMethod()
    nodes = []
    nodes.append(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode"))
    nodes.append(other)
    nodes[0].NoSuchMethod()
    slicer.mrmlScene.AddNewNodeByClass(other).NoSuchMethod()
    qt.Qt.NoSuchValue


def shadowed(slicer):
    slicer.app.noSuchMember()
"""


def test_a_receiver_whose_class_cannot_be_told_is_not_checked(apis):
    """Names bound more than one way, lists given items of unknown types, nodes made from a
    class name held in a variable, a shadowed module: nothing is reported."""
    assert conformance.SourceChecker(RECEIVERS_UNTOLD, ui(), apis[OLDEST]).run() == []
    typed = RECEIVERS_UNTOLD.replace("    database = other\n", "").replace("    nodes.append(other)\n", "")
    problems = conformance.SourceChecker(typed, ui(), apis[OLDEST]).run()
    assert [p.split(": ", 2)[2] for p in problems] == [
        "ctkDICOMDatabase.noSuchMember() is no slot, invokable or listed method in Slicer v5.6.2",
        "vtkMRMLSliceNode.NoSuchMethod is no method or constant in Slicer v5.6.2",
    ], problems


UI_BREAKS = [
    (
        '<property name="tracking">',
        '<property name="trackng">',
        "ctkSliderWidget has no writable property trackng",
    ),
    (
        '<property name="segmentationNodeSelectorVisible">',
        '<property name="segmentationSelectorVisible">',
        "qMRMLSegmentEditorWidget has no writable property segmentationSelectorVisible",
    ),
    (
        "<slot>setMRMLScene(vtkMRMLScene*)</slot>",
        "<slot>setScene(vtkMRMLScene*)</slot>",
        "qMRMLNodeComboBox has no slot setScene(vtkMRMLScene*)",
    ),
    (
        '<widget class="QLineEdit" name="modelEdit">',
        '<widget class="QPlainTextEdit" name="modelEdit">',
        "no GUI connector binds a QPlainTextEdit to str (model)",
    ),
]


@pytest.mark.parametrize("old,new,reported", UI_BREAKS)
def test_a_broken_ui_property_connection_or_binding_is_reported(apis, old, new, reported):
    text = UI_FILE.read_text()
    assert old in text, f"the .ui no longer contains {old!r}: update the row"
    problems = conformance.check(source(), ui(text.replace(old, new, 1)), apis[OLDEST], PARAMETERS)
    assert any(reported in p for p in problems), problems


def test_a_combo_bound_to_a_string_needs_its_choices(apis):
    """The parameterNodeWrapper binds a QComboBox to a str only with a Choice annotation."""
    text = source().replace(
        "preset: Annotated[str, Choice(Preset.labels())] = Preset.FAST.label", 'preset: str = ""'
    )
    assert text != source()
    problems = conformance.check(text, ui(), apis["v5.10.0"], PARAMETERS)
    assert any("needs the ['Choice'] annotation on preset" in p for p in problems), problems


# Installing dependencies the way Slicer extensions do (PyTorchUtils for torch, slicer.packaging
# where the release has it): the module's install path may take another way, so the check is
# shown on this fixture.
INSTALLER = """
import slicer


def install(requirements):
    import PyTorchUtils

    PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
    if hasattr(slicer, "packaging"):
        slicer.packaging.pip_ensure(slicer.packaging.load_requirements(requirements), skip_packages=["torch"])
    else:
        slicer.util.pip_install(["-r", requirements])
"""


def installer_problems(api, text: str = INSTALLER) -> list[str]:
    return conformance.SourceChecker(text, ui(), api).run()


def test_pytorchutils_and_slicer_packaging_calls_are_checked(apis):
    assert all(installer_problems(api) == [] for api in apis.values())
    assert any(
        "PyTorchUtils.PyTorchUtilsLogic.installTorch: no parameter 'confirm'" in p
        for p in installer_problems(apis[OLDEST], INSTALLER.replace("askConfirmation=", "confirm="))
    )
    unguarded = INSTALLER.replace('if hasattr(slicer, "packaging"):', "if True:")
    assert any(
        "slicer.packaging does not exist in Slicer v5.6.2" in p
        for p in installer_problems(apis[OLDEST], unguarded)
    )


def test_slicer_packaging_counts_only_where_the_release_has_it(apis):
    """Calls under ``hasattr(slicer, "packaging")`` are checked against the releases that have
    it (and the ``else`` against the others): a wrong keyword there is reported for 5.12 only."""
    broken = INSTALLER.replace('skip_packages=["torch"]', 'skip=["torch"]')
    reported = {tag: installer_problems(api, broken) for tag, api in apis.items()}
    assert [
        tag for tag, problems in reported.items() if any("no parameter 'skip'" in p for p in problems)
    ] == ["v5.12.3"]
    broken_else = INSTALLER.replace(
        'slicer.util.pip_install(["-r", requirements])', "slicer.util.pip_install()"
    )
    reported = {tag: installer_problems(api, broken_else) for tag, api in apis.items()}
    assert [tag for tag, problems in reported.items() if problems] == ["v5.6.2", "v5.8.1", "v5.10.0"]


# -- the manifest script's readers -------------------------------------------------------------


def generator() -> types.ModuleType:
    """scripts/slicer_api_manifest.py, loaded as a module."""
    spec = importlib.util.spec_from_file_location(
        "slicer_api_manifest", ROOT / "scripts" / "slicer_api_manifest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VTK_HEADER = """
#define vtkMRMLMacro(x) \\
  { return x; }
class VTK_MRML_EXPORT vtkMRMLExampleNode : public vtkMRMLNode
{
public:
  static vtkMRMLExampleNode* New();
  vtkTypeMacro(vtkMRMLExampleNode, vtkMRMLNode);
  enum { SliceEvent = 1000, OtherEvent };
  vtkGetMacro(UseOutline, int);
  vtkSetMacro(UseOutline, int);
  vtkBooleanMacro(UseOutline, int);
  vtkGetObjectMacro(Segmentation, vtkSegmentation);
  virtual void SetReference(vtkMRMLScalarVolumeNode* volume);
  const char* GetNodeTagName() override { return "a // b ("; }
  VTK_NEWINSTANCE vtkMRMLNode* Copy(const char* name = "/*");
protected:
  void Hidden();
  vtkSetMacro(HiddenValue, int);
};
"""


def test_the_vtk_reader_takes_public_methods_macros_and_enum_values():
    facts = generator().parse_vtk_header(VTK_HEADER, "vtkMRMLExampleNode")
    assert facts["base"] == "vtkMRMLNode"
    assert facts["methods"] == [
        "Copy",
        "GetNodeTagName",
        "GetSegmentation",
        "GetUseOutline",
        "New",
        "SetReference",
        "SetUseOutline",
        "UseOutlineOff",
        "UseOutlineOn",
    ]
    assert facts["constants"] == ["OtherEvent", "SliceEvent"]
    assert facts["returns"] == {
        "Copy": "vtkMRMLNode",
        "GetSegmentation": "vtkSegmentation",
        "New": "vtkMRMLExampleNode",
    }


QT_HEADER = """
class Q_EXAMPLE_EXPORT qSlicerExampleApplication : public qSlicerCoreApplication
{
  Q_OBJECT
  Q_PROPERTY(int majorVersion READ majorVersion CONSTANT)
public:
  Q_INVOKABLE qSlicerCommandOptions* commandOptions() const;
  Q_INVOKABLE QString url() const { return "https://example.org/(x"; }
  QString notExposed() const;
public slots:
  void restart();
};
"""

DECORATORS = """
class qExampleDecorators : public QObject
{
  Q_OBJECT
public slots:
  bool static_qSlicerCoreApplication_testingEnabled() { return true; }
  void processEvents(qSlicerCoreApplication* app) { app->processEvents(); }
  qSlicerCoreApplication* new_qSlicerCoreApplication() { return nullptr; }
};
"""


def test_the_qt_reader_takes_what_pythonqt_exposes_and_what_it_returns():
    script = generator()
    facts = script.parse_header(QT_HEADER, "qSlicerExampleApplication")
    assert (facts["base"], list(facts["properties"])) == ("qSlicerCoreApplication", ["majorVersion"])
    assert facts["invokables"] == ["commandOptions()", "url()"] and facts["slots"] == ["restart()"]
    assert facts["returns"] == {"commandOptions": "qSlicerCommandOptions"}
    assert script.decorated_methods(DECORATORS) == {
        "qSlicerCoreApplication": ["processEvents", "testingEnabled"]
    }


PROGRESS = """
def createDialog(parent=None, labelText="", **kwargs):
    import qt

    dialog = qt.QProgressDialog(parent)
    dialog.labelText = labelText
    for key, value in kwargs.items():
        if hasattr(dialog, key):
            setattr(dialog, key, value)
    return dialog


def other(**kwargs):
    dialog = qt.QProgressDialog()
    dialog = make()
    return dialog
"""


def test_a_python_function_returning_a_qt_object_it_made_is_described_so():
    functions = generator().describe_module(PROGRESS)["functions"]
    assert functions["createDialog"]["returns"] == "QProgressDialog"
    assert functions["createDialog"]["kwargs_set_as_properties"] is True
    assert "returns" not in functions["other"]  # also bound to what make() returns


GIT_DIRS = {
    name: os.environ.get(f"INSTRUCTX2X_{name.upper()}_GIT", "") for name in ("slicer", "ctk", "slicerpytorch")
}


@pytest.mark.skipif(
    not all(GIT_DIRS.values()),
    reason="INSTRUCTX2X_SLICER_GIT, INSTRUCTX2X_CTK_GIT and INSTRUCTX2X_SLICERPYTORCH_GIT name git directories",
)
def test_the_committed_manifests_are_what_the_script_writes():
    script = generator()
    for tag in conformance.SUPPORTED_TAGS:
        written = script.manifest(
            Path(GIT_DIRS["slicer"]), Path(GIT_DIRS["ctk"]), Path(GIT_DIRS["slicerpytorch"]), tag
        )
        committed = json.loads((conformance.API_DIR / f"slicer-{tag}.json").read_text())
        assert json.loads(json.dumps(written)) == committed, tag
