"""Ingest stage: catalog query -> one standardized, provenance-stamped CF Zarr store per dataset group.

Contract:
- :func:`search_catalog` opens an intake-esm catalog (local path or fsspec URL) and returns the subset
  matching a :class:`~climrecon.config.CatalogQuery`; a term that matches nothing raises
  :class:`CatalogQueryError` listing the values the catalog offers for that column.
- :func:`plan_ingest` makes one :class:`IngestPlan` per catalog group (the catalog's ``groupby_attrs``:
  one model, experiment, member and table), self-contained (catalog description + matched rows) so a
  worker can run it without reading the catalog again. Its store URL carries a :func:`content_key` of
  the query, the ingest config and the matched rows (paths + versions): new inputs, new store.
- :func:`open_plan` opens the rows lazily with intake-esm (every file is standardized by
  :func:`~climrecon.tasks.standardize.standardize` before intake-esm combines them) and clips to
  ``query.time``.
- :func:`ingest_plan` writes the store through :class:`~climrecon.stores.StageStore` (template, one
  chunk-aligned block per ``time_chunk`` steps, complete marker last) and returns its URL. A complete
  store is skipped untouched. All input checks run before anything is written, so a bad input leaves
  every existing store as it was; a failure while writing leaves an incomplete store, never a complete one.

Storage options (possibly holding secrets) are used for catalogs, sources and the output alike and are
never recorded. Remote sources must be Zarr (netCDF rows are read from local paths).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import scipy.io
import xarray as xr
from intake_esm import esm_datastore

from climrecon.catalogs.esmcat import CatalogError, open_catalog
from climrecon.config import CatalogQuery, IngestConfig, StorageConfig
from climrecon.provenance import code_version
from climrecon.storage import is_remote, public_url, resolve_storage_options, store_url, url_options
from climrecon.stores import StageStore, content_key, default_owner, time_blocks
from climrecon.tasks.standardize import (
    CMIP_VARIABLES,
    CatalogQueryError,
    CoordinateError,
    IngestError,
    MissingVariableError,
    SourceReadError,
    normalize_frequency,
    standardize,
)

__all__ = [
    "IngestPlan",
    "IngestError",
    "CatalogQueryError",
    "TABLE_FREQUENCY",
    "search_catalog",
    "plan_ingest",
    "open_plan",
    "ingest_plan",
]

# CMIP table_id -> frequency, for catalogs without a ``frequency`` column (e.g. Pangeo's CMIP6 catalog)
TABLE_FREQUENCY = {
    "Amon": "mon",
    "Lmon": "mon",
    "Omon": "mon",
    "SImon": "mon",
    "Emon": "mon",
    "AERmon": "mon",
    "Ayr": "yr",
    "Eyr": "yr",
    "day": "day",
    "Eday": "day",
    "3hr": "3hr",
    "6hrPlev": "6hr",
    "fx": "fx",
    "Efx": "fx",
    "Ofx": "fx",
}
# netCDF-C and HDF5 are not thread-safe to open: one open at a time per process (tasks may run in threads)
_OPEN_LOCK = threading.Lock()


@dataclass(frozen=True)
class IngestPlan:
    """Everything needed to ingest one catalog group into one store (JSON-able, no secrets)."""

    label: str  # "MPI-ESM-LR historical r1i1p1 Amon"
    group: str  # intake-esm group key
    catalog: str  # catalog path or URL (provenance only)
    esmcat: dict[str, Any]  # the catalog's esmcat description (without its CSV)
    rows: tuple[dict[str, Any], ...]  # matched catalog rows
    config: IngestConfig
    frequency: str | None
    url: str
    key: str

    @property
    def path_column(self) -> str:
        return self.esmcat["assets"]["column_name"]

    @property
    def variable_column(self) -> str:
        return (self.esmcat.get("aggregation_control") or {}).get("variable_column_name") or "variable_id"

    def paths(self) -> list[str]:
        return [str(r[self.path_column]) for r in self.rows]

    def variables(self) -> list[str]:
        return sorted({str(r[self.variable_column]) for r in self.rows})


# -- catalog -------------------------------------------------------------------------------------
def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _period(text: str, end: bool) -> tuple[int, int] | None:
    digits = "".join(ch for ch in str(text) if ch.isdigit())
    if len(digits) < 4:
        return None
    month = int(digits[4:6]) if len(digits) >= 6 else (12 if end else 1)
    return int(digits[:4]), month


def _overlaps(time_range: Any, query_time: tuple[str, str]) -> bool:
    """Whether a catalog ``time_range`` ("YYYYMM-YYYYMM", "YYYY-YYYY") overlaps the query (unknown: yes)."""
    if not isinstance(time_range, str) or "-" not in time_range:
        return True
    lo, hi = time_range.split("-", 1)
    a, b = _period(lo, False), _period(hi, True)
    qa, qb = _period(query_time[0], False), _period(query_time[1], True)
    if None in (a, b, qa, qb):
        return True
    return a <= qb and qa <= b


def search_catalog(
    catalog: str, query: CatalogQuery, storage_options: dict[str, Any] | None = None
) -> esm_datastore:
    """The subset of ``catalog`` matching every term of ``query`` (and overlapping ``query.time``).

    Each requested value must match at least one row (given the terms before it); otherwise
    :class:`CatalogQueryError` names the column, the missing values and the values available.
    """
    try:
        cat = open_catalog(catalog, storage_options)
    except CatalogError as exc:
        raise CatalogQueryError(str(exc)) from None
    df = cat.df
    terms = query.search_terms()
    for column, value in terms.items():
        if column not in df.columns:
            raise CatalogQueryError(
                f"catalog {public_url(catalog)} has no column {column!r}; its columns: {list(df.columns)}"
            )
        wanted = _as_list(value)
        available = sorted(map(str, df[column].dropna().unique()))
        missing = [v for v in wanted if v not in available]
        if missing:
            everywhere = sorted(map(str, cat.df[column].dropna().unique()))
            within = (
                "" if available == everywhere else f" among the rows matching the other terms ({available})"
            )
            raise CatalogQueryError(
                f"catalog {public_url(catalog)}: no entry with {column}={missing}{within}; "
                f"available {column} values: {everywhere}"
            )
        df = df[df[column].isin(wanted)]
    sub = cat.search(**terms) if terms else cat
    if query.time and "time_range" in sub.df.columns:
        keep = sub.df["time_range"].map(lambda r: _overlaps(r, query.time))
        if not keep.any():
            raise CatalogQueryError(
                f"catalog {public_url(catalog)}: no file of the query overlaps time {query.time}; "
                f"available time_range values: {sorted(map(str, sub.df['time_range'].unique()))}"
            )
        sub = esm_datastore(
            {"esmcat": sub.esmcat.model_dump(), "df": sub.df[keep].reset_index(drop=True)},
            progressbar=False,
            threaded=False,
        )
    return sub


def _json_row(row: pd.Series) -> dict[str, Any]:
    return {
        str(k): (
            None
            if (not isinstance(v, (list, tuple)) and pd.isna(v))
            else (v.item() if hasattr(v, "item") else v)
        )
        for k, v in row.items()
    }


def _esmcat_description(cat: esm_datastore) -> dict[str, Any]:
    d = cat.esmcat.model_dump(mode="json")
    d["catalog_file"] = None
    d["catalog_dict"] = None
    return d


def plan_ingest(cfg: IngestConfig, catalog: str, storage: StorageConfig) -> list[IngestPlan]:
    """One :class:`IngestPlan` per catalog group matching ``cfg.query``, sorted by label."""
    options = resolve_storage_options(storage.options)
    sub = search_catalog(catalog, cfg.query, options)
    esmcat = _esmcat_description(sub)
    agg = esmcat.get("aggregation_control") or {}
    groupby = [c for c in agg.get("groupby_attrs") or [] if c in sub.df.columns]
    var_col = agg.get("variable_column_name") or "variable_id"
    path_col = esmcat["assets"]["column_name"]
    wanted = _as_list(cfg.query.variable_id) if cfg.query.variable_id else None
    plans = []
    groups = sub.df.groupby(groupby, sort=True, dropna=False) if groupby else [((), sub.df)]
    for values, frame in groups:
        values = values if isinstance(values, tuple) else (values,)
        group = ".".join(str(v) for v in values) or "all"
        rows = tuple(_json_row(r) for _, r in frame.sort_values([var_col, path_col]).iterrows())
        have = {str(r[var_col]) for r in rows}
        if wanted and set(wanted) - have:
            raise MissingVariableError(
                f"catalog {public_url(catalog)}: group {group} has no file for variable(s) "
                f"{sorted(set(wanted) - have)} (it has {sorted(have)})"
            )
        first = rows[0]
        ident = {c: str(first.get(c) or "") for c in ("source_id", "experiment_id", "member_id", "table_id")}
        freqs = {r.get("frequency") for r in rows if r.get("frequency")}
        frequency = normalize_frequency(
            freqs.pop() if len(freqs) == 1 else TABLE_FREQUENCY.get(ident["table_id"])
        )
        inputs = [{"path": r[path_col], "version": r.get("version"), "variable_id": r[var_col]} for r in rows]
        key = content_key(cfg.query, cfg, inputs)
        parts = [ident[c] or "na" for c in ident]
        plans.append(
            IngestPlan(
                label=" ".join(v for v in ident.values() if v) or group,
                group=group,
                catalog=public_url(catalog),
                esmcat=esmcat,
                rows=rows,
                config=cfg,
                frequency=frequency,
                url=store_url(storage.root, "ingest", parts, f"{key}.zarr"),
                key=key,
            )
        )
    return sorted(plans, key=lambda p: (p.label, p.url))


# -- opening -------------------------------------------------------------------------------------
def _is_zarr(plan: IngestPlan, row: dict[str, Any]) -> bool:
    fmt = plan.esmcat["assets"].get("format")
    col = plan.esmcat["assets"].get("format_column_name")
    value = row.get(col) if col else fmt
    return str(value or "").startswith("zarr") or str(row[plan.path_column]).rstrip("/").endswith(".zarr")


def _local_path(path: str) -> str:
    """A local path or ``file://`` URL as an absolute real path (catalogs list Zarr stores as file:// URLs)."""
    return os.path.realpath(path.removeprefix("file://"))


def _check_netcdf3(path: str) -> None:
    """Classic netCDF files cut short read back as zeros in netCDF-C: read them fully with scipy first."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:3] != b"CDF":
        return
    try:
        with scipy.io.netcdf_file(path, mmap=False):
            pass
    except Exception as exc:  # noqa: BLE001
        raise SourceReadError(f"{path}: the netCDF file is truncated or corrupt ({exc})") from None


def _find(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _unreadable_row(plan: IngestPlan, storage_options: dict[str, Any]) -> tuple[str, str] | None:
    """The first row whose file/store cannot be opened on its own, with the reason."""
    for row in plan.rows:
        path = str(row[plan.path_column])
        try:
            if _is_zarr(plan, row):
                xr.open_zarr(
                    path, storage_options=url_options(path, storage_options), decode_times=False
                ).close()
            else:
                _check_netcdf3(path)
                xr.open_dataset(path, decode_times=False).load().close()
        except Exception as exc:  # noqa: BLE001
            return path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def open_plan(plan: IngestPlan, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """The plan's data, standardized, clipped to ``query.time`` and chunked ``{time: time_chunk}`` (lazy)."""
    cfg = plan.config
    options = storage_options or {}
    # one entry per file: a file serving several rows (u and v in one file) is opened once
    files = pd.DataFrame(list(plan.rows)).drop_duplicates(subset=[plan.path_column]).reset_index(drop=True)
    cat = esm_datastore({"esmcat": plan.esmcat, "df": files}, progressbar=False, threaded=False)
    by_path: dict[str, list[str]] = {}
    for row in plan.rows:
        path = str(row[plan.path_column])
        key = path if is_remote(path) else _local_path(path)
        by_path.setdefault(key, []).append(str(row[plan.variable_column]))
    tracking: dict[str, str] = {}

    def preprocess(ds: xr.Dataset) -> xr.Dataset:
        src = ds.encoding.get("source")
        if src and not is_remote(str(src)):
            src = _local_path(str(src))
            if os.path.isfile(src):  # a netCDF file (a Zarr store is a directory)
                _check_netcdf3(src)
        variables = by_path.get(src) if src else None
        if variables is None and len(by_path) == 1:  # a single store (e.g. Zarr) serves every row
            variables = plan.variables()
        label = src or f"{plan.label} ({', '.join(plan.paths())})"
        out = standardize(
            ds, lon_convention=cfg.lon_convention, source=label, variables=variables, frequency=plan.frequency
        )
        if ds.attrs.get("tracking_id"):
            tracking[label] = str(ds.attrs["tracking_id"])
        return out

    try:
        with _OPEN_LOCK:
            dsets = cat.to_dataset_dict(
                xarray_open_kwargs={"decode_times": False},
                storage_options=options,
                preprocess=preprocess,
                xarray_combine_by_coords_kwargs={
                    "compat": "no_conflicts",
                    "coords": "different",
                    "data_vars": "all",
                    "join": "exact",
                },
                threaded=False,
                progressbar=False,
            )
    except Exception as exc:  # noqa: BLE001 - turned into an IngestError naming the file
        known = _find(exc, IngestError)
        if known is not None:
            raise known from None
        bad = _unreadable_row(plan, options)
        if bad:
            raise SourceReadError(f"{plan.label}: cannot read source {bad[0]} ({bad[1]})") from None
        raise SourceReadError(
            f"{plan.label}: the sources {plan.paths()} cannot be combined into one dataset: {_root_cause(exc)}"
        ) from None
    if len(dsets) != 1:
        raise IngestError(
            f"{plan.label}: the rows form {len(dsets)} datasets ({sorted(dsets)}), expected one"
        )
    ds = next(iter(dsets.values()))
    # intake-esm turns every variable but the row's own into a coordinate before combining
    promote = [n for n in ds.coords if n in CMIP_VARIABLES or n == "time_bnds"]
    ds = ds.reset_coords(promote)
    wanted = plan.variables()
    missing = [v for v in wanted if v not in ds.data_vars]
    if missing:
        raise MissingVariableError(f"{plan.label}: variable(s) {missing} not found in {plan.paths()}")
    ds = ds[[*wanted, *(["time_bnds"] if "time_bnds" in ds else [])]]
    ds.attrs = {k: v for k, v in ds.attrs.items() if not str(k).startswith("intake_esm")}
    if tracking:
        ds.attrs["source_tracking_ids"] = sorted(set(tracking.values()))
    if "time" in ds.dims:
        if cfg.query.time:
            start, end = cfg.query.time
            ds = ds.sel(time=slice(start, end))
            if ds.sizes["time"] == 0:
                raise CoordinateError(
                    f"{plan.label}: no time step within query.time {cfg.query.time} in {plan.paths()}"
                )
        calendar = ds["time"].values[0].calendar
        for n in ("time", "time_bnds"):
            ds[n].encoding = {
                "units": "days since 1850-01-01 00:00:00",
                "calendar": calendar,
                "dtype": "float64",
            }
    chunks = {"time": cfg.time_chunk} if "time" in ds.dims else {}
    ds = ds.chunk({**chunks, "lat": -1, "lon": -1})
    if "time_bnds" in ds:
        # in memory, so the template holds real bounds at once: xarray decodes the store's existing
        # time_bnds before every region write, and an all-NaN 360_day array cannot be decoded
        ds["time_bnds"] = ds["time_bnds"].load()
        ds["time_bnds"].encoding["chunks"] = (cfg.time_chunk, ds.sizes["bnds"])
    return ds


# -- writing -------------------------------------------------------------------------------------
def _provenance(plan: IngestPlan, ds: xr.Dataset) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    versions = sorted({str(r["version"]) for r in plan.rows if r.get("version")})
    line = (
        f"{now}: climrecon ingest of {', '.join(plan.variables())} from catalog {plan.catalog} "
        f"({len(plan.rows)} rows) standardized to CF names, units, lat ascending, lon {plan.config.lon_convention}"
    )
    history = f"{line}\n{ds.attrs['history']}" if ds.attrs.get("history") else line
    return {
        "climrecon_stage": "ingest",
        "source_catalog": plan.catalog,
        "source_group": plan.group,
        "source_files": plan.paths(),
        "source_versions": versions,
        "ingest_config": json.dumps(plan.config.model_dump(mode="json"), sort_keys=True),
        "code_version": code_version(),
        "date_created": now,
        "history": history,
    }


def ingest_plan(plan: IngestPlan, storage_options: dict[str, Any] | None = None) -> str:
    """Write (or finish) the plan's store and return its URL; a complete store is returned untouched."""
    store = StageStore(plan.url, plan.key, dict(storage_options or {}))
    if store.is_complete():
        return plan.url
    ds = open_plan(plan, storage_options)
    dim = "time" if "time" in ds.dims else "lat"
    step = plan.config.time_chunk if dim == "time" else ds.sizes["lat"]
    regions = [{dim: s} for s in time_blocks(ds.sizes[dim], step)]
    store.initialize(ds, zarr_format=plan.config.zarr_format)
    for region in store.pending(regions):
        if not store.claim(region):  # written by a concurrent run of the same store
            continue
        try:
            store.write_block(ds.isel(region), region)
        except IngestError:
            raise
        except Exception as exc:
            bad = _unreadable_row(plan, storage_options or {})
            if bad is None:
                raise
            raise SourceReadError(f"{plan.label}: cannot read source {bad[0]} ({bad[1]})") from exc
        finally:
            store.release(region, default_owner())
    store.finalize(regions, attrs=_provenance(plan, ds))
    return plan.url
