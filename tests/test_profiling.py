"""The profiled micro-batch's sync count (training/profiling.py): each synchronising call counted where it was made."""

from __future__ import annotations

import warnings

from dsocr_lightning.training.profiling import SyncRecorder


def reads_back() -> None:
    warnings.warn("called a synchronizing CUDA operation", UserWarning)  # what torch's sync debug mode says


def test_sync_recorder_counts_each_place_and_passes_other_warnings_on():
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        recorder = SyncRecorder()
        with recorder:
            for _ in range(3):
                reads_back()
            warnings.warn("something else", UserWarning)
        reads_back()  # after: shown as before, not counted
    assert list(recorder.places.values()) == [3]
    (place,) = recorder.places
    assert "test_profiling.py" in place and place.endswith(" reads_back")
    assert [str(w.message) for w in shown] == ["something else", "called a synchronizing CUDA operation"]
