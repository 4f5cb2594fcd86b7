"""Verification error rates from labelled pairs: FMR, FNMR, EER, thresholds for target FMRs.

Pure numpy over two score arrays, so the arithmetic is tested without models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from enrollment.csvfile import read_rows
from kiosk.errors import UsageError

TRUE_WORDS = {"1", "yes", "true", "y", "same"}
FALSE_WORDS = {"0", "no", "false", "n", "different"}
TARGET_FMRS = (1e-2, 1e-3)


@dataclass(frozen=True)
class Pair:
    image_a: Path
    image_b: Path
    same: bool
    line: int


@dataclass
class Report:
    """What `kiosk-enroll evaluate` prints; `as_dict()` is its --json form."""

    threshold: float
    genuine: np.ndarray
    impostor: np.ndarray
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return int(len(self.genuine) + len(self.impostor))

    def fmr(self, t: float) -> float | None:
        """False match rate: impostor pairs scoring >= t (None without impostor pairs)."""
        return float(np.mean(self.impostor >= t)) if len(self.impostor) else None

    def fnmr(self, t: float) -> float | None:
        """False non-match rate: genuine pairs scoring < t (None without genuine pairs)."""
        return float(np.mean(self.genuine < t)) if len(self.genuine) else None

    def eer(self) -> tuple[float | None, float | None]:
        """(EER, threshold): where FMR and FNMR cross, over every observed score."""
        if not len(self.genuine) or not len(self.impostor):
            return None, None
        cands = np.unique(np.concatenate([self.genuine, self.impostor, [np.inf]]))
        fmr = (self.impostor[None, :] >= cands[:, None]).mean(axis=1)
        fnmr = (self.genuine[None, :] < cands[:, None]).mean(axis=1)
        i = int(np.argmin(np.abs(fmr - fnmr) + 1e-9 * np.arange(len(cands))))
        return float((fmr[i] + fnmr[i]) / 2), float(cands[i])

    def threshold_for_fmr(self, target: float) -> float | None:
        """Lowest threshold with FMR <= target; None if there are too few impostor pairs to tell.

        Measuring an FMR of 1e-3 needs at least 1000 impostor pairs.
        """
        n = len(self.impostor)
        if n == 0 or n * target < 1:
            return None
        allowed = int(np.floor(target * n))  # impostor scores that may reach the threshold
        ranked = np.sort(self.impostor)[::-1]
        # Just above the (allowed+1)-th highest impostor score.
        return float(np.nextafter(ranked[allowed], np.inf))

    def as_dict(self) -> dict[str, Any]:  # (JSON)
        eer, eer_t = self.eer()
        return {
            "pairs": self.pairs,
            "genuine_pairs": int(len(self.genuine)),
            "impostor_pairs": int(len(self.impostor)),
            "threshold": self.threshold,
            "fmr": self.fmr(self.threshold),
            "fnmr": self.fnmr(self.threshold),
            "eer": eer,
            "eer_threshold": eer_t,
            "threshold_at_fmr": {f"{t:g}": self.threshold_for_fmr(t) for t in TARGET_FMRS},
            "genuine_min": float(self.genuine.min()) if len(self.genuine) else None,
            "genuine_mean": float(self.genuine.mean()) if len(self.genuine) else None,
            "impostor_max": float(self.impostor.max()) if len(self.impostor) else None,
            "impostor_mean": float(self.impostor.mean()) if len(self.impostor) else None,
            "skipped": self.skipped,
        }


def parse_same(value: str, where: str) -> bool:
    v = value.strip().lower()
    if v in TRUE_WORDS:
        return True
    if v in FALSE_WORDS:
        return False
    raise UsageError(f"{where}: column 'same' must be 1/0, yes/no or true/false, found {value!r}")


def read_pairs(path: Path) -> list[Pair]:
    """Rows of PAIRS.csv (image_a,image_b,same); image paths relative to the CSV's folder."""
    pairs = []
    for line, row in read_rows(path, {"image_a", "image_b", "same"}, "image_a,image_b,same"):
        where = f"{path}:{line}"
        if not row["image_a"] or not row["image_b"]:
            raise UsageError(f"{where}: image_a and image_b must both be given")
        pairs.append(
            Pair(path.parent / row["image_a"], path.parent / row["image_b"], parse_same(row["same"], where), line)
        )
    if not pairs:
        raise UsageError(f"{path}: no pairs in the file")
    return pairs
