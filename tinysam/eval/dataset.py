"""A COCO-format ground truth (COCO, LVIS, or our own conversions) with its image folder."""

import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..transforms import to_rgb_uint8


class CocoImages:
    """Images and ground-truth masks of a COCO-format file, image by image."""

    def __init__(self, annotations: str, images_dir: str) -> None:
        from pycocotools.coco import COCO

        if not os.path.exists(annotations):
            raise FileNotFoundError(f"{annotations}: no such ground-truth file")
        self.path = annotations
        self.images_dir = images_dir
        self.coco = _quiet(lambda: COCO(annotations))

    def image_ids(self, limit: Optional[int] = None) -> List[int]:
        """Ids of images with at least one non-crowd annotation, sorted."""
        ids = sorted(
            i for i in self.coco.getImgIds() if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))
        )
        return ids[:limit] if limit is not None else ids

    def load(self, image_id: int) -> Tuple[np.ndarray, List[Dict[str, Any]], List[np.ndarray]]:
        """(HxWx3 uint8 image, its non-crowd annotations, their boolean masks)."""
        from PIL import Image

        info = self.coco.imgs[image_id]
        path = os.path.join(self.images_dir, info["file_name"])
        try:
            with Image.open(path) as im:
                image = to_rgb_uint8(np.array(im), path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the image of id {image_id} ({e})") from e
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]}, the annotations say "
                f"{info['width']}x{info['height']}"
            )
        anns = sorted(
            (a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)), key=lambda a: a["id"]
        )
        return image, anns, [self.coco.annToMask(a).astype(bool) for a in anns]

    def __iter__(self) -> Iterator[Tuple[int, np.ndarray, List[Dict[str, Any]], List[np.ndarray]]]:
        for image_id in self.image_ids():
            yield (image_id, *self.load(image_id))


def _quiet(fn):
    """Run a pycocotools call without its progress prints."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn()
