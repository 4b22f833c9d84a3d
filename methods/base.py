"""The contract every downscaling method keeps, and the inputs every stage hands it.

- :class:`Method` (a Protocol): ``needs`` (:class:`Needs`: static fields, factors served or any, paired
  training data, a time halo), ``fit(coarse_train, fine_train)`` (learns from training years; a no-op for a
  pretrained model), ``validate(inputs)`` (cheap checks on lazy inputs, so a stage fails at plan time, not
  in a work unit), ``downscale(inputs, members, seed)`` -> ``(member, time, lat, lon)`` float32 dataset,
  ``identity(members, seed)`` (the JSON-able parts that fix the output bytes: the store key) and
  ``describe()`` (provenance, the report line, the label used in store names).
- :class:`Inputs`: the coarse fields on their own grid, the same fields bilinearly on the fine grid (what the
  conditioned models see), the static fields on the fine grid and the fine grid. The downscale stage builds
  them from the regrid stage's stores, the evaluation from coarsened truth: both call the same ``downscale``.
- :class:`MethodConfig`: the pydantic base of every method's config (``name`` is the registry key and the
  discriminator); :class:`SamplerConfig`: the one ``sampler:`` section shared by downscale and evaluate.
- Seeds: member ``m`` of time step ``t`` uses ``seed_for(seed, time_index(t), m)`` (``year * 12 + month - 1``
  for monthly data)
  (:func:`item_seeds`), so a member is the same field whatever the ensemble size, unit size or worker.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import xarray as xr

from climrecon.config import MethodConfig, SamplerConfig
from climrecon.tasks.grids import Grid

__all__ = [
    "MethodError",
    "MethodConfig",
    "SamplerConfig",
    "Needs",
    "Inputs",
    "Method",
    "gridded_variables",
    "member_indices",
    "per_step",
    "month_index",
    "month_starts",
    "time_index",
    "item_seeds",
]


class MethodError(ValueError):
    """A method cannot run on these inputs or with this config; the message names what is at fault."""


@dataclass(frozen=True)
class Needs:
    """What a method needs from the stage that runs it."""

    static: tuple[str, ...] = ()  # static fields on the fine grid (names in the static store)
    factors: tuple[int, ...] | None = None  # coarsening factors it serves; None: any
    fit: bool = False  # fit() needs paired training data (coarse_train, fine_train)
    time_halo: int = 0  # OUTPUT time steps of context on each side of a block (window methods)
    stochastic: bool = False  # members differ (an ensemble); else members are identical copies
    coarse: bool = True  # reads Inputs.coarse (the coarse grid itself), not only coarse_on_fine
    fit_model: bool = False  # fit() also takes model_train: the coarse input's own fields over the fit years
    # input time step -> (output time step, output steps per input step), e.g. {"year": ("month", 12)}: a
    # method that returns monthly members of an annual input; time steps not listed are returned as given
    refine: Mapping[str, tuple[str, int]] = field(default_factory=dict)

    def output_step(self, time_step: str) -> tuple[str, int]:
        """(output time step, output steps per input step) for an input of ``time_step``."""
        return self.refine.get(time_step, (time_step, 1))


@dataclass(frozen=True)
class Inputs:
    """A block of time steps to downscale.

    ``coarse``: the coarse fields (time, lat, lon) on their own grid, or None where a stage has only their
    view on the fine grid; ``coarse_on_fine``: the coarse fields bilinearly on ``grid`` (edges clamped: the
    conditioning of the diffusion methods; the regrid stage's fine store); ``static``: static fields on
    ``grid`` (``orog``, ``orog_std``, ``sftlf`` and the ``<name>_coarse`` views) or None; ``grid``: the fine
    target grid. Datasets may be lazy; a method loads what it reads.
    """

    coarse_on_fine: xr.Dataset
    grid: Grid
    coarse: xr.Dataset | None = None
    static: xr.Dataset | None = None
    # "month", "day", "hour" or "year": what time features and seeds are built from
    time_step: str = "month"
    # (lat, lon) bool on ``grid``: valid cells; None: all (see :meth:`masked`)
    mask: xr.DataArray | None = None
    # the coarse fields are the fine truth's own coarse view (a perfect-model evaluation): a bias correction of
    # the coarse input has nothing to correct (methods/bias_correction.py)
    truth_view: bool = False

    def masked(self, out: xr.Dataset) -> xr.Dataset:
        """``out`` (a method's result on ``grid``) with NaN at the cells ``mask`` marks invalid (ocean,
        missing data): the stages apply it to every method's output, so the mask travels into the stores and
        every score is taken on valid cells only. Unchanged without a mask."""
        if self.mask is None:
            return out
        keep = self.mask.assign_coords(lat=out["lat"], lon=out["lon"])
        return out.assign({v: out[v].where(keep) for v in gridded_variables(out)})

    def time_index(self) -> list[int]:
        """The seed index of each time step (:func:`time_index`)."""
        return time_index(self.time.values, self.time_step)

    @classmethod
    def from_coarse(
        cls,
        coarse: xr.Dataset,
        target: Grid | xr.Dataset,
        static: xr.Dataset | None = None,
        *,
        time_step: str = "month",
        mask: xr.DataArray | None = None,
        truth_view: bool = False,
    ) -> Inputs:
        """Inputs of a coarse dataset on ``target``: its bilinear view is computed here (as training does)."""
        from climrecon.methods.features import coarse_on_fine

        grid = target if isinstance(target, Grid) else Grid.from_dataset(target, "target grid")
        on_fine = coarse_on_fine(coarse[gridded_variables(coarse)].astype("float32"), grid)
        return cls(on_fine, grid, coarse, static, time_step=time_step, mask=mask, truth_view=truth_view)

    @property
    def time(self) -> xr.DataArray:
        return self.coarse_on_fine["time"]

    @property
    def variables(self) -> list[str]:
        return [str(v) for v in gridded_variables(self.coarse_on_fine)]

    def factor(self) -> float | None:
        """Coarse / fine grid spacing, or None without a coarse grid."""
        if self.coarse is None:
            return None
        return Grid.from_dataset(self.coarse, "coarse input").dlat / self.grid.dlat

    def require(self, needs: Needs, method: str) -> None:
        """Raise :class:`MethodError` when these inputs cannot serve ``needs``."""
        if needs.coarse and self.coarse is None:
            raise MethodError(f"{method} reads the coarse grid itself; give the stage the coarse store")
        if needs.static:
            have = [] if self.static is None else [str(v) for v in self.static.data_vars]
            missing = [s for s in needs.static if s not in have]
            if missing:
                raise MethodError(
                    f"{method} is conditioned on static fields {list(needs.static)}; the static fields lack "
                    f"{missing} (they have {sorted(have)}); re-run the regrid stage of this version"
                )
        factor = self.factor() if needs.factors else None  # (any rectilinear grid when any factor serves)
        if (
            needs.factors
            and factor is not None
            and not any(math.isclose(factor, f, rel_tol=1e-6) for f in needs.factors)
        ):
            raise MethodError(
                f"{method} serves coarsening factor(s) {list(needs.factors)}; the coarse input is x{factor:g} "
                "coarser than the target"
            )


@runtime_checkable
class Method(Protocol):
    """One downscaling method (module docstring)."""

    name: str
    needs: Needs

    def fit(self, coarse_train: xr.Dataset, fine_train: xr.Dataset) -> Method: ...

    def validate(self, inputs: Inputs) -> None: ...

    def downscale(self, inputs: Inputs, members: int | Sequence[int] = 1, seed: int = 0) -> xr.Dataset: ...

    def identity(self, members: int, seed: int) -> list[Any]: ...

    def describe(self) -> dict[str, Any]: ...


def gridded_variables(ds: xr.Dataset) -> list[Hashable]:
    """The data variables of ``ds`` on its lat/lon grid (bounds variables excluded)."""
    return [v for v in ds.data_vars if {"lat", "lon"} <= set(ds[v].dims) and not str(v).endswith("_bnds")]


def per_step(time_step: str) -> str:
    """``"month"`` -> ``"monthly"``, ``"day"`` -> ``"daily"``, ... (for messages)."""
    return {"month": "monthly", "day": "daily", "hour": "hourly", "year": "yearly"}.get(time_step, time_step)


def member_indices(members: int | Sequence[int]) -> list[int]:
    """``members`` as a list of member indices: an int n means 0..n-1; a sequence is taken as given."""
    if isinstance(members, (int, np.integer)):
        if members < 1:
            raise MethodError(f"members must be >= 1, got {members}")
        return list(range(int(members)))
    out = [int(m) for m in members]
    if not out or any(m < 0 for m in out):
        raise MethodError(f"member indices must be a non-empty list of non-negative ints, got {out}")
    return out


def time_index(times: Sequence[Any], time_step: str = "month") -> list[int]:
    """The time part of every seed: a distinct integer per label; for monthly labels exactly
    :func:`month_index` (:func:`climrecon.tasks.fine_data.time_index` has the rule for days and hours)."""
    from climrecon.tasks.fine_data import FineDataError
    from climrecon.tasks.fine_data import time_index as _time_index

    try:
        return _time_index(times, time_step)  # type: ignore[arg-type]
    except FineDataError as exc:
        raise MethodError(str(exc)) from None


def month_index(times: Sequence[Any]) -> list[int]:
    """Absolute month of each cftime label: ``year * 12 + month - 1`` (the time part of every seed)."""
    out = [int(t.year) * 12 + int(t.month) - 1 for t in times]
    if any(i < 0 for i in out):
        raise MethodError(f"time labels before year 0 cannot be seeded (first: {times[0]})")
    return out


def month_starts(times: Sequence[Any]) -> np.ndarray:
    """The 12 month starts (cftime, each label's own calendar) of the year of every label, in order: the
    monthly time axis of a method that returns months of annual input (:attr:`Needs.refine`)."""
    return np.array([type(t)(int(t.year), m, 1) for t in times for m in range(1, 13)], dtype=object)


def item_seeds(base_seed: int, months: Sequence[int], members: Sequence[int]) -> list[int]:
    """Seeds of (member, time) items in member-major order: ``seed_for(base, month, m)``."""
    from climrecon.models.samplers import seed_for

    return [seed_for(base_seed, int(t), int(m)) for m in members for t in months]
