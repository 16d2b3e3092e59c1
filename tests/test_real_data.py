"""Real-data checks: the BBBC038 ground truth is what we think it is (the real weights' box-prompt
mIoU >= 0.75 on it is asserted by tests/test_eval.py, and random weights' < 0.4 by its job test)."""

from tinysam_samples import instance_masks


def test_bbbc038_has_125_ground_truth_nuclei(nuclei):
    image, labels = nuclei
    assert image.shape == labels.shape == (512, 512)
    assert len(list(instance_masks(labels))) == 125
