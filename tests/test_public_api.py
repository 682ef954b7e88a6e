"""The public surface: every public name of the package's public modules, and every public method
of its classes, has a docstring (inherited ones count), and the package ships ``py.typed``."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

PUBLIC_MODULES = ["nocollapse", "nocollapse.diagnostics", "nocollapse.evaluation", "nocollapse.prototypes",
                  "nocollapse.integrations.lightning", "nocollapse.integrations.lightly"]


def _public(module):
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    return [(n, getattr(module, n)) for n in names]


def _undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = []
    for name, obj in _public(module):
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not inspect.getdoc(obj):
            missing.append(f"{module_name}.{name}")
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if attr.startswith("_") or not (inspect.isfunction(value) or isinstance(
                        value, (property, classmethod, staticmethod))):
                    continue
                if not inspect.getdoc(getattr(obj, attr) if not isinstance(value, property) else value):
                    missing.append(f"{module_name}.{name}.{attr}")
    return missing


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_and_method_has_a_docstring(module_name):
    if module_name.endswith(".lightly"):
        pytest.importorskip("lightly", reason="needs the lightly extra")
    if module_name.endswith("lightning"):
        pytest.importorskip("lightning.pytorch")
    assert _undocumented(module_name) == []


def test_the_package_is_typed():
    import nocollapse

    assert (Path(nocollapse.__file__).parent / "py.typed").is_file()


def test_docs_api_lists_every_public_name_and_the_index_is_current():
    pytest.importorskip("lightly", reason="the index documents the lightly integration too")
    import importlib.util
    import re

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("update_api_reference", root / "tools" / "update_api_reference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = tool.API_DOC.read_text()
    block = re.search(re.escape(tool.START) + r"\n(.*?)\n" + re.escape(tool.END), text, re.S)
    assert block, "docs/api.md lost its name index: python tools/update_api_reference.py"
    assert block.group(1) == tool.name_index(), "run: python tools/update_api_reference.py"
    for module_name in PUBLIC_MODULES:
        for name in importlib.import_module(module_name).__all__:
            assert f"| `{name}` |" in block.group(1), (module_name, name)
