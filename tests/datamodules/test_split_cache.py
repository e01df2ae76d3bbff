"""cached_split: a corrupt, truncated or stale split cache fails naming the file and the fix, never a bare error."""

from __future__ import annotations

import pytest

from lightning_transfer.datamodules.base import cached_split, stratified_split


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


def test_stratified_split_holds_out_some_of_every_class_that_can_spare_one():
    labels = [0] * 100 + [1] * 4 + [2] * 2 + [3]  # at 0.1, classes 1 and 2 used to round to nothing held out
    rest, held = stratified_split(labels, 0.1, seed=0)
    assert sorted(rest + held) == list(range(len(labels))) and not set(rest) & set(held)
    held_per_class = {c: sum(labels[i] == c for i in held) for c in range(4)}
    assert held_per_class == {0: 10, 1: 1, 2: 1, 3: 0}  # the single image of class 3 stays in training
    assert stratified_split(labels, 0.0, seed=0) == (list(range(len(labels))), [])
    _, most = stratified_split([0] * 3, 0.99, seed=0)
    assert len(most) == 2  # one is always left to train on
