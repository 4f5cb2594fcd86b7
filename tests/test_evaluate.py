"""Error-rate arithmetic of `kiosk-enroll evaluate`, on score arrays."""

from __future__ import annotations

import numpy as np
import pytest

from enrollment.evaluate import Report, read_pairs
from kiosk.errors import UsageError


def test_fmr_fnmr_at_threshold():
    r = Report(0.5, genuine=np.array([0.9, 0.6, 0.4, 0.55]), impostor=np.array([0.1, 0.52, 0.3, 0.0]))
    assert r.fmr(0.5) == pytest.approx(0.25)
    assert r.fnmr(0.5) == pytest.approx(0.25)
    d = r.as_dict()
    assert d["pairs"] == 8 and d["genuine_min"] == pytest.approx(0.4) and d["impostor_max"] == pytest.approx(0.52)


def test_eer_separable_and_overlapping():
    sep = Report(0.5, genuine=np.array([0.7, 0.8, 0.9]), impostor=np.array([0.1, 0.2]))
    eer, t = sep.eer()
    assert eer == 0.0 and 0.2 < t <= 0.7
    rng = np.random.default_rng(0)
    gen, imp = rng.normal(0.6, 0.1, 4000), rng.normal(0.4, 0.1, 4000)
    eer, t = Report(0.5, gen, imp).eer()
    assert eer == pytest.approx(0.1587, abs=0.015)  # two unit-separated Gaussians cross at 1 sigma
    assert t == pytest.approx(0.5, abs=0.02)


def test_threshold_for_target_fmr_needs_enough_impostors():
    imp = np.linspace(-0.2, 0.3, 1000)
    r = Report(0.4, genuine=np.array([0.8]), impostor=imp)
    t2 = r.threshold_for_fmr(1e-2)
    assert r.fmr(t2) <= 1e-2 and r.fmr(np.nextafter(imp[-11], -np.inf)) > 1e-2
    t3 = r.threshold_for_fmr(1e-3)
    assert r.fmr(t3) <= 1e-3 and t3 > t2
    few = Report(0.4, genuine=np.array([0.8]), impostor=imp[:500])
    assert few.threshold_for_fmr(1e-3) is None
    assert few.as_dict()["threshold_at_fmr"]["0.001"] is None


def test_pairs_csv_forms_and_errors(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text("image_a,image_b,same\na.jpg,b.jpg,1\na.jpg,c.jpg,no\nb.jpg,c.jpg,True\n")
    pairs = read_pairs(p)
    assert [x.same for x in pairs] == [True, False, True]
    assert pairs[0].image_a == tmp_path / "a.jpg"
    p.write_text("image_a,image_b,same\na.jpg,b.jpg,maybe\n")
    with pytest.raises(UsageError, match=r"pairs.csv:2: column 'same'"):
        read_pairs(p)
    p.write_text("a,b\n1,2\n")
    with pytest.raises(UsageError, match="header must name"):
        read_pairs(p)
