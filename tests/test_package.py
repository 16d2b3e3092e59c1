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


def test_data_workers_do_not_import_torch():
    # Ray's read and write workers import these modules; torch's import costs seconds of CPU that
    # the model actor needs on a small machine (benchmarks/automask.py).
    code = (
        "import sys, pipelines.stages, pipelines.automask, pipelines.embeddings, tinysam.transforms\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parents[1]))
