"""cached_split: a corrupt, truncated or stale split cache fails naming the file and the fix, never a bare error."""

from __future__ import annotations

import pytest

from lightning_transfer.datamodules.base import cached_split


def test_cache_is_written_once_and_read_back(tmp_path):
    path = tmp_path / "splits" / "s.json"
    assert cached_split(path, lambda: {"train": [0, 2], "val": [1]}, keys=("train", "val"), num_items=3) == {
        "train": [0, 2], "val": [1]}
    assert cached_split(path, lambda: pytest.fail("redrawn"), keys=("train", "val"), num_items=3)["train"] == [0, 2]
    assert not list(path.parent.glob("*.tmp*"))


@pytest.mark.parametrize(("content", "problem"), [
    ('{"train": [0, 2], "va', r"not valid JSON"),
    ('{"train": [0, 2]}', r"lacks the split\(s\) val"),
    ('{"train": [0, 7], "val": [1]}', r"index 7 outside 0\.\.2"),
    ('[1, 2]', r"not a JSON object"),
])
def test_corrupt_cache_names_the_file_and_says_delete_it(tmp_path, content, problem):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"split cache .*s\.json.*{problem}.*delete it to redraw"):
        cached_split(path, lambda: {"train": [0], "val": [1]}, keys=("train", "val"), num_items=3)
