# shellcheck shell=bash
# ops/lib.sh: functions shared by ops/up, ops/test and ops/bench. Source it, do not run it.
#
# What it does for the scripts:
#   - finds the repository root and the state folder `.provisio/` (gitignored);
#   - reads PROVISIO_DATABASE_URL and PROVISIO_AMQP_URL (defaults: the local services);
#   - makes sure PostgreSQL and RabbitMQ answer. When they do not and they are the local
#     ones (127.0.0.1, localhost, ::1), installs them with apt-get and starts them without
#     systemd; services the user named on another host are only probed, never touched;
#   - makes sure the PostgreSQL role of the URL can log in over TCP (local set-up: a `trust`
#     line for 127.0.0.1/::1 in pg_hba.conf, see docs/operations.md) and that
#     max_prepared_transactions >= 64 (the sql provider uses PREPARE TRANSACTION);
#   - starts, watches and stops the fleet's processes for ops/up.
# Every step is idempotent: running a script twice is safe.

PROVISIO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROVISIO_STATE="$PROVISIO_ROOT/.provisio"
PROVISIO_TARGET="${CARGO_TARGET_DIR:-$PROVISIO_ROOT/target}"
# Debian keeps rabbitmq-server and friends in sbin, which a non-root PATH may lack.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

readonly PROVISIO_DEFAULT_DATABASE_URL='postgres://postgres@127.0.0.1:5432/provisio'
readonly PROVISIO_DEFAULT_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f'
# The sql provider prepares one transaction per in-flight step (PREPARE TRANSACTION).
readonly PROVISIO_MIN_PREPARED_XACTS=64
readonly PROVISIO_SET_PREPARED_XACTS=128
# Engines hold pools of connections (see pg_ensure_settings).
readonly PROVISIO_MIN_CONNECTIONS=300
readonly PROVISIO_SET_CONNECTIONS=500

# ---------------------------------------------------------------------------------------
# Small helpers

log() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# Runs a command as root (directly, or through sudo).
as_root() {
	if [[ $EUID -eq 0 ]]; then
		"$@"
	elif have sudo; then
		sudo -- "$@"
	else
		die "need root (or sudo) to run: $*"
	fi
}

can_root() { [[ $EUID -eq 0 ]] || have sudo; }

# Runs a command as the `postgres` OS user (peer authentication on the local socket).
as_postgres() {
	if [[ $EUID -eq 0 ]] && have runuser; then
		runuser -u postgres -- "$@"
	elif have sudo; then
		sudo -u postgres -- "$@"
	else
		return 1
	fi
}

# wait_until SECONDS WHAT CMD...: runs CMD every second until it succeeds; fails after SECONDS.
wait_until() {
	local limit=$1 what=$2
	shift 2
	local deadline=$((SECONDS + limit))
	until "$@" >/dev/null 2>&1; do
		if ((SECONDS >= deadline)); then
			log "gave up after ${limit}s waiting for $what"
			return 1
		fi
		sleep 1
	done
}

# tcp_probe HOST PORT: true when something accepts TCP connections there.
tcp_probe() {
	# shellcheck disable=SC2016 # $1 and $2 belong to the inner bash
	timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

is_local_host() {
	case "$1" in
	'' | localhost | 127.* | ::1 | 0.0.0.0) return 0 ;;
	*) return 1 ;;
	esac
}

# A random secret: 32 bytes as hex.
random_hex() {
	if have openssl; then
		openssl rand -hex 32
	else
		od -An -N32 -tx1 /dev/urandom | tr -d ' \n'
		echo
	fi
}

_PROVISIO_APT_UPDATED=0
apt_install() {
	have apt-get || die "cannot install $* (no apt-get here): install it yourself, or point PROVISIO_DATABASE_URL / PROVISIO_AMQP_URL at running services"
	can_root || die "installing $* needs root or sudo"
	if [[ $_PROVISIO_APT_UPDATED -eq 0 ]]; then
		log "apt-get update"
		as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
		_PROVISIO_APT_UPDATED=1
	fi
	log "apt-get install $*"
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2
}

# ---------------------------------------------------------------------------------------
# URLs

# parse_url URL: sets URL_SCHEME, URL_USERINFO, URL_HOST (without brackets), URL_PORT,
# URL_PATH (with its leading slash), URL_QUERY (with its "?") and URL_BASE
# (scheme://userinfo@host:port, as written). Fails on anything else.
parse_url() {
	local re='^([A-Za-z][A-Za-z0-9+.-]*)://(([^@/?]*)@)?(\[[^]/]*\]|[^:/?]*)(:([0-9]+))?(/[^?]*)?(\?.*)?$'
	[[ $1 =~ $re ]] || return 1
	URL_SCHEME=${BASH_REMATCH[1]}
	URL_USERINFO=${BASH_REMATCH[3]}
	URL_HOST=${BASH_REMATCH[4]}
	URL_HOST=${URL_HOST#[}
	URL_HOST=${URL_HOST%]}
	URL_PORT=${BASH_REMATCH[6]}
	URL_PATH=${BASH_REMATCH[7]}
	URL_QUERY=${BASH_REMATCH[8]}
	URL_BASE="${BASH_REMATCH[1]}://${BASH_REMATCH[2]}${BASH_REMATCH[4]}${BASH_REMATCH[5]}"
}

# Reads the configuration the scripts need from the environment. Sets:
#   DATABASE_URL  PG_HOST PG_PORT PG_USER PG_DB PG_BASE_URL PG_ADMIN_URL PG_LOCAL
#   AMQP_URL      AMQP_HOST AMQP_PORT AMQP_LOCAL
provisio_resolve() {
	DATABASE_URL=${PROVISIO_DATABASE_URL:-$PROVISIO_DEFAULT_DATABASE_URL}
	parse_url "$DATABASE_URL" || die "PROVISIO_DATABASE_URL is not a URL like $PROVISIO_DEFAULT_DATABASE_URL"
	case "$URL_SCHEME" in
	postgres | postgresql) ;;
	*) die "PROVISIO_DATABASE_URL must start with postgres:// (got $URL_SCHEME://)" ;;
	esac
	[[ -n $URL_HOST ]] || die "PROVISIO_DATABASE_URL must name a host (the services connect over TCP)"
	PG_HOST=$URL_HOST
	PG_PORT=${URL_PORT:-5432}
	PG_USER=${URL_USERINFO%%:*}
	PG_USER=${PG_USER:-postgres}
	PG_DB=${URL_PATH#/}
	if [[ -z $PG_DB ]]; then
		PG_DB=provisio
		DATABASE_URL="$URL_BASE/$PG_DB$URL_QUERY"
	fi
	PG_BASE_URL=$URL_BASE
	PG_ADMIN_URL="$URL_BASE/postgres$URL_QUERY"
	PG_LOCAL=0
	if is_local_host "$PG_HOST"; then PG_LOCAL=1; fi

	AMQP_URL=${PROVISIO_AMQP_URL:-$PROVISIO_DEFAULT_AMQP_URL}
	parse_url "$AMQP_URL" || die "PROVISIO_AMQP_URL is not a URL like $PROVISIO_DEFAULT_AMQP_URL"
	case "$URL_SCHEME" in
	amqp) AMQP_PORT=${URL_PORT:-5672} ;;
	amqps) AMQP_PORT=${URL_PORT:-5671} ;;
	*) die "PROVISIO_AMQP_URL must start with amqp:// or amqps:// (got $URL_SCHEME://)" ;;
	esac
	AMQP_HOST=${URL_HOST:-127.0.0.1}
	AMQP_LOCAL=0
	if is_local_host "$AMQP_HOST"; then AMQP_LOCAL=1; fi
}

# ---------------------------------------------------------------------------------------
# PostgreSQL

# psql against a URL: quiet, unaligned, stop on the first error.
pg_q() {
	local url=$1
	shift
	PGCONNECT_TIMEOUT=5 psql -X -w -q -At -v ON_ERROR_STOP=1 -d "$url" "$@"
}

# psql as the local superuser over the Unix socket.
pg_local_admin() {
	as_postgres psql -X -q -At -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres "$@"
}

# SQL that needs a superuser: through the URL when its role is one, else as local `postgres`.
pg_superuser_sql() {
	pg_q "$PG_ADMIN_URL" -c "$1" 2>/dev/null || pg_local_admin -c "$1"
}

pg_reachable() {
	if have pg_isready; then
		pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3
	else
		tcp_probe "$PG_HOST" "$PG_PORT"
	fi
}

# Prints "VERSION NAME STATUS" of the local Debian cluster on PG_PORT, if any.
pg_local_cluster() {
	have pg_lsclusters || return 0
	pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1, $2, $4; exit }'
}

pg_ctl_local() {
	local action=$1 cluster ver name
	cluster=$(pg_local_cluster)
	[[ -n $cluster ]] || die "no Debian PostgreSQL cluster listens on port $PG_PORT here (pg_lsclusters); $action the server yourself"
	read -r ver name _ <<<"$cluster"
	log "pg_ctlcluster $ver $name $action"
	as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" "$action" >&2
}

pg_start_local() {
	if ! have pg_ctlcluster || ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
		apt_install postgresql
	fi
	if [[ -z $(pg_local_cluster) ]]; then
		local ver
		ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -n | tail -n1)
		[[ -n $ver ]] || die "PostgreSQL server binaries not found under /usr/lib/postgresql"
		if [[ -z $(pg_lsclusters -h 2>/dev/null) && $PG_PORT == 5432 ]]; then
			log "creating PostgreSQL cluster $ver/main"
			as_root pg_createcluster "$ver" main >&2
		else
			die "no local PostgreSQL cluster on port $PG_PORT (pg_lsclusters shows others): create one with pg_createcluster -p $PG_PORT or change PROVISIO_DATABASE_URL"
		fi
	fi
	if ! pg_reachable; then
		pg_ctl_local start
	fi
	wait_until 60 "PostgreSQL on $PG_HOST:$PG_PORT" pg_reachable || die "PostgreSQL did not start (see /var/log/postgresql/)"
}

# The local set-up logs in over TCP without a password: a `trust` line for the URL's role on
# the loopback addresses goes first in pg_hba.conf (a fresh Debian install asks for a
# scram password on host lines).
pg_trust_loopback() {
	local hba marker="# provisio (ops/lib.sh): local development logins over TCP without password"
	hba=$(pg_local_admin -c 'SHOW hba_file') || die "cannot ask the local PostgreSQL for its pg_hba.conf as user postgres"
	if ! as_root grep -qF "host all $PG_USER 127.0.0.1/32 trust" "$hba"; then
		log "adding trust lines for role $PG_USER on 127.0.0.1 and ::1 to $hba"
		local tmp
		tmp=$(mktemp)
		{
			printf '%s\n' "$marker"
			printf 'host all %s 127.0.0.1/32 trust\n' "$PG_USER"
			printf 'host all %s ::1/128 trust\n' "$PG_USER"
			as_root cat "$hba"
		} >"$tmp"
		# Rewriting in place keeps the file's owner and mode.
		as_root tee "$hba" <"$tmp" >/dev/null
		rm -f "$tmp"
		pg_local_admin -c 'SELECT pg_reload_conf()' >/dev/null
	fi
	# The role itself (the default `postgres` always exists).
	local exists
	exists=$(pg_local_admin -v role="$PG_USER" <<<"SELECT 1 FROM pg_roles WHERE rolname = :'role'")
	if [[ -z $exists ]]; then
		log "creating PostgreSQL role $PG_USER"
		pg_local_admin -v role="$PG_USER" <<<'CREATE ROLE :"role" LOGIN SUPERUSER' >/dev/null
	fi
}

pg_ensure_login() {
	local err
	if err=$(pg_q "$PG_ADMIN_URL" -c 'SELECT 1' 2>&1 >/dev/null); then
		return 0
	fi
	err=${err//$'\n'/ }
	if [[ $PG_LOCAL -eq 0 ]]; then
		die "cannot log in to PostgreSQL at $PG_HOST:$PG_PORT as $PG_USER: $err"
	fi
	# Only a refused login is fixed here; anything else (too many clients, starting up) is
	# reported as it is.
	case "$err" in
	*password* | *authentication* | *pg_hba.conf* | *"does not exist"*) ;;
	*) die "cannot log in to PostgreSQL at $PG_HOST:$PG_PORT as $PG_USER: $err" ;;
	esac
	log "cannot log in over TCP as $PG_USER ($err); configuring the local server"
	pg_trust_loopback
	err=$(pg_q "$PG_ADMIN_URL" -c 'SELECT 1' 2>&1 >/dev/null) || die "still cannot log in to PostgreSQL as $PG_USER: $err"
}

# pg_setting NAME: the server's current value.
pg_setting() {
	pg_q "$PG_ADMIN_URL" -c "SHOW $1" || die "cannot read the PostgreSQL setting $1"
}

# Server settings Provisio needs:
#   max_prepared_transactions >= 64: the sql provider uses PREPARE TRANSACTION;
#   max_connections >= 300: every engine holds up to database.pool_size (32) +
#     txlog.pool_size (100) + 16 (test provider) connections, the queue manager 32, and the
#     PostgreSQL default of 100 runs out under ops/bench.
# On the local server both are raised with ALTER SYSTEM and one restart; on a server the
# user named, a low max_prepared_transactions is an error and a low max_connections a
# warning.
pg_ensure_settings() {
	local xacts conns changes=()
	xacts=$(pg_setting max_prepared_transactions)
	conns=$(pg_setting max_connections)
	if ((xacts < PROVISIO_MIN_PREPARED_XACTS)); then
		changes+=("max_prepared_transactions = $PROVISIO_SET_PREPARED_XACTS")
	fi
	if ((conns < PROVISIO_MIN_CONNECTIONS)); then
		changes+=("max_connections = $PROVISIO_SET_CONNECTIONS")
	fi
	((${#changes[@]} > 0)) || return 0
	if [[ $PG_LOCAL -eq 0 ]]; then
		if ((xacts < PROVISIO_MIN_PREPARED_XACTS)); then
			die "max_prepared_transactions is $xacts on $PG_HOST:$PG_PORT; Provisio needs >= $PROVISIO_MIN_PREPARED_XACTS (ALTER SYSTEM SET max_prepared_transactions = $PROVISIO_SET_PREPARED_XACTS, then restart the server)"
		fi
		log "warning: max_connections is $conns on $PG_HOST:$PG_PORT; a fleet may need $PROVISIO_MIN_CONNECTIONS or more (or smaller pools)"
		return 0
	fi
	local c
	for c in "${changes[@]}"; do
		log "setting $c on the local PostgreSQL (max_prepared_transactions was $xacts, max_connections $conns)"
		pg_superuser_sql "ALTER SYSTEM SET $c" >/dev/null || die "ALTER SYSTEM SET $c failed"
	done
	log "restarting the local PostgreSQL for the new settings (once)"
	pg_ctl_local restart
	wait_until 60 "PostgreSQL to come back" pg_reachable || die "PostgreSQL did not come back after the restart"
	wait_until 30 "PostgreSQL logins" pg_q "$PG_ADMIN_URL" -c 'SELECT 1' || die "PostgreSQL refuses logins after the restart"
	xacts=$(pg_setting max_prepared_transactions)
	conns=$(pg_setting max_connections)
	((xacts >= PROVISIO_MIN_PREPARED_XACTS && conns >= PROVISIO_MIN_CONNECTIONS)) ||
		die "after the restart max_prepared_transactions is $xacts and max_connections $conns"
}

ensure_postgres() {
	if ! pg_reachable; then
		if [[ $PG_LOCAL -eq 0 ]]; then
			die "PostgreSQL at $PG_HOST:$PG_PORT (PROVISIO_DATABASE_URL) does not answer"
		fi
		log "PostgreSQL does not answer on $PG_HOST:$PG_PORT: installing/starting the local one"
		pg_start_local
	fi
	have psql || apt_install postgresql-client
	pg_ensure_login
	pg_ensure_settings
	log "PostgreSQL ok: $PG_HOST:$PG_PORT as $PG_USER"
}

# Creates the database of PROVISIO_DATABASE_URL unless it exists.
ensure_database() {
	local exists
	exists=$(pg_q "$PG_ADMIN_URL" -v db="$PG_DB" <<<"SELECT 1 FROM pg_database WHERE datname = :'db'")
	if [[ -z $exists ]]; then
		log "creating database $PG_DB"
		# A concurrent creator may win the race; it is there either way.
		pg_q "$PG_ADMIN_URL" -v db="$PG_DB" <<<'CREATE DATABASE :"db"' >/dev/null 2>&1 ||
			[[ -n $(pg_q "$PG_ADMIN_URL" -v db="$PG_DB" <<<"SELECT 1 FROM pg_database WHERE datname = :'db'") ]] ||
			die "cannot create database $PG_DB"
	fi
}

# ---------------------------------------------------------------------------------------
# RabbitMQ

# True when the local node answers (rabbitmq-diagnostics needs root for the Erlang cookie).
rabbit_ping() {
	as_root timeout 20 rabbitmq-diagnostics -q ping >/dev/null 2>&1
}

amqp_reachable() { tcp_probe "$AMQP_HOST" "$AMQP_PORT"; }

ensure_rabbitmq() {
	if amqp_reachable; then
		if [[ $AMQP_LOCAL -eq 1 ]] && have rabbitmq-diagnostics && can_root && ! rabbit_ping; then
			log "warning: port $AMQP_PORT answers but 'rabbitmq-diagnostics ping' fails (a broker this machine does not manage?); using it"
		fi
		log "RabbitMQ ok: $AMQP_HOST:$AMQP_PORT"
		return 0
	fi
	if [[ $AMQP_LOCAL -eq 0 ]]; then
		die "RabbitMQ at $AMQP_HOST:$AMQP_PORT (PROVISIO_AMQP_URL) does not answer"
	fi
	log "RabbitMQ does not answer on $AMQP_HOST:$AMQP_PORT: installing/starting the local one"
	have rabbitmq-server || apt_install rabbitmq-server
	# The package may have started it already (its init script runs without systemd).
	if ! rabbit_ping; then
		log "rabbitmq-server -detached"
		as_root rabbitmq-server -detached >&2 || die "rabbitmq-server did not start (see /var/log/rabbitmq/)"
	fi
	wait_until 120 "RabbitMQ to boot" rabbit_ping ||
		die "RabbitMQ did not boot (see /var/log/rabbitmq/)"
	wait_until 30 "RabbitMQ on $AMQP_HOST:$AMQP_PORT" amqp_reachable ||
		die "RabbitMQ runs but nothing listens on $AMQP_HOST:$AMQP_PORT"
	log "RabbitMQ ok: $AMQP_HOST:$AMQP_PORT"
}

# Both services.
ensure_services() {
	provisio_resolve
	ensure_postgres
	ensure_rabbitmq
}

# The variables the tests and the benchmark read (kept when set already): the server URL
# without a database name, and the broker URL.
export_test_env() {
	export PROVISIO_TEST_PG="${PROVISIO_TEST_PG:-$PG_BASE_URL}"
	export PROVISIO_TEST_AMQP="${PROVISIO_TEST_AMQP:-$AMQP_URL}"
}

# The binaries read every PROVISIO_* variable as a setting and refuse unknown ones: drop the
# variables of the tests and of provisioctl before starting them.
unset_non_settings() {
	local v
	for v in $(compgen -e PROVISIO_TEST_ || true) PROVISIO_URL PROVISIO_API_KEY; do
		unset "$v"
	done
}

# ---------------------------------------------------------------------------------------
# Secrets kept in .provisio/ between runs

# state_secret NAME: prints the secret stored in .provisio/NAME, generating it on first use.
state_secret() {
	local file="$PROVISIO_STATE/$1"
	if [[ ! -s $file ]]; then
		mkdir -p "$PROVISIO_STATE"
		(
			umask 077
			random_hex >"$file.tmp"
			mv "$file.tmp" "$file"
		)
		log "generated $file"
	fi
	tr -d '[:space:]' <"$file"
}

# ---------------------------------------------------------------------------------------
# Processes (ops/up)

PROVISIO_PIDS=()
PROVISIO_NAMES=()
PROVISIO_LOGS=()

# True while PID runs (a zombie does not count). Conservative: when /proc cannot tell,
# a process that still exists counts as running.
proc_alive() {
	kill -0 "$1" 2>/dev/null || return 1
	local state
	state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null || true)
	[[ $state != Z ]]
}

# start_proc NAME CMD...: starts CMD in the background, its output in .provisio/logs/NAME.log
# (the previous run's log becomes NAME.log.1).
start_proc() {
	local name=$1
	shift
	local logdir="$PROVISIO_STATE/logs"
	local logfile="$logdir/$name.log"
	mkdir -p "$logdir"
	if [[ -f $logfile ]]; then mv -f "$logfile" "$logfile.1"; fi
	"$@" >"$logfile" 2>&1 </dev/null &
	PROVISIO_PIDS+=("$!")
	PROVISIO_NAMES+=("$name")
	PROVISIO_LOGS+=("$logfile")
	log "started $name (pid $!), log $logfile"
}

# wait_listening INDEX SECONDS: waits for the process's "listening on http://ADDR" line;
# prints ADDR.
wait_listening() {
	local i=$1 limit=$2
	local pid=${PROVISIO_PIDS[$i]} name=${PROVISIO_NAMES[$i]} logfile=${PROVISIO_LOGS[$i]}
	local deadline=$((SECONDS + limit)) line
	while :; do
		line=$(grep -m1 '^listening on http://' "$logfile" 2>/dev/null || true)
		if [[ -n $line ]]; then
			printf '%s\n' "${line#listening on http://}"
			return 0
		fi
		if ! proc_alive "$pid"; then
			log "$name exited during start-up; the end of $logfile:"
			tail -n 20 "$logfile" >&2 || true
			return 1
		fi
		if ((SECONDS >= deadline)); then
			log "$name did not report 'listening on' within ${limit}s; see $logfile"
			return 1
		fi
		sleep 0.2
	done
}

# An address a client can connect to (a wildcard listen address means this machine).
client_addr() {
	local addr=$1
	addr=${addr/#0.0.0.0:/127.0.0.1:}
	addr=${addr/#\[::\]:/[::1]:}
	printf '%s\n' "$addr"
}

# wait_ready ADDR SECONDS: polls http://ADDR/readyz until it answers 200.
wait_ready() {
	wait_until "$2" "http://$1/readyz" curl -fsS -o /dev/null --max-time 2 "http://$1/readyz"
}

# forget_proc PID: drops a process (already waited for) from the lists.
forget_proc() {
	local i pids=() names=() logs=()
	for i in "${!PROVISIO_PIDS[@]}"; do
		if [[ ${PROVISIO_PIDS[$i]} != "$1" ]]; then
			pids+=("${PROVISIO_PIDS[$i]}")
			names+=("${PROVISIO_NAMES[$i]}")
			logs+=("${PROVISIO_LOGS[$i]}")
		fi
	done
	PROVISIO_PIDS=("${pids[@]}")
	PROVISIO_NAMES=("${names[@]}")
	PROVISIO_LOGS=("${logs[@]}")
}

# proc_name PID: the name start_proc gave it.
proc_name() {
	local i
	for i in "${!PROVISIO_PIDS[@]}"; do
		if [[ ${PROVISIO_PIDS[$i]} == "$1" ]]; then
			printf '%s\n' "${PROVISIO_NAMES[$i]}"
			return 0
		fi
	done
	printf 'pid %s\n' "$1"
}

# stop_procs [SECONDS]: SIGTERM to every process started by start_proc, then waits for them
# (engines drain) using the shell's own child bookkeeping; a `sleep SECONDS` watchdog bounds
# the wait, after which the stragglers get SIGKILL. Returns non-zero when one of them did not
# exit cleanly (0, or 143 for a process that had not yet installed its SIGTERM handler).
stop_procs() {
	local limit=${1:-45} rc=0 pid status done_pid watchdog name
	((${#PROVISIO_PIDS[@]} > 0)) || return 0
	for pid in "${PROVISIO_PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	# (SIGKILL ends it below: a caller's `trap '' TERM` would make it ignore SIGTERM.)
	sleep "$limit" &
	watchdog=$!
	while ((${#PROVISIO_PIDS[@]} > 0)); do
		status=0
		done_pid=''
		wait -n -p done_pid "${PROVISIO_PIDS[@]}" "$watchdog" 2>/dev/null || status=$?
		if [[ -z $done_pid ]]; then
			# Nothing left that this shell can wait for.
			break
		fi
		if [[ $done_pid == "$watchdog" ]]; then
			watchdog=''
			for pid in "${PROVISIO_PIDS[@]}"; do
				log "$(proc_name "$pid") (pid $pid) still runs after ${limit}s: SIGKILL"
				kill -KILL "$pid" 2>/dev/null || true
				wait "$pid" 2>/dev/null || true
			done
			rc=1
			break
		fi
		name=$(proc_name "$done_pid")
		forget_proc "$done_pid"
		case "$status" in
		0 | 143) log "$name stopped" ;;
		*)
			log "$name exited with status $status"
			rc=1
			;;
		esac
	done
	if [[ -n $watchdog ]]; then
		kill -KILL "$watchdog" 2>/dev/null || true
		wait "$watchdog" 2>/dev/null || true
	fi
	PROVISIO_PIDS=()
	PROVISIO_NAMES=()
	PROVISIO_LOGS=()
	return "$rc"
}

# Path of a release binary.
release_bin() { printf '%s\n' "$PROVISIO_TARGET/release/$1"; }

ensure_curl() {
	have curl || apt_install curl ca-certificates
}
