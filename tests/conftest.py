"""Shared fixtures: the real MobileSAM weights, the official code as oracle, real images."""

import warnings

import numpy as np
import pytest
import torch

from tinysam import build_sam
from tinysam.sample_data import bbbc038, sample_images
from tinysam.weights import fetch_known


def pytest_configure(config):
    torch.set_num_threads(max(1, torch.get_num_threads()))


def import_official(package: str):
    """Import an oracle package, silencing the deprecation noise of its timm imports."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return __import__(package)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter and buffer with seeded noise (zero-initialised ones too), real shapes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g) * 0.02
            if name.endswith("running_var") or ("norm" in name and name.endswith("weight")):
                t.copy_(1.0 + noise)
            else:
                t.copy_(noise)
    return model


@pytest.fixture(scope="session")
def mobile_sam_path():
    return fetch_known("mobile_sam")


@pytest.fixture(scope="session")
def vit_t(mobile_sam_path):
    return build_sam("vit_t", str(mobile_sam_path))


@pytest.fixture(scope="session")
def official_vit_t(mobile_sam_path):
    mobile_sam = import_official("mobile_sam")
    model = mobile_sam.sam_model_registry["vit_t"]()
    model.load_state_dict(torch.load(mobile_sam_path, weights_only=True), strict=True)
    return model.eval()  # eval() after loading refreshes TinyViT's cached attention biases


@pytest.fixture(scope="session")
def photos():
    return dict(sample_images())


@pytest.fixture(scope="session")
def astronaut(photos):
    return photos["astronaut"]


@pytest.fixture(scope="session")
def nuclei():
    image, labels = bbbc038()
    return image, labels


@pytest.fixture
def rng():
    return np.random.default_rng(0)
