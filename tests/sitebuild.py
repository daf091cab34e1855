"""The site builder, ``site/build.py``, loaded as a module for the tests. It is a tool of the
checkout (``make site``, ``python site/build.py sync-setup-cells``), not part of the bnviz
package: the wheel does not ship it."""
import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "site" / "build.py"


def _load():
    name = "bnviz_site_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


site = _load()
