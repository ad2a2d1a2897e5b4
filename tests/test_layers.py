"""The import structure of docs/ARCHITECTURE.md, enforced: layers import only downward, no package has an
import cycle (import-linter contracts in pyproject.toml), and imports sit at module level unless they load
an optional dependency or something heavy on purpose, said on the line with a `# lazy: <reason>` comment."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sdxl"
ROOT = SRC.parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports")
    assert exe, "import-linter is a test dependency (pip install -e '.[test]')"
    res = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "BROKEN" not in res.stdout


def function_level_imports(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line: statement` for each import inside a function without a `# lazy:` reason."""
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                span = lines[inner.lineno - 1 : inner.end_lineno]
                if not any("# lazy:" in line for line in span):
                    found.append(f"{path.relative_to(root)}:{inner.lineno}: {span[0].strip()}")
    return sorted(set(found))


def test_function_level_imports_say_why():
    offenders = [x for p in sorted(SRC.rglob("*.py")) for x in function_level_imports(p)]
    assert not offenders, f"{len(offenders)} function-level imports without a reason:\n" + "\n".join(
        offenders
    )


def test_the_checker_sees_a_bare_function_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import json\n    return json\n\n\n"
                 "def g():\n    import torch  # lazy: heavy\n")
    found = function_level_imports(f, tmp_path)
    assert found == ["m.py:2: import json"]


def test_the_cli_and_the_request_import_without_torch():
    """`sdxl --help` and request validation stay fast: importing the CLI module and the request loads no
    torch (a torch import there costs seconds on every command line)."""
    code = ("import sys, sdxl.cli, sdxl.request, sdxl.prompts; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
