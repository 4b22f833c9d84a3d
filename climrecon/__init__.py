"""ClimRecon: high-resolution probabilistic climate reconstruction with diffusion models.

Stages (each a plain function library in ``climrecon.tasks``, wrapped by Prefect flows in
``climrecon.flows``): catalog -> ingest -> regrid -> downscale -> aggregate -> evaluate.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("climrecon")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
