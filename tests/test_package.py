"""Packaging promises: the library imports without Ray and exposes the official API names."""

import subprocess
import sys


def test_tinysam_imports_without_ray():
    code = (
        "import sys, tinysam, tinysam.predictor, tinysam.weights, tinysam.transforms\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
        "from tinysam import sam_model_registry, SamPredictor\n"
        "assert set(sam_model_registry) == {'default', 'vit_h', 'vit_l', 'vit_b', 'vit_t'}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
