# Sourced by scripts/test and scripts/demo: create .venv and install the project, idempotently.
# A stamp keyed on pyproject.toml skips the install when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
EXTRAS="${1:-dev}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
STAMP=".venv/.dinoctl-installed-$EXTRAS"
WANT="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "==> installing dinoctl[$EXTRAS] into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  .venv/bin/python -c "import torch, deepspeed, faiss, mlflow, minio" >/dev/null 2>&1 \
    || { echo "install failed: see pip output above" >&2; exit 1; }
  # `torchrun` in the venv is dinoctl's wrapper, as in the images: SIGTERM ends it with 143.
  .venv/bin/python -m app.launch.torchrun --install .venv/bin >/dev/null
  echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
# DeepSpeed JIT builds go to a cache inside the venv so repeated runs reuse them.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.venv/torch_extensions}"
