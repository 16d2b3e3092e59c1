"""Real sample data for demos, tests and benchmarks, fetched from PyPI packages that ship it.

- Photos: scikit-image's bundled images (astronaut, coffee, chelsea, ...).
- BBBC038 nuclei (2018 Data Science Bowl): one 512x512 image with 125 ground-truth instances,
  carried by the `stardist==0.9.2` wheel; fetched with `pip download` and cached like checkpoints.
"""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np

from tinysam.weights import cache_dir

SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
# The scikit-image photos inside its wheel (no download; colour and grey; its binary, logo and
# 102-pixel images left out): a larger small set, e.g. a held-out split big enough to measure learning on.
# Each photo once: scikit-image's `cat()` is `chelsea()` (the same array), so it is not listed, or
# a split could hold the same photo on both sides.
ALL_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
_STARDIST = "stardist==0.9.2"
_BBBC038_MEMBERS = {"image": "stardist/data/images/img2d.tif", "mask": "stardist/data/images/mask2d.tif"}


def sample_images(names: Tuple[str, ...] = SAMPLE_PHOTOS[:3]) -> List[Tuple[str, np.ndarray]]:
    """(name, uint8 image) pairs of scikit-image's real photos (HxWx3, or HxW for grey ones)."""
    from skimage import data

    return [(name, np.ascontiguousarray(getattr(data, name)())) for name in names]


def write_sample_photos(folder: Path, names: Tuple[str, ...] = SAMPLE_PHOTOS) -> List[Path]:
    """Write the sample photos as JPEG/PNG files into `folder` (a small real corpus for the jobs)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, img in sample_images(names):
        path = folder / f"{name}.jpg"
        if not path.exists():
            tmp = folder / f".{name}.jpg.part"
            Image.fromarray(img).save(tmp, format="JPEG", quality=95)
            os.replace(tmp, path)
        paths.append(path)
    return paths


def write_sample_corpus(folder: Path, n: int) -> Path:
    """A corpus of `n` image files in `folder` cycling through the sample photos (benchmarks)."""
    import shutil

    photos = write_sample_photos(Path(folder) / ".src")
    corpus = Path(folder) / "images"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shutil.copy(photos[i % len(photos)], corpus / f"img{i:04d}.jpg")
    return corpus


def write_pseudo_labelled_shard(
    folder: Path, model, names: Tuple[str, ...] = SAMPLE_PHOTOS[:4], points_per_side: int = 16
) -> Path:
    """An SA-1B style tar shard of the sample photos whose labels are `model`'s everything-mode
    masks (SA-1B itself is machine-made the same way): a small real training set for distillation.
    Idempotent; returns the shard's path."""
    import io

    from PIL import Image

    from tinysam.everything import SamAutomaticMaskGenerator
    from tinysam.transforms import to_rgb_uint8
    from tinysam.utils.sa1b import sa1b_document, write_sa1b_shard

    shard = Path(folder) / "sa_000000.tar"
    if shard.exists():
        return shard
    shard.parent.mkdir(parents=True, exist_ok=True)
    generator = SamAutomaticMaskGenerator(model, points_per_side=points_per_side, output_mode="coco_rle")
    items = []
    for n, (name, img) in enumerate(sample_images(names), start=1):
        rgb = to_rgb_uint8(img, name)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
        records = generator.generate(rgb)
        items.append((n, buf.getvalue(), sa1b_document(str(n), f"sa_{n}.jpg", rgb.shape[1], rgb.shape[0], records)))
    return write_sa1b_shard(shard, items)


def write_synthetic_sa1b_shard(
    path: Path,
    count: int,
    first: int = 1,
    size: Tuple[int, int] = (1500, 2250),
    masks_per_image: int = 100,
    variants: int = 4,
) -> Path:
    """An SA-1B-like tar shard of `count` members for scale tests and benchmarks: JPEGs of SA-1B's
    size (the sample photos resized to `size`, quality 90: a few hundred KB each) and SA-1B JSONs of
    `masks_per_image` masks. A few variants are made and cycled, so a large shard is quick to
    write; ids run from `first`. Returns the shard's path."""
    import io
    import json

    from PIL import Image

    from tinysam.transforms import to_rgb_uint8
    from tinysam.utils.rle import mask_to_coco_rle
    from tinysam.utils.sa1b import write_sa1b_shard

    h, w = size
    rng = np.random.default_rng(0)
    jpegs, docs = [], []
    for name, img in sample_images(SAMPLE_PHOTOS[:variants]):
        rgb = np.array(Image.fromarray(to_rgb_uint8(img, name)).resize((w, h), Image.BILINEAR))
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
        annotations = []
        for m in range(masks_per_image):
            y0, x0 = int(rng.integers(0, h - 64)), int(rng.integers(0, w - 64))
            y1, x1 = y0 + int(rng.integers(32, min(400, h - y0))), x0 + int(rng.integers(32, min(400, w - x0)))
            mask = np.zeros((h, w), bool)
            mask[y0:y1, x0:x1] = True
            annotations.append(
                {
                    "id": m,
                    "segmentation": mask_to_coco_rle(mask),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(mask.sum()),
                    "predicted_iou": 0.9,
                    "point_coords": [[x0 + 1, y0 + 1]],
                    "stability_score": 0.95,
                    "crop_box": [0, 0, w, h],
                }
            )
        doc = {"image": {"image_id": -1, "width": w, "height": h, "file_name": "sa_-1.jpg"}, "annotations": annotations}
        docs.append(json.dumps(doc).encode())

    def items():
        for n in range(first, first + count):
            k = n % len(jpegs)
            doc = docs[k].replace(b'"image_id": -1', b'"image_id": %d' % n).replace(b"sa_-1.jpg", b"sa_%d.jpg" % n)
            yield n, jpegs[k], doc

    return write_sa1b_shard(Path(path), items(), encoded=True)


def _bbbc038_dir() -> Path:
    return cache_dir() / "data" / "bbbc038"


def bbbc038() -> Tuple[np.ndarray, np.ndarray]:
    """The real BBBC038 nuclei image (512x512 uint16) and its instance label image (0 = background)."""
    import tifffile

    folder = _bbbc038_dir()
    paths = {k: folder / Path(m).name for k, m in _BBBC038_MEMBERS.items()}
    if not all(p.exists() for p in paths.values()):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tinysam-stardist-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", _STARDIST, "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                raise RuntimeError(f"{_STARDIST}: pip download failed: {done.stderr.strip()[-500:]}")
            with zipfile.ZipFile(wheels[0]) as zf:
                for key, member in _BBBC038_MEMBERS.items():
                    part = paths[key].with_suffix(".part")
                    part.write_bytes(zf.read(member))
                    os.replace(part, paths[key])
    return tifffile.imread(paths["image"]), tifffile.imread(paths["mask"])


def instance_masks(labels: np.ndarray) -> Iterator[np.ndarray]:
    """Boolean masks of each instance of a label image, in label order."""
    for value in np.unique(labels):
        if value != 0:
            yield labels == value


def bbbc038_coco(folder: Path) -> Tuple[Path, Path]:
    """The BBBC038 image as an 8-bit PNG and its 125 nuclei as a COCO ground-truth file in
    `folder`; returns (annotations json, images folder). Idempotent."""
    import json

    from PIL import Image

    from tinysam.transforms import to_rgb_uint8
    from tinysam.utils.rle import mask_bbox_xywh, mask_to_coco_rle

    folder = Path(folder)
    images, gt_path = folder / "images", folder / "bbbc038_coco.json"
    if gt_path.exists() and (images / "bbbc038.png").exists():
        return gt_path, images
    images.mkdir(parents=True, exist_ok=True)
    image, labels = bbbc038()
    Image.fromarray(to_rgb_uint8(image, "BBBC038")).save(images / "bbbc038.png")
    anns = []
    for k, mask in enumerate(instance_masks(labels), start=1):
        anns.append(
            {
                "id": k,
                "image_id": 1,
                "category_id": 1,
                "segmentation": mask_to_coco_rle(mask),
                "bbox": mask_bbox_xywh(mask),
                "area": int(mask.sum()),
                "iscrowd": 0,
            }
        )
    doc = {
        "images": [
            {"id": 1, "file_name": "bbbc038.png", "height": int(labels.shape[0]), "width": int(labels.shape[1])}
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "nucleus"}],
    }
    tmp = gt_path.with_suffix(".part")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, gt_path)
    return gt_path, images
