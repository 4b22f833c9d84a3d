"""Aggregate stage benchmark: throughput and peak memory, and how fast users read the output from S3.

Cases, each in a fresh child process (peak RSS from ``wait4`` on that child alone, via common.py):

- ``members``: write a synthetic member store (16 members x 12*Y months x 80 x 80 cells, tas/uas/vas,
  float32, seeded) the way the downscale stage does (StageStore, one year per region write);
- ``aggregate``: :func:`climrecon.tasks.aggregate.run_aggregate` of that store (no Dask client: the
  blocks run one after another in the child, so its peak RSS is one block's working set); for Y = 1 and
  10 at the default ``time_chunk`` (120) and at ``time_chunk`` 12;
- ``read``: a 40-year ``tas_mean`` (480 x 80 x 80 float32) written to S3 (``moto_server`` started here on
  127.0.0.1) with three candidate chunkings; a fresh ``xr.open_zarr`` reads one map (a month) and one
  point's whole series, median of 5. These figures chose the default chunking (tasks/aggregate.py).

Run: ``python benchmarks/aggregate.py`` (a few minutes on 2 busy cores); writes
benchmarks/results/aggregate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from common import command_line, machine, run_isolated, versions, write_results  # noqa: E402

from climrecon.localhost import serve_moto  # noqa: E402

N_MEMBER, NY, NX, VARIABLES = 16, 80, 80, ("tas", "uas", "vas")
CANDIDATES = {"t12_map": (12, 80, 80), "t120_map": (120, 80, 80), "t120_tile40": (120, 40, 40)}
RESULTS = Path(__file__).resolve().parent / "results" / "aggregate.json"


# -- children ----------------------------------------------------------------------------------------------
def write_members(root: str, years: int) -> dict:
    import xarray as xr

    from climrecon.stores import StageStore, content_key, time_blocks

    n_time = 12 * years
    starts = xr.date_range("1981-01-01", periods=n_time + 1, freq="MS", calendar="noleap", use_cftime=True)
    key = content_key("bench-members", years, N_MEMBER, NY, NX)
    url = f"{root}/downscale/BENCH-GCM.historical.r1i1p1f1.dpdm.{key}.zarr"
    units = {
        "tas": ("air_temperature", "K"),
        "uas": ("eastward_wind", "m s-1"),
        "vas": ("northward_wind", "m s-1"),
    }
    coords = {
        "member": np.arange(N_MEMBER),
        "time": starts[:-1].values,
        "lat": 30.125 + 0.25 * np.arange(NY),
        "lon": -124.875 + 0.25 * np.arange(NX),
    }
    import dask.array as da

    tmpl = xr.Dataset(
        {
            v: (
                ("member", "time", "lat", "lon"),
                da.empty((N_MEMBER, n_time, NY, NX), chunks=(1, 12, NY, NX), dtype=np.float32),
                {"standard_name": units[v][0], "units": units[v][1], "cell_methods": "time: mean"},
            )
            for v in VARIABLES
        },
        coords=coords,
    )
    tmpl["time_bnds"] = (("time", "bnds"), np.stack([starts[:-1].values, starts[1:].values], -1))
    for name in ("time", "time_bnds"):
        tmpl[name].encoding.update(units="days since 1850-01-01", calendar="noleap")
    store = StageStore(url, key)
    store.initialize(tmpl)
    rng = np.random.default_rng(years)
    regions = [{"time": s} for s in time_blocks(n_time, 12)]
    for r in regions:
        shape = (N_MEMBER, r["time"].stop - r["time"].start, NY, NX)
        block = xr.Dataset(
            {
                v: (
                    ("member", "time", "lat", "lon"),
                    ((285.0 if v == "tas" else 0.0) + 8.0 * rng.standard_normal(shape)).astype(np.float32),
                )
                for v in VARIABLES
            },
            coords={"time": coords["time"][r["time"]]},
        )
        store.write_block(block, r)
    store.finalize(
        regions, attrs={"climrecon_provenance": json.dumps({"stage": "downscale", "benchmark": True})}
    )
    return {"url": url}


def aggregate(member_url: str, root: str, time_chunk: int) -> dict:
    from climrecon.config import AggregateConfig
    from climrecon.tasks.aggregate import plan_aggregate, run_aggregate

    cfg = AggregateConfig(time_chunk=time_chunk)
    start = time.perf_counter()
    plan = plan_aggregate(member_url, cfg, root)
    run_aggregate(plan)
    seconds = time.perf_counter() - start
    member_bytes = plan.n_member * plan.n_time * NY * NX * 4 * len(plan.variables)
    return {
        "aggregate_s": round(seconds, 3),
        "member_mb": round(member_bytes / 1e6, 1),
        "throughput_member_mb_per_s": round(member_bytes / 1e6 / seconds, 2),
        "blocks": len(plan.regions()),
    }


def read(repeats: int = 5) -> dict:
    """Write tas_mean (40 years) per candidate chunking to S3 and time a map and a point-series read."""
    import s3fs
    import xarray as xr

    with serve_moto() as server:
        os.environ.update(server.credentials)
        opts = server.storage_options
        s3fs.S3FileSystem(**opts).mkdir("bench")
        n_time = 480
        starts = xr.date_range("1981-01-01", periods=n_time, freq="MS", calendar="noleap", use_cftime=True)
        data = (285 + np.random.default_rng(0).standard_normal((n_time, NY, NX))).astype(np.float32)
        ds = xr.Dataset(
            {"tas_mean": (("time", "lat", "lon"), data, {"units": "K"})},
            coords={"time": starts.values, "lat": np.arange(NY) * 0.25, "lon": np.arange(NX) * 0.25},
        )
        out = {}
        for name, chunks in CANDIDATES.items():
            url = f"s3://bench/{name}.zarr"
            ds.to_zarr(
                url, storage_options=opts, encoding={"tas_mean": {"chunks": chunks}}, consolidated=True
            )
            maps, points = [], []
            for i in range(repeats):
                t0 = time.perf_counter()
                _ = xr.open_zarr(url, storage_options=opts).tas_mean.isel(time=200 + i).values
                maps.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                series = xr.open_zarr(url, storage_options=opts).tas_mean.isel(lat=41 + i, lon=17).values
                points.append(time.perf_counter() - t0)
                assert series.shape == (n_time,)
            out[name] = {
                "chunks": list(chunks),
                "map_read_s": round(statistics.median(maps), 4),
                "point_series_read_s": round(statistics.median(points), 4),
            }
        return out


# -- driver ------------------------------------------------------------------------------------------------
def _child(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "members":
        result = write_members(argv[1], int(argv[2]))
    elif kind == "aggregate":
        result = aggregate(argv[1], argv[2], int(argv[3]))
    else:
        result = read()
    Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    cases: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for years in (1, 10):
            members = run_isolated([*me, "members", tmp, str(years)])
            cases[f"write_members_{years}y"] = dict(members)
            for chunk in (120, 12):
                r = run_isolated([*me, "aggregate", members["url"], f"{tmp}/out{chunk}", str(chunk)])
                cases[f"aggregate_{years}y_time_chunk{chunk}"] = dict(r)
                print(f"{years}y time_chunk={chunk}: {r}", flush=True)
    reads = dict(run_isolated([*me, "read"]))
    print(f"reads: {reads}", flush=True)
    chosen = reads["t120_tile40"]  # what spatial_chunks gives at the default time_chunk of 120
    a1, a10 = cases["aggregate_1y_time_chunk120"], cases["aggregate_10y_time_chunk120"]
    b1, b10 = cases["aggregate_1y_time_chunk12"], cases["aggregate_10y_time_chunk12"]
    write_results(
        args.output,
        {
            "command": command_line(),
            "machine": machine(),
            "versions": versions("numpy", "xarray", "zarr", "dask", "s3fs", "moto"),
            "config": {
                "members": N_MEMBER,
                "grid": [NY, NX],
                "variables": list(VARIABLES),
                "statistics": "mean, std (ddof=1), quantiles [0.05, 0.5, 0.95], exceedance tas > [273.15, 303.15]",
                "read_span_months": 480,
                "read_repeats": 5,
                "chosen_chunks": chosen["chunks"],
            },
            "cases": cases,
            "read_candidates": reads,
            "peak_rss_ratio_10y_vs_1y": round(a10["peak_rss_mib"] / a1["peak_rss_mib"], 3),
            "peak_rss_ratio_10y_vs_1y_time_chunk12": round(b10["peak_rss_mib"] / b1["peak_rss_mib"], 3),
            "throughput_member_mb_per_s_10y": a10["throughput_member_mb_per_s"],
            "map_read_s": chosen["map_read_s"],
            "point_series_read_s": chosen["point_series_read_s"],
            "note": "peak RSS of the aggregate child alone; 10 years at time_chunk 120 is one block of 120 months "
            "(the largest block any span reaches), at time_chunk 12 ten blocks of 12",
        },
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
