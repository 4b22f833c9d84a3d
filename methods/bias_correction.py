"""Bias correction of a coarse input before a model downscales it: quantile mapping toward the truth's coarse view.

A model trained on pairs of a fine truth and its own coarse view (perfect model) has only ever seen coarse fields
with the truth's climate. A free-running GCM's fields are another climate: their anomalies from the truth's
climatology can lie many standard deviations outside what the model learnt, and anything that responds to them
linearly (a local-regression first guess, a guidance toward them) extrapolates. The standard remedy of
statistical downscaling (the "BC" of BCSD; Schmidt et al. before their posterior sampling) is to map the coarse
model's distribution onto the truth's coarse view first, per calendar month and coarse cell, over years both
cover, and to apply that mapping to every step downscaled (a scenario keeps its change signal, relative to the
mapped historical distribution).

:class:`CoarseBiasCorrection` is that step for every trained method that reads a coarse input (DPDM, CorrDiff,
ZSSD, spatiotemporal: ``method.bias_correction``). It fits the project's one empirical quantile mapping
(:class:`climrecon.methods.baselines.EmpiricalQuantileMapping`, additive, ratio for precipitation; the same as
the ``qm`` and ``bcsd`` baselines) on the stage's fit data (``Needs.fit_model``: the coarse input's own fields
over the training years it covers, and the truth's coarse view over the training years), and applies it to an
:class:`~climrecon.methods.base.Inputs`: the coarse grid's fields are mapped, and their bilinear view on the
fine grid moves by the bilinearly interpolated adjustment (so it is exactly the bilinear view of the mapped
fields when the stage made it from the same coarse grid). Annual model fields are mapped toward the truth's
annual means. Without model fields (a perfect-model evaluation: the input IS the truth's coarse view) the
correction is the identity: inputs pass unchanged, bit for bit, as do inputs marked ``Inputs.truth_view`` (what
:func:`climrecon.tasks.evaluate.perfect_model_inputs` builds), fitted or not.

:meth:`CoarseBiasCorrection.record` is what provenance keeps: the period, quantile count, mean adjustment per
variable and month, and the hash of the fitted quantiles.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import xarray as xr

from climrecon.methods.base import Inputs, MethodError, gridded_variables
from climrecon.methods.baselines import BaselineError, EmpiricalQuantileMapping

__all__ = ["CoarseBiasCorrection", "SHORT_FIT_YEARS"]

log = logging.getLogger(__name__)
SHORT_FIT_YEARS = 10  # fewer years of the input to fit on: its own anomalies are mapped away with its bias


def _is_annual(ds: xr.Dataset) -> bool:
    """Whether ``ds``'s time labels are one per year (an annual-mean input), as the correction distinguishes."""
    years = [t.year for t in ds["time"].values]
    return len(years) > 1 and len(set(years)) == len(years)


def _annual_means_like(reference: xr.Dataset, model: xr.Dataset) -> xr.Dataset:
    """``reference``'s annual means, labelled like ``model``'s annual steps (same month and day)."""
    t0 = model["time"].values[0]
    means = reference.groupby("time.year").mean("time")
    times = [type(t0)(int(y), t0.month, t0.day) for y in means["year"].values]
    return means.rename(year="time").assign_coords(time=times)


@dataclass
class CoarseBiasCorrection:
    """Quantile mapping of a coarse model toward the truth's coarse view (module docstring).

    ``fit(reference, model)``: ``reference`` the truth's coarse view over the fit years, ``model`` the coarse
    input's own fields on the same grid over the years it shares with them (None: a perfect model, the
    identity). ``inputs`` and ``coarse`` apply it; ``record`` describes it (None until fitted). ``what`` names
    the method in every error."""

    variables: Sequence[str]
    what: str = "bias correction"
    mapping: EmpiricalQuantileMapping | None = field(default=None, repr=False)
    record: dict[str, Any] | None = None

    def fit(self, reference: xr.Dataset, model: xr.Dataset | None = None) -> CoarseBiasCorrection:
        present = [v for v in self.variables if v in reference.data_vars]
        reference = reference[present]
        if model is None:  # a perfect model: the input is the truth's coarse view, nothing to map
            self.mapping = None
            self.record = {
                "method": "identity (perfect model: the input is the truth's coarse view)",
                "perfect_model": True,
            }
            return self
        fitted = model[[v for v in present if v in model.data_vars]]
        if not list(fitted.data_vars):
            raise MethodError(
                f"{self.what}: the coarse input has none of {list(self.variables)} over the fit years"
            )
        if _is_annual(fitted):
            reference = _annual_means_like(reference, fitted)
        try:
            self.mapping = EmpiricalQuantileMapping().fit(fitted, reference[list(fitted.data_vars)])
        except BaselineError as exc:
            raise MethodError(f"{self.what}: {exc}") from None
        self.record = self.mapping.describe(fitted, reference)
        years = self.record["model_years"]
        if years < SHORT_FIT_YEARS:
            log.warning(
                "%s is fitted on %d year(s) of the coarse input (%s..%s): on so short a period the mapping also "
                "takes away those years' own anomalies, not only the model's bias; give the run a longer historical "
                "period inside the training years (e.g. 30 years) for a climate bias",
                self.what,
                years,
                *self.record["model_period"],
            )
        return self

    def coarse(self, coarse: xr.Dataset) -> xr.Dataset:
        """``coarse`` with every fitted variable mapped (the others unchanged; all of it for a perfect model)."""
        if self.record is None:
            raise MethodError(
                f"{self.what}: bias_correction is on but the method was not fitted; the downscale stage fits "
                "it on the training years (or set method.bias_correction: false)"
            )
        if self.mapping is None:
            return coarse
        names = [v for v in gridded_variables(coarse) if v in self.mapping.model_quantiles]
        try:
            return coarse.assign(self.mapping.adjust(coarse[names]))
        except BaselineError as exc:
            raise MethodError(f"{self.what}: {exc}") from None

    def inputs(self, inputs: Inputs) -> Inputs:
        """``inputs`` with the coarse fields mapped and their fine-grid view moved by the bilinearly
        interpolated adjustment (:func:`climrecon.methods.features.coarse_on_fine`, as the stage made it); a
        coarse cell without a value stays so, and adjusts nothing around it."""
        from climrecon.methods.features import coarse_on_fine

        if inputs.truth_view or (self.record is not None and self.mapping is None):
            return inputs  # the truth's own coarse view (a perfect model): nothing to correct
        if inputs.coarse is None:
            raise MethodError(f"{self.what} maps the coarse grid itself; give the stage the coarse store")
        original = inputs.coarse.load()
        corrected = self.coarse(original)
        names = [v for v in self.mapping.model_quantiles.data_vars if v in inputs.coarse_on_fine.data_vars]
        if not names:
            return dataclasses.replace(inputs, coarse=corrected)
        # a coarse cell without a value (masked) gets no adjustment, rather than spreading NaN to its neighbours
        adjustment = (corrected[names] - original[names]).astype("float64").fillna(0.0)
        increment = coarse_on_fine(adjustment, inputs.grid)
        on_fine = inputs.coarse_on_fine.load().copy()
        for v in names:
            base = on_fine[v].transpose("time", "lat", "lon")
            moved = base.values + increment[v].transpose("time", "lat", "lon").values
            on_fine[v] = base.copy(data=moved.astype(base.dtype))
        return dataclasses.replace(inputs, coarse=corrected, coarse_on_fine=on_fine)
