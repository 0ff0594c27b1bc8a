"""World sizes 1, 2, 4 (torchrun, gloo): groups split over ranks in shuffled order give identical
advantages, loss (sum of rank shares) and per-row gradients."""

from __future__ import annotations

import pytest

from tests.torchrun_utils import run_torchrun

pytestmark = pytest.mark.distributed


def merge(results):
    merged = {"cases": {}}
    for res in results:
        for key, val in res.items():
            if key.startswith("adv_"):
                merged.setdefault(key, {}).update(val)
        for case, c in res["cases"].items():
            m = merged["cases"].setdefault(case, {"loss": 0.0, "grads": {}, "metrics": c["metrics"]})
            m["loss"] += c["loss_share"]
            m["grads"].update(c["grads"])
            assert c["metrics"] == res["cases"][case]["metrics"]
    return merged


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for world in (1, 2, 4):
        results = run_torchrun("loss_dp_worker.py", world, tmp_path_factory.mktemp(f"w{world}"), timeout=300)
        assert len(results) == world
        # Every rank reports the same (globally reduced) metrics.
        for case in results[0]["cases"]:
            for r in results[1:]:
                assert r["cases"][case]["metrics"] == pytest.approx(results[0]["cases"][case]["metrics"],
                                                                    rel=1e-6, abs=1e-9)
        out[world] = merge(results)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_dp_split_matches_single_process(runs, world):
    ref, got = runs[1], runs[world]
    for key in ("adv_include_expert=False", "adv_include_expert=True"):
        assert got[key].keys() == ref[key].keys()
        for row, adv in ref[key].items():
            assert got[key][row] == pytest.approx(adv, rel=1e-6, abs=1e-7)
    assert got["cases"].keys() == ref["cases"].keys() and len(ref["cases"]) == 16
    for case, r in ref["cases"].items():
        g = got["cases"][case]
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-6), case
        assert g["metrics"] == pytest.approx(r["metrics"], rel=1e-5, abs=1e-8), case
        assert g["grads"].keys() == r["grads"].keys()
        for row, grad in r["grads"].items():
            assert g["grads"][row] == pytest.approx(grad, rel=1e-6, abs=1e-10), (case, row)
