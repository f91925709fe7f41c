#!/usr/bin/env bash
# PostgreSQL for the scaled-out configuration (MLflow's and Prefect's database), from
# Debian's package: the e2e test and a developer machine use the same steps.
#
#   scripts/postgres.sh install            install PostgreSQL with apt-get (root; skipped if present,
#                                          FORCE_INSTALL=1 runs apt-get anyway)
#   scripts/postgres.sh start DIR [PORT]   a throwaway cluster in DIR on 127.0.0.1:PORT (5432),
#                                          trust auth on loopback, databases `mlflow` and `prefect`;
#                                          prints its URL, postgresql://postgres@127.0.0.1:PORT
#   scripts/postgres.sh stop DIR           stop that cluster and remove DIR
#
# PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` system user
# that Debian's package creates, so DIR must be in a directory that user can reach (/tmp, not
# a 0700 pytest folder). Trust auth on 127.0.0.1 is for throwaway clusters on one machine;
# a shared server needs passwords (the compose stack's postgres image has them).
set -euo pipefail

log() { printf '[postgres %4ss] %s\n' "$SECONDS" "$*" >&2; }
die() {
    printf '[postgres] error: %s\n' "$*" >&2
    exit 1
}

# The newest installed server's bin directory (Debian keeps each major version apart).
pg_bin() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
    [[ -n $dir && -x $dir/postgres ]] && echo "$dir"
}

install_postgres() {
    if pg_bin >/dev/null && [[ ${FORCE_INSTALL:-0} != 1 ]]; then
        log "PostgreSQL present: $(pg_bin)"
        return
    fi
    [[ $(id -u) -eq 0 ]] || die "PostgreSQL is not installed; run as root: sudo $0 install"
    command -v apt-get >/dev/null || die "apt-get not found; install PostgreSQL by hand"
    log "installing PostgreSQL with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    DEBCONF_NOWARNINGS=yes apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    pg_bin >/dev/null || die "apt-get installed postgresql but no server binary was found"
    log "installed: $(pg_bin)"
}

# Run a PostgreSQL program as the cluster's owner: `postgres` when we are root, else us.
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start_cluster() {
    local dir="${1:?usage: $0 start DIR [PORT]}" port="${2:-5432}" bin
    bin="$(pg_bin)" || die "PostgreSQL is not installed: $0 install"
    [[ ! -e $dir/data ]] || die "$dir/data exists: stop that cluster first ($0 stop $dir)"
    mkdir -p "$dir"
    [[ $(id -u) -ne 0 ]] || chown postgres: "$dir"
    chmod 700 "$dir"
    log "initdb in $dir/data"
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --no-locale -E UTF8 >"$dir/initdb.log"
    # Loopback only; the socket in DIR, so clusters never meet in /var/run/postgresql.
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir" start >/dev/null ||
        die "the server did not start: $(tail -n 20 "$dir/server.log")"
    local db
    for db in mlflow prefect; do
        as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db"
    done
    log "running on 127.0.0.1:$port (databases mlflow, prefect)"
    echo "postgresql://postgres@127.0.0.1:$port"
}

stop_cluster() {
    local dir="${1:?usage: $0 stop DIR}" bin
    bin="$(pg_bin)" || die "PostgreSQL is not installed"
    if [[ -f $dir/data/postmaster.pid ]]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    fi
    rm -rf "$dir"
}

case "${1:-}" in
install) install_postgres ;;
start) start_cluster "${@:2}" ;;
stop) stop_cluster "${@:2}" ;;
*) die "usage: $0 install | start DIR [PORT] | stop DIR" ;;
esac
