"""The equal-skill verdicts of benchmarks/sampling_cost.py (issue 19's tests, and "equal or better")."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import sampling_cost as sc  # noqa: E402 - benchmarks/ is not a package


def _point(crps: float, ssr: dict[str, float], lsd: float = 0.05, nfe: int = 8) -> dict:
    return {
        "crps": crps,
        "nfe": nfe,
        "per_variable": {v: {"spread_skill_ratio": r, "log_spectral_distance": lsd} for v, r in ssr.items()},
    }


REF = _point(0.150, {"tas": 0.95, "uas": 0.85}, nfe=35)


def test_better_calibration_fails_the_symmetric_test_but_not_equal_or_better():
    points = {"dpdm/heun-18": REF, "dpdm/dpmpp2m-8": _point(0.152, {"tas": 1.04, "uas": 0.93})}
    sc.compare_to_reference(points)
    p = points["dpdm/dpmpp2m-8"]
    assert p["equal_skill_tests"] == {
        "crps_within_3pct": True,
        "spread_skill_within_0.05": False,  # tas 0.09 above Heun's, though closer to 1
        "lsd_within_ref_plus_10pct": True,
    }
    assert not p["equal_skill"] and p["calibration_no_worse"] and p["equal_or_better_skill"]
    assert sc.cheapest_equal_skill(points) == (None, None)  # the reference itself never counts
    assert sc.cheapest_equal_skill(points, verdict="equal_or_better_skill") == ("dpdm/dpmpp2m-8", None)


def test_worse_calibration_crps_or_spectra_fail_both_verdicts():
    points = {
        "dpdm/heun-18": REF,
        "dpdm/euler-8": _point(0.148, {"tas": 0.85, "uas": 0.70}),  # under-dispersed: worse than Heun
        "dpdm/dpmpp2m-4": _point(0.156, {"tas": 0.95, "uas": 0.85}),  # CRPS +4 %
        "dpdm/heun-9": _point(0.150, {"tas": 0.95, "uas": 0.85}, lsd=0.056),  # spectra 12 % further
        "dpdm/dpmpp2m-12": _point(0.151, {"tas": 0.97, "uas": 0.88}, nfe=12),
    }
    sc.compare_to_reference(points)
    verdicts = {k: (p["equal_skill"], p["equal_or_better_skill"]) for k, p in points.items()}
    assert verdicts == {
        "dpdm/heun-18": (True, True),
        "dpdm/euler-8": (False, False),
        "dpdm/dpmpp2m-4": (False, False),
        "dpdm/heun-9": (False, False),
        "dpdm/dpmpp2m-12": (True, True),
    }
    assert sc.cheapest_equal_skill(points) == ("dpdm/dpmpp2m-12", None)


def test_a_confirmation_run_decides_over_the_curve():
    doc = {"curve": {"points": {"dpdm/heun-18": REF}}, "confirm": {"points": {"dpdm/dpmpp2m-8": REF}}}
    assert set(sc.decision_points(doc)) == {"dpdm/dpmpp2m-8"}
    del doc["confirm"]
    assert set(sc.decision_points(doc)) == {"dpdm/heun-18"}


def test_the_calibrated_part_decides_once_it_holds_the_reference():
    doc = {"confirm": {"points": {"dpdm/dpmpp2m-8": REF}}, "calibrated": {"points": {"dpdm/dpmpp2m-6": REF}}}
    assert sc.decision_part(doc) == "confirm"  # no calibrated 18-step Heun to compare with yet
    doc["calibrated"]["points"]["dpdm/heun-18"] = REF
    assert sc.decision_part(doc) == "calibrated"
    assert set(sc.decision_points(doc)) == {"dpdm/dpmpp2m-6", "dpdm/heun-18"}
    assert sc.decision_part({}) is None and sc.decision_points({}) == {}


def test_calibrated_runs_side_by_side_merge_only_on_the_same_sample():
    settings = {"month_stride": 5, "members": 8, "threads": 1, "fit_months": 30, "fit_members": 8}
    ref = {"dpdm/heun-18": REF}
    doc = {"calibrated": {"settings": settings, "points": ref, "fits": {"dpdm/heun-18": {}}, "command": "a"}}
    part = {"settings": dict(settings), "points": {"dpdm/dpmpp2m-8": REF}, "fits": {"dpdm/dpmpp2m-8": {}}}
    sc.merge_part(doc, "calibrated", {**part, "command": "b"})
    assert (
        set(doc["calibrated"]["points"])
        == set(doc["calibrated"]["fits"])
        == {"dpdm/heun-18", "dpdm/dpmpp2m-8"}
    )
    assert doc["calibrated"]["command"] == "a && b"
    other = {**part, "settings": {**settings, "fit_months": 12}, "command": "c"}
    sc.merge_part(doc, "calibrated", other)  # another fit protocol: the recorded points are not comparable
    assert set(doc["calibrated"]["points"]) == {"dpdm/dpmpp2m-8"} and doc["calibrated"]["command"] == "c"


def test_a_confirm_run_extends_the_recorded_one_only_on_the_same_sample():
    import argparse

    recorded = {"settings": {"month_stride": 5, "members": 8, "threads": 1}, "points": {"dpdm/heun-18": REF}}
    same = argparse.Namespace(month_stride=5, members=8, threads=1)
    assert sc.same_sample(recorded, same)
    for other in ({"month_stride": 10}, {"members": 4}, {"threads": 2}):
        assert not sc.same_sample(recorded, argparse.Namespace(**{**vars(same), **other}))
    assert not sc.same_sample(None, same) and not sc.same_sample({}, same)


def test_points_name_the_checkpoint_they_sampled():
    from climrecon.models.checkpoint import read_checkpoint

    ident = sc.checkpoint_id(str(sc.CHECKPOINTS["distilled"]))
    assert ident == {
        "file": "distilled-dpdm-westus-x8.pt",
        "sha256": read_checkpoint(sc.CHECKPOINTS["distilled"]).header["content_sha256"],
    }
    assert len(ident["sha256"]) == 64 and sc.checkpoint_id(None) is None


def test_speed_choices_follow_the_current_verdicts_over_the_recorded_timings():
    rows = {
        "dpdm/heun-18": {"months_x_members_per_hour": 600.0, "fraction_of_matmul": 0.5},
        "dpdm/dpmpp2m-12": {"months_x_members_per_hour": 1800.0, "fraction_of_matmul": 0.6},
        "dpdm/dpmpp2m-12 [compile]": {"months_x_members_per_hour": 2400.0, "fraction_of_matmul": 0.8},
        "dpdm/distilled-4": {"months_x_members_per_hour": 5400.0, "fraction_of_matmul": 0.7},
    }
    points = {
        "dpdm/heun-18": REF,
        "dpdm/dpmpp2m-12": _point(0.151, {"tas": 0.96, "uas": 0.86}, nfe=12),
        "dpdm/distilled-4": _point(0.151, {"tas": 0.93, "uas": 0.84}, nfe=4),
    }
    sc.compare_to_reference(points)
    got = sc.speed_choices(rows, points, "dpdm/dpmpp2m-12")
    assert got["chosen_fastest"] == "dpdm/distilled-4" and got["speedup_at_equal_skill"] == 9.0
    assert got["fastest_network_mode"] == "dpdm/dpmpp2m-12 [compile]"
    assert got["flops_fraction_of_matmul_shipped_path"] == 0.8
    # the student fails its spectra test: the fastest timed mode of the cheapest equal-skill sampler
    points["dpdm/distilled-4"]["per_variable"]["uas"]["log_spectral_distance"] = 0.2
    sc.compare_to_reference(points)
    got = sc.speed_choices(rows, points, "dpdm/dpmpp2m-12")
    assert got["chosen_fastest"] == "dpdm/dpmpp2m-12 [compile]" and got["speedup_at_equal_skill"] == 4.0
    # a chosen sampler that was never timed has no speedup (rerun speed), rather than a wrong one
    del rows["dpdm/dpmpp2m-12"], rows["dpdm/dpmpp2m-12 [compile]"]
    got = sc.speed_choices(rows, points, "dpdm/dpmpp2m-12")
    assert got["chosen_fastest"] is None and got["speedup_at_equal_skill"] is None


def test_methods_x8_reuses_a_recorded_method_only_for_the_same_sample_and_weights():
    import methods_x8 as mx  # noqa: PLC0415 - benchmarks/ is not a package

    ident = {"file": "dpdm-westus-x8.pt", "sha256": "a" * 64}
    sample = {"months": ["2011-01", "2011-06"], "members": 16, "sampler": {"solver": "heun", "num_steps": 12}}
    recorded = {**sample, "per_variable": {"dpdm": {"tas": {}}}, "checkpoints": {"dpdm": ident}}
    assert mx.reusable(recorded, ["dpdm"], sample, {"dpdm": ident}) == []
    # a sampler key the recorded run did not know (added since) does not block reuse
    assert (
        mx.reusable(
            recorded,
            ["dpdm"],
            {**sample, "sampler": {**sample["sampler"], "network": "eager"}},
            {"dpdm": ident},
        )
        == []
    )
    assert mx.reusable(recorded, ["dpdm"], {**sample, "members": 8}, {"dpdm": ident}) == [
        "the recorded members differ"
    ]
    other_solver = {**sample, "sampler": {"solver": None, "num_steps": 12}}
    assert mx.reusable(recorded, ["dpdm"], other_solver, {"dpdm": ident}) == [
        "the recorded sampler differs in ['solver']"
    ]
    retrained = {"file": "dpdm-westus-x8.pt", "sha256": "b" * 64}
    assert mx.reusable(recorded, ["dpdm"], sample, {"dpdm": retrained}) == [
        "dpdm's checkpoint is not the recorded one (dpdm-westus-x8.pt bbbbbbbbbbbb)"
    ]
    assert mx.reusable(
        {**recorded, "checkpoints": {}}, ["dpdm"], sample, {"dpdm": ident}
    )  # unrecorded weights
    assert mx.reusable(recorded, ["qm"], sample, {}) == ["qm has no recorded figures"]
