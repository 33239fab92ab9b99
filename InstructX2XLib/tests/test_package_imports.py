"""``import instructx2x``'s lazy names: each comes from the module that defines it, and every
name whose module needs no torch imports without torch (a panel parses and validates first)."""

import json
import subprocess
import sys

import instructx2x

TORCH_FREE_CORE = {
    "EditParameters",
    "RegionMode",
    "ParsedInstruction",
    "parse_instruction",
    "EditJob",
    "read_provenance",
    "InstructX2XError",
    "ParameterError",
    "InputError",
}

_WITHOUT_TORCH = """
import importlib, json, sys
sys.modules["torch"] = None  # any import of torch fails
import instructx2x
result = {}
for name, module in instructx2x._LAZY.items():
    try:
        importlib.import_module("instructx2x." + module)
        home = True
    except ImportError:
        home = False
    try:
        getattr(instructx2x, name)
        package = True
    except ImportError:
        package = False
    result[name] = [home, package]
print(json.dumps(result))
"""


def test_every_public_name_comes_from_its_defining_module():
    for name, module in instructx2x._LAZY.items():
        value = getattr(instructx2x, name)
        assert value.__module__ == f"instructx2x.{module}", (name, value.__module__)
    assert sorted(instructx2x.__all__) == sorted(instructx2x._LAZY)


def test_every_name_whose_module_needs_no_torch_imports_without_torch():
    completed = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH], capture_output=True, text=True, check=True
    )
    result = json.loads(completed.stdout)
    assert {name for name, (home, package) in result.items() if home and not package} == set()
    assert TORCH_FREE_CORE <= {name for name, (_home, package) in result.items() if package}
