#!/usr/bin/env bash
# Installs ClimRecon into ./.venv on a fresh machine (idempotent, fast when nothing changed):
#  1. a virtual environment with torch==2.13.0 first (the CPU wheel on disk; see ../shared/STACK.md),
#  2. the project and its test extras,
#  3. the real offline climate data shipped as Debian packages (see ../shared/DATA.md), unpacked
#     without installing into $CLIMRECON_DATA_HOME/debian (default ~/.cache/climrecon/debian).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CLIMRECON_VENV:-.venv}
DATA_HOME=${CLIMRECON_DATA_HOME:-$HOME/.cache/climrecon}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.climrecon-install-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q torch==2.13.0
  "$PY" -m pip install -q -e ".[test]"
  touch "$stamp"
fi
# Dask configuration for every Dask process of this environment (worker start-up environment)
mkdir -p "$VENV/etc/dask"
cp deploy/dask/config/climrecon.yaml "$VENV/etc/dask/climrecon.yaml"

mkdir -p "$DATA_HOME/debian"
for pkg in libncarg-data ferret-datasets; do
  if [ ! -f "$DATA_HOME/debian/.$pkg.done" ]; then
    tmp=$(mktemp -d)
    if ! (cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1); then
      if [ "$(id -u)" = 0 ]; then apt-get update -q >/dev/null; else sudo apt-get update -q >/dev/null; fi
      (cd "$tmp" && apt-get download -q "$pkg" >/dev/null)
    fi
    dpkg -x "$tmp"/"$pkg"_*.deb "$DATA_HOME/debian"
    rm -rf "$tmp"
    touch "$DATA_HOME/debian/.$pkg.done"
  fi
done
echo "climrecon installed in $VENV (data in $DATA_HOME)"
