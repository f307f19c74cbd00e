# Sourced by test.sh and demo.sh: host packages and the project venv.
# Sets VENV. Idempotent; quiet when everything is in place.
VENV="${VUB_VENV:-$PWD/.venv}"
bash scripts/install_host_deps.sh
if [ ! -x "$VENV/bin/pip" ]; then     # (a venv made without ensurepip has no pip)
    python3 -m venv --clear "$VENV"
fi
stamp="$VENV/.vub-installed"
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py c_ext -newer "$stamp" 2>/dev/null)" ]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
