"""The plan file format (design.md 7): strict on required keys, lenient on optional ones, atomic."""
import json

import pytest

from megatron_spd.core.plan import PLAN_FORMAT, PlanError, SPDPlan


def test_round_trip_keeps_unknown_optional_keys(tmp_path):
    plan = SPDPlan(3, ["dense", "zs", "b2b", "hg"], {"sensitivity": [0.1, 0.2, 0.3, 0.4],
                                                     "provenance": {"tool": "test"}})
    path = tmp_path / "plan.json"
    plan.save(path)
    d = json.loads(path.read_text())
    assert d["format"] == PLAN_FORMAT and d["num_layers"] == 4 and d["groups"] == 3
    loaded = SPDPlan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    assert loaded.spd_blocks == [1, 2, 3] and loaded.spd_ratio == 0.75
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("groups"), r"missing required key\(s\) \['groups'\]"),
    (lambda d: d.update(strategies=["zs"]), "'strategies' has 1 entries but num_layers is 2"),
    (lambda d: d.update(strategies=["zs", "spd"]), "block 1 has unknown strategy 'spd'"),
    (lambda d: d.update(format="other/1"), "is not 'megatron-spd-plan/1'"),
    (lambda d: d.update(groups=0), "'groups' must be a positive integer"),
])
def test_bad_plan_files_fail_clearly(tmp_path, mutate, message):
    d = SPDPlan(2, ["dense", "zs"]).to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match=message):
        SPDPlan.load(path)


def test_unreadable_plan_files(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        SPDPlan.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        SPDPlan.load(tmp_path / "broken.json")


def test_from_spd_blocks():
    plan = SPDPlan.from_spd_blocks(4, 2, [3, 1])
    assert plan.strategies == ["dense", "zs", "dense", "zs"]
    with pytest.raises(PlanError, match="out of range"):
        SPDPlan.from_spd_blocks(4, 2, [4])
