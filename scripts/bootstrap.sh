# Sourced by scripts/*: finds Python, makes the virtualenvs and installs the project into them.
# Idempotent: a venv is rebuilt only when pyproject.toml or the mitmproxy line it needs changes.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '%s\n' "$*" >&2; }

# python_for 3.11 -> path of a working python3.11, or nothing.
python_for() {
    local want="$1" candidate version
    for candidate in "python$want" python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && version=$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
            && [ "$version" = "$want" ]; then
            command -v "$candidate"
            return 0
        fi
    done
    # pyenv keeps other versions out of PATH unless selected.
    if command -v pyenv >/dev/null 2>&1; then
        # pyenv finds its versions under $PYENV_ROOT, else ~/.pyenv: with another HOME (a CI
        # runner, sudo) it would find none, so take the root pyenv itself is installed in.
        local root="${PYENV_ROOT:-$(cd "$(dirname "$(readlink -f "$(command -v pyenv)")")/.." && pwd)}"
        version=$(PYENV_ROOT="$root" pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}(\.[0-9]+)?$" | sort -V | tail -n 1)
        if [ -n "$version" ] && candidate=$(PYENV_ROOT="$root" PYENV_VERSION="$version" pyenv which "python$want" 2>/dev/null); then
            echo "$candidate"
            return 0
        fi
    fi
    return 1
}

# mitmproxy 11 is the last line that runs on Python 3.11; 12 needs 3.12+.
mitmproxy_spec_for() {
    case "$1" in
        3.11) echo "mitmproxy>=11,<12" ;;
        *) echo "mitmproxy>=12,<13" ;;
    esac
}

# ensure_venv DIR PYTHON: make DIR a venv of PYTHON with the project (and dev tools) installed.
ensure_venv() {
    local dir="$1" python="$2" version spec stamp
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    spec=$(mitmproxy_spec_for "$version")
    stamp="$version|$spec|$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)"
    if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.l402proxy-stamp" 2>/dev/null)" = "$stamp" ]; then
        return 0
    fi
    say "setting up $dir (Python $version, $spec) ..."
    rm -rf "$dir"
    "$python" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -e "$REPO[dev]" "$spec"
    echo "$stamp" > "$dir/.l402proxy-stamp"
}

# The main environment: the oldest supported Python we can find, so the demo runs anywhere.
ensure_main_venv() {
    local python version
    for version in 3.11 3.12 3.13; do
        if python=$(python_for "$version"); then
            ensure_venv "$REPO/.venv" "$python"
            return 0
        fi
    done
    say "l402proxy needs Python 3.11 or newer; none found (tried python3.11, python3.12, python3.13, python3)"
    return 1
}

# ensure_lnbits_venv: a real LNbits (1.6.2) for the tests in REPO/.venv-lnbits, apart from ours
# (it needs Python < 3.13 and pins its own dependencies). Prints the path of its `lnbits`
# command; fails loudly (non-zero, with the reason on stderr) when it cannot be built.
LNBITS_SPEC="lnbits==1.6.2"
ensure_lnbits_venv() {
    local dir="$REPO/.venv-lnbits" python="" version stamp
    for version in 3.11 3.12; do
        if python=$(python_for "$version"); then
            break
        fi
        python=""
    done
    if [ -z "$python" ]; then
        say "LNbits needs Python 3.11 or 3.12; none found (tried python3.11, python3.12, python3)"
        return 1
    fi
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    # bolt11 (an LNbits dependency) fails to import with bitstring 5.
    stamp="$version|$LNBITS_SPEC|bitstring<5"
    if [ -x "$dir/bin/lnbits" ] && [ "$(cat "$dir/.l402proxy-stamp" 2>/dev/null)" = "$stamp" ]; then
        echo "$dir/bin/lnbits"
        return 0
    fi
    say "setting up $dir (Python $version, $LNBITS_SPEC) for the LNbits tests ..."
    rm -rf "$dir"
    # Their output goes to stderr: stdout carries only the resulting path.
    if ! "$python" -m venv "$dir" >&2 \
        || ! "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
            "$LNBITS_SPEC" "bitstring<5" >&2 \
        || [ ! -x "$dir/bin/lnbits" ]; then
        say "could not install $LNBITS_SPEC into $dir (see the pip output above)"
        rm -rf "$dir"
        return 1
    fi
    echo "$stamp" > "$dir/.l402proxy-stamp"
    echo "$dir/bin/lnbits"
}
