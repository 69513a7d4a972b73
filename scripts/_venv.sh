# Shared by the integration venv scripts (scripts/anomalib_env.sh, scripts/serve_env.sh), sourced after they set
# VENV (the venv folder) and SCRIPT (their name, for messages): fail, pipi and make_venv.

fail() { echo "$SCRIPT: FAILED: $*" >&2; exit 1; }
# this machine's pip configuration names index folders that do not all exist: one warning per package, dropped
pipi() {
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
# (re)create $VENV when its python does not run, then bring pip, setuptools and wheel up to date in it
make_venv() {
    if ! "$VENV/bin/python" -c "" >/dev/null 2>&1; then
        rm -rf "$VENV"
        python3 -m venv "$VENV" || fail "python3 -m venv $VENV"
    fi
    pipi --upgrade pip "setuptools>=69" wheel || fail "pip/setuptools into $VENV"
}
