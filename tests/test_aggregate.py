"""Aggregate stage on local stores: statistics against numpy on the members, CF metadata, bounded blocks,
provenance, the output catalog, refusal of incomplete input, skip on re-run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from climrecon.catalogs.output_catalog import (
    CatalogError,
    add_to_output_catalog,
    open_output_catalog,
    open_outputs,
    output_catalog_url,
    read_output_rows,
)
from climrecon.config import AggregateConfig, ConfigError, load_config
from climrecon.stores import StageStore, content_key, time_blocks
from climrecon.tasks.aggregate import (
    AggregateError,
    aggregate_block,
    ensemble_statistics,
    plan_aggregate,
    prepare_aggregate,
    run_aggregate,
    spatial_chunks,
)

CFTIME = xr.coders.CFDatetimeCoder(use_cftime=True)
UNITS = {
    "tas": ("air_temperature", "K"),
    "uas": ("eastward_wind", "m s-1"),
    "vas": ("northward_wind", "m s-1"),
}


def member_dataset(
    n_member: int = 16, n_time: int = 24, ny: int = 16, nx: int = 20, seed: int = 0, calendar: str = "noleap"
) -> xr.Dataset:
    """A downscale-stage-like member dataset: seeded random fields, month-start cftime with bounds."""
    rng = np.random.default_rng(seed)
    starts = xr.date_range("1990-01-01", periods=n_time + 1, freq="MS", calendar=calendar, use_cftime=True)
    lat = 30.125 + 0.25 * np.arange(ny)
    lon = -124.875 + 0.25 * np.arange(nx)
    shape = (n_member, n_time, ny, nx)
    data = {
        "tas": 285.0 + 12.0 * rng.standard_normal(shape),  # straddles both default thresholds
        "uas": 4.0 * rng.standard_normal(shape),
        "vas": 4.0 * rng.standard_normal(shape),
    }
    ds = xr.Dataset(
        {
            v: (
                ("member", "time", "lat", "lon"),
                x.astype(np.float32),
                {
                    "standard_name": UNITS[v][0],
                    "units": UNITS[v][1],
                    "long_name": v,
                    "cell_methods": "time: mean",
                },
            )
            for v, x in data.items()
        },
        coords={
            "member": np.arange(n_member),
            "time": ("time", starts[:-1].values, {"standard_name": "time"}),
            "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude"}),
        },
    )
    ds["time_bnds"] = (("time", "bnds"), np.stack([starts[:-1].values, starts[1:].values], axis=-1))
    ds.time.encoding.update(units="days since 1850-01-01", calendar=calendar)
    ds.time_bnds.encoding.update(units="days since 1850-01-01", calendar=calendar)
    return ds


def write_member_store(
    root: str,
    ds: xr.Dataset,
    *,
    storage_options: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    complete: bool = True,
    block: int = 12,
) -> str:
    """Write ``ds`` as the downscale stage does: a StageStore at <root>/downscale/<name>.<key>.zarr."""
    key = content_key("test-downscale", ds.sizes, float(ds.tas.values[0, 0, 0, 0]))
    url = f"{root.rstrip('/')}/downscale/MPI-ESM-LR.historical.r1i1p1.dpdm.{key}.zarr"
    store = StageStore(url, key, dict(storage_options or {}))
    enc = {v: {"chunks": (1, block, ds.sizes["lat"], ds.sizes["lon"])} for v in ("tas", "uas", "vas")}
    tmpl = ds.copy()
    for v in ("tas", "uas", "vas"):
        tmpl[v] = tmpl[v].chunk({"member": 1, "time": block})
    tmpl["time_bnds"] = tmpl["time_bnds"].load()
    store.initialize(tmpl, encoding=enc)
    regions = [{"time": s} for s in time_blocks(ds.sizes["time"], block)]
    for r in regions if complete else regions[:1]:
        store.write_block(ds[["tas", "uas", "vas"]].isel(r), r)
    if complete:
        store.finalize(
            regions,
            attrs={
                "history": "2026-11-20T00:00:00+00:00 climrecon 0.1.0 downscale: key " + key,
                "climrecon_downscale_config": json.dumps(
                    {"method": "dpdm", "members": ds.sizes["member"], "seed": 7}
                ),
                "climrecon_provenance": json.dumps(
                    provenance or {"stage": "downscale", "seeds": {"base": 7}}
                ),
            },
        )
    return url


def expected_statistics(members: np.ndarray, quantiles, thresholds) -> dict[str, np.ndarray]:
    """The statistics computed independently with plain numpy on the stored members."""
    x = members.astype(np.float64)
    return {
        "mean": x.mean(0),
        "std": x.std(0, ddof=1),
        "quantile": np.quantile(x, quantiles, axis=0),
        "exceedance": np.stack([(x > t).sum(0) / x.shape[0] for t in thresholds])
        if len(thresholds)
        else None,
    }


def check_against_members(out: xr.Dataset, members: xr.Dataset, cfg: AggregateConfig) -> None:
    for v in ("tas", "uas", "vas"):
        exp = expected_statistics(members[v].values, cfg.quantiles, cfg.thresholds.get(v, []))
        for stat in ("mean", "std", "quantile"):
            got = out[f"{v}_{stat}"].values
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, exp[stat], rtol=2e-6, atol=1e-5 * np.abs(exp[stat]).max())
        if v in cfg.thresholds:
            np.testing.assert_array_equal(out[f"{v}_exceedance"].values, exp["exceedance"].astype(np.float32))


@pytest.fixture
def member_store(tmp_path) -> tuple[str, xr.Dataset]:
    ds = member_dataset()
    return write_member_store(str(tmp_path), ds), ds


def test_ensemble_statistics_match_numpy_and_propagate_nan():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 3, 4, 5)).astype(np.float32)
    x[2, 0, 1, 1] = np.nan
    got = ensemble_statistics(x, [0.1, 0.5, 0.9], [0.0, 1.0])
    np.testing.assert_allclose(got["std"][1], np.std(x[:, 1].astype(float), axis=0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(
        got["quantile"][:, 2], np.quantile(x[:, 2], [0.1, 0.5, 0.9], axis=0), rtol=1e-6
    )
    np.testing.assert_array_equal(got["exceedance"][1, 1], (x[:, 1] > 1.0).mean(0).astype(np.float32))
    for name in ("mean", "std"):
        assert np.isnan(got[name][0, 1, 1]) and np.isfinite(got[name][0, 1, 2])
    assert np.isnan(got["quantile"][:, 0, 1, 1]).all() and np.isnan(got["exceedance"][:, 0, 1, 1]).all()
    with pytest.raises(AggregateError, match="at least 2 members"):
        ensemble_statistics(x[:1], [0.5])


def test_aggregate_values_cf_metadata_provenance_catalog_and_rerun(member_store, tmp_path):
    url, ds = member_store
    cfg = AggregateConfig(
        time_chunk=12, quantiles=[0.9, 0.05, 0.5], thresholds={"tas": [303.15, 273.15], "uas": [5.0]}
    )
    root = str(tmp_path / "out")
    plan = plan_aggregate(url, cfg, root)
    assert (
        plan.url.startswith(f"{root}/aggregate/MPI-ESM-LR.historical.r1i1p1.dpdm.") and plan.key in plan.url
    )
    assert plan.period == "199001-199112" and plan.n_member == 16
    catalog = output_catalog_url(root)
    assert run_aggregate(plan, catalog=catalog) == plan.url

    out = xr.open_zarr(plan.url, decode_times=CFTIME, consolidated=True)
    check_against_members(out, ds, cfg)
    # CF: statistics keep standard_name/units; cell_methods in order of application; bounds everywhere
    assert out.tas_mean.attrs["standard_name"] == "air_temperature" and out.tas_mean.attrs["units"] == "K"
    assert out.tas_mean.attrs["cell_methods"].startswith("time: mean realization: mean")
    assert (
        "realization: standard_deviation (comment: sample estimator with N-1"
        in out.tas_std.attrs["cell_methods"]
    )
    assert out.tas_quantile.attrs["cell_methods"] == "time: mean" and list(out["quantile"].values) == [
        0.05,
        0.5,
        0.9,
    ]
    assert out["quantile"].attrs["units"] == "1"
    assert out.tas_exceedance.attrs["units"] == "1" and "standard_name" not in out.tas_exceedance.attrs
    assert out.tas_threshold.attrs == {
        "standard_name": "air_temperature",
        "units": "K",
        "long_name": "threshold of tas",
        "spp_relative_to_threshold": "greater_than",
    }
    assert list(out.tas_threshold.values) == pytest.approx([273.15, 303.15]) and "vas_exceedance" not in out
    assert out.time.attrs["bounds"] == "time_bnds" and out.lat.attrs["bounds"] == "lat_bnds"
    assert out.time_bnds.values[0, 1] == out.time.values[1] and out.time.values[0].calendar == "noleap"
    np.testing.assert_allclose(out.lat_bnds.values[:, 1] - out.lat_bnds.values[:, 0], 0.25)
    assert out.lon_bnds.values[0, 0] == pytest.approx(-125.0)
    assert out.tas_mean.encoding["chunks"] == (12, 16, 20) and out.tas_quantile.encoding["chunks"] == (
        1,
        12,
        16,
        20,
    )
    assert "tas" not in out.data_vars  # members only on request
    # provenance: attributes, history, PROV document beside the zarr metadata
    assert out.attrs["climrecon_status"] == "complete" and out.attrs["climrecon_source"] == url
    assert out.attrs["history"].splitlines()[0].endswith("downscale: key " + plan.member_key)
    assert out.attrs["climrecon_lineage"].endswith(f"aggregate/{plan.key}")
    record = json.loads(out.attrs["climrecon_provenance"])
    assert record["upstream"]["seeds"] == {"base": 7} and record["upstream"]["config"]["method"] == "dpdm"
    doc = json.loads((Path(plan.url) / "provenance.json").read_text())
    assert doc["entity"][f"climrecon:store/{plan.member_key}"]["prov:location"] == url
    assert {
        "prov:generatedEntity": f"climrecon:store/{plan.key}",
        "prov:usedEntity": f"climrecon:store/{plan.member_key}",
    } in doc["wasDerivedFrom"].values()
    # the output catalog lists one row per statistic variable and opens with intake-esm
    rows = read_output_rows(catalog)
    assert {(r["variable_id"], r["statistic"]) for r in rows} >= {
        ("tas", "mean"),
        ("tas", "exceedance"),
        ("vas", "std"),
    }
    assert {r["period"] for r in rows} == {"199001-199112"} and {r["key"] for r in rows} == {plan.key}
    (opened,) = open_outputs(catalog, statistic="mean").values()
    assert sorted(opened.data_vars) == ["tas_mean", "uas_mean", "vas_mean"]
    np.testing.assert_array_equal(opened.tas_mean.values, out.tas_mean.values)

    # re-run: the complete store is untouched (no file rewritten), the same URL comes back
    stamps = {p: p.stat().st_mtime_ns for p in Path(plan.url).rglob("*") if p.is_file()}
    again = plan_aggregate(url, cfg, root)
    assert again.url == plan.url and prepare_aggregate(again) == []
    assert run_aggregate(again, catalog=catalog) == plan.url
    assert {p: p.stat().st_mtime_ns for p in Path(plan.url).rglob("*") if p.is_file()} == stamps
    assert len(read_output_rows(catalog)) == len(rows)
    # a deleted store disappears from the opened catalog (its rows are filtered out)
    (Path(plan.url) / ".climrecon" / "complete.json").unlink()
    assert open_output_catalog(catalog).df.empty


def test_small_memory_budget_bands_members_and_gives_the_same_result(member_store, tmp_path):
    url, ds = member_store
    cfg = AggregateConfig(time_chunk=12, include_members=True)
    plan = plan_aggregate(url, cfg, str(tmp_path / "out"))
    regions = prepare_aggregate(plan)
    assert len(regions) == 2
    # 3 lat rows of 16 members x 12 months x 20 lon per band
    assert aggregate_block(plan, regions[0], memory_budget=16 * 12 * 20 * 12 * 3)
    assert not aggregate_block(plan, regions[0])  # done marker: not written again
    run_aggregate(plan)
    out = xr.open_zarr(plan.url, decode_times=CFTIME)
    check_against_members(out, ds, cfg)
    np.testing.assert_array_equal(out.tas.values, ds.tas.values)
    assert out.tas.attrs["statistic"] == "members" and out.member.attrs["standard_name"] == "realization"
    assert out.tas.encoding["chunks"] == (1, 12, 16, 20)


def test_incomplete_or_foreign_member_store_is_refused(tmp_path):
    url = write_member_store(str(tmp_path), member_dataset(n_member=4, n_time=24), complete=False)
    with pytest.raises(AggregateError, match=r"is incomplete .*finish the downscale run"):
        plan_aggregate(url, AggregateConfig(), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    foreign = tmp_path / "foreign.zarr"
    member_dataset(n_member=4, n_time=12).to_zarr(foreign)
    with pytest.raises(AggregateError, match="no climrecon_key attribute"):
        plan_aggregate(str(foreign), AggregateConfig(), str(tmp_path / "out"))
    with pytest.raises(AggregateError, match="cannot open member store"):
        plan_aggregate(str(tmp_path / "missing.zarr"), AggregateConfig(), str(tmp_path / "out"))
    with pytest.raises(CatalogError, match="not complete"):
        add_to_output_catalog(output_catalog_url(str(tmp_path)), url)


def test_config_errors_name_the_field(member_store, tmp_path):
    url, _ = member_store
    # chunks: whole maps when ~1 MB allows, else equal tiles (the layout benchmarks/aggregate.py chose)
    assert spatial_chunks(12, 80, 80) == (80, 80) and spatial_chunks(120, 80, 80) == (40, 40)
    assert spatial_chunks(120, 1000, 1000) == (46, 46)
    with pytest.raises(AggregateError, match=r"aggregate.thresholds names \['pr'\]"):
        plan_aggregate(url, AggregateConfig(thresholds={"pr": [1e-5]}), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="fractions, not percent"):
        AggregateConfig(quantiles=[5, 50, 95])
    config = tmp_path / "run.yaml"
    config.write_text(
        f"storage:\n  root: {tmp_path / 'o'}\naggregate:\n  time_chunk: 6\n  quantiles: [0.25]\n"
    )
    cfg = load_config(config, ["aggregate.include_members=true"])
    agg = cfg.aggregate
    assert cfg.storage.root == str(tmp_path / "o") and agg.time_chunk == 6 and agg.quantiles == [0.25]
    assert agg.include_members
    with pytest.raises(ConfigError, match=rf"{config}:\n  aggregate.time_chunk: Input should be greater"):
        load_config(config, ["aggregate.time_chunk=0"])
    with pytest.raises(ConfigError, match="aggregate.colour: unknown key"):
        load_config(config, ["aggregate.colour=red"])
