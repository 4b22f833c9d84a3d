"""The offline sample catalog: real packaged climate data written as CMIP6-style files, plus static fields.

:func:`build_sample_catalog` turns the real data that ships inside packages (``../shared/DATA.md``) into
CF netCDF files laid out like a CMIP6 archive and describes them in an intake-esm catalog
(:mod:`climrecon.catalogs.esmcat`):

=====================  =========================================  =====================================
source                 package / file                             written as
=====================  =========================================  =====================================
Met Office UM 6.05     iris-sample-data: A1B_north_america.nc,    tas, annual 1860-2099, 360_day
                       E1_north_america.nc
MPI-ESM-LR (CMIP5)     libncarg-data: nug/{tas,uas,vas}_           tas, uas, vas monthly 2005;
                       rectilinear_grid_2D.nc, {orog,sftlf}_mod1_  orog, sftlf (fx)
FNOC navy winds        ferret-datasets: monthly_navy_winds.cdf    uas, vas monthly 1982-1992
EURO-CORDEX EUR-11     libncarg-data: nug/tas_rotated_grid_       tas, one month, rotated pole: a real
                       EUR11.nc                                   bad input later stages must reject
static fields          ETOPO5 + GLOBE (:mod:`.static`)            orog, sftlf on a global 5' grid (zarr)
synthetic reanalysis   generated (:mod:`.synthetic`), optional    one zarr row per variable, labelled
=====================  =========================================  =====================================

What is kept: the data values bit for bit (files are copied undecoded: no unit conversion, no latitude
flip, no longitude shift -- the ingest stage standardises), every source attribute, the time axis with
its units and calendar. What is changed: variable (and coordinate) names become CMIP short names, CF
``standard_name``/``long_name``/``units`` are set as the source states them (added only where the source
has none), and CMIP6-style global attributes are added (``activity_id`` ... ``grid_label`` and
``climrecon_origin``; an overwritten source attribute is kept as ``source_<name>``). Facets the source
does not state are recorded as such in ``climrecon_identification``.

Each output file carries a ``climrecon_key`` (source digest + facets + converter version); a re-run skips
files whose key matches, so rebuilding an unchanged catalog takes well under a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cftime
import netCDF4
import numpy as np
import xarray as xr

from climrecon.catalogs.esmcat import write_catalog
from climrecon.catalogs.static import (
    MissingSourceDataError,
    build_static_fields,
    debian_package_version,
    open_static_fields,
    static_fields_key,
)
from climrecon.stores import content_key

if TYPE_CHECKING:
    from climrecon.config import SyntheticConfig

__all__ = [
    "STATIC_SOURCE_ID",
    "SYNTHETIC_SOURCE_ID",
    "CATALOG_NAME",
    "CONVERTER_VERSION",
    "MissingSourceDataError",
    "SampleFile",
    "sample_files",
    "build_sample_catalog",
]

SYNTHETIC_SOURCE_ID = "ClimRecon-SyntheticReanalysis"  # catalog source_id of the synthetic reanalysis
STATIC_SOURCE_ID = "ETOPO5-GLOBE"  # catalog source_id of the static fields

CATALOG_NAME = "catalog.json"
CONVERTER_VERSION = 1  # bump when the conversion below changes, so existing files are rewritten
_NUG = "usr/share/ncarg/data/nug"
_FERRET = "usr/share/ferret-vis/data"
_LICENSES = {
    "iris-sample-data": "OGL-UK-3.0 (UK Open Government Licence; Met Office data in iris-sample-data)",
    "libncarg-data": "BSD-4-clause (UCAR, Debian libncarg-data); "
    "originating centre's CMIP5/CORDEX terms of use",
    "ferret-datasets": "NOAA-PMEL-TMAP Ferret licence (Debian ferret-datasets)",
}
_FACETS = (
    "activity_id",
    "institution_id",
    "source_id",
    "experiment_id",
    "member_id",
    "table_id",
    "frequency",
    "grid_label",
)


@dataclass
class SampleFile:
    """One CMIP-style output file: its facets, the raw (undecoded) dataset to write and where it came from."""

    variable: str
    facets: dict[str, str]
    dataset: xr.Dataset = field(repr=False)
    package: str
    package_version: str
    source_file: str  # path inside the package
    source_path: Path = field(repr=False)
    identification: str  # how the facets were established (stated by the source / inferred from ...)

    @property
    def origin(self) -> str:
        return f"{self.package} {self.package_version}: {self.source_file}"

    @property
    def version(self) -> str:
        """The DRS version: the version of the package that ships the data ("v2.5.2", "v7.6.0.5")."""
        return "v" + re.sub(r"[^A-Za-z0-9.]+", ".", self.package_version)

    @property
    def calendar(self) -> str:
        return _calendar(self.dataset)

    @property
    def time_range(self) -> str:
        return _time_range(self.dataset, self.facets["frequency"])

    def relative_path(self) -> Path:
        """CMIP6 DRS: activity/institution/source/experiment/member/table/variable/grid/version/file."""
        f = self.facets
        parts = [f["source_id"], f["experiment_id"], f["member_id"], f["grid_label"]]
        stem = [self.variable, f["table_id"], *parts] + ([self.time_range] if self.time_range else [])
        name = "_".join(stem)
        return Path(
            f["activity_id"], f["institution_id"], f["source_id"], f["experiment_id"], f["member_id"],
            f["table_id"], self.variable, f["grid_label"], self.version, f"{name}.nc",
        )  # fmt: skip


# -- helpers on raw (undecoded) datasets ----------------------------------------------------------
def _open_raw(path: Path) -> xr.Dataset:
    """The file exactly as stored: no masking, scaling or time decoding (values are copied bit for bit)."""
    return xr.open_dataset(path, decode_cf=False, engine="netcdf4")


def _time_values(ds: xr.Dataset) -> list[Any]:
    if "time" not in ds.variables:
        return []
    t = ds["time"]
    return list(cftime.num2date(np.asarray(t.values), t.attrs["units"], _calendar(ds)))


def _calendar(ds: xr.Dataset) -> str:
    if "time" not in ds.variables:
        return ""
    return str(ds["time"].attrs.get("calendar", "standard"))


def _time_range(ds: xr.Dataset, frequency: str) -> str:
    times = _time_values(ds)
    if not times or frequency == "fx":
        return ""
    if frequency == "yr":
        return f"{times[0].year:04d}-{times[-1].year:04d}"
    return f"{times[0].year:04d}{times[0].month:02d}-{times[-1].year:04d}{times[-1].month:02d}"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _cmip5_member(attrs: dict[str, Any]) -> str:
    r, i, p = (int(attrs[k]) for k in ("realization", "initialization_method", "physics_version"))
    return f"r{r}i{i}p{p}"


def _gridspec_facets(var: xr.DataArray, where: Path) -> tuple[str, str, str]:
    """(source_id, experiment_id, member) from a CMOR ``associated_files`` gridspec name."""
    pattern = r"gridspec_\w+?_fx_([A-Za-z0-9-]+)_(\w+?)_(r\d+i\d+p\d+)\.nc"
    m = re.search(pattern, var.attrs.get("associated_files", ""))
    if not m:
        raise ValueError(f"{where}: variable {var.name!r} has no CMOR associated_files naming a model")
    return m.group(1), m.group(2), m.group(3)


def _same_axes(a: xr.Dataset, b: xr.Dataset, names: tuple[str, ...]) -> bool:
    return all(n in a and n in b and np.array_equal(a[n].values, b[n].values) for n in names)


# -- the sources ----------------------------------------------------------------------------------
def _iris_sample_dir() -> Path:
    try:
        import iris_sample_data
    except ImportError as exc:
        raise MissingSourceDataError(
            "iris-sample-data is not installed; run deploy/install.sh (pip install iris-sample-data==2.5.2)"
        ) from exc
    return Path(iris_sample_data.path)


def _need(path: Path, package: str) -> Path:
    if not path.is_file():
        raise MissingSourceDataError(
            f"{path} not found (from {package}); run deploy/install.sh, which installs the packaged sample "
            "data (Debian packages are unpacked into $CLIMRECON_DATA_HOME/debian)"
        )
    return path


def _um_north_america(data_home: Path) -> Iterator[SampleFile]:
    """Met Office UM 1.5 m air temperature, annual means 1860-2099, SRES A1B and ENSEMBLES E1 scenarios."""
    version = importlib.metadata.version("iris-sample-data")
    for scenario in ("A1B", "E1"):
        name = f"{scenario}_north_america.nc"
        path = _need(_iris_sample_dir() / name, "iris-sample-data")
        ds = _open_raw(path)
        var = ds["air_temperature"]
        m = re.search(r"Unified Model ([\d.]+)", var.attrs.get("source", ""))
        if var.attrs.get("Model scenario") != scenario or not m:
            raise ValueError(
                f"{path}: air_temperature does not state 'Model scenario' {scenario} and a UM "
                "version in its 'source' attribute"
            )
        ds = ds.rename({"air_temperature": "tas", "latitude": "lat", "longitude": "lon"})
        yield SampleFile(
            variable="tas",
            facets={
                "activity_id": "ENSEMBLES",
                "institution_id": "MOHC",
                "source_id": "UM" + m.group(1).replace(".", ""),  # no dots: intake-esm joins keys with '.'
                "experiment_id": scenario,
                "member_id": "r1i1p1",
                "table_id": "Ayr",
                "frequency": "yr",
                "grid_label": "gn",
            },
            dataset=ds,
            package="iris-sample-data",
            package_version=version,
            source_file=f"iris_sample_data/sample_data/{name}",
            source_path=path,
            identification=f"model (UM {m.group(1)}) and scenario stated in the file's variable attributes; "
            "institution MOHC from 'Met Office'; activity ENSEMBLES inferred from the E1 scenario; "
            "realization not stated, r1i1p1 assigned; annual frequency from the 360-day time bounds",
        )


def _mpi_esm_lr(data_home: Path) -> Iterator[SampleFile]:
    """CMIP5 MPI-ESM-LR historical r1i1p1: monthly tas/uas/vas of 2005 and the fx orog/sftlf."""
    nug = Path(data_home) / "debian" / _NUG
    version = debian_package_version(data_home, "libncarg-data")
    tas_path = _need(nug / "tas_rectilinear_grid_2D.nc", "Debian libncarg-data")
    tas = _open_raw(tas_path)
    g = tas.attrs
    table = re.match(r"Table (\w+)", str(g.get("table_id", "")))
    if g.get("project_id") != "CMIP5" or not table:
        raise ValueError(f"{tas_path}: global attributes do not describe a CMIP5 file (project_id, table_id)")
    base = {
        "activity_id": "CMIP5",
        "institution_id": str(g["institute_id"]),
        "source_id": str(g["model_id"]),
        "experiment_id": str(g["experiment_id"]),
        "member_id": _cmip5_member(g),
        "table_id": table.group(1),
        "frequency": str(g["frequency"]),
        "grid_label": "gn",
    }
    for variable in ("tas", "uas", "vas"):
        name = f"{variable}_rectilinear_grid_2D.nc"
        path = _need(nug / name, "Debian libncarg-data")
        ds = tas if variable == "tas" else _open_raw(path)
        how = "stated in the file's CMIP5 global attributes"
        if variable != "tas":
            # uas/vas carry no global attributes: they belong to the tas run if grid, time axis and the
            # CMOR gridspec reference all match (checked, not assumed)
            model, experiment, _ = _gridspec_facets(ds[variable], path)
            if not (_same_axes(ds, tas, ("time", "time_bnds", "lat", "lon")) and (model, experiment) ==
                    (base["source_id"], base["experiment_id"])):  # fmt: skip
                raise ValueError(f"{path}: grid, time axis or model differ from {tas_path}; not identified")
            how = (f"no global attributes; identified from {tas_path.name} (identical grid and time axis, "
                   f"associated_files names {model} {experiment})")  # fmt: skip
        yield SampleFile(variable, dict(base), ds, "libncarg-data", version, f"{_NUG}/{name}", path, how)
    for variable in ("orog", "sftlf"):
        name = f"{variable}_mod1_rectilinear_grid_2D.nc"
        path = _need(nug / name, "Debian libncarg-data")
        ds = _open_raw(path)
        model, experiment, member = _gridspec_facets(ds[variable], path)
        if not _same_axes(ds, tas, ("lat", "lon")):
            raise ValueError(f"{path}: grid differs from {tas_path}; cannot pair it with {model}")
        facets = {**base, "source_id": model, "experiment_id": experiment, "member_id": member,
                  "table_id": "fx", "frequency": "fx"}  # fmt: skip
        how = (f"no global attributes; model, experiment and member ({member}, the CMIP5 fx convention) from "
               f"associated_files; institution from {tas_path.name}, whose grid is identical")  # fmt: skip
        yield SampleFile(variable, facets, ds, "libncarg-data", version, f"{_NUG}/{name}", path, how)


def _fnoc_winds(data_home: Path) -> Iterator[SampleFile]:
    """FNOC monthly surface winds 1982-1992 (the Ferret tutorial data set), as uas and vas."""
    name = "monthly_navy_winds.cdf"
    path = _need(Path(data_home) / "debian" / _FERRET / name, "Debian ferret-datasets")
    version = debian_package_version(data_home, "ferret-datasets")
    raw = _open_raw(path).rename({"FNOCX": "lon", "FNOCY": "lat", "TIME": "time"})
    raw.encoding["unlimited_dims"] = {"time"}  # TIME was the record dimension
    # coordinates get their CF identity; values (lon 20..377.5, lat -90..90) stay as they are
    raw["lon"].attrs.update(standard_name="longitude", axis="X")
    raw["lat"].attrs.update(standard_name="latitude", axis="Y")
    raw["time"].attrs.update(standard_name="time", axis="T")
    raw["time"].attrs.setdefault("calendar", "standard")  # not stated: the CF default
    for variable, src, standard_name in (("uas", "UWND", "eastward_wind"), ("vas", "VWND", "northward_wind")):
        ds = raw[[src]].rename({src: variable})
        ds[variable].attrs.setdefault("standard_name", standard_name)
        yield SampleFile(
            variable=variable,
            facets={
                "activity_id": "obs",
                "institution_id": "FNOC",
                "source_id": "FNOC",
                "experiment_id": "analysis",
                "member_id": "r1i1p1",
                "table_id": "Amon",
                "frequency": "mon",
                "grid_label": "gn",
            },
            dataset=ds,
            package="ferret-datasets",
            package_version=version,
            source_file=f"{_FERRET}/{name}",
            source_path=path,
            identification="FNOC (US Navy Fleet Numerical Oceanography Center) named by the file and its "
            "axes; a single analysis, r1i1p1 assigned; no calendar stated, CF default 'standard' set",
        )


def _euro_cordex_rotated(data_home: Path) -> Iterator[SampleFile]:
    """EURO-CORDEX 0.11 deg tas on a rotated-pole grid: kept as is, a real input later stages must reject."""
    name = "tas_rotated_grid_EUR11.nc"
    path = _need(Path(data_home) / "debian" / _NUG / name, "Debian libncarg-data")
    ds = _open_raw(path)
    if ds["tas"].attrs.get("grid_mapping") != "rotated_pole" or "rlat" not in ds.dims:
        raise ValueError(f"{path}: expected tas on the rotated_pole grid (rlat, rlon)")
    yield SampleFile(
        variable="tas",
        facets={
            "activity_id": "CORDEX",
            "institution_id": "CLMcom",
            "source_id": "COSMO-CLM",
            "experiment_id": "unspecified",
            "member_id": "r1i1p1",
            "table_id": "Amon",
            "frequency": "mon",
            "grid_label": "gn",
        },
        dataset=ds,
        package="libncarg-data",
        package_version=debian_package_version(data_home, "libncarg-data"),
        source_file=f"{_NUG}/{name}",
        source_path=path,
        identification="the file names neither model nor experiment: COSMO-CLM (CLMcom) inferred from "
        "original_name T_2M and the COSMO-CLM static files shipped with it; domain EUR-11 from the grid; "
        "experiment not stated; r1i1p1 assigned",
    )


_SOURCES: tuple[Callable[[Path], Iterator[SampleFile]], ...] = (
    _um_north_america,
    _mpi_esm_lr,
    _fnoc_winds,
    _euro_cordex_rotated,
)


def sample_files(data_home: Path) -> list[SampleFile]:
    """Every real sample file (opened lazily) with its facets; raises if a source file is missing."""
    return [f for make in _SOURCES for f in make(Path(data_home))]


# -- writing --------------------------------------------------------------------------------------
def _file_key(item: SampleFile) -> str:
    source = _digest(item.source_path)
    return content_key("sample-file", CONVERTER_VERSION, source, item.variable, item.facets)


def _stored_key(path: Path) -> str | None:
    try:
        with netCDF4.Dataset(path) as nc:
            return str(nc.getncattr("climrecon_key")) if "climrecon_key" in nc.ncattrs() else None
    except OSError:
        return None


def _with_cmip_attrs(item: SampleFile, key: str) -> xr.Dataset:
    ds = item.dataset.copy()
    added = {
        **{k: item.facets[k] for k in _FACETS},
        "variant_label": item.facets["member_id"],
        "variable_id": item.variable,
        "climrecon_origin": item.origin,
        "climrecon_identification": item.identification,
        "climrecon_key": key,
        "license": _LICENSES[item.package],
    }
    attrs = dict(ds.attrs)
    for k, v in added.items():
        if k in attrs and str(attrs[k]) != v:
            attrs[f"source_{k}"] = attrs[k]  # keep what the source said
        attrs[k] = v
    ds.attrs = attrs
    return ds


def _write_netcdf(ds: xr.Dataset, path: Path, variable: str) -> None:
    """Write undecoded ``ds`` as NETCDF4 (data variable compressed) to a temporary file, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # no fill value where the source has none (xarray would add NaN to every float coordinate)
    encoding: dict[str, dict[str, Any]] = {
        str(n): {"_FillValue": None} for n in ds.variables if "_FillValue" not in ds[n].attrs
    }
    encoding.setdefault(variable, {}).update(zlib=True, complevel=4, shuffle=True)
    try:
        ds.to_netcdf(tmp, format="NETCDF4", engine="netcdf4", encoding=encoding)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _row(item: SampleFile, path: Path) -> dict[str, Any]:
    return {
        **{k: item.facets[k] for k in _FACETS},
        "variable_id": item.variable,
        "version": item.version,
        "calendar": item.calendar if item.facets["frequency"] != "fx" else "",
        "time_range": item.time_range,
        "format": "netcdf",
        "path": str(path.resolve()),
        "origin": item.origin,
        "synthetic": False,
        "license": _LICENSES[item.package],
    }


def _zarr_rows(url: str, facets: dict[str, str], variables: list[str], origin: str, license: str,
               synthetic: bool) -> list[dict[str, Any]]:  # fmt: skip
    """One row per variable of the (complete) zarr store at ``url``, time range and calendar read from it."""
    ds = xr.open_zarr(url, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))
    missing = sorted(set(variables) - set(ds.data_vars))
    if missing:
        raise ValueError(f"zarr store {url} lacks variable(s) {missing}")
    rows = []
    for v in variables:
        calendar, time_range = "", ""
        if "time" in ds[v].dims:
            t = ds["time"].values
            calendar = str(ds["time"].encoding.get("calendar", t[0].calendar))
            time_range = f"{t[0].year:04d}{t[0].month:02d}-{t[-1].year:04d}{t[-1].month:02d}"
        rows.append({
            **facets, "variable_id": v, "version": "v" + str(ds.attrs.get("climrecon_key", "1")),
            "calendar": calendar, "time_range": time_range, "format": "zarr", "path": url,
            "origin": origin, "synthetic": synthetic, "license": license,
        })  # fmt: skip
    return rows


def _static_rows(url: str) -> list[dict[str, Any]]:
    ds = open_static_fields(url)
    facets = {
        "activity_id": "ClimRecon",
        "institution_id": "ClimRecon",
        "source_id": STATIC_SOURCE_ID,
        "experiment_id": "static",
        "member_id": "r0i0p0",
        "table_id": "fx",
        "frequency": "fx",
        "grid_label": "gr",
    }
    origin, license = ds.attrs["climrecon_origin"], ds.attrs["license"]
    return _zarr_rows(url, facets, ["orog", "sftlf"], origin, license, synthetic=False)


def _synthetic_rows(cfg: SyntheticConfig, static_url: str, url: str) -> list[dict[str, Any]]:
    facets = {
        "activity_id": "ClimRecon",
        "institution_id": "ClimRecon",
        "source_id": SYNTHETIC_SOURCE_ID,
        "experiment_id": "synthetic",
        "member_id": "r1i1p1f1",
        "table_id": "Amon",
        "frequency": "mon",
        "grid_label": "gn",
    }
    origin = (f"climrecon.catalogs.synthetic (generated, seed {cfg.seed}; driven by the static fields "
              f"{static_url}); NOT observations")  # fmt: skip
    return _zarr_rows(url, facets, list(cfg.variables), origin, "Apache-2.0 (generated by ClimRecon)", True)


class _Progress:
    """A rich progress bar, or nothing when ``enabled`` is False."""

    def __init__(self, enabled: bool, total: int):
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]sample catalog"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.description}"), TimeElapsedColumn(),
            )  # fmt: skip
            self._task = self._bar.add_task("", total=total)

    def __enter__(self) -> _Progress:
        if self._bar:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar:
            self._bar.__exit__(*exc)

    def step(self, description: str) -> None:
        if self._bar:
            self._bar.update(self._task, advance=1, description=description)


def build_sample_catalog(
    directory: Path,
    data_home: Path,
    *,
    include_synthetic: SyntheticConfig | None = None,
    progress: bool = True,
) -> Path:
    """Write the real sample files, the static-fields store (and the synthetic reanalysis) and the catalog.

    Files go under ``directory/data/<CMIP6 DRS>/``, static fields to ``directory/static/``, the synthetic
    reanalysis to ``directory/synthetic/``; the catalog is ``directory/catalog.json`` (+ ``catalog.csv``),
    merged with rows already there. Returns the catalog JSON path.

    Raises :class:`MissingSourceDataError` naming the missing file when packaged data is not installed.
    """
    directory, data_home = Path(directory), Path(data_home)
    items = sample_files(data_home)
    total = len(items) + 1 + (include_synthetic is not None)
    rows: list[dict[str, Any]] = []
    with _Progress(progress, total) as bar:
        for item in items:
            path = directory / "data" / item.relative_path()
            key = _file_key(item)
            if _stored_key(path) != key:
                _write_netcdf(_with_cmip_attrs(item, key), path, item.variable)
            rows.append(_row(item, path))
            bar.step(path.name)
        static_store = directory / "static" / f"static-5arcmin-{static_fields_key(data_home)}.zarr"
        static_url = str(static_store.resolve())
        build_static_fields(data_home, static_url)
        rows += _static_rows(static_url)
        bar.step("static fields (orog, sftlf at 5')")
        if include_synthetic is not None:
            from climrecon.catalogs import synthetic

            # the name changes whenever the generator's key would, so a stale store is never in the way
            generator = (synthetic.GENERATOR_VERSION, dataclasses.asdict(synthetic.PHYSICS), static_url)
            name = f"synthetic-reanalysis-{content_key(include_synthetic, generator)}.zarr"
            target = str((directory / "synthetic" / name).resolve())
            static = open_static_fields(static_url)
            url = synthetic.write_synthetic_reanalysis(include_synthetic, static, target)
            rows += _synthetic_rows(include_synthetic, static_url, url)
            bar.step("synthetic reanalysis")
    return write_catalog(directory / CATALOG_NAME, rows)
