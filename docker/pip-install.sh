#!/bin/sh
# Install camserve's Python packages during an image build (both Dockerfiles):
#   sh pip-install.sh requirements|deps|package EXTRAS TORCH_INDEX
# "requirements" prints what pyproject.toml declares (plus the comma-separated EXTRAS' lines; the host's
# wheelhouse script reads it too), "deps" installs requirements.txt (that output), "package" then
# installs camserve itself. Offline from /wheels when the wheelhouse holds wheels; otherwise
# from the package index, with TORCH_INDEX (if set) as an extra index for PyTorch's own builds.
set -eu
STEP=$1
EXTRAS=${2:-}
TORCH_INDEX=${3:-}

if ls /wheels/*.whl >/dev/null 2>&1; then
    set -- --no-index --find-links /wheels
elif [ -n "$TORCH_INDEX" ]; then
    set -- --extra-index-url "$TORCH_INDEX"
else
    set --
fi

requirements() {
    "${PYTHON:-python3}" - "$EXTRAS" <<'PY'
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
requirements = list(project["dependencies"])
optional = project.get("optional-dependencies", {})
for extra in filter(None, sys.argv[1].split(",")):
    if extra not in optional:
        sys.exit(f"EXTRAS names {extra!r}, which pyproject.toml does not define; known: {sorted(optional)}")
    requirements += optional[extra]
print("\n".join(requirements))
PY
}

case "$STEP" in
requirements)
    requirements
    ;;
deps)
    pip install "$@" -r requirements.txt
    ;;
package)
    # The venv's own setuptools builds it, so no build dependency has to be fetched.
    pip install "$@" --no-deps --no-build-isolation .
    ;;
*)
    echo "pip-install.sh: first argument must be deps, package or requirements, got '$STEP'" >&2
    exit 2
    ;;
esac
