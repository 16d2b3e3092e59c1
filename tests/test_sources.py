"""Input listing and stable ids, shared by every job."""

import pytest

from pipelines.sources import decode_image, image_id_for, list_images


def test_folder_and_list_file_give_sorted_sources_and_stable_ids(tmp_path):
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "notes.md").write_text("not an image")
    refs = list_images(str(tmp_path))
    assert [r.source.rsplit("/", 1)[-1] for r in refs] == ["a.png", "b.jpg"]
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# corpus\n{tmp_path / 'b.jpg'}\n\n{tmp_path / 'a.png'}\n")
    assert list_images(str(listing)) == refs
    assert list_images(str(listing), limit=1) == refs[:1]
    assert [r.image_id for r in list_images(str(tmp_path))] == [r.image_id for r in refs]  # stable
    assert image_id_for("s3://bucket/shards/sa_000001.tar::sa_223750.jpg") == "223750"
    assert image_id_for("/data/a.png") != image_id_for("/other/a.png")


def test_missing_input_and_undecodable_bytes_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"x\.jpg: not a decodable image"):
        decode_image(b"definitely not a jpeg", "x.jpg")
    with pytest.raises(ValueError, match=r"y\.jpg: empty file"):
        decode_image(b"", "y.jpg")
