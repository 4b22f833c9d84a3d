"""Benchmark of the regrid stage against a plain ``xarray.Dataset.interp``, by length of record.

    python benchmarks/regrid.py [--years 1 10 40] [--block-mb 32] [--out benchmarks/results/regrid.json]

Setup (not timed): for each length, a monthly global 1-degree ``tas`` record (generated lazily with dask,
deterministic: a latitude/season climatology plus seeded noise per month) is written as an ingested-like
store (time chunks of 12 months, StageStore, complete), plus an analytic 5' static store.

The time block (= output zarr time chunk) is chosen by bytes: :func:`~climrecon.tasks.regrid_stage.
time_chunk_for` gives the whole number of years holding about ``--block-mb`` MB of source data (120
months for 1-degree global tas at 32 MB; capped at the record's length). Every case uses that same
``time_chunk``, reads the source in pieces of its own 12-month chunks, computes with dask's synchronous
scheduler and writes one StageStore region per block (zarr defaults: v3, same compressor).

Cases, each in a fresh Python process so that its peak RSS (``wait4`` on the child) is its own:

- ``bilinear``: the bilinear path: the stage's bilinear regridding (``conditioning.coarse_on_fine`` =
  ``regrid.bilinear`` with edge clamping, the function the stage puts coarse fields on the fine grid
  with) straight from the 1-degree source to the 0.25-degree western-US grid (80 x 80);
- ``interp``: the baseline: ``Dataset.interp(lat=..., lon=..., method="linear")`` from the same source
  to the same cell centres, opened, chunked and written exactly like ``bilinear`` (one shared writer);
- ``conservative``: ``regrid.conservative`` of the same source to the global 5-degree grid (36 x 72);
- ``stage``: the stage's full run, :func:`~climrecon.tasks.regrid_stage.run_regrid`: static fields on
  the fine grid (built in the run), conservative to the unified 5-degree grid over the region (coarse
  store, 4 x 4) and bilinear from it to 0.25 degree (fine store, 80 x 80).

``throughput_ratio_vs_interp`` is bilinear / interp at the longest record; ``peak_rss_ratio_*`` is the
stage's peak RSS at the longest record over the shortest. Throughput is source MB (float32 values) per
second of work (opening the source to the complete marker; interpreter start and imports excluded, but
included in ``child_wall_s``); each case runs ``--repeat`` times (median work time, largest peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from common import command_line, machine, peak_rss_mib, run_isolated, versions, write_results  # noqa: E402

# zarr notes on every write that consolidated metadata is not in the v3 spec (the project uses it on purpose)
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")

SOURCE_RESOLUTION = 1.0
TIME_CHUNK = 12  # the source stores' time chunk (ingest-like)
SEED = 20261121
START_YEAR = 1981


# -- setup ----------------------------------------------------------------------------------------------
def _months_block(months: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """tas [K] for absolute months ``months`` (12 * year + month - 1): climatology + season + noise."""
    la, lo = np.meshgrid(np.radians(lat), np.radians(lon), indexing="ij")
    base = 288.0 - 40.0 * np.sin(la) ** 2 + 3.0 * np.cos(2 * lo) * np.cos(la)
    out = np.empty((months.size, lat.size, lon.size), np.float32)
    for i, m in enumerate(months):
        rng = np.random.default_rng([SEED, int(m)])
        season = 15.0 * np.sin(la) * np.cos(2 * np.pi * (int(m) % 12) / 12.0)
        out[i] = base + season + 1.5 * rng.standard_normal(la.shape)
    return out


def synthetic_global(years: int):
    """A lazy, deterministic monthly global 1-degree record of ``years`` years (dask, 12-month chunks)."""
    import cftime
    import dask.array as da
    import xarray as xr

    lat = -90 + SOURCE_RESOLUTION * (np.arange(round(180 / SOURCE_RESOLUTION)) + 0.5)
    lon = -180 + SOURCE_RESOLUTION * (np.arange(round(360 / SOURCE_RESOLUTION)) + 0.5)
    months = np.arange(12 * START_YEAR, 12 * (START_YEAR + years))
    start = [cftime.datetime(int(m) // 12, int(m) % 12 + 1, 1, calendar="noleap") for m in months]
    after = [cftime.datetime((int(m) + 1) // 12, (int(m) + 1) % 12 + 1, 1, calendar="noleap") for m in months]
    blocks = da.from_array(months, chunks=TIME_CHUNK)
    tas = da.map_blocks(
        _months_block,
        blocks,
        lat=lat,
        lon=lon,
        new_axis=[1, 2],
        chunks=(blocks.chunks[0], (lat.size,), (lon.size,)),
        dtype=np.float32,
    )
    return xr.Dataset(
        {
            "tas": (("time", "lat", "lon"), tas, {"units": "K", "standard_name": "air_temperature"}),
            "time_bnds": (("time", "bnds"), np.array([start, after]).T),
        },
        coords={
            "time": ("time", start, {"standard_name": "time", "bounds": "time_bnds"}),
            "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude"}),
        },
        attrs={
            "title": f"benchmark input: {years} years of synthetic monthly tas, global 1 deg",
            "lon_convention": "-180..180",
            "history": "generated by benchmarks/regrid.py",
        },
    )


def write_store(ds, url: str, key: str, dim: str, step: int) -> str:
    """Write ``ds`` as a complete StageStore (template, one region per ``step`` along ``dim``)."""
    import dask

    from climrecon.stores import StageStore, time_blocks

    store = StageStore(url, key)
    encoding = {}
    if "time" in ds.dims:
        enc = {"units": "days since 1850-01-01", "calendar": "noleap", "dtype": "float64"}
        encoding = {"time": enc, "time_bnds": enc}
    store.initialize(ds, encoding=encoding)
    regions = [{dim: s} for s in time_blocks(ds.sizes[dim], step)]
    blocked = [v for v, x in ds.data_vars.items() if dim in x.dims]
    with dask.config.set(scheduler="synchronous"):
        for r in regions:
            store.write_block(ds[blocked].isel(r).compute(), r)
    store.finalize(regions)
    return url


def analytic_static():
    """5' orog [m] / sftlf [%] over 25..55N, 130..100W (the default region plus a margin)."""
    import xarray as xr

    step = 1 / 12
    lat = np.arange(25 + step / 2, 55, step)
    lon = np.arange(-130 + step / 2, -100, step)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    land = lo > -122.0 + 1.5 * np.sin(np.radians(la) * 12)
    orog = np.where(land, 300 + 2500 * np.exp(-(((lo + 118) / 0.6) ** 2)), 0.0)
    return xr.Dataset(
        {
            "orog": (("lat", "lon"), orog.astype("float32"), {"units": "m"}),
            "sftlf": (("lat", "lon"), (100.0 * land).astype("float32"), {"units": "%"}),
        },
        coords={"lat": lat, "lon": lon},
    ).chunk({"lat": 120})


# -- cases (run in a child process) -----------------------------------------------------------------------
CASES = ("bilinear", "interp", "conservative", "stage")


def _regrid_to_store(source: str, url: str, regrid, time_chunk: int) -> int:
    """Open ``source`` as the stage does, ``regrid`` it lazily, write it in blocks of ``time_chunk``."""
    import dask

    from climrecon.stores import StageStore, content_key, time_blocks
    from climrecon.tasks.regrid_stage import open_source, read_steps

    src = open_source(source, lazy=False)[["tas", "time_bnds"]]
    src = src.chunk({"time": read_steps(src, ["tas"], time_chunk), "lat": -1, "lon": -1})
    out = regrid(src)
    out["time_bnds"] = src["time_bnds"].load()
    time_enc = {"units": "days since 1850-01-01", "calendar": "noleap", "dtype": "float64"}
    encoding = {
        "tas": {"chunks": (time_chunk, out.sizes["lat"], out.sizes["lon"]), "dtype": "float32"},
        "time": {**time_enc, "chunks": (time_chunk,)},
        "time_bnds": {**time_enc, "chunks": (time_chunk, 2)},
    }
    store = StageStore(url, content_key("bench-regrid", source, url, time_chunk))
    # the template (nothing computed) is chunked like the store; the blocks are written from ``out``
    store.initialize(out.chunk({"time": time_chunk}).drop_encoding(), encoding=encoding)
    regions = [{"time": s} for s in time_blocks(out.sizes["time"], time_chunk)]
    with dask.config.set(scheduler="synchronous"):
        for region in regions:
            store.write_block(out[["tas"]].isel(region).compute(), region)
    store.finalize(regions)
    return len(regions)


def run_case(case: str, source: str, static: str, out_root: str, time_chunk: int) -> dict:
    from climrecon.config import RegridConfig, StorageConfig
    from climrecon.methods.features import coarse_on_fine
    from climrecon.tasks import regrid
    from climrecon.tasks.grids import Grid
    from climrecon.tasks.regrid_stage import plan_regrid, run_regrid

    cfg = RegridConfig(time_chunk=time_chunk)
    fine, five = Grid.from_region(cfg.region, cfg.resolution), Grid.global_(5.0)
    methods = {
        "bilinear": lambda ds: coarse_on_fine(ds, fine),
        "interp": lambda ds: ds.interp(lat=fine.lat, lon=fine.lon, method="linear"),
        "conservative": lambda ds: regrid.conservative(ds, five),
    }
    start = time.perf_counter()
    if case == "stage":
        result = run_regrid(plan_regrid(cfg, source, StorageConfig(root=out_root), static))
        blocks, outputs = result.blocks_written, result.urls()
    else:
        url = f"{out_root}/{case}/tas.zarr"
        blocks, outputs = _regrid_to_store(source, url, methods[case], time_chunk), {case: url}
    return {"work_s": time.perf_counter() - start, "blocks_written": blocks, "outputs": outputs}


def child(args: argparse.Namespace) -> None:
    result = run_case(args.case, args.source, args.static, args.out_root, args.time_chunk)
    result["self_peak_rss_mib"] = round(peak_rss_mib(), 1)
    Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(result))


# -- driver -----------------------------------------------------------------------------------------------
def _time_chunk(source: str, block_mb: float) -> int:
    from climrecon.tasks.regrid_stage import open_source, time_chunk_for

    return time_chunk_for(open_source(source), ["tas"], block_mb)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--years", type=int, nargs="+", default=[1, 10, 40])
    parser.add_argument(
        "--block-mb", type=float, default=32.0, help="source MB per time block (-> time_chunk)"
    )
    parser.add_argument("--out", default="benchmarks/results/regrid.json")
    parser.add_argument("--workdir", default=None, help="where the stores go (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median time, max peak RSS)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--static", help=argparse.SUPPRESS)
    parser.add_argument("--out-root", help=argparse.SUPPRESS)
    parser.add_argument("--time-chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        return child(args)

    command = command_line()
    years = sorted(set(args.years))
    with tempfile.TemporaryDirectory(prefix="climrecon-bench-regrid-") as tmp:
        work = Path(args.workdir or tmp)
        setup_start = time.perf_counter()
        static = write_store(
            analytic_static(), str(work / "inputs" / "static.zarr"), "bench-static", "lat", 120
        )
        sources = {
            y: write_store(
                synthetic_global(y),
                str(work / "inputs" / f"tas.global1deg.{y}y.zarr"),
                f"bench-{y}y",
                "time",
                TIME_CHUNK,
            )
            for y in years
        }
        time_chunks = {y: _time_chunk(sources[y], args.block_mb) for y in years}
        setup_s = time.perf_counter() - setup_start
        cases = []
        for y in years:
            input_mb = 12 * y * 180 * 360 * 4 / 1e6
            for case in CASES:
                runs = []
                for r in range(args.repeat):  # fresh output stores each time
                    out_root = str(work / "out" / f"{case}-{y}y-{r}")
                    argv_child = [
                        sys.executable,
                        __file__,
                        "--case",
                        case,
                        "--source",
                        sources[y],
                        "--static",
                        static,
                        "--out-root",
                        out_root,
                        "--time-chunk",
                        str(time_chunks[y]),
                    ]
                    runs.append(run_isolated(argv_child, timeout_s=600))
                    shutil.rmtree(out_root)
                work_s = float(np.median([run["work_s"] for run in runs]))
                rss = max(run["peak_rss_mib"] for run in runs)
                cases.append(
                    {
                        "case": case,
                        "years": y,
                        "months": 12 * y,
                        "input_mb": round(input_mb, 2),
                        "time_chunk": time_chunks[y],
                        "block_input_mb": round(input_mb * min(time_chunks[y], 12 * y) / (12 * y), 2),
                        "work_s": round(work_s, 3),
                        "work_s_runs": [round(run["work_s"], 3) for run in runs],
                        "child_wall_s_runs": [run["wall_s"] for run in runs],
                        "throughput_mb_s": round(input_mb / work_s, 2),
                        "peak_rss_mib": rss,
                        "peak_rss_mib_runs": [run["peak_rss_mib"] for run in runs],
                        "self_reported_peak_rss_mib": max(run["self_peak_rss_mib"] for run in runs),
                        "blocks_written": runs[0]["blocks_written"],
                    }
                )
                print(
                    f"{case:12s} {y:3d} y: median {work_s:7.2f} s, {input_mb / work_s:7.2f} MB/s, "
                    f"peak RSS {rss:.0f} MiB",
                    flush=True,
                )

    def pick(case: str, y: int) -> dict:
        return next(c for c in cases if c["case"] == case and c["years"] == y)

    def tput(case: str, y: int) -> float:
        return pick(case, y)["throughput_mb_s"] / pick("interp", y)["throughput_mb_s"]

    lo, hi = years[0], years[-1]
    rss_ratios = {
        case: round(pick(case, hi)["peak_rss_mib"] / pick(case, lo)["peak_rss_mib"], 3) for case in CASES
    }
    tput_ratio = tput("bilinear", hi)
    results = {
        "benchmark": "regrid",
        "command": command,
        "machine": machine(),
        "versions": versions("numpy", "xarray", "dask", "distributed", "zarr", "scipy"),
        "config": {
            "years": years,
            "source": f"synthetic monthly tas, global {SOURCE_RESOLUTION:g} deg (180 x 360), float32, "
            f"zarr chunks of {TIME_CHUNK} months, noleap calendar, seed {SEED}",
            "block_mb": args.block_mb,
            "time_chunk_by_years": {str(y): time_chunks[y] for y in years},
            "cases": {
                "bilinear": "the bilinear path: conditioning.coarse_on_fine (= regrid.bilinear, edges clamped), "
                "the stage's bilinear, from the 1-deg source to the 0.25-deg grid 30..50N 125..105W (80 x 80)",
                "interp": "baseline: xarray.Dataset.interp(lat, lon, method='linear') from the same source to the "
                "same 0.25-deg centres, opened/chunked/written by the same code as 'bilinear'",
                "conservative": "regrid.conservative from the same source to the global 5-deg grid (36 x 72), same writer",
                "stage": "full run_regrid, config region/resolutions default, time_chunk as above: static fields on "
                "the fine grid (built in the run), conservative to the unified 5-deg grid (4 x 4 coarse store), "
                "bilinear from it to 0.25 deg (80 x 80 fine store): two region writes per block",
            },
            "writer": "StageStore template + one region write per time block (zarr v3 defaults, same compressor), "
            "source opened lazily and read in its own 12-month chunks",
            "repeats": args.repeat,
            "scheduler": "dask synchronous (single-threaded), one block at a time, no Dask cluster",
            "throughput": "source float32 MB read per second of work (open source -> complete marker)",
            "setup_s": round(setup_s, 1),
        },
        "cases": cases,
        f"peak_rss_ratio_{hi}y_vs_{lo}y": rss_ratios["stage"],
        "peak_rss_ratio_case": "stage (full run_regrid)",
        f"peak_rss_ratio_{hi}y_vs_{lo}y_by_case": rss_ratios,
        "throughput_ratio_vs_interp": round(tput_ratio, 3),
        "throughput_ratio_case": f"bilinear / interp at {hi} y (the bilinear path, same source, grid, writer)",
        "throughput_ratio_vs_interp_by_years": {str(y): round(tput("bilinear", y), 3) for y in years},
        "stage_throughput_ratio_vs_interp_by_years": {str(y): round(tput("stage", y), 3) for y in years},
        "goals": {
            f"peak_rss_{hi}y_within_1.25x_of_{lo}y": rss_ratios["stage"] <= 1.25,
            "throughput_at_least_interp": tput_ratio >= 1.0,
        },
    }
    if f"peak_rss_ratio_{hi}y_vs_{lo}y" != "peak_rss_ratio_40y_vs_1y":
        results["note"] = "ratios are between the longest and shortest records run (not 40 y vs 1 y)"
    path = write_results(args.out, results)
    print(
        json.dumps(
            {k: results[k] for k in ("throughput_ratio_vs_interp", f"peak_rss_ratio_{hi}y_vs_{lo}y", "goals")}
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
