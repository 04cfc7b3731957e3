"""The shape of the house: public names import, the two sides never import each other's framework,
and CI runs exactly the README's test command."""

from __future__ import annotations

import importlib
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None  # any import of it fails\n"


@pytest.mark.parametrize("package", ["torch_side", "jax_side", "qbridge"])
def test_every_public_name_imports(package):
    module = importlib.import_module(package)
    assert module.__all__, f"{package} has an empty __all__"
    assert len(set(module.__all__)) == len(module.__all__), f"{package}.__all__ repeats a name"
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


def _run_blocked(blocked: list[str], code: str) -> subprocess.CompletedProcess:
    script = BLOCK.format(names=blocked) + code
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_torch_side_never_imports_jax():
    code = (
        "import torch_side, torch\n"
        "w = torch_side.dequantize_fp8(torch.ones(4, 4).to(torch.float8_e4m3fn), torch.ones(1))\n"
        "assert w.dtype == torch.bfloat16\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax') and sys.modules[m] is not None]\n"
        "assert not bad, bad\n"
    )
    result = _run_blocked(["jax", "jaxlib", "flax"], code)
    assert result.returncode == 0, result.stderr


def test_jax_side_never_imports_torch():
    code = (
        "import jax_side, numpy as np\n"
        "x = jax_side.dequantize_nf4(np.array([0x1F], np.uint8), np.ones(1, np.float32), shape=(2,))\n"
        "assert x.shape == (2,)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'bitsandbytes', 'torchao', 'triton')"
        " and sys.modules[m] is not None]\n"
        "assert not bad, bad\n"
    )
    result = _run_blocked(["torch", "bitsandbytes", "torchao", "triton"], code)
    assert result.returncode == 0, result.stderr


def test_no_cross_imports_in_source():
    pattern = {
        "torch_side": re.compile(r"^\s*(import|from)\s+(jax|jaxlib|flax|jax_side|qbridge)\b", re.M),
        "jax_side": re.compile(
            r"^\s*(import|from)\s+(torch|bitsandbytes|torchao|triton|torch_side|qbridge)\b", re.M
        ),
    }
    for package, regex in pattern.items():
        for path in (ROOT / package).rglob("*.py"):
            assert not regex.search(path.read_text()), f"{path.relative_to(ROOT)} imports across the sides"


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_ci_runs_the_readme_test_command():
    commands = _quickstart_commands()
    assert len(commands) == 2, "the Quickstart has exactly two commands: the demo and the tests"
    demo, tests = commands
    assert "qbridge demo" in demo and "pytest" in tests
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == [tests], "the CI script must run the README's test command and nothing else"
    for command in commands:
        assert "torch==2.13.0" in command, "an unpinned torch pulls a multi-GB CUDA build on CPU machines"


def test_no_module_of_a_package_imports_another_that_imports_it_back():
    """Import cycles between a package's modules (imports inside functions included) mean that a shared
    piece wants its own file."""
    import ast
    import graphlib

    for package in ("qbridge", "torch_side", "jax_side"):
        graph = {}
        for path in (ROOT / package).glob("*.py"):
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"{package}._"):
                    deps.add(node.module.split(".")[1])
            graph[path.stem] = deps
        try:
            tuple(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError as e:
            pytest.fail(f"{package}: modules import each other: {e.args[1]}")
