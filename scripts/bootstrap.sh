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
#   * PostgreSQL answers on 127.0.0.1:5432 as user postgres, without a password, with a
#     database test, and Redis answers PING on 127.0.0.1:6379 (each started when installed,
#     or on Debian as root installed with apt-get; PostgreSQL then gets trust for user
#     postgres from 127.0.0.1 and ::1 in its pg_hba.conf and the database test), unless
#     STEADYRABBIT_TEST_POSTGRES / STEADYRABBIT_TEST_REDIS name the servers the tests use,
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
SERVICE_WAIT_SECONDS=60 # PostgreSQL and Redis
PG_PORT=5432
REDIS_PORT=6379
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

# Serialise the slow paths of concurrent bootstraps (e.g. scripts/demo and scripts/test).
lock() {
    have flock || return 0
    exec 9<"$SELF"
    flock -w 900 9 || die "timed out waiting for another bootstrap to finish"
}
unlock() {
    have flock || return 0
    exec 9<&-
}

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
# postinst starts does not inherit our stdout/stderr and keep a caller's pipe open, nor the
# lock's descriptor 9 and with it the lock).
apt_run() {
    local out rc=0
    out=$(mktemp "${TMPDIR:-/tmp}/steadyrabbit-apt.XXXXXX")
    DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 "$@" \
        </dev/null >"$out" 2>&1 9<&- || rc=$?
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

    # Slow path: serialise concurrent bootstraps.
    lock
    want=$(stamp_wanted)
    if stamp_current "$want"; then
        unlock
        return 0
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
    unlock
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

# ------------------------------------------------------------------ PostgreSQL and Redis
# Starts a service's daemon and waits until CHECK PORT succeeds: as root on a machine run by
# systemd, `systemctl start UNIT` (when UNIT is not empty); otherwise COMMAND..., in a
# session of its own (as for RabbitMQ: the daemon must not keep a caller's pipe open, nor
# get the terminal's Ctrl-C; nor inherit descriptor 9, which would hold the lock for as long
# as it runs). HINT ends the message when it does not come up.
start_and_wait() { # what unit check port hint command...
    local what=$1 unit=$2 check=$3 port=$4 hint=$5
    shift 5
    log "starting $what and waiting up to ${SERVICE_WAIT_SECONDS}s for 127.0.0.1:$port"
    local out rc=0 start=$SECONDS
    out=$(mktemp "${TMPDIR:-/tmp}/steadyrabbit-start.XXXXXX")
    if [[ -n $unit ]] && is_root && [[ -d /run/systemd/system ]] && have systemctl; then
        systemctl start "$unit" </dev/null >"$out" 2>&1 9<&- || rc=$?
    elif have setsid; then
        setsid "$@" </dev/null >"$out" 2>&1 9<&- || rc=$?
    else
        "$@" </dev/null >"$out" 2>&1 9<&- || rc=$?
    fi
    until "$check" "$port"; do
        if [[ $rc -ne 0 ]]; then
            tail -n 20 "$out" >&2
            rm -f "$out"
            die "starting $what failed (exit $rc; its output, if any, is above): $hint"
        fi
        if ((SECONDS - start >= SERVICE_WAIT_SECONDS)); then
            tail -n 20 "$out" >&2
            rm -f "$out"
            die "$what did not answer on 127.0.0.1:$port within ${SERVICE_WAIT_SECONDS}s after starting it: $hint"
        fi
        sleep 0.5
    done
    rm -f "$out"
    log "$what answers on 127.0.0.1:$port (after $((SECONDS - start))s)"
}

# ---------------------------------------------------------------------------- PostgreSQL
# The tests connect to postgresql://postgres@127.0.0.1:5432/test (tests/test_lease_stores.py)
# unless STEADYRABBIT_TEST_POSTGRES names another server, which is then used as it is.
HOW_TO_POSTGRES="or set STEADYRABBIT_TEST_POSTGRES=postgresql://USER@HOST:PORT/DATABASE to use another server"
HOW_TO_LET_IN="let user postgres in from 127.0.0.1 without a password (a line 'host all postgres 127.0.0.1/32 trust' before the other rules of pg_hba.conf, then reload) and create database test (sudo -u postgres createdb test)"
HBA_MARK="# steadyrabbit's tests (scripts/bootstrap.sh): user postgres from this host, no password"

# Succeeds when user postgres connects to database test on 127.0.0.1:PORT without a
# password, as the tests do; otherwise prints libpq's reason on one line and fails.
postgres_problem() { # port
    local out rc=0
    if have psql; then
        out=$(PGCONNECT_TIMEOUT=5 psql -X -w -q -At -h 127.0.0.1 -p "$1" -U postgres -d test \
            -c 'select 1' 2>&1 </dev/null) || rc=$?
    else # the tests' own driver, in .venv
        out=$(PGCONNECT_TIMEOUT=5 "$VENV/bin/python" -I -c 'import sys, psycopg
try:
    psycopg.connect(host="127.0.0.1", port=sys.argv[1], user="postgres", dbname="test").close()
except Exception as error:
    sys.exit(str(error))' "$1" 2>&1 </dev/null) || rc=$?
    fi
    [[ $rc -eq 0 ]] && return 0
    # psql: error: connection to server at "127.0.0.1", port 5432 failed: FATAL:  ...\n\tHint
    out=$(tr '\t\n' '  ' <<<"$out" | sed -e 's/^psql: error: //' -e 's/  */ /g' -e 's/ $//')
    printf '%s\n' "${out:-psql failed with exit status $rc}"
    return 1
}

pg_listening() { port_open 127.0.0.1 "$1"; }

# The installed server versions of Debian's packaging, newest last.
pg_versions() {
    local p
    for p in /usr/lib/postgresql/*/bin/postgres; do
        if [[ -x $p ]]; then
            p=${p%/bin/postgres}
            printf '%s\n' "${p##*/}"
        fi
    done | sort -V
}

pg_installed() { [[ -n $(pg_versions) ]] || have postgres || have pg_ctl; }

# Debian's cluster (pg_lsclusters) on PORT, as "version name status owner".
pg_cluster_on() { # port
    have pg_lsclusters || return 1
    local ver name port status owner rest
    while read -r ver name port status owner rest; do
        if [[ $port == "$1" ]]; then
            printf '%s %s %s %s\n' "$ver" "$name" "$status" "$owner"
            return 0
        fi
    done < <(pg_lsclusters -h 2>/dev/null)
    return 1
}

# Nothing answers on 127.0.0.1:PORT: start the installed PostgreSQL (as root on Debian,
# installing it first when it is missing), or stop with what to do.
start_postgres() { # port
    local port=$1 cluster ver name status owner
    if ! pg_installed; then
        if ! can_apt; then
            die "no PostgreSQL answers on 127.0.0.1:$port and it is not installed: install it (Debian/Ubuntu: sudo apt-get install -y postgresql), $HOW_TO_LET_IN, $HOW_TO_POSTGRES"
        fi
        log "no PostgreSQL answers on 127.0.0.1:$port and it is not installed"
        apt_install postgresql
        pg_installed || die "PostgreSQL is still missing after 'apt-get install postgresql'; install it by hand, $HOW_TO_POSTGRES"
    fi
    if ! have pg_lsclusters; then # not Debian's packaging: it has its own ways of starting
        die "PostgreSQL is installed but does not answer on 127.0.0.1:$port: start it there, $HOW_TO_POSTGRES"
    fi
    if ! cluster=$(pg_cluster_on "$port"); then
        ver=$(pg_versions | tail -n 1)
        if ! is_root || [[ -z $ver || -n $(pg_lsclusters -h 2>/dev/null) ]]; then
            die "no PostgreSQL cluster here uses port $port (pg_lsclusters lists them): create one (Debian: sudo pg_createcluster VERSION main -p $port), $HOW_TO_POSTGRES"
        fi
        log "creating PostgreSQL cluster $ver/main on port $port"
        local out rc=0
        out=$(pg_createcluster "$ver" main -p "$port" 2>&1 </dev/null) || rc=$?
        if [[ $rc -ne 0 ]]; then
            printf '%s\n' "$out" | tail -n 20 >&2
            die "'pg_createcluster $ver main -p $port' failed (exit $rc; output above): $HOW_TO_POSTGRES"
        fi
        cluster=$(pg_cluster_on "$port") || die "pg_lsclusters shows no cluster on port $port after 'pg_createcluster $ver main -p $port': $HOW_TO_POSTGRES"
    fi
    read -r ver name status owner <<<"$cluster"
    # (a package's postinst may have started it already)
    pg_listening "$port" && return 0
    if [[ $status == online* ]]; then
        die "PostgreSQL cluster $ver/$name runs but does not listen on 127.0.0.1:$port: set listen_addresses = 'localhost' in /etc/postgresql/$ver/$name/postgresql.conf and restart it, $HOW_TO_POSTGRES"
    fi
    if ! is_root; then
        die "PostgreSQL is installed but not running on 127.0.0.1:$port: start it (sudo pg_ctlcluster $ver $name start, or sudo systemctl start postgresql), $HOW_TO_POSTGRES"
    fi
    start_and_wait "PostgreSQL $ver/$name" "postgresql@$ver-$name" pg_listening "$port" \
        "start it by hand (logs in /var/log/postgresql/), $HOW_TO_POSTGRES" \
        pg_ctlcluster "$ver" "$name" start
}

# PostgreSQL answers on 127.0.0.1:PORT but refuses the tests' connection (PROBLEM): as root,
# with Debian's cluster on that port, let user postgres in from this host without a
# password and create database test; otherwise stop with what to do.
configure_postgres() { # port problem
    local port=$1 problem=$2 cluster ver name status owner hba tmp
    if ! is_root || ! have runuser || ! cluster=$(pg_cluster_on "$port"); then
        die "PostgreSQL on 127.0.0.1:$port refuses the tests' connection as user postgres to database test ($problem): $HOW_TO_LET_IN, $HOW_TO_POSTGRES"
    fi
    read -r ver name status owner <<<"$cluster"
    # as the cluster's owner, over its Unix socket (peer authentication)
    local admin=(runuser -u "$owner" -- psql --cluster "$ver/$name" -X -w -q -At -d postgres)

    if grep -qiE 'password|authentication|pg_hba' <<<"$problem"; then
        hba=$("${admin[@]}" -c 'show hba_file' 2>/dev/null </dev/null) || hba=""
        [[ -n $hba && -f $hba ]] || hba=/etc/postgresql/$ver/$name/pg_hba.conf
        [[ -f $hba ]] || die "PostgreSQL on 127.0.0.1:$port refuses the tests' connection ($problem) and its pg_hba.conf was not found: $HOW_TO_LET_IN, $HOW_TO_POSTGRES"
        if ! grep -qxF "$HBA_MARK" "$hba"; then
            log "letting user postgres in from 127.0.0.1 and ::1 without a password: 'trust' lines go before the other rules of $hba"
            [[ -e "$hba.steadyrabbit-orig" ]] || cp -p -- "$hba" "$hba.steadyrabbit-orig"
            tmp=$(mktemp "${TMPDIR:-/tmp}/steadyrabbit-hba.XXXXXX")
            awk -v mark="$HBA_MARK" '
                function ours() {
                    print mark
                    print "host    all    postgres    127.0.0.1/32    trust"
                    print "host    all    postgres    ::1/128         trust"
                    done = 1
                }
                !done && /^[[:space:]]*[^#[:space:]]/ { ours() }
                { print }
                END { if (!done) ours() }' "$hba" >"$tmp"
            cat -- "$tmp" >"$hba" # (keeps the file's owner and mode)
            rm -f -- "$tmp"
        fi
        "${admin[@]}" -c 'select pg_reload_conf()' >/dev/null 2>&1 </dev/null ||
            pg_ctlcluster "$ver" "$name" reload </dev/null >/dev/null 2>&1 ||
            die "could not reload PostgreSQL $ver/$name after editing $hba: reload it (sudo pg_ctlcluster $ver $name reload), $HOW_TO_POSTGRES"
        local tries=0 # (the server reloads in the background)
        while ((tries++ < 20)) && ! problem=$(postgres_problem "$port") &&
            grep -qiE 'password|authentication|pg_hba' <<<"$problem"; do
            sleep 0.25
        done
    fi
    problem=$(postgres_problem "$port") && return 0
    if grep -qF 'database "test" does not exist' <<<"$problem"; then
        log "creating database test in PostgreSQL $ver/$name"
        "${admin[@]}" -c 'create database test' </dev/null >/dev/null ||
            die "could not create database test in PostgreSQL $ver/$name (sudo -u $owner createdb test), $HOW_TO_POSTGRES"
        problem=$(postgres_problem "$port") && return 0
    fi
    die "PostgreSQL on 127.0.0.1:$port still refuses the tests' connection as user postgres to database test ($problem): $HOW_TO_LET_IN, $HOW_TO_POSTGRES"
}

ensure_postgres() {
    # A server named by the variable is the tests' to use as it is.
    [[ -n ${STEADYRABBIT_TEST_POSTGRES:-} ]] && return 0
    local port=$PG_PORT problem
    postgres_problem "$port" >/dev/null && return 0
    lock
    pg_listening "$port" || start_postgres "$port"
    if problem=$(postgres_problem "$port"); then
        unlock
        return 0
    fi
    configure_postgres "$port" "$problem"
    log "PostgreSQL on 127.0.0.1:$port lets user postgres in to database test"
    unlock
}

# --------------------------------------------------------------------------------- Redis
# The tests use redis://127.0.0.1:6379/0 unless STEADYRABBIT_TEST_REDIS names another
# server, which is then used as it is.
HOW_TO_REDIS="or set STEADYRABBIT_TEST_REDIS=redis://HOST:PORT/0 to use another server"

# Succeeds when 127.0.0.1:PORT answers PING with PONG; otherwise prints its answer (if
# any) and fails.
redis_reply() { # port
    # shellcheck disable=SC2016  # expanded by the inner bash
    local probe='exec 3<>"/dev/tcp/127.0.0.1/$0" || exit 1
printf "PING\r\n" >&3
IFS= read -r -t 5 reply <&3 || exit 1
[[ $reply == "+PONG"* ]] && exit 0
printf "%s\n" "${reply//[[:cntrl:]]/}"
exit 1'
    if have timeout; then
        timeout 5 "${BASH:-bash}" -c "$probe" "$1" 2>/dev/null
    else
        "${BASH:-bash}" -c "$probe" "$1" 2>/dev/null
    fi
}

redis_up() { redis_reply "$1" >/dev/null; }

find_redis_server() {
    local p
    if have redis-server; then
        p=$(command -v redis-server)
        printf '%s\n' "$p"
        return 0
    fi
    for p in /usr/bin/redis-server /usr/sbin/redis-server /usr/local/bin/redis-server \
        /opt/homebrew/bin/redis-server; do
        if [[ -x $p ]]; then
            printf '%s\n' "$p"
            return 0
        fi
    done
    return 1
}

ensure_redis() {
    # A server named by the variable is the tests' to use as it is.
    [[ -n ${STEADYRABBIT_TEST_REDIS:-} ]] && return 0
    local port=$REDIS_PORT reply server
    reply=$(redis_reply "$port") && return 0
    if port_open 127.0.0.1 "$port"; then
        die "something on 127.0.0.1:$port does not answer Redis's PING with PONG (${reply:-no answer}): the tests need a Redis there that asks for no password, $HOW_TO_REDIS"
    fi
    lock
    if redis_up "$port"; then
        unlock
        return 0
    fi
    if ! server=$(find_redis_server); then
        if ! can_apt; then
            die "no Redis answers on 127.0.0.1:$port and redis-server is not installed: install and start it (Debian/Ubuntu: sudo apt-get install -y redis-server), $HOW_TO_REDIS"
        fi
        log "no Redis answers on 127.0.0.1:$port and redis-server is not installed"
        apt_install redis-server
        server=$(find_redis_server) ||
            die "redis-server is still missing after 'apt-get install redis-server': install it by hand, $HOW_TO_REDIS"
        # (a package's postinst may have started it already)
        if redis_up "$port"; then
            unlock
            return 0
        fi
    fi
    if is_root && [[ $port == 6379 && -x /etc/init.d/redis-server ]]; then
        # Debian's service (its own configuration, as user redis)
        start_and_wait "Redis" redis-server redis_up "$port" \
            "start it by hand (logs in /var/log/redis/), $HOW_TO_REDIS" \
            /etc/init.d/redis-server start
    else
        # A Redis of our own on this host's loopback, keeping nothing on disk.
        local dir=${TMPDIR:-/tmp}
        log "redis-server runs with no configuration file: it keeps nothing on disk and logs to $dir/steadyrabbit-redis-$EUID.log"
        start_and_wait "Redis ($server)" "" redis_up "$port" \
            "start it by hand (its log is $dir/steadyrabbit-redis-$EUID.log), $HOW_TO_REDIS" \
            "$server" --port "$port" --bind 127.0.0.1 --daemonize yes --save "" \
            --appendonly no --dir "$dir" --logfile "$dir/steadyrabbit-redis-$EUID.log"
    fi
    unlock
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
ensure_postgres
ensure_redis
ensure_browser
