"""The package's layering (pyproject ``[tool.importlinter]``) holds, and the product never reaches
``lowbit.bench`` even by a dynamic import."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = [p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in ("bench", "tests", "build", ".venv")]


def test_import_linter_contracts_hold():
    # a subprocess: import-linter builds its graph from the installed package, cache off
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("KEPT") == 3


def test_product_never_names_the_bench():
    offenders = [str(p.relative_to(ROOT)) for p in PRODUCT if re.search(r"lowbit\.bench\b", p.read_text())]
    assert offenders == []
