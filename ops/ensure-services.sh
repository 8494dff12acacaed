#!/usr/bin/env bash
# Makes sure PostgreSQL and NATS (with JetStream) accept connections on 127.0.0.1:5432 and
# 127.0.0.1:4222, for the integration tests and for running the fleet locally with cargo.
#
#   * already reachable: nothing is changed;
#   * installed but stopped: started (PostgreSQL with pg_ctlcluster, NATS with start-stop-daemon);
#   * missing: installed with apt-get (Debian/Ubuntu), then started.
#
# PostgreSQL must let user `postgres` in over 127.0.0.1 without a password, as the default URLs
# assume. When it asks for one and TANDEM_TEST_DATABASE_URL is unset, this script adds `trust`
# lines for user postgres on the loopback addresses to pg_hba.conf (marked "tandem-fleet") and
# reloads. To keep password authentication instead, export TANDEM_TEST_DATABASE_URL (admin URL,
# e.g. postgres://postgres:secret@127.0.0.1:5432/postgres) and TANDEM_DATABASE_URL yourself.
#
# Non-interactive (CI=true, no stdin). Needs root, or sudo without a password, only when it must
# install, start or configure something.
#
# Env: TANDEM_SERVICES_WAIT_SECS (default 60), TANDEM_ENSURE_PG_PORT (default 5432),
#      TANDEM_ENSURE_NATS_PORT (default 4222), TANDEM_ENSURE_NATS_STORE (default
#      /var/lib/nats-server).
set -euo pipefail

WAIT_SECS="${TANDEM_SERVICES_WAIT_SECS:-60}"
PG_HOST=127.0.0.1
PG_PORT="${TANDEM_ENSURE_PG_PORT:-5432}"
NATS_PORT="${TANDEM_ENSURE_NATS_PORT:-4222}"
NATS_STORE="${TANDEM_ENSURE_NATS_STORE:-/var/lib/nats-server}"
NATS_LOG="${NATS_STORE%/}.log"
[ "$NATS_STORE" = /var/lib/nats-server ] && NATS_LOG=/var/log/nats-server.log

say() { echo "ensure-services: $*"; }
die() { echo "ensure-services: ERROR: $*" >&2; exit 1; }

port_open() { # host port
  timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    die "need root (or passwordless sudo) to run: $*"
  fi
}

as_postgres() {
  if [ "$(id -un)" = postgres ]; then
    "$@"
  elif [ "$(id -u)" = 0 ] && command -v runuser >/dev/null 2>&1; then
    runuser -u postgres -- "$@"
  elif [ "$(id -u)" = 0 ]; then
    su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
  else
    sudo -n -u postgres "$@"
  fi
}

wait_port() { # name host port logfile
  local deadline=$((SECONDS + WAIT_SECS))
  until port_open "$2" "$3"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "ensure-services: ERROR: $1 does not accept connections on $2:$3 after ${WAIT_SECS}s" >&2
      if [ -n "${4:-}" ] && [ -r "$4" ]; then
        echo "--- last lines of $4 ---" >&2
        tail -n 20 "$4" >&2 || true
      fi
      exit 1
    fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------------------------
# What is missing?
need_install=()
if ! port_open "$PG_HOST" "$PG_PORT"; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    need_install+=(postgresql)
  fi
fi
if ! port_open 127.0.0.1 "$NATS_PORT"; then
  if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    need_install+=(nats-server)
  fi
fi
if [ "${#need_install[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 ||
    die "${need_install[*]} not installed and apt-get is not available: install them by hand"
  say "installing ${need_install[*]} with apt-get"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_install[@]}" </dev/null
  # On a systemd machine the package starts its own nats-server without JetStream on our port:
  # stop it, ours (below) runs with -js.
  if [[ " ${need_install[*]} " == *" nats-server "* ]] && command -v systemctl >/dev/null 2>&1 &&
    systemctl is-active --quiet nats-server 2>/dev/null; then
    say "stopping the packaged nats-server service (it runs without JetStream)"
    as_root systemctl disable --now nats-server || true
  fi
fi

# ---------------------------------------------------------------------------------------------
# PostgreSQL
pg_log=""
if port_open "$PG_HOST" "$PG_PORT"; then
  say "PostgreSQL already accepts connections on $PG_HOST:$PG_PORT"
else
  command -v pg_lsclusters >/dev/null 2>&1 ||
    die "PostgreSQL is installed without Debian's cluster tools (pg_lsclusters): start it by hand on $PG_HOST:$PG_PORT"
  clusters="$(pg_lsclusters -h 2>/dev/null || true)"
  if [ -z "$clusters" ]; then
    ver="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
    [ -n "$ver" ] || die "no PostgreSQL version found under /usr/lib/postgresql"
    say "creating PostgreSQL cluster $ver/main"
    as_root pg_createcluster "$ver" main
    clusters="$(pg_lsclusters -h)"
  fi
  # Start the stopped cluster(s) listening on $PG_PORT (normally <version>/main); when no
  # cluster is configured for that port, start the `main` cluster of each installed version.
  targets="$(awk -v p="$PG_PORT" '$3 == p' <<<"$clusters")"
  [ -n "$targets" ] || targets="$(awk '$2 == "main"' <<<"$clusters")"
  [ -n "$targets" ] || die "no PostgreSQL cluster for port $PG_PORT (pg_lsclusters): create one with pg_createcluster"
  while read -r ver name port status _owner _data log; do
    [ -n "${ver:-}" ] || continue
    pg_log="$log"
    case "$status" in
      online*) ;;
      *)
        say "starting PostgreSQL cluster $ver/$name (port $port)"
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start ||
          say "pg_ctlcluster $ver $name start failed (see $log)"
        ;;
    esac
  done <<<"$targets"
  wait_port PostgreSQL "$PG_HOST" "$PG_PORT" "$pg_log"
  say "PostgreSQL is up on $PG_HOST:$PG_PORT"
fi

# Can user postgres connect over TCP without a password (what the default URLs assume)?
if [ -n "${TANDEM_TEST_DATABASE_URL:-}" ]; then
  say "TANDEM_TEST_DATABASE_URL is set: leaving PostgreSQL authentication as it is"
elif command -v psql >/dev/null 2>&1; then
  if ! PGCONNECT_TIMEOUT=5 psql "postgres://postgres@$PG_HOST:$PG_PORT/postgres" -Atqc 'SELECT 1' </dev/null >/dev/null 2>&1; then
    hba="$(as_postgres psql -p "$PG_PORT" -Atqc 'SHOW hba_file' </dev/null 2>/dev/null || true)"
    [ -n "$hba" ] ||
      die "user postgres cannot log in over $PG_HOST without a password, and pg_hba.conf could not be located: set TANDEM_TEST_DATABASE_URL and TANDEM_DATABASE_URL with a password"
    say "allowing user postgres on the loopback addresses without a password ($hba)"
    tmp="$(mktemp)"
    {
      echo "# tandem-fleet: local development and tests (ops/ensure-services.sh)"
      echo "host all postgres 127.0.0.1/32 trust"
      echo "host all postgres ::1/128 trust"
      as_root cat "$hba"
    } >"$tmp"
    as_root cp "$tmp" "$hba"
    rm -f "$tmp"
    as_postgres psql -p "$PG_PORT" -Atqc 'SELECT pg_reload_conf()' </dev/null >/dev/null
    sleep 0.5
    PGCONNECT_TIMEOUT=5 psql "postgres://postgres@$PG_HOST:$PG_PORT/postgres" -Atqc 'SELECT 1' </dev/null >/dev/null ||
      die "user postgres still cannot log in over $PG_HOST; check $hba"
  fi
fi

# ---------------------------------------------------------------------------------------------
# NATS with JetStream
nats_bin="$(command -v nats-server 2>/dev/null || echo /usr/sbin/nats-server)"
if port_open 127.0.0.1 "$NATS_PORT"; then
  say "NATS already accepts connections on 127.0.0.1:$NATS_PORT"
else
  [ -x "$nats_bin" ] || die "nats-server not found"
  as_root mkdir -p "$NATS_STORE"
  say "starting $nats_bin with JetStream on 127.0.0.1:$NATS_PORT (store $NATS_STORE, log $NATS_LOG)"
  if command -v start-stop-daemon >/dev/null 2>&1; then
    # The pid file makes start-stop-daemon look at our instance only, not at any nats-server.
    as_root start-stop-daemon --start --oknodo --background \
      --pidfile "/run/tandem-nats-server-$NATS_PORT.pid" --make-pidfile --exec "$nats_bin" -- \
      -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$NATS_STORE" -l "$NATS_LOG"
  else
    as_root nohup "$nats_bin" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$NATS_STORE" -l "$NATS_LOG" \
      </dev/null >/dev/null 2>&1 &
  fi
  wait_port NATS 127.0.0.1 "$NATS_PORT" "$NATS_LOG"
  say "NATS is up on 127.0.0.1:$NATS_PORT"
fi

# JetStream must be enabled: the server's INFO line says so.
info="$(timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/'"$NATS_PORT"'; IFS= read -r -t 4 line <&3; echo "$line"' 2>/dev/null || true)"
case "$info" in
  *'"jetstream":true'*) say "JetStream is enabled" ;;
  INFO*) die "NATS on 127.0.0.1:$NATS_PORT runs without JetStream: restart it with -js (e.g. nats-server -js -sd /var/lib/nats-server)" ;;
  *) die "no INFO line from NATS on 127.0.0.1:$NATS_PORT" ;;
esac
