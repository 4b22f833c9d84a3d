"""Regular, cell-centred lat/lon grids: the targets of every regridding step.

Contract:
- A :class:`Grid` is ``nlat x nlon`` cells of ``dlat x dlon`` degrees whose south-west corner is
  ``(south, west)``; ``lat``/``lon`` are the cell *centres* (never edges), ``lat`` ascending and ``lon``
  monotonic increasing.
- Longitudes follow the project's conventions ("-180..180" or "0..360"). A region that crosses the
  dateline in -180..180 (``lon_min > lon_max``, e.g. 170 -> -170) is contiguous only in 0..360, so its grid
  uses 0..360 (centres 170..190); one that crosses Greenwich in 0..360 uses -180..180. ``lon_convention``
  says which.
- ``cell_area()`` is the exact spherical area R^2 dlon (sin lat_n - sin lat_s); a global grid sums to
  4 pi R^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import xarray as xr

from climrecon.config import Region

__all__ = ["EARTH_RADIUS_M", "Grid", "GridError", "lat_edges_from_centres", "lon_edges_from_centres"]

EARTH_RADIUS_M = 6_371_000.0
_TOL = 1e-6  # in units of one cell: how far a float extent may be from a whole number of cells


class GridError(ValueError):
    """A region, resolution or coordinate does not describe a regular cell-centred grid."""


def _whole_cells(extent: float, step: float, what: str) -> int:
    """``extent / step`` as an int, or a GridError saying what would have fitted."""
    n = extent / step
    if step <= 0 or round(n) < 1 or abs(n - round(n)) > _TOL:
        lo, hi = math.floor(n), math.ceil(n)
        raise GridError(
            f"{what}: an extent of {extent:g} deg is not a whole number of {step:g}-deg cells "
            f"({n:.4g} cells); expected a resolution that divides it, e.g. {extent / max(hi, 1):g} or "
            f"{extent / max(lo, 1):g} deg"
        )
    return int(round(n))


@dataclass(frozen=True)
class Grid:
    """``nlat x nlon`` cells of ``dlat x dlon`` degrees with south-west corner ``(south, west)``."""

    south: float
    west: float
    dlat: float
    dlon: float
    nlat: int
    nlon: int

    def __post_init__(self) -> None:
        if self.dlat <= 0 or self.dlon <= 0 or self.nlat < 1 or self.nlon < 1:
            raise GridError(f"grid needs positive resolution and cell counts, got {self}")
        north = self.south + self.nlat * self.dlat
        if self.south < -90 - _TOL * self.dlat or north > 90 + _TOL * self.dlat:
            raise GridError(f"grid latitudes {self.south:g}..{north:g} leave -90..90")
        if self.nlon * self.dlon > 360 + _TOL * self.dlon:
            raise GridError(f"grid spans {self.nlon * self.dlon:g} deg of longitude, more than 360")
        tol = _TOL * self.dlon
        in_pm180 = self.west >= -180 - tol and self.east <= 180 + tol
        in_0_360 = self.west >= -tol and self.east <= 360 + tol
        offset_global = self.is_global_lon and -180 - self.dlon <= self.west < 360  # e.g. centres 0..358.125
        if not (in_pm180 or in_0_360 or offset_global):
            raise GridError(
                f"grid longitudes {self.west:g}..{self.west + self.nlon * self.dlon:g} are in neither "
                "convention (-180..180 or 0..360)"
            )

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_region(cls, region: Region, resolution: float | tuple[float, float]) -> Grid:
        """Cells of ``resolution`` deg (or ``(dlat, dlon)``) tiling ``region`` (edges = its bounds)."""
        dlat, dlon = (resolution, resolution) if np.isscalar(resolution) else resolution
        nlat = _whole_cells(
            region.lat_max - region.lat_min, dlat, f"region latitudes {region.lat_min:g}..{region.lat_max:g}"
        )
        width = (region.lon_max - region.lon_min) % 360 or 360.0
        nlon = _whole_cells(width, dlon, f"region longitudes {region.lon_min:g}..{region.lon_max:g}")
        west = region.lon_min
        # lon_min > lon_max in -180..180 (170 -> -170) crosses the dateline: west=170, east=190, i.e. 0..360.
        # One crossing Greenwich in 0..360 (350 -> 10) is contiguous only in -180..180: west=-10, east=10.
        if west + width > 360 + _TOL:
            west -= 360
        return cls(region.lat_min, west, float(dlat), float(dlon), nlat, nlon)

    @classmethod
    def global_(cls, resolution: float | tuple[float, float], lon_convention: str = "-180..180") -> Grid:
        """The whole sphere in cells of ``resolution`` deg; west edge -180 or 0 per ``lon_convention``."""
        if lon_convention not in ("-180..180", "0..360"):
            raise GridError(f"lon_convention must be '-180..180' or '0..360', got {lon_convention!r}")
        dlat, dlon = (resolution, resolution) if np.isscalar(resolution) else resolution
        nlat = _whole_cells(180.0, dlat, "global latitudes -90..90")
        nlon = _whole_cells(360.0, dlon, "global longitudes")
        return cls(
            -90.0, -180.0 if lon_convention == "-180..180" else 0.0, float(dlat), float(dlon), nlat, nlon
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset | xr.DataArray, name: str = "dataset") -> Grid:
        """The grid whose centres are ``ds.lat``/``ds.lon`` (must be regular and ascending)."""
        lat, lon = np.asarray(ds["lat"], float), np.asarray(ds["lon"], float)
        dlat, dlon = _regular_step(lat, f"{name}: lat"), _regular_step(lon, f"{name}: lon")
        return cls(float(lat[0] - dlat / 2), float(lon[0] - dlon / 2), dlat, dlon, lat.size, lon.size)

    # -- geometry -------------------------------------------------------------------------------
    @property
    def north(self) -> float:
        return self.south + self.nlat * self.dlat

    @property
    def east(self) -> float:
        return self.west + self.nlon * self.dlon

    @property
    def lat(self) -> np.ndarray:
        """Cell-centre latitudes, ascending."""
        return self.south + (np.arange(self.nlat) + 0.5) * self.dlat

    @property
    def lon(self) -> np.ndarray:
        """Cell-centre longitudes, increasing."""
        return self.west + (np.arange(self.nlon) + 0.5) * self.dlon

    @property
    def is_global_lon(self) -> bool:
        return abs(self.nlon * self.dlon - 360) < _TOL * self.dlon

    @property
    def lon_convention(self) -> str:
        """Which convention the cell centres follow: "-180..180" if none exceeds 180, else "0..360"."""
        return "-180..180" if self.lon[-1] <= 180 else "0..360"

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lat_bnds, lon_bnds)``, shapes ``(nlat, 2)``/``(nlon, 2)``: [south, north], [west, east]."""
        lat_e = self.south + np.arange(self.nlat + 1) * self.dlat
        lon_e = self.west + np.arange(self.nlon + 1) * self.dlon
        return np.stack([lat_e[:-1], lat_e[1:]], -1), np.stack([lon_e[:-1], lon_e[1:]], -1)

    def cell_area(self, radius: float = EARTH_RADIUS_M) -> np.ndarray:
        """Exact spherical cell areas [m2], shape ``(nlat, nlon)``."""
        lat_b, _ = self.bounds()
        band = np.diff(np.sin(np.radians(np.clip(lat_b, -90, 90))), axis=-1)[:, 0]
        return np.outer(radius**2 * np.radians(self.dlon) * band, np.ones(self.nlon))

    def coarsened(self, factor: int) -> Grid:
        """The grid of ``factor x factor`` blocks of this one (same edges; centres are block centres)."""
        if factor < 1 or self.nlat % factor or self.nlon % factor:
            raise GridError(
                f"cannot coarsen a {self.nlat} x {self.nlon} grid by {factor}: expected a factor dividing "
                "both (lat and lon cell counts)"
            )
        return Grid(
            self.south,
            self.west,
            self.dlat * factor,
            self.dlon * factor,
            self.nlat // factor,
            self.nlon // factor,
        )

    def contains(self, other: Grid) -> bool:
        """Whether every cell of ``other`` lies inside this grid's domain (longitudes modulo 360)."""
        tol = _TOL * min(self.dlat, other.dlat)
        if other.south < self.south - tol or other.north > self.north + tol:
            return False
        if self.is_global_lon:
            return True
        shift = 360.0 * round(((other.west + other.east) - (self.west + self.east)) / 720.0)
        return other.west - shift >= self.west - tol and other.east - shift <= self.east + tol

    def to_dataset(self) -> xr.Dataset:
        """Coordinates ``lat``/``lon`` (CF attrs) plus ``lat_bnds``/``lon_bnds``: a regridding target."""
        lat_b, lon_b = self.bounds()
        return xr.Dataset(
            {"lat_bnds": (("lat", "bnds"), lat_b), "lon_bnds": (("lon", "bnds"), lon_b)},
            coords={
                "lat": (
                    "lat",
                    self.lat,
                    {"units": "degrees_north", "standard_name": "latitude", "bounds": "lat_bnds"},
                ),
                "lon": (
                    "lon",
                    self.lon,
                    {"units": "degrees_east", "standard_name": "longitude", "bounds": "lon_bnds"},
                ),
            },
            attrs={"lon_convention": self.lon_convention},
        )

    def same_cells(self, other: Grid, rtol: float = 1e-6) -> bool:
        """The same cells as ``other`` (within ``rtol`` of a cell; longitudes compared modulo 360)."""
        tol = rtol * min(self.dlat, other.dlat)
        west = (self.west - other.west + 180.0) % 360.0 - 180.0
        return (self.nlat, self.nlon) == (other.nlat, other.nlon) and all(
            abs(x) < tol
            for x in (self.south - other.south, west, self.dlat - other.dlat, self.dlon - other.dlon)
        )

    def describe(self) -> str:
        return (
            f"{self.nlat}x{self.nlon} grid of {self.dlat:g}x{self.dlon:g} deg, "
            f"lat {self.south:g}..{self.north:g}, lon {self.west:g}..{self.east:g}"
        )


def _regular_step(centres: np.ndarray, what: str) -> float:
    if centres.ndim != 1 or centres.size < 2:
        raise GridError(f"{what}: need a 1-D coordinate of at least 2 centres, got shape {centres.shape}")
    steps = np.diff(centres)
    step = float(np.mean(steps))
    if step <= 0 or np.max(np.abs(steps - step)) > 1e-4 * step:
        raise GridError(
            f"{what}: centres are not regular and ascending (steps {steps.min():g}..{steps.max():g}); "
            "expected a regular grid in the project conventions (lat ascending, lon increasing)"
        )
    return step


def lat_edges_from_centres(lat: np.ndarray) -> np.ndarray:
    """Cell edges of ascending centres: midpoints inside, outer edges mirrored; size n+1, within -90..90.

    An outer edge snaps to the pole when the pole is less than one cell width from the outermost centre
    (the source covers the polar cap): exact for regular global grids, and the usual reading of Gaussian
    ones (MPI-ESM T63: first centre -88.57, mirrored edge -89.49 -> -90).
    """
    lat = np.asarray(lat, float)
    mid = (lat[:-1] + lat[1:]) / 2
    edges = np.concatenate([[2 * lat[0] - mid[0]], mid, [2 * lat[-1] - mid[-1]]])
    if 90 + lat[0] < lat[1] - lat[0]:
        edges[0] = -90.0
    if 90 - lat[-1] < lat[-1] - lat[-2]:
        edges[-1] = 90.0
    return np.clip(edges, -90.0, 90.0)


def lon_edges_from_centres(lon: np.ndarray) -> np.ndarray:
    """Cell edges of increasing longitude centres (midpoints, outer edges mirrored); size n+1."""
    lon = np.asarray(lon, float)
    mid = (lon[:-1] + lon[1:]) / 2
    return np.concatenate([[2 * lon[0] - mid[0]], mid, [2 * lon[-1] - mid[-1]]])
