"""Standardize one source dataset to the pipeline's conventions (see DATA conventions in the README).

``standardize(ds, source=...)`` returns a dataset with

- dims ``(time, lat, lon)`` (static fields: ``(lat, lon)``), coords ``lat`` ascending (degrees_north) and
  ``lon`` monotonic in the requested convention (``"-180..180"`` -> [-180, 180), ``"0..360"`` -> [0, 360));
- CMIP short names (tas, uas, vas, pr, psl, orog, sftlf) in CF canonical units, float32;
- time decoded to cftime objects in the source calendar; monthly / annual labels moved to the START of
  the period that holds each cell's midpoint, with ``time_bnds = [period start, next period start]``;
- spatial bounds moved along with their coordinates (dropped when the source has none), CF attributes,
  no source encodings (so Zarr writes use Zarr defaults).

Every failure raises a subclass of :class:`IngestError` whose message names ``source`` (the file or
dataset) and the variable or coordinate at fault.

Supported calendars: those of :data:`SUPPORTED_CALENDARS` (all CF calendars that cftime implements);
a ``calendar`` of ``none`` or any other string is rejected with :class:`CalendarError`.
Supported grids: rectilinear lat/lon only. Rotated-pole and curvilinear grids raise :class:`GridError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import cf_units
import cftime
import dask
import numpy as np
import xarray as xr

__all__ = [
    "IngestError",
    "UnitsError",
    "MissingVariableError",
    "CoordinateError",
    "CalendarError",
    "GridError",
    "EmptyVariableError",
    "SourceReadError",
    "CatalogQueryError",
    "VariableSpec",
    "CMIP_VARIABLES",
    "SUPPORTED_CALENDARS",
    "LonConvention",
    "standardize",
    "horizontal_coords",
    "rename_coordinates",
    "map_variables",
    "convert_units",
    "sort_latitude",
    "set_lon_convention",
    "decode_time",
    "normalize_time",
    "normalize_frequency",
]

LonConvention = Literal["-180..180", "0..360"]


# -- errors --------------------------------------------------------------------------------------
class IngestError(ValueError):
    """Base class of every input problem found while ingesting; the message names the file and field."""


class UnitsError(IngestError):
    """A variable has no units, or units that cannot be converted to the CF canonical ones."""


class MissingVariableError(IngestError):
    """A requested variable is not in the source."""


class CoordinateError(IngestError):
    """A coordinate is missing, non-monotonic, duplicated or otherwise unusable."""


class CalendarError(IngestError):
    """The time axis uses a calendar this pipeline does not support."""


class GridError(IngestError):
    """The grid is not a rectilinear lat/lon grid (rotated pole, curvilinear, extra dimensions)."""


class EmptyVariableError(IngestError):
    """A variable holds no valid value at all (NaN or fill value everywhere)."""


class SourceReadError(IngestError):
    """A source file or store cannot be read (corrupt, truncated, not a netCDF/Zarr)."""


class CatalogQueryError(IngestError):
    """A catalog query matches nothing, or names a column the catalog lacks."""


# -- the variables the pipeline knows ------------------------------------------------------------
@dataclass(frozen=True)
class VariableSpec:
    """A CMIP short name with its CF standard name, canonical units and names it is known by elsewhere."""

    name: str
    standard_name: str
    units: str
    long_name: str
    aliases: tuple[str, ...] = field(default=())  # other variable names or long_names (case-insensitive)


CMIP_VARIABLES: dict[str, VariableSpec] = {
    v.name: v
    for v in (
        VariableSpec(
            "tas",
            "air_temperature",
            "K",
            "Near-Surface Air Temperature",
            (
                "t2m",
                "2t",
                "2m_temperature",
                "tmp2m",
                "trefht",
                "near-surface air temperature",
                "surface air temperature",
                "2 metre temperature",
            ),
        ),
        VariableSpec(
            "uas",
            "eastward_wind",
            "m s-1",
            "Eastward Near-Surface Wind",
            (
                "u10",
                "10u",
                "10m_u_component_of_wind",
                "uwnd",
                "zonal wind",
                "eastward near-surface wind",
                "10 metre u wind component",
            ),
        ),
        VariableSpec(
            "vas",
            "northward_wind",
            "m s-1",
            "Northward Near-Surface Wind",
            (
                "v10",
                "10v",
                "10m_v_component_of_wind",
                "vwnd",
                "meridional wind",
                "northward near-surface wind",
                "10 metre v wind component",
            ),
        ),
        VariableSpec(
            "pr",
            "precipitation_flux",
            "kg m-2 s-1",
            "Precipitation",
            ("prate", "precip", "precipitation", "precipitation rate", "prect"),
        ),
        VariableSpec(
            "psl",
            "air_pressure_at_mean_sea_level",
            "Pa",
            "Sea Level Pressure",
            (
                "msl",
                "slp",
                "mslp",
                "mean_sea_level_pressure",
                "sea level pressure",
                "mean sea level pressure",
            ),
        ),
        VariableSpec(
            "orog",
            "surface_altitude",
            "m",
            "Surface Altitude",
            ("elevation", "surface altitude", "surface height"),
        ),
        VariableSpec(
            "sftlf",
            "land_area_fraction",
            "%",
            "Percentage of the Grid Cell Occupied by Land",
            ("land area fraction", "land fraction", "land_sea_mask"),
        ),
    )
}

SUPPORTED_CALENDARS = (
    "standard",
    "gregorian",
    "proleptic_gregorian",
    "julian",
    "noleap",
    "365_day",
    "all_leap",
    "366_day",
    "360_day",
)

# Legacy unit spellings that udunits cannot parse or would misread (e.g. "C" is coulomb, "mb" millibarn).
_UNIT_ALIASES = {
    "m/s": "m s-1",
    "m/sec": "m s-1",
    "mps": "m s-1",
    "meters/second": "m s-1",
    "deg c": "degC",
    "degrees c": "degC",
    "deg_c": "degC",
    "celsius": "degC",
    "degrees celsius": "degC",
    "deg k": "K",
    "degrees k": "K",
    "kelvin": "K",
    "mb": "hPa",
    "millibars": "hPa",
    "(0 - 1)": "1",
    "0-1": "1",
    "fraction": "1",
    "percent": "%",
    "mm/day": "mm day-1",
    "mm/d": "mm day-1",
}
_TEMPERATURE_ONLY_ALIASES = {"c": "degC"}  # "C" alone means Celsius only where a temperature is expected
WATER_DENSITY = 1000.0  # kg m-3, to turn a precipitation depth rate (mm/day, m s-1) into a mass flux

_LAT_UNITS = {"degrees_north", "degree_north", "degrees_n", "degree_n", "degreesn", "degreen"}
_LON_UNITS = {"degrees_east", "degree_east", "degrees_e", "degree_e", "degreese", "degreee"}
_LAT_NAMES = {"lat", "latitude", "nav_lat"}
_LON_NAMES = {"lon", "longitude", "long", "nav_lon"}
_ROTATED_NAMES = {"grid_latitude", "grid_longitude"}
_TIME_NAMES = {"time", "t"}


# -- coordinates ---------------------------------------------------------------------------------
def _is_axis(var: xr.Variable, name: str, *, units: set[str], names: set[str], std: str, axis: str) -> bool:
    a = var.attrs
    if a.get("standard_name") == std:
        return True
    if str(a.get("units", "")).strip().lower() in units:
        return True
    if (
        str(a.get("axis", "")).upper() == axis
        and "degree" in str(a.get("units", "")).lower()
        and a.get("standard_name") not in _ROTATED_NAMES
    ):
        return True
    return name.lower() in names


def _check_grid(ds: xr.Dataset, source: str) -> None:
    for name, var in ds.variables.items():
        if var.attrs.get("standard_name") in _ROTATED_NAMES:
            raise GridError(
                f"{source}: coordinate {name!r} is a {var.attrs['standard_name']} (rotated-pole grid); "
                "rotated-pole and curvilinear grids are not supported yet: regrid the source to a regular "
                "lat/lon grid first"
            )
        mapping = var.attrs.get("grid_mapping_name")
        if mapping and mapping != "latitude_longitude":
            raise GridError(
                f"{source}: grid mapping {name!r} is {mapping!r}; only regular lat/lon grids are supported, "
                "rotated-pole and curvilinear grids are not supported yet"
            )


def horizontal_coords(ds: xr.Dataset, source: str) -> tuple[str, str]:
    """Names of the latitude and longitude coordinates, found by CF standard_name, units, axis or name.

    Raises :class:`GridError` for rotated-pole or curvilinear (2-D lat/lon) grids and
    :class:`CoordinateError` when no (or more than one) latitude/longitude coordinate is found.
    """
    _check_grid(ds, source)
    found: dict[str, list[str]] = {"lat": [], "lon": []}
    for name, var in ds.variables.items():
        for key, units, names, std, axis in (
            ("lat", _LAT_UNITS, _LAT_NAMES, "latitude", "Y"),
            ("lon", _LON_UNITS, _LON_NAMES, "longitude", "X"),
        ):
            if _is_axis(var, str(name), units=units, names=names, std=std, axis=axis):
                if var.ndim >= 2:
                    raise GridError(
                        f"{source}: {key} coordinate {name!r} is {var.ndim}-D {var.dims} (a curvilinear grid); "
                        "curvilinear grids are not supported yet: regrid to a regular lat/lon grid first"
                    )
                if var.ndim == 1 and var.dims[0] == name:
                    found[key].append(str(name))
    out = []
    for key in ("lat", "lon"):
        if len(found[key]) != 1:
            what = "no" if not found[key] else f"several ({found[key]})"
            raise CoordinateError(
                f"{source}: {what} {key} coordinate found among {sorted(map(str, ds.variables))}; "
                f"a {key} coordinate needs standard_name/units {'degrees_north' if key == 'lat' else 'degrees_east'}"
            )
        out.append(found[key][0])
    return out[0], out[1]


def _time_name(ds: xr.Dataset) -> str | None:
    for name, var in ds.variables.items():
        if var.ndim != 1 or var.dims[0] != name:
            continue
        a = var.attrs
        if (
            var.dtype.kind in "OM"
            or " since " in str(a.get("units", "") or var.encoding.get("units", ""))
            or a.get("standard_name") == "time"
            or str(a.get("axis", "")).upper() == "T"
            or str(name).lower() in _TIME_NAMES
        ):
            return str(name)
    return None


def _bounds_name(ds: xr.Dataset, coord: str) -> str | None:
    var = ds.variables[coord]
    for cand in (var.attrs.get("bounds"), var.encoding.get("bounds"), f"{coord}_bnds", f"{coord}_bounds"):
        if cand and cand in ds.variables:
            return str(cand)
    return None


def rename_coordinates(ds: xr.Dataset, source: str) -> xr.Dataset:
    """Rename the lat/lon/time coordinates (and their bounds and bounds dim) to lat, lon, time, *_bnds, bnds."""
    lat, lon = horizontal_coords(ds, source)
    time = _time_name(ds)
    mapping: dict[str, str] = {lat: "lat", lon: "lon"}
    if time:
        mapping[time] = "time"
    for old, new in list(mapping.items()):
        b = _bounds_name(ds, old)
        if b:
            mapping[b] = f"{new}_bnds"
            bdim = ds.variables[b].dims[-1]
            if bdim not in mapping:
                mapping[bdim] = "bnds"
    clash = [new for old, new in mapping.items() if new in ds.variables and new != old and new not in mapping]
    if clash:
        raise CoordinateError(f"{source}: cannot rename to {clash}: names already used by other variables")
    ds = ds.rename({k: v for k, v in mapping.items() if k != v})
    for c in ("lat", "lon", "time"):
        if c in ds.variables:
            ds[c].attrs.pop("bounds", None)
            ds[c].encoding.pop("bounds", None)
    return ds


# -- variables -----------------------------------------------------------------------------------
def _match(name: str, var: xr.DataArray) -> tuple[str, int] | None:
    """(short name, rank) of the best match; lower rank wins: name, alias, standard_name, long_name."""
    lname = name.lower()
    if lname in CMIP_VARIABLES:
        return lname, 0
    for spec in CMIP_VARIABLES.values():
        if lname in spec.aliases:
            return spec.name, 1
    std = var.attrs.get("standard_name")
    for spec in CMIP_VARIABLES.values():
        if std == spec.standard_name:
            return spec.name, 2
    long_name = str(var.attrs.get("long_name", "")).strip().lower()
    for spec in CMIP_VARIABLES.values():
        if long_name and long_name in spec.aliases:
            return spec.name, 3
    return None


def map_variables(ds: xr.Dataset, source: str, variables: Iterable[str] | None = None) -> xr.Dataset:
    """Keep the fields that map to CMIP short names, renamed to them, and drop the other data variables.

    A field maps by its name, its CF ``standard_name``, or a known alias/long_name (e.g. ``t2m``,
    ``"ZONAL WIND"``; the match is recorded in the variable's ``climrecon_renamed_from``). When
    ``variables`` names exactly one short name and the source holds exactly one unrecognised field, the
    caller's ``variables`` (a catalog's ``variable_id``) names it. Requested variables that are not found
    raise :class:`MissingVariableError`.
    """
    wanted = [v for v in (variables or [])]
    unknown = [v for v in wanted if v not in CMIP_VARIABLES]
    if unknown:
        raise MissingVariableError(
            f"{source}: variable(s) {unknown} are not known to the pipeline; known: {sorted(CMIP_VARIABLES)}"
        )
    bounds = {n for n in ds.variables if str(n).endswith("_bnds")}
    fields = [str(n) for n, v in ds.data_vars.items() if n not in bounds and v.ndim >= 2]
    renames: dict[str, str] = {}
    best: dict[str, tuple[int, int, str]] = {}  # short name -> (has levels, rank, source name)
    unmatched = []
    for name in fields:
        hit = _match(name, ds[name])
        if hit is None:
            unmatched.append(name)
            continue
        short, rank = hit
        levels = int(any(ds.sizes[d] > 1 for d in ds[name].dims if d not in ("time", "lat", "lon")))
        score = (levels, rank, name)
        if short in best and best[short][:2] == score[:2]:
            raise MissingVariableError(
                f"{source}: both {best[short][2]!r} and {name!r} look like {short!r}; rename one in the source"
            )
        if short not in best or score < best[short]:
            best[short] = score
    renames = {score[2]: short for short, score in best.items()}
    unmatched += [n for n in fields if n not in renames and n not in unmatched]
    missing = [v for v in wanted if v not in renames.values()]
    if len(missing) == 1 and len(unmatched) == 1 and not set(renames.values()) - set(wanted):
        renames[unmatched[0]] = missing[0]
        missing = []
    if missing:
        raise MissingVariableError(
            f"{source}: variable(s) {missing} not found; the source holds data variables {fields} "
            f"(matched: {renames or 'none'})"
        )
    keep = [n for n, s in renames.items() if not wanted or s in wanted]
    drop = [n for n in ds.data_vars if n not in keep and n not in bounds]
    ds = ds.drop_vars(drop)
    for old in keep:
        if old != renames[old]:
            ds[old].attrs["climrecon_renamed_from"] = old
    return ds.rename({o: renames[o] for o in keep if o != renames[o]})


def _parse_units(units: str, spec: VariableSpec) -> cf_units.Unit:
    text = str(units).strip()
    alias = _UNIT_ALIASES.get(text.lower())
    if alias is None and spec.units == "K":
        alias = _TEMPERATURE_ONLY_ALIASES.get(text.lower())
    return cf_units.Unit(alias or text)


def convert_units(da: xr.DataArray, source: str) -> xr.DataArray:
    """``da`` (named by its CMIP short name) in the canonical units of :data:`CMIP_VARIABLES`, as float32.

    Conversions are affine (``x * scale + offset``, computed in float64, lazily). A precipitation depth
    rate (mm/day, m s-1, ...) becomes a mass flux assuming liquid water of density 1000 kg m-3; the
    assumption is recorded in the variable's ``comment``.
    """
    spec = CMIP_VARIABLES[str(da.name)]
    raw = da.attrs.get("units")
    if raw is None or str(raw).strip() == "":
        raise UnitsError(f"{source}: variable {da.name!r} has no units attribute (expected {spec.units!r})")
    try:
        unit = _parse_units(raw, spec)
    except ValueError:
        raise UnitsError(
            f"{source}: variable {da.name!r} has units {raw!r} that udunits cannot parse"
        ) from None
    target = cf_units.Unit(spec.units)
    note = None
    if unit.is_convertible(target):
        offset = float(unit.convert(0.0, target))
        scale = float(unit.convert(1.0, target)) - offset
    elif spec.name == "pr" and unit.is_convertible(cf_units.Unit("m s-1")):
        offset, scale = 0.0, float(unit.convert(1.0, cf_units.Unit("m s-1"))) * WATER_DENSITY
        note = f"converted from {raw} assuming liquid water density {WATER_DENSITY:g} kg m-3"
    else:
        raise UnitsError(
            f"{source}: variable {da.name!r} has units {raw!r}, which cannot be converted to {spec.units!r}"
        )
    attrs = dict(da.attrs)
    if scale == 1.0 and offset == 0.0:
        out = da.astype("float32")
    else:
        out = (da.astype("float64") * scale + offset).astype("float32")
        attrs["climrecon_units_from"] = str(raw)
    if note:
        attrs["comment"] = f"{attrs['comment']}; {note}" if attrs.get("comment") else note
    attrs["units"] = spec.units
    return out.assign_attrs(attrs)


# -- lat / lon -----------------------------------------------------------------------------------
def _strictly_monotonic(values: np.ndarray) -> int:
    """+1 (increasing), -1 (decreasing) or 0 (neither, or duplicates)."""
    d = np.diff(values)
    if values.size < 2 or np.all(d > 0):
        return 1
    if np.all(d < 0):
        return -1
    return 0


def _coordinate_problem(values: np.ndarray) -> str:
    uniq, counts = np.unique(values, return_counts=True)
    if (counts > 1).any():
        return f"duplicate values {uniq[counts > 1][:5].tolist()}"
    return "values that are not monotonic"


def sort_latitude(ds: xr.Dataset, source: str) -> xr.Dataset:
    """Latitude ascending (reversing the data and ``lat_bnds`` if it descends); range -90..90 checked."""
    lat = np.asarray(ds["lat"].values, dtype="float64")
    sign = _strictly_monotonic(lat)
    if sign == 0:
        raise CoordinateError(f"{source}: coordinate 'lat' has {_coordinate_problem(lat)}")
    if np.nanmin(lat) < -90 - 1e-6 or np.nanmax(lat) > 90 + 1e-6 or np.isnan(lat).any():
        raise CoordinateError(f"{source}: coordinate 'lat' has values outside -90..90")
    if sign < 0:
        ds = ds.isel(lat=slice(None, None, -1))
        if "lat_bnds" in ds.variables:
            ds = ds.assign_coords(lat_bnds=ds["lat_bnds"].isel(bnds=slice(None, None, -1)))
    return ds.assign_coords(lat=ds["lat"].astype("float64"))


def _wrap(lon: np.ndarray, convention: LonConvention) -> np.ndarray:
    if convention == "-180..180":
        return (lon + 180.0) % 360.0 - 180.0
    if convention == "0..360":
        return lon % 360.0
    raise ValueError(f"unknown longitude convention {convention!r}; use '-180..180' or '0..360'")


def set_lon_convention(ds: xr.Dataset, convention: LonConvention, source: str) -> xr.Dataset:
    """Longitudes relabelled into ``convention`` and the data rolled so that ``lon`` ascends seamlessly.

    A global grid is rotated to start at the convention's seam; a repeated cyclic column (last = first
    + 360) is dropped. A regional grid is relabelled only; one that straddles the convention's seam
    (e.g. 170..190E in -180..180) would be split in two pieces and raises :class:`CoordinateError`.
    """
    lon = np.asarray(ds["lon"].values, dtype="float64")
    if np.isnan(lon).any():
        raise CoordinateError(f"{source}: coordinate 'lon' has missing values")
    sign = _strictly_monotonic(lon)
    if sign == 0:
        raise CoordinateError(f"{source}: coordinate 'lon' has {_coordinate_problem(lon)}")
    if sign < 0:
        ds = ds.isel(lon=slice(None, None, -1))
        if "lon_bnds" in ds.variables:
            ds = ds.assign_coords(lon_bnds=ds["lon_bnds"].isel(bnds=slice(None, None, -1)))
        lon = lon[::-1]
    if lon.size > 2 and np.isclose(lon[-1] - lon[0], 360.0):
        ds, lon = ds.isel(lon=slice(0, -1)), lon[:-1]
    if lon.size and lon[-1] - lon[0] >= 360.0:
        raise CoordinateError(f"{source}: coordinate 'lon' spans more than 360 degrees ({lon[0]}..{lon[-1]})")
    wrapped = _wrap(lon, convention)
    order = np.argsort(wrapped, kind="stable")
    shift = wrapped - lon
    step = np.median(np.diff(lon)) if lon.size > 1 else 360.0
    is_global = lon.size > 1 and lon[-1] - lon[0] + step >= 360.0 - 1e-6 * max(step, 1.0)
    if not is_global and not np.array_equal(order, np.arange(lon.size)):
        raise CoordinateError(
            f"{source}: the regional longitude range {lon[0]:g}..{lon[-1]:g} crosses the seam of the "
            f"{convention} convention and would be split; use the other lon_convention for this domain"
        )
    ds = ds.assign_coords(lon=("lon", wrapped, ds["lon"].attrs))
    if "lon_bnds" in ds.variables:
        ds = ds.assign_coords(lon_bnds=ds["lon_bnds"].astype("float64") + xr.DataArray(shift, dims="lon"))
    if not np.array_equal(order, np.arange(lon.size)):
        ds = ds.isel(lon=order)
    return ds


# -- time ----------------------------------------------------------------------------------------
def normalize_frequency(freq: str | None) -> str | None:
    """'mon' or 'yr' for monthly/annual spellings (CMIP ``frequency``, table ids, pandas aliases), else as given."""
    if not freq:
        return None
    f = str(freq).strip().lower()
    if f in {"mon", "month", "monthly", "1m", "m", "ms", "1ms", "monclim"} or f.endswith("mon"):
        return "mon"
    if f in {"yr", "year", "yearly", "annual", "1y", "y", "ys", "a", "as", "ayr"} or f.endswith("yr"):
        return "yr"
    return f


def _calendar_of(values: np.ndarray) -> str:
    return str(getattr(values.flat[0], "calendar", "standard") or "standard")


def decode_time(ds: xr.Dataset, source: str) -> xr.Dataset:
    """Time (and its bounds) decoded to cftime objects in the source calendar.

    Numeric times are decoded here (after a calendar check) so that an unsupported calendar gives a
    clear :class:`CalendarError`; datetime64 times become cftime in the proleptic Gregorian calendar.
    """
    if "time" not in ds.variables:
        return ds
    t = ds["time"]
    names = ["time"] + (["time_bnds"] if "time_bnds" in ds.variables else [])
    if t.dtype.kind in "iuf":
        units = t.attrs.get("units", "")
        if " since " not in str(units):
            raise CoordinateError(f"{source}: time coordinate has units {units!r}, not '<unit> since <date>'")
        calendar = str(t.attrs.get("calendar", "standard")).lower()
        if calendar not in SUPPORTED_CALENDARS:
            raise CalendarError(
                f"{source}: time calendar {t.attrs.get('calendar')!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_CALENDARS)}"
            )
        sub = xr.Dataset({n: ds[n].variable.to_base_variable() for n in names})
        if "time_bnds" in sub:  # CF: bounds without units/calendar inherit the coordinate's
            battrs = sub["time_bnds"].attrs
            battrs.setdefault("units", units)
            battrs.setdefault("calendar", calendar)
            if str(battrs["calendar"]).lower() != calendar:
                raise CalendarError(
                    f"{source}: time_bnds calendar {battrs['calendar']!r} differs from time's {calendar!r}"
                )
        coder = xr.coders.CFDatetimeCoder(use_cftime=True)
        try:
            dec = xr.decode_cf(sub, decode_times=coder, decode_timedelta=False)
        except (ValueError, OverflowError) as exc:
            raise CalendarError(f"{source}: cannot decode time ({units!r}, {calendar!r}): {exc}") from None
        return ds.assign_coords(time=dec["time"]).assign({n: dec[n] for n in names if n != "time"})
    if t.dtype.kind == "M":

        def to_cf(v: np.ndarray) -> np.ndarray:
            idx = np.asarray(v, dtype="datetime64[us]").astype(object)
            return np.array(
                [
                    cftime.datetime(*x.timetuple()[:6], x.microsecond, calendar="proleptic_gregorian")
                    for x in idx.ravel()
                ]
            ).reshape(np.shape(v))

        ds = ds.assign_coords(time=("time", to_cf(t.values), t.attrs))
        if "time_bnds" in ds.variables and ds["time_bnds"].dtype.kind == "M":
            ds["time_bnds"] = (ds["time_bnds"].dims, to_cf(ds["time_bnds"].values))
        return ds
    cal = _calendar_of(np.asarray(t.values))
    if cal not in SUPPORTED_CALENDARS:
        raise CalendarError(
            f"{source}: time calendar {cal!r} is not supported; supported: {', '.join(SUPPORTED_CALENDARS)}"
        )
    return ds


def _period_start(d: cftime.datetime, freq: str) -> cftime.datetime:
    return d.replace(month=1 if freq == "yr" else d.month, day=1, hour=0, minute=0, second=0, microsecond=0)


def _next_period(d: cftime.datetime, freq: str) -> cftime.datetime:
    if freq == "yr":
        return d.replace(year=d.year + 1)
    return d.replace(year=d.year + d.month // 12, month=d.month % 12 + 1)


def _infer_frequency(times: np.ndarray, bounds: np.ndarray | None) -> str | None:
    if times.size >= 2:
        days = np.median(
            [(b - a).total_seconds() / 86400 for a, b in zip(times[:-1], times[1:], strict=True)]
        )
    elif bounds is not None:
        days = (bounds[0, 1] - bounds[0, 0]).total_seconds() / 86400
    else:
        return None
    if 27 <= days <= 32:
        return "mon"
    if 359 <= days <= 367:
        return "yr"
    return None


def normalize_time(ds: xr.Dataset, source: str, frequency: str | None = None) -> xr.Dataset:
    """Monthly/annual labels at the start of the period holding each cell's midpoint, with ``time_bnds``.

    ``frequency`` ('mon', 'yr', or a CMIP/pandas spelling) defaults to the dataset's ``frequency``
    attribute, else is inferred from the label spacing (or bounds). Other frequencies keep their labels
    and bounds. Times must be strictly increasing and unique (also after normalisation).
    """
    if "time" not in ds.variables:
        return ds
    times = np.asarray(ds["time"].values)
    if times.size == 0:
        raise CoordinateError(f"{source}: the time axis is empty")
    diffs = [b > a for a, b in zip(times[:-1], times[1:], strict=True)]
    if not all(diffs):
        dup = [str(b) for a, b in zip(times[:-1], times[1:], strict=True) if a == b]
        what = f"duplicate values {dup[:3]}" if dup else "values that are not increasing"
        raise CoordinateError(f"{source}: coordinate 'time' has {what}")
    bounds = np.asarray(ds["time_bnds"].values) if "time_bnds" in ds.variables else None
    freq = normalize_frequency(frequency or ds.attrs.get("frequency")) or _infer_frequency(times, bounds)
    if freq not in ("mon", "yr"):
        return ds
    mids = times if bounds is None else np.array([a + (b - a) / 2 for a, b in bounds])
    starts = np.array([_period_start(m, freq) for m in mids])
    dup = [str(b) for a, b in zip(starts[:-1], starts[1:], strict=True) if not b > a]
    if dup:
        raise CoordinateError(
            f"{source}: time labels fall in the same {'month' if freq == 'mon' else 'year'} more than once "
            f"(e.g. {dup[0]}): the data are not {'monthly' if freq == 'mon' else 'annual'} means or hold duplicates"
        )
    ends = np.array([_next_period(s, freq) for s in starts])
    attrs = {k: v for k, v in ds["time"].attrs.items() if k not in ("units", "calendar", "bounds")}
    ds = ds.drop_vars("time_bnds", errors="ignore").assign_coords(time=("time", starts, attrs))
    ds["time_bnds"] = (("time", "bnds"), np.stack([starts, ends], axis=1))
    ds.attrs["frequency"] = freq
    return ds


# -- the whole thing -----------------------------------------------------------------------------
def _squeeze_extra_dims(ds: xr.Dataset, source: str) -> xr.Dataset:
    core = {"time", "lat", "lon", "bnds"}
    for name, var in ds.data_vars.items():
        extra = [d for d in var.dims if d not in core]
        big = [d for d in extra if ds.sizes[d] > 1]
        if big:
            raise GridError(
                f"{source}: variable {name!r} has extra dimension(s) {[(d, ds.sizes[d]) for d in big]}; "
                "select one level before ingesting"
            )
    extra = [d for d in ds.dims if d not in core]
    return ds.squeeze(extra, drop=False) if extra else ds


def _cf_attrs(ds: xr.Dataset, convention: LonConvention, calendar: str | None) -> xr.Dataset:
    ds["lat"].attrs = {
        "standard_name": "latitude",
        "long_name": "latitude",
        "units": "degrees_north",
        "axis": "Y",
    }
    ds["lon"].attrs = {
        "standard_name": "longitude",
        "long_name": "longitude",
        "units": "degrees_east",
        "axis": "X",
        "climrecon_lon_convention": convention,
    }
    for c in ("lat", "lon"):
        if f"{c}_bnds" in ds.variables:
            ds[c].attrs["bounds"] = f"{c}_bnds"
            ds[f"{c}_bnds"].attrs = {}
    if "time" in ds.variables:
        ds["time"].attrs = {"standard_name": "time", "long_name": "time", "axis": "T", "bounds": "time_bnds"}
        enc = {"units": "days since 1850-01-01 00:00:00", "calendar": calendar, "dtype": "float64"}
        ds["time"].encoding = dict(enc)
        ds["time_bnds"].attrs = {}
        ds["time_bnds"].encoding = dict(enc)
    for name in ds.data_vars:
        if name in CMIP_VARIABLES:
            spec = CMIP_VARIABLES[name]
            keep = {
                k: v
                for k, v in ds[name].attrs.items()
                if k in ("cell_methods", "comment", "climrecon_renamed_from", "climrecon_units_from")
            }
            ds[name].attrs = {
                "standard_name": spec.standard_name,
                "long_name": spec.long_name,
                "units": spec.units,
                **keep,
            }
    return ds


def _check_not_empty(ds: xr.Dataset, source: str) -> None:
    names = [n for n in ds.data_vars if n in CMIP_VARIABLES]
    valid = dask.compute(*[ds[n].notnull().any() for n in names])
    empty = [n for n, ok in zip(names, valid, strict=True) if not bool(ok)]
    if empty:
        raise EmptyVariableError(f"{source}: variable(s) {empty} hold no valid value (all NaN / fill value)")


def standardize(
    ds: xr.Dataset,
    *,
    lon_convention: LonConvention = "-180..180",
    source: str,
    variables: Iterable[str] | None = None,
    frequency: str | None = None,
    check_values: bool = True,
) -> xr.Dataset:
    """``ds`` in the pipeline's conventions (module docstring); lazy dask arrays stay lazy.

    ``source`` names the file or dataset in every error message; ``variables`` (CMIP short names) are
    required to be present (default: every recognised field is kept); ``frequency`` as in
    :func:`normalize_time`. With ``check_values`` every variable is checked to hold at least one valid
    value (one pass over the data).
    """
    ds = ds.copy(deep=False)
    ds.attrs = dict(ds.attrs)  # never mutate the caller's attributes
    ds = rename_coordinates(ds, source)
    ds = map_variables(ds, source, variables)
    if not any(n in CMIP_VARIABLES for n in ds.data_vars):
        raise MissingVariableError(f"{source}: no recognised variable (known: {sorted(CMIP_VARIABLES)})")
    ds = _squeeze_extra_dims(ds, source)
    # only the index coordinates, bounds and scalar coordinates (e.g. height) survive
    drop = [
        n
        for n, c in ds.coords.items()
        if n not in ("time", "lat", "lon", "time_bnds", "lat_bnds", "lon_bnds")
        and not (c.ndim == 0 and (n == "height" or c.attrs.get("standard_name") == "height"))
    ]
    ds = ds.drop_vars(drop)
    other_bounds = [
        n for n in ds.data_vars if n not in CMIP_VARIABLES and n not in ("time_bnds", "lat_bnds", "lon_bnds")
    ]
    ds = ds.drop_vars(other_bounds).set_coords([b for b in ("lat_bnds", "lon_bnds") if b in ds.data_vars])
    # spatial bounds are small: keep them in memory so that a Zarr template writes them at once
    ds = ds.assign_coords({b: ds[b].load() for b in ("lat_bnds", "lon_bnds") if b in ds.coords})
    if "time_bnds" in ds.coords:
        ds = ds.reset_coords("time_bnds")
    ds = decode_time(ds, source)
    ds = normalize_time(ds, source, frequency)
    ds = sort_latitude(ds, source)
    ds = set_lon_convention(ds, lon_convention, source)
    ds = ds.assign({n: convert_units(ds[n], source) for n in ds.data_vars if n in CMIP_VARIABLES})
    order = [d for d in ("time", "lat", "lon") if d in ds.dims]
    ds = ds.transpose(*order, ...).drop_encoding()
    calendar = _calendar_of(np.asarray(ds["time"].values)) if "time" in ds.variables else None
    ds.attrs = {k: v for k, v in ds.attrs.items() if not str(k).startswith("intake_esm")}
    ds.attrs["Conventions"] = "CF-1.8"
    ds = _cf_attrs(ds, lon_convention, calendar)
    if check_values:
        _check_not_empty(ds, source)
    return ds
