"""The output catalog: an intake-esm catalog (esmcat 0.1.0 JSON + CSV) of the pipeline's finished stores.

One row per (store, data variable): ``source_id``, ``experiment_id``, ``member_id`` (the GCM run),
``variable_id`` (tas, uas, ...), ``method`` (downscaling method), ``period`` (``YYYYMM-YYYYMM``),
``statistic`` (members | mean | std | quantile | exceedance), ``store_variable`` (the variable's name in
the store, e.g. ``tas_mean``: intake-esm's variable column, so a search opens only what it matched),
``path`` (store URL; local stores as ``file://`` URLs), ``format`` (zarr), ``created`` and ``key`` (the
store's content key). Rows of one store form one intake-esm group (one dataset).

Contract:
- :func:`add_to_output_catalog` lists a store only once its complete marker names the store's key
  (:class:`CatalogError` otherwise); rows of the same ``path`` are replaced, others kept.
- Concurrency: a local catalog is updated read-modify-write under an exclusive ``fcntl`` lock on
  ``<catalog>.lock`` and each file is replaced atomically. A remote catalog (s3://, gs://) is rewritten
  whole with no lock: object stores give no portable lock, so it assumes a single writer (one flow
  updating it at a time); concurrent writers can lose each other's rows (re-running a finished
  aggregate flow re-adds its rows, since the stage itself is skipped).
- :func:`open_output_catalog` drops rows whose store is no longer complete (deleted, or being rewritten)
  before handing the ``esm_datastore`` out; :func:`open_outputs` opens matches, one dataset per store.

Reuses :class:`climrecon.catalogs.esmcat.CatalogError` and its atomic file replacement; the esmcat
writer itself is tied to the input catalog's columns and to local paths, so it cannot write this one.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import xarray as xr

from climrecon.catalogs.esmcat import CatalogError, _atomic_write
from climrecon.storage import filesystem, is_remote, url_options
from climrecon.stores import StageStore

__all__ = [
    "COLUMNS",
    "GROUPBY_ATTRS",
    "STATISTICS",
    "CatalogError",
    "output_catalog_url",
    "output_catalog_spec",
    "rows_for_store",
    "read_output_rows",
    "add_to_output_catalog",
    "open_output_catalog",
    "open_outputs",
]

COLUMNS: tuple[str, ...] = (
    "source_id",
    "experiment_id",
    "member_id",
    "variable_id",
    "method",
    "period",
    "statistic",
    "store_variable",
    "path",
    "format",
    "created",
    "key",
)
GROUPBY_ATTRS: tuple[str, ...] = ("source_id", "experiment_id", "member_id", "method", "period", "key")
STATISTICS = ("members", "mean", "std", "quantile", "exceedance")
_TIME_CODER = xr.coders.CFDatetimeCoder(use_cftime=True)


def output_catalog_url(root: str) -> str:
    """Where a run rooted at ``root`` keeps its output catalog: ``<root>/catalogs/outputs.json``."""
    return f"{str(root).rstrip('/')}/catalogs/outputs.json"


def _csv_url(json_url: str) -> str:
    return json_url[: -len(".json")] + ".csv" if json_url.endswith(".json") else json_url + ".csv"


def output_catalog_spec(json_url: str) -> dict[str, Any]:
    """The esmcat 0.1.0 description: groups = stores, variables unioned within a store."""
    csv_url = _csv_url(json_url)
    return {
        "esmcat_version": "0.1.0",
        "id": "climrecon-outputs",
        "description": "ClimRecon downscaled ensembles and their statistics (complete stores only)",
        "catalog_file": csv_url if is_remote(json_url) else Path(csv_url).name,
        "attributes": [{"column_name": c, "vocabulary": ""} for c in COLUMNS if c != "path"],
        "assets": {"column_name": "path", "format_column_name": "format"},
        "aggregation_control": {
            "variable_column_name": "store_variable",
            "groupby_attrs": list(GROUPBY_ATTRS),
            "aggregations": [{"type": "union", "attribute_name": "store_variable"}],
        },
    }


def _store_path(url: str) -> str:
    """Local stores as absolute ``file://`` URLs (zarr 3 rejects storage_options for plain paths)."""
    if "://" in url:
        return url
    return Path(url).resolve().as_uri()


def _fs_url(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def rows_for_store(store_url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """The catalog rows of a complete store (one per data variable with a ``statistic`` attribute).

    Raises :class:`CatalogError` for a store that is missing, has no key, or is not complete.
    """
    try:
        ds = xr.open_zarr(
            _fs_url(store_url),
            storage_options=url_options(store_url, storage_options),
            decode_times=_TIME_CODER,
        )
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        raise CatalogError(
            f"cannot open store {store_url} to catalog it: {type(exc).__name__}: {exc}"
        ) from None
    key = ds.attrs.get("climrecon_key")
    if not key or not StageStore(_fs_url(store_url), str(key), dict(storage_options or {})).is_complete():
        raise CatalogError(
            f"store {store_url} is not complete (no .climrecon/complete.json for key {key!r}); "
            "the output catalog lists finished stores only"
        )
    missing = [
        a
        for a in ("source_id", "experiment_id", "member_id", "downscaling_method", "period")
        if a not in ds.attrs
    ]
    if missing:
        raise CatalogError(f"store {store_url} lacks the attribute(s) {missing} the output catalog needs")
    a = ds.attrs
    rows = []
    for name, var in ds.data_vars.items():
        statistic = var.attrs.get("statistic")
        if statistic not in STATISTICS:
            continue
        rows.append(
            {
                "source_id": a["source_id"],
                "experiment_id": a["experiment_id"],
                "member_id": a["member_id"],
                "variable_id": var.attrs.get("variable_id", str(name)),
                "method": a["downscaling_method"],
                "period": a["period"],
                "statistic": statistic,
                "store_variable": str(name),
                "path": _store_path(store_url),
                "format": "zarr",
                "created": str(a.get("date_created") or a.get("climrecon_completed", "")),
                "key": str(key),
            }
        )
    if not rows:
        raise CatalogError(f"store {store_url} has no variable with a 'statistic' attribute {STATISTICS}")
    return rows


def read_output_rows(json_url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """The catalog's rows ([] when it does not exist yet); a CSV with other columns is a CatalogError."""
    fs, path = filesystem(_csv_url(json_url), storage_options)
    if not fs.exists(path):
        return []
    df = pd.read_csv(io.BytesIO(fs.cat(path)), dtype=str, keep_default_na=False)
    if tuple(df.columns) != COLUMNS:
        raise CatalogError(
            f"output catalog {_csv_url(json_url)} has columns {list(df.columns)}, expected {list(COLUMNS)}"
        )
    return df.to_dict("records")


@contextlib.contextmanager
def _locked(json_url: str) -> Iterator[None]:
    """An exclusive lock for a local catalog; none for a remote one (single writer, see module doc)."""
    if is_remote(json_url):
        yield
        return
    lock = Path(_fs_url(json_url)).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write(json_url: str, rows: list[Mapping[str, str]], storage_options: dict[str, Any] | None) -> None:
    ordered = sorted(rows, key=lambda r: [r[c] for c in (*GROUPBY_ATTRS, "variable_id", "statistic", "path")])
    csv_text = pd.DataFrame(ordered, columns=list(COLUMNS)).to_csv(index=False, lineterminator="\n")
    spec_text = json.dumps(output_catalog_spec(json_url), indent=2) + "\n"
    if is_remote(json_url):
        fs, _ = filesystem(json_url, storage_options)
        fs.pipe(_csv_url(json_url), csv_text.encode())  # the CSV first: the JSON always names a full CSV
        fs.pipe(json_url, spec_text.encode())
        return
    local = Path(_fs_url(json_url))
    local.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(_csv_url(str(local))), csv_text)
    _atomic_write(local, spec_text)


def add_to_output_catalog(
    json_url: str, store_url: str, storage_options: dict[str, Any] | None = None
) -> str:
    """Add (or replace) the rows of the complete store ``store_url`` in the catalog; returns ``json_url``."""
    new = rows_for_store(store_url, storage_options)
    with _locked(json_url):
        kept = [r for r in read_output_rows(json_url, storage_options) if r["path"] != new[0]["path"]]
        _write(json_url, kept + new, storage_options)
    return json_url


def open_output_catalog(json_url: str, storage_options: dict[str, Any] | None = None):
    """The catalog as an ``intake_esm.esm_datastore``, without rows whose store is no longer complete."""
    import intake_esm

    rows = read_output_rows(json_url, storage_options)
    if not rows and not filesystem(json_url, storage_options)[0].exists(
        filesystem(json_url, storage_options)[1]
    ):
        raise CatalogError(f"output catalog {json_url} does not exist; run the aggregate stage first")
    complete = {
        (path, key): StageStore(_fs_url(path), key, dict(storage_options or {})).is_complete()
        for path, key in {(r["path"], r["key"]) for r in rows}
    }
    df = pd.DataFrame([r for r in rows if complete[(r["path"], r["key"])]], columns=list(COLUMNS))
    spec = output_catalog_spec(json_url)
    spec["catalog_file"] = None
    return intake_esm.esm_datastore(
        {"esmcat": spec, "df": df}, storage_options=storage_options or {}, progressbar=False, threaded=False
    )


def open_outputs(
    catalog: Any, storage_options: dict[str, Any] | None = None, **query: Any
) -> dict[str, xr.Dataset]:
    """Open the rows matching ``query`` (column=value(s)), one dataset per store holding only those variables.

    ``catalog`` is the catalog URL or an :func:`open_output_catalog` datastore. No match: CatalogError.
    """
    cat = catalog if hasattr(catalog, "search") else open_output_catalog(catalog, storage_options)
    bad = sorted(set(query) - set(COLUMNS))
    if bad:
        raise CatalogError(
            f"query names column(s) {bad} that the output catalog does not have: {list(COLUMNS)}"
        )
    sub = cat.search(**query)
    if sub.df.empty:
        raise CatalogError(f"no output catalog rows match {query}")
    kwargs = {
        "xarray_open_kwargs": {"decode_times": _TIME_CODER, "consolidated": True},
        "requested_variables": sorted(sub.df["store_variable"].unique()),
        "storage_options": storage_options or {},
        "threaded": False,
    }
    return {key: sub[key](**kwargs).to_dask() for key in sorted(sub.keys())}
