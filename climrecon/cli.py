"""The ``climrecon`` command line: one subcommand per stage, each a thin call into flows/ or tasks/.

Every command takes ``--config FILE`` (YAML, validated) and repeated ``--set dotted.key=value``
overrides; ``climrecon config show`` prints the effective configuration.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

app = typer.Typer(
    name="climrecon",
    help="High-resolution probabilistic climate reconstruction: catalog -> ingest -> regrid -> downscale "
    "-> aggregate -> evaluate, orchestrated by Prefect and computed by Dask.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
catalog_app = typer.Typer(
    help="Build and inspect intake-esm catalogs (the offline sample catalog).", no_args_is_help=True
)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")
app.add_typer(config_app, name="config")

console = Console(stderr=True)
# Our stores consolidate metadata on purpose (fast opens on object storage); zarr 3 notes it on every write.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (default: embedded defaults).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set ingest.time_chunk=24 (repeatable)."),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler", help="Address of an existing Dask scheduler (default: start a LocalCluster)."
    ),
]


VERBOSE = {"on": False}


@app.callback()
def _main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show full tracebacks of failed tasks and flows.")
    ] = False,
) -> None:
    """Every command validates its config first, then runs its Prefect flow(s)."""
    VERBOSE["on"] = verbose
    if verbose:
        import os

        os.environ["CLIMRECON_VERBOSE"] = "1"  # Dask workers started by this command keep their tracebacks


class _NoTraceback:
    """A logging filter for console handlers: a failed task or flow is logged as its one-line message;
    the traceback stays in the Prefect API (UI) and appears on the console with --verbose."""

    def filter(self, record) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _quiet_console() -> None:
    import logging

    from prefect.logging.configuration import setup_logging

    setup_logging()  # Prefect's handlers exist from here on (idempotent; a flow run would do it later)
    if VERBOSE["on"]:
        return
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "distributed"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _NoTraceback) for f in handler.filters
            ):
                handler.addFilter(_NoTraceback())


@contextmanager
def _run_flows() -> Iterator[None]:
    """Around a command's flows: the Prefect API (a private, self-stopping server unless PREFECT_API_URL
    points at one) and a console without tracebacks (unless --verbose)."""
    from climrecon.flows.server import PrefectServerError, prefect_api

    try:
        with prefect_api():
            _quiet_console()
            try:
                yield
            finally:  # ship the run's last log lines to the API before a private server stops
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=5)
    except PrefectServerError as exc:
        _fail(exc)


def _load(config: Path | None, overrides: list[str] | None):
    from climrecon.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _fail(exc: Exception, cfg=None) -> None:
    message = str(exc)
    if cfg is not None:
        from climrecon.storage import explain_storage_error

        message = explain_storage_error(exc, cfg.storage.root) or message
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1) from None


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the effective configuration (file + overrides + defaults) as YAML."""
    cfg = _load(config, set_)
    sys.stdout.write(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@catalog_app.command("build-sample")
def catalog_build_sample(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    synthetic: Annotated[
        bool, typer.Option(help="Also generate the synthetic reanalysis (ERA5 stand-in).")
    ] = True,
) -> None:
    """Build the offline sample catalog from real packaged climate data (+ the synthetic reanalysis).

    Writes CMIP6-style CF netCDF files, the static fields (etopo5 elevation, GLOBE land fraction) and an
    intake-esm catalog (JSON + CSV) under <data_home>/sample (or sample.directory).
    """
    from climrecon.catalogs.sample import build_sample_catalog

    cfg = _load(config, set_)
    try:
        path = build_sample_catalog(
            cfg.sample_dir(),
            Path(cfg.data_home),
            include_synthetic=cfg.sample.synthetic if synthetic else None,
        )
    except (FileNotFoundError, ValueError) as exc:
        _fail(exc)
    console.print(f"[green]sample catalog:[/green] {path}")
    typer.echo(str(path))


@catalog_app.command("show")
def catalog_show(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    catalog: Annotated[str | None, typer.Argument(help="Catalog JSON (default: the sample catalog).")] = None,
) -> None:
    """List a catalog's datasets: source, experiment, member, table, variables, time range."""
    from rich.table import Table

    from climrecon.catalogs.esmcat import open_catalog

    cfg = _load(config, set_)
    path = catalog or str(cfg.sample_catalog())
    try:
        cat = open_catalog(path)
    except (FileNotFoundError, ValueError) as exc:
        _fail(exc)
    df = cat.df
    table = Table(title=f"{path} ({len(df)} rows)")
    cols = [
        c
        for c in (
            "source_id",
            "experiment_id",
            "member_id",
            "table_id",
            "variable_id",
            "time_range",
            "format",
            "synthetic",
        )
        if c in df
    ]
    for c in cols:
        table.add_column(c)
    for _, row in df.iterrows():
        table.add_row(*("" if str(row[c]) == "nan" else str(row[c]) for c in cols))
    Console(width=max(Console().width, 160)).print(table)


@app.command()
def ingest(config: ConfigOpt = None, set_: SetOpt = None, scheduler: SchedulerOpt = None) -> None:
    """Query a catalog and write standardized CF Zarr stores (names, units, lon, lat order, calendars).

    Runs the Prefect flow `ingest` with a Dask LocalCluster (or --scheduler). Complete stores are skipped.
    """

    cfg = _load(
        config, set_
    )  # validated before Prefect starts: flows get the config, never raw --set strings
    with _run_flows():
        from climrecon.flows.ingest import ingest_flow

        try:
            urls = ingest_flow(scheduler_address=scheduler, config=cfg)
        except Exception as exc:  # noqa: BLE001 - stage errors are reported, not dumped
            _fail(exc, cfg)
    for url in urls:
        typer.echo(url)


@app.command()
def regrid(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    source: Annotated[
        str | None, typer.Option(help="Ingested store URL (default: this config's ingest output).")
    ] = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Put an ingested store on the unified coarse grid and the high-resolution target grid.

    Writes three hash-keyed Zarr stores: coarse (conservative), fine (the coarse field on the target grid:
    the model's conditioning) and static fields on the target grid (elevation, its sub-grid spread, land
    fraction). Runs the Prefect flow `regrid`; complete stores are skipped, partial ones filled.
    """

    cfg = _load(config, set_)
    with _run_flows():
        from climrecon.flows.regrid import regrid_flow

        try:
            urls = regrid_flow(source_url=source, scheduler_address=scheduler, config=cfg)
        except Exception as exc:  # noqa: BLE001
            _fail(exc, cfg)
    for name, url in urls.items():
        typer.echo(f"{name}\t{url}")


@app.command("methods")
def methods_(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The registered downscaling methods (`method.name`, `evaluate.methods`): what each needs and does."""
    from rich.table import Table

    from climrecon.methods import METHODS

    cfg = _load(config, set_)
    table = Table(title="ClimRecon methods")
    for column in ("name", "trainable", "needs", "what it does", "config keys"):
        table.add_column(column)
    for name, entry in sorted(METHODS.items()):
        keys = ", ".join(k for k in entry.config.model_fields if k != "name") or "-"
        marker = " (method:)" if name == cfg.method.name else ""
        trainable = ("yes" if entry.train else "no") + (" (+ distill)" if entry.distill else "")
        table.add_row(name + marker, trainable, entry.needs, entry.summary, keys)
    Console(width=max(Console().width, 160)).print(table)


@app.command()
def train(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train the configured method (`method.name`, default dpdm) on fine truth (default: the synthetic reanalysis).

    DPDM: perfect-model pairs (truth area-averaged by train.factor), random patch crops, normalisation on the
    training years only, EMA weights, resumable checkpoints and a loss-curve PNG beside the checkpoint.
    Runs the Prefect flow `train`. The shipped checkpoint was made with
    `climrecon train --config configs/train-dpdm-westus-x8.yaml` (see checkpoints/README.md).
    With `train.distill` set, trains a few-step student of a trained checkpoint instead (progressive
    distillation; `climrecon train --config configs/distill-dpdm-westus-x8.yaml`).
    """

    cfg = _load(config, set_)
    with _run_flows():
        from climrecon.flows.train import train_flow

        try:
            path = train_flow(config=cfg)
        except Exception as exc:  # noqa: BLE001
            _fail(exc, cfg)
    typer.echo(path)


@app.command()
def downscale(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    fine: Annotated[
        str | None, typer.Option(help="Regridded fine store (default: this config's regrid output).")
    ] = None,
    static: Annotated[
        str | None, typer.Option(help="Static store on the fine grid (default: regrid output).")
    ] = None,
    scheduler: SchedulerOpt = None,
    workers: Annotated[
        int | None, typer.Option(help="CPU workers of the local cluster (default: Dask's choice).")
    ] = None,
) -> None:
    """Downscale a regridded store into an N-member high-resolution ensemble with the configured method.

    Any registered method (`method.name`; `climrecon methods` lists them; default: the shipped DPDM checkpoint,
    patch-based sampling with overlap blending, `sampler.*`). Work units of (months x members) on a Dask pool
    whose GPU workers take the sampling (CPU workers when there is no GPU); deterministic seeds per (month,
    member); resumable. Runs the Prefect flow `downscale`.
    """

    cfg = _load(config, set_)
    with _run_flows():
        from climrecon.flows.downscale import downscale_flow

        try:
            url = downscale_flow(
                config=cfg,
                fine_url=fine,
                static_url=static,
                scheduler_address=scheduler,
                n_workers=workers,
            )
        except Exception as exc:  # noqa: BLE001
            _fail(exc, cfg)
    typer.echo(url)


@app.command()
def aggregate(
    member_store: Annotated[
        str, typer.Argument(help="A complete member store written by `climrecon downscale`.")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Ensemble mean, spread, quantiles and exceedance probabilities of a member store, with provenance.

    Writes a CF-compliant Zarr store (local or s3://) with a W3C PROV-JSON document beside the data and
    lists it in the output catalog (<storage.root>/catalogs/outputs.json). Runs the Prefect flow `aggregate`.
    """

    cfg = _load(config, set_)
    with _run_flows():
        from climrecon.flows.aggregate import aggregate_flow

        try:
            url = aggregate_flow(member_store, scheduler_address=scheduler, config=cfg)
        except Exception as exc:  # noqa: BLE001
            _fail(exc, cfg)
    typer.echo(url)


@app.command()
def evaluate(config: ConfigOpt = None, set_: SetOpt = None, scheduler: SchedulerOpt = None) -> None:
    """Perfect-model evaluation: coarsen fine truth by each factor, downscale it back with every method of
    evaluate.methods (default: bilinear, BCSD, quantile mapping, DPDM), score on held-out years.

    Writes CSV/JSON records, Markdown tables shaped like the papers' and PNG figures (maps, spectra, rank
    histogram) under evaluate.output, and publishes them as Prefect artifacts. Runs the flow `evaluate`.
    """

    cfg = _load(config, set_)
    with _run_flows():
        from climrecon.flows.evaluate import evaluate_flow

        try:
            result = evaluate_flow(scheduler_address=scheduler, config=cfg)
        except Exception as exc:  # noqa: BLE001
            _fail(exc, cfg)
    for name, value in result.items():
        typer.echo(f"{name}\t{value}")


def _print_outputs(outputs: dict) -> None:
    from rich.table import Table

    table = Table(title="ClimRecon outputs")
    table.add_column("stage")
    table.add_column("store")
    for stage in ("ingest", "regrid", "downscale", "aggregate"):
        for url in outputs.get(stage, []):
            table.add_row(stage, str(url))
    out = Console(width=max(Console().width, 160))
    out.print(table)
    out.print(f"output catalog: {outputs['catalog']}")
    out.print(
        'open a result:  import xarray as xr; ds = xr.open_zarr("<aggregate store>")  '
        "(for s3:// add storage_options={...})"
    )
    out.print('or through the catalog:  import intake_esm; intake_esm.esm_datastore("<output catalog>")')
    if outputs.get("evaluate"):
        from rich.markdown import Markdown

        for scored in outputs["evaluate"]:
            out.print(Markdown(scored["markdown"]))
            if scored.get("markdown_file"):
                out.print(f"skill tables: {scored['markdown_file']} (records: {scored['json_file']})")


EvaluateOpt = Annotated[
    bool,
    typer.Option("--evaluate/--no-evaluate", help="Score each result against fine truth when there is one."),
]


@app.command()
def reconstruct(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    scheduler: SchedulerOpt = None,
    evaluate: EvaluateOpt = True,
) -> None:
    """Run the whole reconstruction: ingest -> regrid -> downscale -> aggregate (Prefect flow `reconstruct`),
    then score each result against fine truth when there is one (evaluate.truth, or the sample catalog's).

    Finished stages are skipped by their content keys; one Dask cluster serves every stage.
    """

    cfg = _load(config, set_)
    with _run_flows():
        from climrecon.flows.reconstruct import reconstruct_flow

        try:
            outputs = reconstruct_flow(scheduler_address=scheduler, evaluate=evaluate, config=cfg)
        except Exception as exc:  # noqa: BLE001
            _fail(exc, cfg)
    _print_outputs(outputs)


@app.command()
def server(
    home: Annotated[Path, typer.Option(help="Server state (SQLite database, logs).")] = Path(
        "~/.cache/climrecon/prefect"
    ),
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 4200,
) -> None:
    """Start a local Prefect server with its UI on 127.0.0.1 and keep it running (Ctrl-C stops it).

    Then, in another shell, `export PREFECT_API_URL=http://127.0.0.1:<port>/api` and every climrecon
    command's flow runs appear in the UI (deployments and workers: deploy/README.md).
    """
    import signal
    import time

    from climrecon.flows.server import PrefectServerError, start_server

    try:
        srv = start_server(home, port=port)
    except PrefectServerError as exc:
        _fail(exc)

    def _terminate(signum, frame):  # SIGTERM (e.g. to the whole process group): stop the server too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    with srv:
        console.print(f"[green]Prefect UI:[/green] {srv.ui_url}   (started in {srv.startup_seconds:.1f} s)")
        console.print(f"export PREFECT_API_URL={srv.api_url}")
        try:
            while srv.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopping the Prefect server")


@app.command()
def demo(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The README's main job: a whole reconstruction on the embedded defaults, in a few minutes.

    Builds the offline sample catalog (real packaged GCM data + the labelled synthetic reanalysis) if
    missing, then reconstructs MPI-ESM-LR 2005 tas/uas/vas over the western US at 0.25 deg with the
    configured method (default: DPDM with the shipped checkpoint, 8 members, 12 DPM-Solver++(2M) steps, the
    GCM bias-corrected toward the synthetic truth's coarse view over the training years; any registered
    method with --set method.name=...), scores it against the synthetic truth, with Prefect's
    local API, a Dask LocalCluster and stores under ./outputs; --set overrides anything (e.g. --set
    downscale.members=4 for a quicker look). `-c configs/demo-corrdiff.yaml`: CorrDiff on tas, uas, vas and
    pr, which the sample GCMs lack (the synthetic reanalysis itself is the coarse source: a perfect-model run).
    """
    reconstruct(config=config, set_=list(set_ or []), scheduler=None, evaluate=True)


if __name__ == "__main__":  # pragma: no cover
    app()
