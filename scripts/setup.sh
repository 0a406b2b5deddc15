#!/usr/bin/env bash
# Install everything vmtransport's tests and benchmarks need on Debian bookworm:
#   * system packages: QEMU 7.2, libvirt_iohelper, util-linux, e2fsprogs;
#   * QEMU 10.0 from bookworm-backports, unpacked (never installed) beside the system QEMU,
#     with a wrapper script $VMTRANSPORT_CACHE/bin/qemu-system-x86_64-10;
#   * the Python virtualenv .venv with the package installed editable.
# Idempotent: a second run checks, finds everything in place and does nothing.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${VMTRANSPORT_CACHE:-/var/cache/vmtransport}
QEMU10_DIR=$CACHE/qemu-10.0
QEMU10_WRAPPER=$CACHE/bin/qemu-system-x86_64-10
QEMU7=/usr/bin/qemu-system-x86_64
BACKPORTS_SOURCES=/etc/apt/sources.list.d/vmtransport-backports.sources
BACKPORTS_PREFS=/etc/apt/preferences.d/vmtransport-backports
# lzop, zstd, xz-utils, bzip2: the decompressors of compressed libvirt save images (tests).
# python3-venv: the .venv below (a minimal Debian has neither it nor python3); time:
# /usr/bin/time, which the benchmark and the page-lending tests run helpers under.
SYSTEM_PACKAGES=(qemu-system-x86 libvirt-daemon util-linux e2fsprogs lzop zstd xz-utils bzip2
                 python3-venv time)
# Packages unpacked for QEMU 10.0: the binary, its data/firmware, and its loadable modules
# (qemu-system-common; the wrapper sets QEMU_MODULE_DIR so 7.2's modules are never tried).
QEMU10_PACKAGES=(qemu-system-x86 qemu-system-data qemu-system-common)
# Firmware packages unpacked too when the system's copy is older than QEMU 10.0 asks for
# (bookworm's seabios is 1.16.2, QEMU 10.0 wants >> 1.16.3); the wrapper puts their
# directories before the built-in firmware path (which still points at the system's copies).
QEMU10_FIRMWARE=(seabios ipxe-qemu)
QEMU10_FIRMWARE_DIRS=(usr/share/qemu usr/share/seabios usr/lib/ipxe/qemu)
PYTHON_EXTRA_PACKAGES=()
# Plugins in this repository, installed editable beside the package (the tests use them).
PLUGINS=("$REPO/plugins/vmtransport-zstd")
export DEBIAN_FRONTEND=noninteractive

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo -E "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_update() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        as_root apt-get update -q >&2
        APT_UPDATED=1
    fi
}

is_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

# Write $2 to file $1 unless it already has exactly that content. Returns 0 when written.
write_if_changed() {
    local path=$1 content=$2
    if [[ -f $path ]] && [[ "$(cat "$path")" == "$content" ]]; then
        return 1
    fi
    log "writing $path"
    printf '%s\n' "$content" | as_root tee "$path" >/dev/null
    return 0
}

# --------------------------------------------------------------------------------------
# apt: bookworm-backports source, derived from the machine's own Debian source.
# Prints "URIS|SIGNED_BY" of the Debian entry that carries the suite bookworm.
debian_source() {
    local deb822=/etc/apt/sources.list.d/debian.sources found=""
    if [[ -f $deb822 ]]; then
        found=$(awk 'BEGIN { RS = ""; FS = "\n" }
            {
                uris = ""; suites = ""; signed = ""; types = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^#/) continue
                    if (match(line, /^[Uu][Rr][Ii][Ss]:[ \t]*/)) uris = substr(line, RLENGTH + 1)
                    else if (match(line, /^[Ss]uites:[ \t]*/)) suites = substr(line, RLENGTH + 1)
                    else if (match(line, /^[Ss]igned-[Bb]y:[ \t]*/)) signed = substr(line, RLENGTH + 1)
                    else if (match(line, /^[Tt]ypes:[ \t]*/)) types = substr(line, RLENGTH + 1)
                    else if (match(line, /^[Ee]nabled:[ \t]*/)) enabled = substr(line, RLENGTH + 1)
                }
                if (enabled == "no" || types !~ /(^|[ \t])deb([ \t]|$)/) next
                n = split(suites, s, /[ \t]+/)
                for (j = 1; j <= n; j++) if (s[j] == "bookworm") {
                    if (signed !~ /^\//) signed = ""   # inline keys: leave to default keyrings
                    print uris "|" signed
                    exit
                }
            }' "$deb822")
    fi
    if [[ -z $found && -f /etc/apt/sources.list ]]; then
        # One-line format: deb [options] URI SUITE COMPONENTS...
        found=$(awk '
            $1 != "deb" { next }
            {
                signed = ""; k = 2
                if ($2 ~ /^\[/) {
                    while (k <= NF) {
                        opt = $k; gsub(/[\[\]]/, "", opt)
                        if (opt ~ /^signed-by=/) { sub(/^signed-by=/, "", opt); signed = opt }
                        if ($k ~ /\]$/) { k++; break }
                        k++
                    }
                }
                if ($(k + 1) == "bookworm") { print $k "|" signed; exit }
            }' /etc/apt/sources.list)
    fi
    [[ -n $found ]] || return 1
    printf '%s\n' "$found"
}

ensure_backports_source() {
    local src uris signed content prefs changed=1
    src=$(debian_source) || die "no Debian bookworm entry found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
    uris=${src%%|*}
    signed=${src#*|}
    content="# Written by vmtransport's scripts/setup.sh: QEMU 10.0 is unpacked from here with
# apt-get download + dpkg -x; nothing is installed from it (see $BACKPORTS_PREFS).
Types: deb
URIs: $uris
Suites: bookworm-backports
Components: main"
    if [[ -n $signed ]]; then
        content+=$'\n'"Signed-By: $signed"
    fi
    prefs="# Written by vmtransport's scripts/setup.sh: never install or upgrade from backports.
Package: *
Pin: release n=bookworm-backports
Pin-Priority: 100"
    write_if_changed "$BACKPORTS_PREFS" "$prefs" || true
    if write_if_changed "$BACKPORTS_SOURCES" "$content"; then
        changed=0
    fi
    # New source, or lists never fetched for it: update.
    if [[ $changed -eq 0 ]] || ! apt-cache show qemu-system-x86/bookworm-backports >/dev/null 2>&1; then
        APT_UPDATED=0
        apt_update
    fi
}

# --------------------------------------------------------------------------------------
# System packages.
ensure_system_packages() {
    local missing=() pkg
    for pkg in "${SYSTEM_PACKAGES[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        apt_update
        log "apt-get install ${missing[*]}"
        # Explicit target release: backports stays out of the picture whatever its pin.
        as_root apt-get install -y -q -t bookworm --no-install-recommends "${missing[@]}" >&2
    fi
    [[ -x $QEMU7 ]] || die "$QEMU7 missing after installing qemu-system-x86"
    [[ -x /usr/lib/libvirt/libvirt_iohelper ]] || die "libvirt_iohelper missing"
}

# --------------------------------------------------------------------------------------
# QEMU 10.0, unpacked.
qemu10_ok() {
    [[ -x $QEMU10_WRAPPER ]] && "$QEMU10_WRAPPER" --version 2>/dev/null | grep -q 'version 10\.'
}

# Download package spec $1 (e.g. foo/bookworm-backports) into the cwd unless it is there
# already; prints the .deb path. Fails when the release has no such package.
download_deb() {
    local spec=$1 info pkg ver arch file
    info=$(apt-cache show --no-all-versions "$spec" 2>/dev/null) || return 1
    pkg=$(sed -n 's/^Package: //p' <<<"$info" | head -n1)
    ver=$(sed -n 's/^Version: //p' <<<"$info" | head -n1)
    arch=$(sed -n 's/^Architecture: //p' <<<"$info" | head -n1)
    [[ -n $pkg && -n $ver && -n $arch ]] || return 1
    file="${pkg}_${ver//:/%3a}_${arch}.deb"   # apt-get download's naming
    if [[ ! -f $file ]]; then
        apt-get download -q "$spec" >&2 || return 1
    fi
    [[ -f $file ]] || return 1
    printf './%s\n' "$file"
}

# Is dependency alternative "name (op version)" satisfied by an installed package or by a
# package already unpacked into $QEMU10_DIR.tmp (recorded in $UNPACKED)?
dep_satisfied() {
    local alt=$1 name op ver have
    name=$(sed -E 's/[[:space:]]*\(.*//; s/:any$//' <<<"$alt")
    op=$(sed -nE 's/.*\(([<>=]+)[[:space:]]*([^)]*)\).*/\1/p' <<<"$alt")
    ver=$(sed -nE 's/.*\(([<>=]+)[[:space:]]*([^)]*)\).*/\2/p' <<<"$alt")
    have=$(awk -v n="$name" '$1 == n { print $2 }' "$UNPACKED")
    if [[ -z $have ]] && is_installed "$name"; then
        have=$(dpkg-query -W -f='${Version}' "$name")
    fi
    if [[ -z $have ]]; then
        # A virtual package provided by something installed counts too (no versions then).
        [[ -z $op ]] && dpkg-query -W -f='${Provides}\n' 2>/dev/null |
            tr ',' '\n' | sed -E 's/^[[:space:]]*//; s/[[:space:]]*\(.*//' | grep -qx "$name"
        return
    fi
    [[ -z $op ]] && return 0
    case $op in
        '>>') op=gt ;; '<<') op=lt ;; '>=') op=ge ;; '<=') op=le ;; '=') op=eq ;;
    esac
    dpkg --compare-versions "$have" "$op" "$ver"
}

# Unpack shared-library packages that the unpacked debs depend on but the system lacks
# (or has too old): from bookworm-backports when it has them, else from bookworm.
unpack_missing_libs() {
    local deb depends group alt satisfied name pass
    for pass in 1 2 3; do
        local fetched=0
        for deb in ./*.deb; do
            grep -qx "$(basename "$deb")" "$UNPACKED_DEBS" || continue
            depends=$(dpkg-deb -f "$deb" Pre-Depends Depends | sed -E 's/^[A-Za-z-]+: //' | tr '\n' ',')
            while IFS= read -r group; do
                group=$(sed -E 's/^[[:space:]]+|[[:space:]]+$//g' <<<"$group")
                [[ -n $group ]] || continue
                satisfied=1
                while IFS= read -r alt; do
                    alt=$(sed -E 's/^[[:space:]]+|[[:space:]]+$//g' <<<"$alt")
                    if dep_satisfied "$alt"; then satisfied=0; break; fi
                done < <(tr '|' '\n' <<<"$group")
                [[ $satisfied -eq 0 ]] && continue
                name=$(sed -E 's/[[:space:]]*\(.*//; s/:any$//; s/[[:space:]]*\|.*//' <<<"$group")
                # Only libraries and firmware matter for running the binary unpacked.
                if [[ $name != lib* && " ${QEMU10_FIRMWARE[*]} " != *" $name "* ]]; then
                    log "ignoring unmet dependency: $group"
                    continue
                fi
                log "unmet dependency '$group': unpacking $name"
                local got=""
                got=$(download_deb "$name/bookworm-backports" 2>/dev/null) ||
                    got=$(download_deb "$name") || die "cannot download $name"
                dpkg -x "$got" "$QEMU10_DIR.tmp"
                basename "$got" >>"$UNPACKED_DEBS"
                printf '%s %s\n' "$(dpkg-deb -f "$got" Package)" "$(dpkg-deb -f "$got" Version)" >>"$UNPACKED"
                fetched=1
            done < <(tr ',' '\n' <<<"$depends")
        done
        [[ $fetched -eq 0 ]] && return 0
    done
}

ensure_qemu10() {
    if qemu10_ok; then
        return 0
    fi
    ensure_backports_source
    local debs=$CACHE/debs pkg deb link target
    as_root mkdir -p "$debs" "$CACHE/bin"
    rm -rf "$QEMU10_DIR.tmp"
    mkdir -p "$QEMU10_DIR.tmp"
    UNPACKED=$(mktemp)
    UNPACKED_DEBS=$(mktemp)
    # shellcheck disable=SC2064
    trap "rm -f '$UNPACKED' '$UNPACKED_DEBS'" EXIT
    (
        cd "$debs"
        # apt's _apt sandbox user must be able to write here, or apt warns.
        chown _apt "$debs" 2>/dev/null || true
        for pkg in "${QEMU10_PACKAGES[@]}"; do
            log "downloading $pkg/bookworm-backports"
            deb=$(download_deb "$pkg/bookworm-backports") || die "cannot download $pkg/bookworm-backports"
            dpkg -x "$deb" "$QEMU10_DIR.tmp"
            basename "$deb" >>"$UNPACKED_DEBS"
            printf '%s %s\n' "$(dpkg-deb -f "$deb" Package)" "$(dpkg-deb -f "$deb" Version)" >>"$UNPACKED"
        done
        unpack_missing_libs
    )
    # Relative symlinks that leave the unpacked tree (seabios, ipxe, ovmf, ...) point to
    # packages we did not unpack: point them at the system's copies instead.
    while IFS= read -r link; do
        target=$(readlink "$link")
        [[ $target == /* ]] && continue
        local rel=${link#"$QEMU10_DIR.tmp"}
        local sys
        sys=$(realpath -m "$(dirname "$rel")/$target")
        if [[ -e $sys ]]; then
            ln -sfn "$sys" "$link"
        fi
    done < <(find "$QEMU10_DIR.tmp" -xtype l)

    local libpath="" d
    for d in "$QEMU10_DIR/usr/lib/x86_64-linux-gnu" "$QEMU10_DIR/lib/x86_64-linux-gnu"; do
        # Only library directories that hold shared objects other than QEMU's own modules.
        if compgen -G "$QEMU10_DIR.tmp${d#"$QEMU10_DIR"}/*.so*" >/dev/null; then
            libpath+="${libpath:+:}$d"
        fi
    done
    rm -rf "$QEMU10_DIR"
    mv "$QEMU10_DIR.tmp" "$QEMU10_DIR"
    {
        printf '#!/bin/sh\n'
        printf '# QEMU 10.0 from bookworm-backports, unpacked by vmtransport scripts/setup.sh.\n'
        if [[ -n $libpath ]]; then
            printf 'LD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' "$libpath"
            printf 'export LD_LIBRARY_PATH\n'
        fi
        printf 'QEMU_MODULE_DIR=%s\n' "$QEMU10_DIR/usr/lib/x86_64-linux-gnu/qemu"
        printf 'export QEMU_MODULE_DIR\n'
        printf 'exec %s' "$QEMU10_DIR/usr/bin/qemu-system-x86_64"
        for d in "${QEMU10_FIRMWARE_DIRS[@]}"; do
            if [[ -d $QEMU10_DIR/$d ]]; then
                printf ' -L %s' "$QEMU10_DIR/$d"
            fi
        done
        printf ' "$@"\n'
    } >"$QEMU10_WRAPPER.tmp"
    chmod 755 "$QEMU10_WRAPPER.tmp"
    mv "$QEMU10_WRAPPER.tmp" "$QEMU10_WRAPPER"
    if ! qemu10_ok; then
        "$QEMU10_WRAPPER" --version >&2 || true
        LD_LIBRARY_PATH=$libpath ldd "$QEMU10_DIR/usr/bin/qemu-system-x86_64" | grep -i 'not found' >&2 || true
        die "QEMU 10.0 does not run from $QEMU10_DIR"
    fi
    log "QEMU 10.0 unpacked into $QEMU10_DIR"
}

# --------------------------------------------------------------------------------------
# Python.
# pip install into venv $1; its output (the build backend's deprecation notices among it)
# is shown only when it fails.
quiet_pip() {
    local venv=$1 out
    shift
    out=$(mktemp)
    if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$out" 2>&1; then
        cat "$out" >&2
        rm -f "$out"
        die "pip install $* failed"
    fi
    rm -f "$out"
}

ensure_python() {
    local venv=$REPO/.venv stamp want
    stamp=$venv/.vmtransport-setup-stamp
    if [[ ! -x $venv/bin/python ]]; then
        log "creating $venv"
        python3 -m venv "$venv"
    fi
    want="$(cat "$REPO/pyproject.toml" "${PLUGINS[@]/%//pyproject.toml}" | sha256sum | cut -d' ' -f1) compat pip25 ${PYTHON_EXTRA_PACKAGES[*]}"
    if [[ -f $stamp ]] && [[ "$(cat "$stamp")" == "$want" ]] &&
        "$venv/bin/python" -c 'import vmtransport' 2>/dev/null &&
        [[ -x $venv/bin/vmtransport ]]; then
        return 0
    fi
    # pip >= 25 writes console scripts that do not import re (~15 ms of the save
    # helper's start-up, before its reader runs and while QEMU's pipe fills).
    if ! "$venv/bin/python" -c 'import sys, pip; sys.exit(int(pip.__version__.split(".")[0]) < 25)'; then
        log "upgrading pip in $venv"
        quiet_pip "$venv" 'pip>=25'
    fi
    log "pip install -e '.[test,lint,docs]' ${PLUGINS[*]#"$REPO/"} ${PYTHON_EXTRA_PACKAGES[*]}"
    # editable_mode=compat: a plain path entry instead of setuptools' import-hook finder,
    # which costs ~35 ms at every start of the save helper (QEMU waits on it).
    # The plugins in the same command: pip takes their vmtransport requirement from the
    # checkout, never from an index.
    quiet_pip "$venv" --config-settings editable_mode=compat -e "$REPO[test,lint,docs]" \
        "${PLUGINS[@]/#/-e}" "${PYTHON_EXTRA_PACKAGES[@]}"
    printf '%s\n' "$want" >"$stamp"
}

ensure_system_packages
ensure_qemu10
ensure_python
# Byte-compile the package: where PYTHONDONTWRITEBYTECODE is set nothing else would, and
# every helper start would compile it again (QEMU waits for the save helper's start).
"$REPO/.venv/bin/python" -m compileall -q "$REPO/vmtransport" "$REPO/plugins" >/dev/null

printf 'QEMU 7.2:  %s  (%s)\n' "$QEMU7" "$("$QEMU7" --version | head -n1)"
printf 'QEMU 10.0: %s  (%s)\n' "$QEMU10_WRAPPER" "$("$QEMU10_WRAPPER" --version | head -n1)"
