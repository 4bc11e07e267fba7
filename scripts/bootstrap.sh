#!/usr/bin/env bash
# shellcheck shell=bash
# scripts/bootstrap.sh: get a working development environment for steadyrabbit.
#
# Meant to be sourced by other scripts (bash):
#
#     source scripts/bootstrap.sh
#
# It makes sure that
#   * a Python >= 3.11 exists (on Debian, as root, it may apt-get install python3),
#   * .venv exists in the repository root and has `pip install -e '.[dev,speed]'` in it
#     (skipped while pyproject.toml is unchanged: a stamp file inside .venv holds its hash),
#   * a RabbitMQ broker answers on 127.0.0.1:5672 (started, or on Debian as root
#     installed with apt-get, when it does not), unless STEADYRABBIT_URL names a broker
#     on another host,
#   * Chromium is installed (the status page's tests run it headless): on Debian as root
#     it is installed with apt-get when missing; otherwise a missing one is only reported
#     (those tests then fail and say so), and STEADYRABBIT_SKIP_BROWSER=1 skips all this,
# and then exports VENV (and VIRTUAL_ENV) and puts .venv/bin first on PATH.
#
# When nothing has to be done it takes a few tens of milliseconds and prints nothing.
# Messages go to stderr, prefixed with "bootstrap: ". If it cannot succeed, it says why
# in one line and stops the sourcing script (exit 1); an interactive shell that sourced
# it only gets a non-zero return instead.
#
# The work runs in a child bash process with `set -euo pipefail`, so sourcing this file
# changes nothing in the caller's shell but VENV, VIRTUAL_ENV and PATH (and unsets
# PYTHONHOME); it also works when executed directly (`bash scripts/bootstrap.sh`), which
# prepares everything but of course cannot change the caller's environment.

if [ -z "${BASH_VERSION:-}" ]; then
    echo "bootstrap: scripts/bootstrap.sh needs bash (source it from a bash script)" >&2
    # shellcheck disable=SC2317  # `exit` is reached when this file is executed, not sourced
    return 1 2>/dev/null || exit 1
fi

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # ---- sourced: do the work in a child process, then adjust the caller's environment.
    _sr_root=$(CDPATH='' cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd) &&
        "${BASH:-bash}" -- "$_sr_root/scripts/bootstrap.sh" </dev/null
    _sr_rc=$?
    if [[ $_sr_rc -ne 0 ]]; then
        unset _sr_root _sr_rc
        if [[ $- == *i* ]]; then
            return 1
        fi
        exit 1
    fi
    export VENV="$_sr_root/.venv"
    export VIRTUAL_ENV="$VENV"
    if [[ ":$PATH:" != ":$VENV/bin:"* ]]; then
        export PATH="$VENV/bin:$PATH"
    fi
    unset PYTHONHOME _sr_root _sr_rc
    hash -r
    return 0
fi

# ---- executed (directly, or as the child of a sourcing script): do the work.
set -euo pipefail

ROOT=$(CDPATH='' cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/scripts/bootstrap.sh"
VENV="$ROOT/.venv"
STAMP="$VENV/.steadyrabbit-bootstrap"
EXTRAS="dev,speed"
STAMP_FORMAT=1
RABBIT_WAIT_SECONDS=60
APT_UPDATED=""

log() { printf 'bootstrap: %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}
have() { # an executable command (bash's `command -v` also finds non-executable files)
    local p
    p=$(command -v "$1" 2>/dev/null) && [[ $p != */* || -x $p ]]
}
is_root() { [[ $EUID -eq 0 ]]; }
can_apt() { is_root && have apt-get; }

file_hash() {
    if have sha256sum; then
        sha256sum <"$1" | cut -c1-64
    elif have shasum; then
        shasum -a 256 <"$1" | cut -c1-64
    else
        cksum <"$1"
    fi
}

# ------------------------------------------------------------------------------ apt-get
# Output goes to a log file, shown only on failure (also so that a daemon that a package's
# postinst starts does not inherit our stdout/stderr and keep a caller's pipe open).
apt_run() {
    local out rc=0
    out=$(mktemp "${TMPDIR:-/tmp}/steadyrabbit-apt.XXXXXX")
    DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 "$@" \
        </dev/null >"$out" 2>&1 || rc=$?
    if [[ $rc -ne 0 ]]; then
        tail -n 30 "$out" >&2
        rm -f "$out"
        die "'apt-get $*' failed (exit $rc; output above)"
    fi
    rm -f "$out"
}

apt_install() {
    if [[ -z $APT_UPDATED ]]; then
        log "apt-get update"
        apt_run update
        APT_UPDATED=1
    fi
    log "apt-get install $* (one-time; this can take a minute)"
    apt_run install "$@"
}

# ------------------------------------------------------------------------------- python
# Prints the path and the version of the first Python >= 3.11 found, on two lines.
find_python() {
    local c out
    for c in python3.13 python3.12 python3.11 python3; do
        have "$c" || continue
        # (a pyenv shim for a version that is not selected fails here, and is skipped)
        out=$("$c" -c 'import platform, sys
if sys.version_info < (3, 11):
    sys.exit(1)
print(sys.executable or "")
print(platform.python_version())' 2>/dev/null </dev/null) || continue
        local exe ver
        {
            read -r exe
            read -r ver
        } <<<"$out"
        [[ -n $exe && -x $exe ]] || exe=$(command -v "$c")
        printf '%s\n%s\n' "$exe" "$ver"
        return 0
    done
    return 1
}

venv_python_ok() {
    [[ -x "$VENV/bin/python" ]] &&
        "$VENV/bin/python" -I -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            >/dev/null 2>&1 </dev/null
}

stamp_wanted() {
    printf 'format %s\nvenv %s\nextras %s\npyproject.toml sha256 %s\n' \
        "$STAMP_FORMAT" "$VENV" "$EXTRAS" "$(file_hash "$ROOT/pyproject.toml")"
}

stamp_current() {
    [[ -f $STAMP ]] && [[ "$(<"$STAMP")" == "$1" ]] && venv_python_ok
}

# Why an existing .venv cannot be used as it is (empty output: it can).
venv_defect() {
    if ! venv_python_ok; then
        echo "its python does not run or is older than 3.11"
    elif ! "$VENV/bin/python" -I -m pip --version >/dev/null 2>&1 </dev/null; then
        echo "it has no pip"
    elif [[ -f "$VENV/bin/pip" ]] && ! grep -qF "$VENV/bin/python" "$VENV/bin/pip"; then
        echo "it was made for another directory"
    elif [[ -f $STAMP ]] && ! grep -qxF "venv $VENV" "$STAMP"; then
        echo "it was made for another directory"
    fi
}

create_venv() {
    local found py ver out
    if ! found=$(find_python); then
        if can_apt; then
            log "no Python >= 3.11 found; installing Debian's python3"
            apt_install python3 python3-venv
            found=$(find_python) ||
                die "Python 3.11+ is required, and Debian's python3 here is older (or still missing): install Python 3.11 or newer (e.g. with pyenv) and re-run"
        else
            die "Python 3.11+ is required but none was found (tried python3.13, python3.12, python3.11, python3): install Python 3.11 or newer (Debian/Ubuntu: sudo apt-get install python3 python3-venv) and re-run"
        fi
    fi
    {
        read -r py
        read -r ver
    } <<<"$found"

    log "creating .venv with $py (Python $ver)"
    if out=$("$py" -m venv "$VENV" 2>&1 </dev/null); then
        return 0
    fi
    rm -rf "$VENV"
    if grep -qiE 'ensurepip|-venv|No module named venv' <<<"$out"; then
        if can_apt; then
            local pkgs=(python3-venv) short
            short=$(cut -d. -f1,2 <<<"$ver")
            if [[ -z $APT_UPDATED ]]; then
                log "apt-get update"
                apt_run update
                APT_UPDATED=1
            fi
            if apt-cache show "python$short-venv" >/dev/null 2>&1; then
                pkgs+=("python$short-venv")
            fi
            apt_install "${pkgs[@]}"
            if out=$("$py" -m venv "$VENV" 2>&1 </dev/null); then
                return 0
            fi
            rm -rf "$VENV"
            printf '%s\n' "$out" >&2
            die "'$py -m venv .venv' still fails after installing ${pkgs[*]} (output above)"
        fi
        die "cannot create .venv: $py lacks venv/ensurepip; install it (Debian/Ubuntu: sudo apt-get install python3-venv) and re-run"
    fi
    printf '%s\n' "$out" >&2
    die "'$py -m venv .venv' failed (output above)"
}

ensure_venv() {
    local want defect
    want=$(stamp_wanted)
    stamp_current "$want" && return 0

    # Slow path: serialise concurrent bootstraps (e.g. scripts/demo and scripts/test).
    if have flock; then
        exec 9<"$SELF"
        flock -w 900 9 || die "timed out waiting for another bootstrap to finish"
        want=$(stamp_wanted)
        if stamp_current "$want"; then
            exec 9<&-
            return 0
        fi
    fi

    if [[ -e $VENV ]]; then
        defect=$(venv_defect)
        if [[ -n $defect ]]; then
            log "recreating .venv: $defect"
            rm -rf "$VENV"
        fi
    fi
    [[ -e $VENV ]] || create_venv

    log "installing steadyrabbit[$EXTRAS] (editable) and its dependencies into .venv"
    # pip's output (and its build backend's warnings) go to a log, shown only on failure.
    local rc=0 pip_log="$VENV/.bootstrap-pip.log"
    (cd "$ROOT" && "$VENV/bin/python" -m pip install --disable-pip-version-check \
        --no-input -e ".[$EXTRAS]" </dev/null >"$pip_log" 2>&1) || rc=$?
    if [[ $rc -ne 0 ]]; then
        tail -n 40 "$pip_log" >&2
        die "'pip install -e .[$EXTRAS]' failed (exit $rc; its last lines are above, all of it in .venv/${pip_log##*/}); fix that and re-run"
    fi
    printf '%s\n' "$want" >"$STAMP.tmp"
    mv -f "$STAMP.tmp" "$STAMP"
    log ".venv is ready"
    if have flock; then
        exec 9<&-
    fi
}

# ------------------------------------------------------------------------------- broker
# True when something accepts TCP connections on host:port.
port_open() {
    if have timeout; then
        # shellcheck disable=SC2016  # expanded by the inner bash
        timeout 5 "${BASH:-bash}" -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" >/dev/null 2>&1
    else
        (exec 3<>"/dev/tcp/$1/$2") >/dev/null 2>&1
    fi
}

local_broker_up() { # port
    port_open 127.0.0.1 "$1" || port_open ::1 "$1"
}

find_rabbitmq_server() {
    local p
    if have rabbitmq-server; then
        p=$(command -v rabbitmq-server)
        printf '%s\n' "$p"
        return 0
    fi
    # /usr/sbin is often not on a non-root user's PATH
    for p in /usr/sbin/rabbitmq-server /usr/local/sbin/rabbitmq-server \
        /opt/homebrew/sbin/rabbitmq-server; do
        if [[ -x $p ]]; then
            printf '%s\n' "$p"
            return 0
        fi
    done
    return 1
}

HOW_TO_BROKER="install and start RabbitMQ (Debian/Ubuntu: sudo apt-get install -y rabbitmq-server && sudo rabbitmq-server -detached), or set STEADYRABBIT_URL=amqp://USER:PASSWORD@HOST:5672/ to use another broker"

ensure_broker() {
    local url=${STEADYRABBIT_URL:-} port=5672
    if [[ -n $url ]]; then
        local scheme rest authority host
        if [[ $url == *://* ]]; then
            scheme=${url%%://*}
            rest=${url#*://}
        else
            scheme=amqp
            rest=$url
        fi
        authority=${rest%%[/?#]*}
        authority=${authority##*@}
        if [[ $authority == \[* ]]; then # [v6-address]:port
            host=${authority#\[}
            host=${host%%]*}
            port=${authority#*]}
            port=${port#:}
        else
            host=${authority%%:*}
            port=""
            if [[ $authority == *:* ]]; then
                port=${authority##*:}
            fi
        fi
        if [[ -z $port ]]; then
            case $scheme in
                amqps | AMQPS) port=5671 ;;
                *) port=5672 ;;
            esac
        fi
        case $host in
            "" | localhost | localhost.localdomain | 127.* | ::1 | 0.0.0.0) ;;
            *) return 0 ;; # a broker elsewhere: not ours to start
        esac
        # Name the host part only: the URL may carry a password.
        [[ $port =~ ^[0-9]+$ ]] || die "cannot read the port in STEADYRABBIT_URL (host part: $authority)"
    fi

    local_broker_up "$port" && return 0

    if [[ $port != 5672 ]]; then
        die "nothing answers on 127.0.0.1:$port (from STEADYRABBIT_URL): start your broker there, or unset STEADYRABBIT_URL to use a RabbitMQ on 127.0.0.1:5672"
    fi

    local server
    if ! server=$(find_rabbitmq_server); then
        if can_apt; then
            log "no RabbitMQ answers on 127.0.0.1:5672 and rabbitmq-server is not installed"
            apt_install rabbitmq-server
            server=$(find_rabbitmq_server) ||
                die "rabbitmq-server is still missing after 'apt-get install rabbitmq-server'; $HOW_TO_BROKER"
        else
            die "no RabbitMQ answers on 127.0.0.1:5672 and rabbitmq-server is not installed: $HOW_TO_BROKER"
        fi
    fi

    # (a package's postinst may have started it already)
    local_broker_up 5672 && return 0

    # Only root starts the system's RabbitMQ (Debian's wrapper refuses anyone else, after
    # first trying to run the node in the foreground); a user's own install (say,
    # Homebrew's) is started by that user.
    if ! is_root && ! [[ -O $server ]]; then
        die "RabbitMQ is installed but not running on 127.0.0.1:5672: start it (sudo rabbitmq-server -detached, or sudo systemctl start rabbitmq-server), or set STEADYRABBIT_URL=amqp://USER:PASSWORD@HOST:5672/ to use another broker"
    fi
    log "starting RabbitMQ ($server -detached) and waiting up to ${RABBIT_WAIT_SECONDS}s for 127.0.0.1:5672"
    local out rc=0 start=$SECONDS
    out=$(mktemp "${TMPDIR:-/tmp}/steadyrabbit-rabbitmq-start.XXXXXX")
    # The daemon must not inherit our stdout/stderr (a caller's pipe would never close)
    # nor the terminal's process group (Ctrl-C in the caller must not stop it).
    if is_root && [[ -d /run/systemd/system ]] && have systemctl; then
        systemctl start rabbitmq-server </dev/null >"$out" 2>&1 || rc=$?
    elif have setsid; then
        setsid "$server" -detached </dev/null >"$out" 2>&1 || rc=$?
    else
        "$server" -detached </dev/null >"$out" 2>&1 || rc=$?
    fi
    if [[ $rc -ne 0 ]] && ! local_broker_up 5672; then
        tail -n 20 "$out" >&2
        rm -f "$out"
        die "starting RabbitMQ failed (exit $rc; its output, if any, is above; logs in /var/log/rabbitmq/): start it by hand, or set STEADYRABBIT_URL=amqp://USER:PASSWORD@HOST:5672/ to use another broker"
    fi
    until local_broker_up 5672; do
        if ((SECONDS - start >= RABBIT_WAIT_SECONDS)); then
            tail -n 20 "$out" >&2
            rm -f "$out"
            die "RabbitMQ did not answer on 127.0.0.1:5672 within ${RABBIT_WAIT_SECONDS}s after starting it (logs in /var/log/rabbitmq/); start it by hand, or set STEADYRABBIT_URL to use another broker"
        fi
        sleep 0.5
    done
    rm -f "$out"
    log "RabbitMQ answers on 127.0.0.1:5672 (after $((SECONDS - start))s)"
}

# ------------------------------------------------------------------------------ browser
have_chromium() { have chromium || have chromium-browser; }

ensure_browser() {
    [[ ${STEADYRABBIT_SKIP_BROWSER:-} == 1 ]] && return 0
    have_chromium && return 0
    if can_apt; then
        log "chromium is not installed (the status page's tests run it headless)"
        apt_install chromium
        have_chromium || die "chromium is still missing after 'apt-get install chromium'"
        return 0
    fi
    # Only the browser tests need it: they fail with this advice; nothing else is held up.
    log "chromium is not installed: the status page's tests will fail (Debian/Ubuntu: sudo apt-get install -y chromium; or set STEADYRABBIT_SKIP_BROWSER=1 to skip them)"
}

ensure_venv
ensure_broker
ensure_browser
