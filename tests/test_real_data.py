"""Real-data checks: the BBBC038 ground truth is what we think it is (the real weights' box-prompt
mIoU >= 0.75 on it is asserted by tests/test_eval.py, and random weights' < 0.4 by its job test),
and the sample photos are distinct photos."""

import hashlib

from tinysam_samples import instance_masks


def test_bbbc038_has_125_ground_truth_nuclei(nuclei):
    image, labels = nuclei
    assert image.shape == labels.shape == (512, 512)
    assert len(list(instance_masks(labels))) == 125


def test_the_sample_photos_are_each_a_different_photo():
    """A held-out split is only held out if no photo appears twice under two names
    (scikit-image's `cat()` returns `chelsea()`'s array)."""
    from tinysam_samples import ALL_PHOTOS, sample_images

    digests = {}
    for name, image in sample_images(ALL_PHOTOS):
        digests.setdefault(hashlib.sha256(image.tobytes()).hexdigest(), []).append(name)
    assert [names for names in digests.values() if len(names) > 1] == []
    assert len(ALL_PHOTOS) >= 17
