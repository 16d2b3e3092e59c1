"""Packaging promises: the library imports without Ray and exposes the official API names."""

import subprocess
import sys
from pathlib import Path


def test_tinysam_imports_without_ray():
    code = (
        "import sys, tinysam, tinysam.predictor, tinysam.weights, tinysam.transforms\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
        "from tinysam import sam_model_registry, SamPredictor\n"
        "assert set(sam_model_registry) == {'default', 'vit_h', 'vit_l', 'vit_b', 'vit_t'}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_sam_stays_the_function_after_its_module_is_imported():
    # the submodule tinysam.build_sam shares the function's name; importing it (as tinysam.quant
    # does) must not replace the function, whatever the import order
    code = (
        "import tinysam.quant\n"
        "from tinysam import build_sam\n"
        "assert callable(build_sam) and build_sam.__name__ == 'build_sam', build_sam\n"
        "from tinysam.build_sam import check_checkpoint\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_data_workers_do_not_import_torch():
    # Ray's read and write workers import these modules; torch's import costs seconds of CPU that
    # the model actor needs on a small machine (benchmarks/automask.py).
    code = (
        "import sys, pipelines.stages, pipelines.automask, pipelines.precompute, tinysam.transforms\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parents[1]))


def test_import_structure_has_no_upward_arrows():
    """tinysam/ imports neither pipelines/, jobs/ nor Ray; tinysam/modeling/ imports nothing of the
    rest of the library (the models stand alone, as in the official package)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "tinysam"
    for path in root.rglob("*.py"):
        in_modeling = path.parent.name == "modeling"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [(0, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.level, node.module or "")]
            else:
                continue
            for level, name in names:
                top = name.split(".")[0]
                assert level or top not in ("pipelines", "jobs", "ray"), f"{path}: imports {name}"
                if in_modeling and level:
                    assert level == 1, f"{path}: imports {'.' * level}{name} from outside tinysam/modeling"
                if in_modeling and not level:
                    assert top != "tinysam", f"{path}: imports {name}"


def _pipelines_imports() -> dict:
    """{module: the pipelines modules it imports, at module level or inside functions}."""
    import ast

    root = Path(__file__).resolve().parents[1]
    modules = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (root / "pipelines").rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                candidates = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in modules and c != name}
        graph[name] = targets
    return graph


def test_pipelines_have_no_import_circle():
    """A module's imports (also those inside its functions) never lead back to it. Packages'
    __init__ modules, which gather their submodules' names, are left out of the walk."""
    root = Path(__file__).resolve().parents[1]
    graph = _pipelines_imports()
    packages = {m for m in graph if (root / m.replace(".", "/")).is_dir()}
    graph = {m: targets - packages for m, targets in graph.items() if m not in packages}
    assert graph["pipelines.distill.job"] and graph["pipelines.stages"]  # the walk sees imports

    def reaches(start: str) -> set:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return seen

    assert not sorted(m for m in graph if m in reaches(m))


def test_the_test_files_named_for_scheduling_exist():
    """conftest.py hands the test files named in LONGEST_FIRST to pytest-xdist's workers first; a
    renamed file would silently lose its place (and a long file started last idles a worker)."""
    from .conftest import LONGEST_FIRST

    root = Path(__file__).resolve().parents[1]
    assert [f for f in LONGEST_FIRST if not (root / f).is_file()] == []
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
