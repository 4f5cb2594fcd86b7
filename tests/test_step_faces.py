"""The step's faces as one table: columns of one length, sliced together."""

import numpy as np
import pytest

from kiosk.pipeline.step_faces import StepFaces
from kiosk.pipeline.tracking import Track
from kiosk.vision.faces import Faces


def faces(widths: list[float]) -> Faces:
    n = len(widths)
    boxes = np.array([[0.0, 0.0, w, w] for w in widths], np.float32).reshape(n, 4)
    return Faces(boxes, np.linspace(0.5, 0.9, n, dtype=np.float32), np.zeros((n, 5, 2), np.float32))


def track(i: int) -> Track:
    return Track(i, "cam", np.zeros(4, np.float32), 0.0)


def table() -> StepFaces:
    """Two frames: three faces in the first, two in the second; each face's width names it."""
    return StepFaces.join(
        [faces([10, 20, 30]), faces([40, 50])], [[track(1), track(2), track(3)], [track(4), track(5)]]
    )


def test_join_numbers_each_row_with_its_frame_and_track():
    t = table()
    assert len(t) == 5
    assert t.frame.tolist() == [0, 0, 0, 1, 1]
    assert [tr.track_id for tr in t.tracks] == [1, 2, 3, 4, 5]
    assert t.faces.widths.tolist() == [10, 20, 30, 40, 50]


def test_a_mask_keeps_every_column_of_a_row_together():
    t = table()
    t = t.with_crops(np.arange(5).reshape(5, 1, 1, 1) * np.ones((5, 2, 2, 3), np.uint8))
    t = t.with_embeddings(np.eye(5, dtype=np.float32))
    picked = t[np.array([False, True, False, True, True])]
    assert [tr.track_id for tr in picked.tracks] == [2, 4, 5]
    assert picked.frame.tolist() == [0, 1, 1]
    assert picked.faces.widths.tolist() == [20, 40, 50]
    assert picked.aligned()[:, 0, 0, 0].tolist() == [1, 3, 4]
    assert picked.embedded().argmax(axis=1).tolist() == [1, 3, 4]
    again = picked[np.array([True, False, True])]  # a mask over the narrowed table
    assert [tr.track_id for tr in again.tracks] == [2, 5] and again.embedded().argmax(axis=1).tolist() == [1, 4]


def test_indices_pick_rows_in_their_order_and_an_empty_pick_is_an_empty_table():
    t = table()
    picked = t[np.array([4, 0])]
    assert [tr.track_id for tr in picked.tracks] == [5, 1] and picked.faces.widths.tolist() == [50, 10]
    none = t[np.array([], np.int64)]
    assert len(none) == 0 and none.tracks == () and none.faces.boxes.shape == (0, 4)
    assert len(t[np.zeros(5, bool)]) == 0


def test_columns_of_different_lengths_are_refused_with_what_differs():
    with pytest.raises(ValueError, match="frame has 2 rows, tracks 1"):
        StepFaces(faces([10, 20]), np.array([0, 0]), (track(1),))
    with pytest.raises(ValueError, match="frame has 5 rows, crops 4"):
        table().with_crops(np.zeros((4, 112, 112, 3), np.uint8))
    with pytest.raises(ValueError, match="join: 2 frames of faces but 1 of tracks"):
        StepFaces.join([faces([10]), faces([20])], [[track(1)]])


def test_a_mask_of_the_wrong_length_or_a_float_index_is_refused():
    with pytest.raises(ValueError, match=r"one entry per row \(5\), got shape \(4,\)"):
        table()[np.array([True, False, True, False])]
    with pytest.raises(TypeError, match="boolean mask or integer indices"):
        table()[np.array([0.5])]


def test_a_column_never_filled_says_so():
    with pytest.raises(ValueError, match="no embeddings"):
        table().embedded()
    with pytest.raises(ValueError, match="no aligned crops"):
        table().aligned()
