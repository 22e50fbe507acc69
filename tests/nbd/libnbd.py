"""Loading the libnbd Python bindings (Debian's python3-libnbd) into the test interpreter.

The bindings are installed for the system Python, which may not be the Python running the
tests. Ask each `python3` on PATH where the `nbd` module lives, and import it from there if its
compiled part fits this interpreter.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

_PACKAGE_HINT = "apt-get install python3-libnbd libnbd-bin"


def _module_dir_from_system_python() -> Path | None:
    """Ask every `python3` on PATH (the system one is often not the first) where `nbd` is."""
    seen: set[str] = set()
    for directory in os.get_exec_path():
        candidate = os.path.join(directory, "python3")
        if not os.access(candidate, os.X_OK):
            continue
        real = os.path.realpath(candidate)
        if real in seen:
            continue
        seen.add(real)
        try:
            out = subprocess.run([candidate, "-c",
                                  "import nbd, os; print(os.path.dirname(nbd.__file__))"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip())
    return None


def load_libnbd() -> tuple[ModuleType | None, str]:
    """(the `nbd` module, "") or (None, why not)."""
    try:
        return importlib.import_module("nbd"), ""
    except ImportError:
        pass
    directory = _module_dir_from_system_python()
    if directory is None:
        return None, f"libnbd Python bindings not found: {_PACKAGE_HINT}"
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    if not any(p.name.startswith("libnbdmod") and any(p.name.endswith(s) for s in suffixes)
               for p in directory.iterdir()):
        return None, (f"the libnbd Python bindings in {directory} are built for another "
                      f"Python than {sys.version.split()[0]}")
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module("nbd"), ""
    except ImportError as exc:
        return None, f"cannot import the libnbd Python bindings: {exc}"
    finally:
        sys.path.remove(str(directory))
