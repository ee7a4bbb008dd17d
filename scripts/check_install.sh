#!/usr/bin/env bash
# The installs a user does, each into a fresh virtual environment that reuses the torch of
# $PYTHON (never installs one), each followed by scripts/install_smoke.py (the compiled
# cpu backend against torch):
#
#   1. the sdist: built from this tree, checked to hold every file of csrc/;
#   2. oldest claimed pip/setuptools/wheel, editable, through the Makefile (`make build
#      PYTHON=$PYTHON` in the unpacked sdist: the .venv must import $PYTHON's torch and
#      install none);
#   3. newest pip/setuptools/wheel on the index, `pip install --no-build-isolation` of
#      the sdist file;
#   with CHECK_INSTALL_MATRIX=full also oldest regular and newest editable (two more builds).
#
# Each install compiles the extension (about 2 minutes on 2 cores; MAX_JOBS is passed on).
# Needs the package index for the pip/setuptools/wheel versions. `make install-check` runs
# it with PYTHON=.venv/bin/python; CI runs that after `make test`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
case "$PYTHON" in  # a path, made absolute (no symlink resolved: a venv's python is one)
  */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;;
esac
MATRIX="${CHECK_INSTALL_MATRIX:-ci}"
# The oldest releases with PEP 660 editable installs (pip 21.3, setuptools 64), and the
# wheel of that time (setuptools before 70.1 takes bdist_wheel from the wheel package).
# torch 2.13 itself asks for setuptools>=77.0.3, so pip reports a conflict with 64.0.0
# there; regfuse's build needs no more than 64, which is what this checks.
OLDEST=(pip==21.3.1 setuptools==64.0.0 wheel==0.37.1)
NEWEST=(--upgrade pip setuptools wheel)

work="$(mktemp -d "${TMPDIR:-/tmp}/regfuse-install-check.XXXXXX")"
if [ -z "${KEEP_INSTALL_CHECK:-}" ]; then trap 'rm -rf "$work"' EXIT; fi
log() { echo "check_install: $*"; }
fail() { echo "check_install: FAILED: $*" >&2; exit 1; }
started=$SECONDS

torch_info="$("$PYTHON" -c 'import torch; print(torch.__version__, torch.__file__)')" \
  || fail "$PYTHON imports no torch"
log "torch $torch_info (from $PYTHON)"

# ---- 1. the sdist ---------------------------------------------------------------------
cd "$repo_root"
if "$PYTHON" -c "import build" 2>/dev/null; then
  "$PYTHON" -m build --sdist --no-isolation --outdir "$work/dist" . >"$work/sdist.log" 2>&1
else
  "$PYTHON" setup.py -q sdist -d "$work/dist" >"$work/sdist.log" 2>&1
fi || { cat "$work/sdist.log"; fail "sdist"; }
sdist="$(ls "$work"/dist/regfuse-*.tar.gz)"
# Every file of csrc/ (the headers above all, which setup.py does not name) and the
# packaging files must be in it.
"$PYTHON" - "$sdist" <<'EOF' || fail "sdist contents"
import os, sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
wanted = ["setup.py", "pyproject.toml", "MANIFEST.in", "Makefile", "scripts/setup_venv.py"]
for top in ("csrc", "regfuse"):
    for root, _, files in os.walk(top):
        wanted += [os.path.join(root, f) for f in files
                   if f.endswith((".h", ".cpp", ".cu", ".cuh", ".py"))]
missing = sorted(set(wanted) - names)
if missing:
    sys.exit("check_install: not in the sdist: " + " ".join(missing))
print(f"check_install: {os.path.basename(sys.argv[1])} holds all {len(wanted)} source files")
EOF

tar -xzf "$sdist" -C "$work"
unpacked="$work/$(basename "$sdist" .tar.gz)"

# ---- the installs -----------------------------------------------------------------------
results=()

# pins ENV COMBO: that combination's pip, setuptools and wheel, into ENV.
pins() {
  local env="$1" combo="$2"
  if [ "$combo" = oldest ]; then
    "$env/bin/python" -m pip install -q "${OLDEST[@]}"
  else
    "$env/bin/python" -m pip install -q "${NEWEST[@]}"
  fi || fail "$combo pip/setuptools/wheel into $env (needs the package index)"
}

versions() {
  "$1/bin/python" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n} {version(n)}" for n in ("pip", "setuptools", "wheel")))
EOF
}

smoke() {
  (cd "$work" && "$1/bin/python" "$repo_root/scripts/install_smoke.py" \
     --regfuse-under "$2" --torch-outside "$1")
}

# editable COMBO: the Makefile's own path in a copy of the unpacked sdist.
editable() {
  local combo="$1" env="$work/venv-$1-editable" src="$work/src-$1-editable" t=$SECONDS
  cp -r "$unpacked" "$src"
  log "== $combo pip/setuptools, editable, make build PYTHON=$PYTHON (in the unpacked sdist)"
  make -s -C "$src" setup PYTHON="$PYTHON" VENV="$env"
  pins "$env" "$combo"
  local v; v="$(versions "$env")"
  log "$v"
  make -s -C "$src" build PYTHON="$PYTHON" VENV="$env" || fail "editable install ($v)"
  smoke "$env" "$src" || fail "smoke test after the editable install ($v)"
  results+=("editable install, $v: OK ($((SECONDS - t)) s)")
}

# regular COMBO: pip install --no-build-isolation of the sdist file.
regular() {
  local combo="$1" env="$work/venv-$1-regular" t=$SECONDS
  log "== $combo pip/setuptools, pip install --no-build-isolation $(basename "$sdist")"
  "$PYTHON" "$repo_root/scripts/setup_venv.py" "$env"
  pins "$env" "$combo"
  local v; v="$(versions "$env")"
  log "$v"
  "$env/bin/python" -m pip install -q --no-build-isolation "$sdist" || fail "install of the sdist ($v)"
  smoke "$env" "$env" || fail "smoke test after installing the sdist ($v)"
  results+=("sdist install, $v: OK ($((SECONDS - t)) s)")
}

case "$MATRIX" in
  ci)   editable oldest; regular newest ;;
  full) editable oldest; regular newest; regular oldest; editable newest ;;
  *)    fail "CHECK_INSTALL_MATRIX must be ci or full, not $MATRIX" ;;
esac

log "summary (torch ${torch_info%% *}, $((SECONDS - started)) s):"
for r in "${results[@]}"; do log "  $r"; done
