"""Real static fields on a global, cell-centred 5-arc-minute grid: surface altitude and land fraction.

Grid (exact): ``lat`` = 2160 ascending cell centres -89.958333 .. 89.958333, ``lon`` = 4320 centres
-179.958333 .. 179.958333, spacing 1/12 degree; cell (i, j) spans [centre - 1/24, centre + 1/24].

- ``sftlf`` [%] (land_area_fraction): GLOBE 30-arc-second land mask as packaged by ``global-land-mask``
  (its ``globe_combined_mask_compressed.npz``, True = ocean, i.e. GLOBE's -500 m no-data code). GLOBE is
  cell-registered: mask row k covers latitudes (90 - (k+1)/120, 90 - k/120], column j covers longitudes
  [-180 + j/120, -180 + (j+1)/120), so each 5' cell holds exactly 10 x 10 GLOBE cells and its land
  percentage is the count of land cells among those 100. The 933 MB array is streamed from the zip
  member in row blocks, never loaded whole.
- ``orog`` [m] (surface_altitude): ETOPO5 relief (``etopo5.cdf`` of Debian ferret-datasets, 2161 x 4320).
  ETOPO5 is grid-registered: its values are point samples at the 5' grid *nodes* (lat -90 .. 90 every
  1/12 degree, both poles included; lon 0 .. 359.9167). A cell-centred value is therefore the bilinear
  interpolant at the cell centre, i.e. the mean of the four nodes at the cell's corners. Relief includes
  bathymetry; the surface altitude of water is 0, so cells that are mostly water (sftlf < 50) get
  ``max(relief, 0)``, while mostly-land cells keep their relief, negative where land lies below sea
  level (Caspian depression, Qattara, Dead Sea). No land surface on Earth lies below the Dead Sea shore
  (about -430 m): a mostly-land cell whose relief is lower is bathymetry under a cell GLOBE calls land
  (ETOPO5's coarse or shifted coastlines around small islands and ice shelves, lake beds) and is set to
  0 like water. About 700 cells (0.008 %) are affected.

The store is written through :class:`climrecon.stores.StageStore` (chunks 540 x 540, four row blocks),
keyed by the source files' content and the method version, so a re-run with the same inputs is a no-op.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from climrecon.storage import url_options
from climrecon.stores import StageStore, StoreStateError, content_key, time_blocks

__all__ = [
    "RESOLUTION_DEG",
    "N_LAT",
    "N_LON",
    "CHUNK",
    "LOWEST_LAND_M",
    "MissingSourceDataError",
    "static_grid",
    "etopo5_path",
    "globe_mask_path",
    "debian_package_version",
    "static_fields_key",
    "land_percentage",
    "cell_centred_relief",
    "build_static_fields",
    "open_static_fields",
]

RESOLUTION_DEG = 1.0 / 12.0  # 5 arc-minutes
N_LAT, N_LON = 2160, 4320
CHUNK = 540
LOWEST_LAND_M = -430.0  # Dead Sea shore: the lowest land surface on Earth
METHOD_VERSION = 1  # bump when the algorithm below changes, so old stores are not reused
_GLOBE_PER_CELL = 10  # 30" GLOBE cells per 5' cell along each axis
_FERRET_DATA = Path("usr/share/ferret-vis/data")


class MissingSourceDataError(FileNotFoundError):
    """Packaged source data is not installed; the message names the file and how to install it."""


def static_grid() -> tuple[np.ndarray, np.ndarray]:
    """The (lat, lon) cell centres of the 5' grid, float64, ascending, lon in -180..180."""
    lat = -90.0 + (np.arange(N_LAT) + 0.5) * RESOLUTION_DEG
    lon = -180.0 + (np.arange(N_LON) + 0.5) * RESOLUTION_DEG
    return lat, lon


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise MissingSourceDataError(
            f"{what} not found at {path}; run deploy/install.sh (it unpacks the Debian data packages "
            "into $CLIMRECON_DATA_HOME/debian) or set CLIMRECON_DATA_HOME to where they are"
        )
    return path


def etopo5_path(data_home: Path) -> Path:
    path = Path(data_home) / "debian" / _FERRET_DATA / "etopo5.cdf"
    return _require(path, "ETOPO5 relief (ferret-datasets)")


def globe_mask_path() -> Path:
    # located, never imported: importing global_land_mask decompresses its 1 GB mask (~8 s)
    spec = importlib.util.find_spec("global_land_mask")
    if spec is None or spec.origin is None:
        raise MissingSourceDataError(
            "global-land-mask is not installed; run deploy/install.sh (pip install global-land-mask==1.0.0)"
        )
    path = Path(spec.origin).parent / "globe_combined_mask_compressed.npz"
    if not path.is_file():
        raise MissingSourceDataError(f"GLOBE land mask {path} is missing; reinstall global-land-mask==1.0.0")
    return path


def debian_package_version(data_home: Path, package: str) -> str:
    """The version of an unpacked Debian package, from the first line of its changelog ('unknown' if none)."""
    log = Path(data_home) / "debian" / "usr/share/doc" / package / "changelog.Debian.gz"
    try:
        with gzip.open(log, "rt") as f:
            first = f.readline()
    except OSError:
        return "unknown"
    m = re.match(r"\S+ \(([^)]+)\)", first)
    return m.group(1) if m else "unknown"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _sources(data_home: Path) -> dict[str, Any]:
    etopo = etopo5_path(data_home)
    globe = globe_mask_path()
    return {
        "etopo5": {
            "package": "ferret-datasets",
            "version": debian_package_version(data_home, "ferret-datasets"),
            "file": str(_FERRET_DATA / "etopo5.cdf"),
            "path": etopo,
            "license": "NOAA/NGDC ETOPO5 (public domain), shipped under the NOAA-PMEL-TMAP Ferret licence",
        },
        "globe": {
            "package": "global-land-mask",
            "version": importlib.metadata.version("global-land-mask"),
            "file": "global_land_mask/globe_combined_mask_compressed.npz",
            "path": globe,
            "license": "MIT (global-land-mask); NOAA/NGDC GLOBE data (public domain)",
        },
    }


def static_fields_key(data_home: Path) -> str:
    """The content key of the static store: sizes and digests of both source files + method version."""
    src = _sources(data_home)
    ident = {
        name: {"version": s["version"], "size": s["path"].stat().st_size, "sha256": _file_digest(s["path"])}
        for name, s in src.items()
    }
    return content_key("static-fields", METHOD_VERSION, N_LAT, N_LON, ident)


# -- sftlf ----------------------------------------------------------------------------------------
def land_percentage(npz_path: Path, rows_per_block: int = 54) -> np.ndarray:
    """Percent land (uint8, 0..100) of each 5' cell, shape (2160, 4320), lat ascending, lon -180..180.

    Streams the boolean ``mask`` member of the npz (True = ocean) in blocks of ``rows_per_block`` 5'
    rows; checks the packaged lat/lon vectors against the GLOBE layout assumed here.
    """
    with np.load(npz_path) as npz:
        lat, lon = npz["lat"], npz["lon"]
    step = 1.0 / 120.0
    if not (
        lat.shape == (N_LAT * _GLOBE_PER_CELL,)
        and lon.shape == (N_LON * _GLOBE_PER_CELL,)
        and np.allclose(lat, 90.0 - step * np.arange(lat.size), atol=1e-9)
        and np.allclose(lon, -180.0 + step * np.arange(lon.size), atol=1e-9)
    ):
        raise ValueError(
            f'{npz_path}: lat/lon vectors are not the 30" GLOBE layout (90N..-90 by rows, -180.. by '
            "columns) this reader assumes"
        )
    n_cols = N_LON * _GLOBE_PER_CELL
    land = np.empty((N_LAT, N_LON), dtype=np.uint8)  # north-to-south for now
    with zipfile.ZipFile(npz_path) as zf, zf.open("mask.npy") as f:
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if shape != (N_LAT * _GLOBE_PER_CELL, n_cols) or fortran_order or dtype != np.bool_:
            raise ValueError(f"{npz_path}: mask is {shape} {dtype} (fortran={fortran_order}), not C bool")
        for start in range(0, N_LAT, rows_per_block):
            n = min(rows_per_block, N_LAT - start)
            raw = f.read(n * _GLOBE_PER_CELL * n_cols)
            ocean = np.frombuffer(raw, dtype=np.uint8).reshape(n, _GLOBE_PER_CELL, n_cols)
            # sum the 10 GLOBE rows of each 5' row (contiguous adds), then each run of 10 columns
            ocean_rows = np.add.reduce(ocean, axis=1, dtype=np.uint8)
            ocean_cells = ocean_rows.reshape(n, N_LON, _GLOBE_PER_CELL).sum(axis=2, dtype=np.uint8)
            land[start : start + n] = _GLOBE_PER_CELL**2 - ocean_cells
    return land[::-1].copy()  # ascending latitude


# -- orog -----------------------------------------------------------------------------------------
def cell_centred_relief(etopo_path: Path) -> np.ndarray:
    """ETOPO5 node values averaged onto the 5' cell centres: float32 (2160, 4320), lat asc., lon -180..180."""
    with xr.open_dataset(etopo_path, decode_times=False) as ds:
        var = ds["ROSE"]
        y = ds[var.dims[0]].values
        x = ds[var.dims[1]].values
        nodes = var.values.astype(np.float64)
    k, j = np.arange(N_LAT + 1), np.arange(N_LON)
    if y.shape != k.shape or not np.allclose(y, -90.0 + k * RESOLUTION_DEG, atol=1e-6):
        raise ValueError(f"{etopo_path}: ETOPO05_Y is not the 2161 5' nodes -90..90 this method assumes")
    # the file's X axis carries single-precision drift (last node 359.92 instead of 359.9167): < 0.005 deg
    if x.shape != j.shape or not np.allclose(x, j * RESOLUTION_DEG, atol=5e-3):
        raise ValueError(f"{etopo_path}: ETOPO05_X is not the 4320 5' nodes 0..359.9167 this method assumes")
    if not np.isfinite(nodes).all():
        raise ValueError(f"{etopo_path}: ROSE has missing values; the static fields need a complete DEM")
    # nodes to -180..180: node column c of `rolled` lies at lon -180 + c/12; close the ring at +180
    rolled = np.roll(nodes, -N_LON // 2, axis=1)
    ring = np.concatenate([rolled, rolled[:, :1]], axis=1)  # (2161, 4321)
    corners = ring[:-1, :-1] + ring[1:, :-1] + ring[:-1, 1:] + ring[1:, 1:]
    return (corners / 4.0).astype(np.float32)


def _static_dataset(data_home: Path) -> xr.Dataset:
    src = _sources(data_home)
    sftlf = land_percentage(src["globe"]["path"]).astype(np.float32)
    relief = cell_centred_relief(src["etopo5"]["path"])
    land_surface = (sftlf >= 50.0) & (relief >= LOWEST_LAND_M)
    orog = np.where(land_surface, relief, np.maximum(relief, 0.0)).astype(np.float32)
    lat, lon = static_grid()
    origin = "; ".join(f"{s['package']} {s['version']}: {s['file']}" for s in src.values())
    return xr.Dataset(
        {
            "orog": (
                ("lat", "lon"),
                orog,
                {
                    "standard_name": "surface_altitude",
                    "long_name": "Surface Altitude",
                    "units": "m",
                    "source": "ETOPO5 ({package} {version}, {file})".format(**src["etopo5"]),
                    "comment": "mean of the 4 ETOPO5 grid nodes at the cell corners; max(relief, 0) where "
                    "sftlf < 50 (water surface altitude is 0) or where relief < -430 m (below the lowest "
                    "land on Earth: bathymetry under a GLOBE land cell); land below sea level keeps its "
                    "value",
                },
            ),
            "sftlf": (
                ("lat", "lon"),
                sftlf,
                {
                    "standard_name": "land_area_fraction",
                    "long_name": "Percentage of the Grid Cell Occupied by Land (Including Lakes)",
                    "units": "%",
                    "source": f'GLOBE 30" land mask ({src["globe"]["package"]} {src["globe"]["version"]})',
                    "comment": "percentage of the 100 GLOBE 30-arc-second cells inside the cell that are "
                    "land",
                },
            ),
        },
        coords={
            "lat": ("lat", lat, {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"}),
            "lon": ("lon", lon, {"standard_name": "longitude", "units": "degrees_east", "axis": "X"}),
        },
        attrs={
            "title": "ClimRecon static fields on a global 5-arc-minute cell-centred grid",
            "Conventions": "CF-1.8",
            "grid": "regular lat-lon, 1/12 deg, cell-centred, lat ascending, lon -180..180",
            "climrecon_origin": origin,
            "license": "; ".join(f"{name}: {s['license']}" for name, s in src.items()),
            "method": f"climrecon.catalogs.static v{METHOD_VERSION}: sftlf = 10x10 GLOBE block land count; "
            "orog = ETOPO5 node-to-cell-centre mean, water cells (and relief < -430 m) clipped at 0",
        },
    )


def build_static_fields(data_home: Path, url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Build the static Zarr store (``orog``, ``sftlf``) at ``url`` unless it is complete; returns ``url``.

    Raises :class:`MissingSourceDataError` when ETOPO5 or the GLOBE mask is not installed, and
    :class:`climrecon.stores.StoreStateError` when ``url`` holds a store built from other inputs.
    """
    key = static_fields_key(Path(data_home))
    store = StageStore(str(url), key=key, storage_options=dict(storage_options or {}))
    if store.is_complete():
        return str(url)
    found = store.stored_key() if store.exists() else store.key
    if found != store.key:  # fail before the expensive part; initialize() would refuse it too
        raise StoreStateError(
            f"{url} already holds a store with key {found!r}, not {store.key!r}; refusing to overwrite it"
        )
    ds = _static_dataset(Path(data_home))
    encoding = {v: {"chunks": (CHUNK, CHUNK)} for v in ds.data_vars}
    store.initialize(ds.chunk({"lat": CHUNK, "lon": CHUNK}), encoding=encoding)
    regions = [{"lat": s} for s in time_blocks(N_LAT, CHUNK)]
    for region in store.pending(regions):
        store.write_block(ds.isel(region), region)
    store.finalize(regions)
    return str(url)


def open_static_fields(url: str, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """Open a complete static store lazily; an incomplete or missing one raises with the URL named."""
    try:
        ds = xr.open_zarr(str(url), storage_options=url_options(str(url), storage_options))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise FileNotFoundError(
            f"no static-fields store at {url}; build it with climrecon.catalogs.static.build_static_fields"
        ) from exc
    if ds.attrs.get("climrecon_status") != "complete":
        raise StoreStateError(f"static-fields store {url} is incomplete; re-run build_static_fields")
    missing = {"orog", "sftlf"} - set(ds.data_vars)
    if missing:
        raise StoreStateError(f"static-fields store {url} lacks variable(s) {sorted(missing)}")
    return ds
