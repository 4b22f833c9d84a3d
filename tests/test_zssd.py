"""ZSSD: the observation operator is the area mean, guidance recovers a known posterior, guided samples agree
with their input, one prior serves several factors and grids, same seed same bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from test_corrdiff import tiny_config
from test_training_data import write_tiny_stores

from climrecon.config import SamplerConfig
from climrecon.methods import MethodError, build, zssd
from climrecon.methods.base import Inputs
from climrecon.models.checkpoint import read_checkpoint
from climrecon.models.guidance import GuidedDenoiser
from climrecon.models.operators import SeparableOperator
from climrecon.models.samplers import edm_sampler
from climrecon.models.tiled import sample_tiled
from climrecon.models.tiling import make_tiling
from climrecon.tasks.evaluate import perfect_model_inputs
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import coarsen_blocks, conservative
from climrecon.tasks.training_data import open_truth, select_years, static_for_truth

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FINE = Grid(south=30.0, west=-125.0, nlat=40, nlon=48, dlat=0.25, dlon=0.25)


def _field(grid: Grid, values: np.ndarray) -> xr.Dataset:
    return xr.Dataset({"x": (("lat", "lon"), values)}, coords={"lat": grid.lat, "lon": grid.lon})


@pytest.mark.parametrize(
    "coarse",
    [
        FINE.coarsened(4),
        FINE.coarsened(8),
        # a GCM's native grid (1.875 deg) that does not line up with the fine cells
        Grid(south=28.125, west=-127.5, nlat=8, nlon=9, dlat=1.875, dlon=1.875),
    ],
    ids=["x4", "x8", "gcm-1.875"],
)
def test_the_operator_is_exactly_the_conservative_area_mean(coarse):
    a, observed, y_op = zssd.observation_operator(FINE, coarse, "dps")
    lat, lon = np.meshgrid(FINE.lat, FINE.lon, indexing="ij")
    # the observed cells are those the fine domain covers wholly (the partial ones at a native grid's edge
    # would compare a part-cell mean with a whole-cell value)
    rows = [
        i
        for i, c in enumerate(coarse.lat)
        if c - coarse.dlat / 2 >= FINE.south and c + coarse.dlat / 2 <= FINE.north
    ]
    cols = [
        j
        for j, c in enumerate(coarse.lon)
        if c - coarse.dlon / 2 >= FINE.west and c + coarse.dlon / 2 <= FINE.east
    ]
    covered = Grid(
        south=float(coarse.lat[rows[0]] - coarse.dlat / 2),
        west=float(coarse.lon[cols[0]] - coarse.dlon / 2),
        nlat=len(rows),
        nlon=len(cols),
        dlat=coarse.dlat,
        dlon=coarse.dlon,
    )
    for values in (np.full(lat.shape, 3.5), 2.0 * lat - 0.5 * lon + 7.0, np.sin(lat) * np.cos(3 * lon)):
        got = a(torch.from_numpy(values)).numpy()
        want = conservative(_field(FINE, values), covered)["x"].values
        assert got.shape == (len(rows), len(cols)) == observed.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # y_op picks the same cells out of the coarse input
    y = np.arange(coarse.nlat * coarse.nlon, dtype=float).reshape(coarse.nlat, coarse.nlon)
    np.testing.assert_array_equal(y_op(torch.from_numpy(y)).numpy(), y[np.ix_(rows, cols)])


def test_unified_guidance_compares_fields_on_the_fine_grid_and_keeps_constants():
    for unified in (5.0, None):
        a, observed, y_op = zssd.observation_operator(FINE, FINE.coarsened(8), "zssd", unified)
        assert a.out_shape == (FINE.nlat, FINE.nlon) and observed.all()
        const = a(torch.full((FINE.nlat, FINE.nlon), 4.0, dtype=torch.float64))
        np.testing.assert_allclose(const.numpy(), 4.0, atol=1e-12)
        # A = Y C: the unified view of a field's own coarse means equals its A
        c, _, _ = zssd.observation_operator(FINE, FINE.coarsened(8), "dps")
        x = torch.randn(FINE.nlat, FINE.nlon, dtype=torch.float64)
        np.testing.assert_allclose(a(x).numpy(), y_op(c(x)).numpy(), atol=1e-12)
    with pytest.raises(MethodError, match="no cell of the coarse input"):
        zssd.observation_operator(FINE, Grid(south=20, west=-140, nlat=2, nlon=2, dlat=20, dlon=20), "dps")


@pytest.mark.parametrize("jacobian", ["network", "identity"])
def test_guidance_on_a_gaussian_prior_recovers_the_known_posterior(jacobian):
    """x ~ N(0, 1) per cell, y = x + e, e ~ N(0, 0.5^2): the posterior is N(y / 1.25, 0.2). The exact denoiser
    of the prior, D(x; sigma) = x / (1 + sigma^2), guided with the Gaussian likelihood rule."""
    n, items, sy, y0 = 8, 256, 0.5, 1.2
    ident = SeparableOperator(np.eye(n), np.eye(n))
    y = torch.full((items, 1, n, n), y0, dtype=torch.float64)
    guided = GuidedDenoiser(
        lambda x, s: x / (1 + s.reshape(-1, 1, 1, 1) ** 2), ident, y, noise=(sy, 1.0), jacobian=jacobian
    )
    latents = torch.randn((items, 1, n, n), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = edm_sampler(guided, latents, num_steps=64)
    assert out.mean().item() == pytest.approx(y0 / (1 + sy**2), rel=0.01)
    assert out.var().item() == pytest.approx(sy**2 / (1 + sy**2), rel=0.03)


@pytest.mark.parametrize("guidance", ["zssd", "dps"])
def test_tiled_guided_samples_agree_with_their_coarse_input(guidance):
    """A Gaussian prior as the patch network, the one tiled sampler, ZSSD's fixed step: A(x) ~= y."""
    coarse = FINE.coarsened(8)
    a, observed, y_op = zssd.observation_operator(FINE, coarse, guidance)
    truth = torch.randn(2, 1, FINE.nlat, FINE.nlon, dtype=torch.float64).cumsum(-1).cumsum(-2) / 20
    c, _, _ = zssd.observation_operator(FINE, coarse, "dps")
    y = y_op(c(truth))
    tiling = make_tiling(FINE.nlat, FINE.nlon, 16, 4)
    zeta = 1.0 if guidance == "zssd" else 0.3 * np.sqrt(observed.sum())

    def prior(x, sigma, cond, toy):
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)

    out = sample_tiled(
        prior,
        None,
        None,
        tiling,
        seeds=[3, 4],
        out_channels=1,
        num_steps=12,
        max_patches_per_batch=8,
        wrap=lambda d: GuidedDenoiser(
            d, a, y, zeta=zeta, loss="mse" if guidance == "zssd" else "norm", shape=(FINE.nlat, FINE.nlon)
        ),
    )
    rel = (a(out.double()) - y).norm() / y.norm()
    if guidance == "zssd":
        assert rel < 0.01
    else:  # vanilla DPS's step shrinks like 1 / factor^2: it pulls toward y, but does not reach it
        free = sample_tiled(
            prior, None, None, tiling, seeds=[3, 4], out_channels=1, num_steps=12, max_patches_per_batch=8
        )
        assert rel < 0.98 * (a(free.double()) - y).norm() / y.norm()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("zssd")
    truth, static = write_tiny_stores(root)
    ckpt = root / "tiny-zssd.pt"
    zssd.train(tiny_config(truth, static, ckpt, steps=2, static_coarse=(), name="zssd"))
    held = select_years(open_truth(truth, ["tas", "uas", "vas"]), (2002, 2002)).isel(time=slice(0, 2))
    held = held.astype("float32").load()
    return {"checkpoint": str(ckpt), "held": held, "static": static_for_truth(static, held)}


def _inputs(world, factor: int) -> Inputs:
    held = world["held"]
    return perfect_model_inputs(coarsen_blocks(held, factor), Grid.from_dataset(held), world["static"], [])


def test_the_prior_knows_no_coarse_field_and_serves_every_factor_with_the_same_bytes_per_seed(world):
    meta = read_checkpoint(world["checkpoint"]).metadata
    assert meta.method == "zssd-prior"
    assert not any(c.endswith("_coarse") for c in meta.cond_channels)
    assert meta.data["conditioning"].startswith("prior")
    sampler = SamplerConfig(num_steps=3, device="cpu", overlap=4, max_patches_per_batch=8)
    for guidance in ("zssd", "dps"):
        method = build({"name": "zssd", "checkpoint": world["checkpoint"], "guidance": guidance}, sampler)
        for factor in (4, 5):
            inputs = _inputs(world, factor)
            a = method.downscale(inputs, members=2, seed=7)
            b = method.downscale(inputs, members=[1], seed=7)
            assert a.tas.dims == ("member", "time", "lat", "lon") and np.isfinite(a.tas.values).all()
            assert a.tas.isel(member=1).values.tobytes() == b.tas.isel(member=0).values.tobytes()
            assert not np.array_equal(a.tas.values[0], a.tas.values[1])
        assert method.describe()["guidance"]["guidance"] == guidance


def test_a_prior_refuses_what_it_cannot_guide(world, tmp_path):
    sampler = SamplerConfig(num_steps=2, device="cpu", overlap=4)
    method = build({"name": "zssd", "checkpoint": world["checkpoint"]}, sampler)
    monthly = _inputs(world, 4)
    daily = Inputs(monthly.coarse_on_fine, monthly.grid, monthly.coarse, monthly.static, time_step="day")
    with pytest.raises(MethodError, match="trained on monthly fields; the input is daily"):
        method.downscale(daily)
    no_coarse = Inputs(monthly.coarse_on_fine, monthly.grid, None, monthly.static)
    with pytest.raises(MethodError, match="reads the coarse grid itself"):
        method.downscale(no_coarse)
    with pytest.raises(MethodError, match="climatology"):
        build({"name": "zssd", "checkpoint": world["checkpoint"], "climatology": True}, sampler)


def test_the_operator_reads_a_gcms_gaussian_latitudes_and_0_360_longitudes():
    """MPI-ESM-LR-like cells: irregular latitudes with CF bounds, longitudes 0..360; the observed cells are
    those the domain covers wholly, and A is their conservative mean."""
    lat_edges = np.array([26.0, 27.86, 29.73, 31.59, 33.45, 35.32, 37.18, 39.04, 40.9, 42.77])
    lon_edges = np.arange(225.0, 250.0, 1.875)
    coarse = xr.Dataset(
        coords={
            "lat": (lat_edges[:-1] + lat_edges[1:]) / 2,
            "lon": (lon_edges[:-1] + lon_edges[1:]) / 2,
            "lat_bnds": (("lat", "nb2"), np.stack([lat_edges[:-1], lat_edges[1:]], 1)),
            "lon_bnds": (("lon", "nb2"), np.stack([lon_edges[:-1], lon_edges[1:]], 1)),
        }
    )
    a, observed, pick = zssd.observation_operator(FINE, coarse, "dps")
    rows = np.flatnonzero((lat_edges[:-1] >= FINE.south) & (lat_edges[1:] <= FINE.north))
    cols = np.flatnonzero((lon_edges[:-1] - 360 >= FINE.west) & (lon_edges[1:] - 360 <= FINE.east))
    assert a.out_shape == (len(rows), len(cols)) == observed.shape and len(rows) >= 4 and len(cols) >= 4
    lat, lon = np.meshgrid(FINE.lat, FINE.lon, indexing="ij")
    values = 2.0 * lat - 0.5 * lon + np.cos(lat)
    covered = coarse.isel(lat=rows, lon=cols)
    want = conservative(_field(FINE, values), covered)["x"].values
    np.testing.assert_allclose(a(torch.from_numpy(values)).numpy(), want, rtol=0, atol=1e-12)
    # zssd's view of the same cells keeps constants on the fine grid
    a, _, _ = zssd.observation_operator(FINE, coarse, "zssd", 5.0)
    np.testing.assert_allclose(
        a(torch.full((FINE.nlat, FINE.nlon), 2.0, dtype=torch.float64)).numpy(), 2.0, atol=1e-12
    )


def test_an_annual_observation_guides_twelve_months_whose_mean_agrees_with_it():
    """GroupMean: 12 items observed through their mean (an annual input to a monthly prior): the guided
    months differ from one another, their mean matches y."""
    from climrecon.models.operators import GroupMean

    n, years = 8, 2
    ident = SeparableOperator(np.eye(n), np.eye(n))
    y = torch.stack([torch.full((1, n, n), 0.7), torch.full((1, n, n), -0.4)]).double()
    guided = GuidedDenoiser(
        lambda x, s: x / (1 + s.reshape(-1, 1, 1, 1) ** 2), GroupMean(ident, 12), y, zeta=12.0
    )
    latents = torch.randn(
        (years * 12, 1, n, n), generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    out = edm_sampler(guided, latents, num_steps=16)
    means = out.reshape(years, 12, 1, n, n).mean(1)
    np.testing.assert_allclose(means.numpy(), y.numpy(), atol=0.02)
    assert out.reshape(years, 12, -1).std(1).mean() > 0.3  # the months are not copies of the mean


def test_an_annual_input_to_a_monthly_prior_gives_annual_members(world):
    held = world["held"]
    sampler = SamplerConfig(num_steps=2, device="cpu", overlap=4, max_patches_per_batch=8)
    method = build({"name": "zssd", "checkpoint": world["checkpoint"], "items_per_call": 30}, sampler)
    grid = Grid.from_dataset(held)
    annual = coarsen_blocks(held, 4).mean("time").expand_dims(time=held["time"].values[:1])
    inputs = perfect_model_inputs(annual, grid, world["static"], [], time_step="year")
    a = method.downscale(inputs, members=2, seed=5)
    assert a.tas.shape == (2, 1, grid.nlat, grid.nlon) and a.attrs["months_per_input_step"] == 12
    b = method.downscale(inputs, members=[1], seed=5)
    assert a.tas.isel(member=1).values.tobytes() == b.tas.isel(member=0).values.tobytes()
