"""The search matrix now lives in `kiosk.boarding.matrix` (plain numpy, no store): re-exported here so the
store's own modules and older imports keep their name for it."""

from kiosk.boarding.matrix import PREFILTER_DIM, PREFILTER_K, PREFILTER_MIN, GalleryMatrix, Match

__all__ = ["PREFILTER_DIM", "PREFILTER_K", "PREFILTER_MIN", "GalleryMatrix", "Match"]
