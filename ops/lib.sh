# shellcheck shell=bash
# ops/lib.sh: functions shared by ops/up, ops/test and ops/bench. Source it, do not run it.
#
# What it does for the scripts:
#   - finds the repository root and the state folder `.provisio/` (gitignored; or
#     PROVISIO_STATE_DIR);
#   - reads PROVISIO_DATABASE_URL and PROVISIO_AMQP_URL (defaults: the local services);
#   - makes sure PostgreSQL and RabbitMQ answer. When they do not and they are the local
#     ones (127.0.0.1, localhost, ::1), installs them with apt-get and starts them without
#     systemd; services the user named on another host are only probed, never touched;
#   - makes sure the PostgreSQL role of the URL can log in over TCP (local set-up: a `trust`
#     line for 127.0.0.1/::1 in pg_hba.conf, see docs/operations.md) and that
#     max_prepared_transactions >= 64 (the sql provider uses PREPARE TRANSACTION);
#   - starts, supervises (restarts) and stops the fleet's processes for ops/up.
# Every step is idempotent: running a script twice is safe.

PROVISIO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# PROVISIO_STATE_DIR moves the state folder (a test's own, for instance).
PROVISIO_STATE="${PROVISIO_STATE_DIR:-$PROVISIO_ROOT/.provisio}"
case "$PROVISIO_STATE" in
/*) ;;
*) PROVISIO_STATE="$PWD/$PROVISIO_STATE" ;;
esac
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
# variables of the tests, of provisioctl and of ops/up itself before starting them.
unset_non_settings() {
	local v
	for v in $(compgen -e PROVISIO_TEST_ || true) PROVISIO_URL PROVISIO_API_KEY \
		PROVISIO_STATE_DIR PROVISIO_BIN_DIR PROVISIO_PORT_BASE; do
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
# Processes (ops/up): started, supervised (restarted with a back-off when they die) and
# stopped. Every process has a slot (its index, in start order) that keeps its name, its
# command, its log file and, while it runs, its pid. The current pid of each is also in
# STATE/pids/NAME.pid, for operators and tests.
#
# Deaths are found by polling `kill -0` at least every second rather than by `wait -n`
# alone: bash's `wait -n` ignores a child that ended before it was called (its status is
# still there for `wait PID`), so a death in between would go unseen.

SUP_NAME=()    # NAME
SUP_CMD=()     # the command, quoted for eval
SUP_LOG=()     # STATE/logs/NAME.log
SUP_PID=()     # pid while it runs, '' while it waits to be restarted
SUP_STARTED=() # when it was (re)started, ms
SUP_DELAY=()   # back-off used for its last restart, ms (0: never restarted)
SUP_DUE=()     # when it is to be restarted, ms
SUP_NOW=0
SUP_TIMER=''    # the `sleep` that bounds one wait of the supervisor
SUP_CRITICAL=0  # 1 while a process is being started: a stop signal is deferred
SUP_STOP=0      # a stop signal arrived during the critical section
# Restart back-off: the first restart after RESET_MS of stable running waits MIN_MS, each
# quicker death doubles it, up to MAX_MS.
SUP_BACKOFF_MIN_MS=1000
SUP_BACKOFF_MAX_MS=30000
SUP_BACKOFF_RESET_MS=60000

sup_now() { SUP_NOW=$((${EPOCHREALTIME//[!0-9]/} / 1000)); }

# True while PID runs (a zombie does not count). Conservative: when /proc cannot tell,
# a process that still exists counts as running.
proc_alive() {
	kill -0 "$1" 2>/dev/null || return 1
	local state
	state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null || true)
	[[ $state != Z ]]
}

# on_stop_signal: the INT/TERM trap of ops/up. Stops at once, except while a process is
# being started (its pid not yet recorded): then the stop waits for the end of that step.
on_stop_signal() {
	if ((SUP_CRITICAL)); then
		SUP_STOP=1
		return 0
	fi
	log "interrupted"
	exit 0
}

sup_pidfile() { printf '%s/pids/%s.pid\n' "$PROVISIO_STATE" "${SUP_NAME[$1]}"; }

# sup_launch SLOT: starts the slot's command in the background, output appended to its log.
sup_launch() {
	local i=$1 pidfile
	pidfile=$(sup_pidfile "$i")
	SUP_CRITICAL=1
	# exec: the pid recorded is the program's own, so that signals reach it directly.
	eval "exec ${SUP_CMD[$i]}" >>"${SUP_LOG[$i]}" 2>&1 </dev/null &
	SUP_PID[i]=$!
	sup_now
	SUP_STARTED[i]=$SUP_NOW
	mkdir -p "${pidfile%/*}"
	printf '%s\n' "${SUP_PID[$i]}" >"$pidfile.tmp"
	mv -f "$pidfile.tmp" "$pidfile"
	SUP_CRITICAL=0
	if ((SUP_STOP)); then
		log "interrupted"
		exit 0
	fi
}

# start_proc NAME CMD...: starts CMD in the background, its output in STATE/logs/NAME.log
# (the previous run's log becomes NAME.log.1). Until `supervise` runs, nothing restarts it.
start_proc() {
	local name=$1 i=${#SUP_NAME[@]}
	shift
	local logfile="$PROVISIO_STATE/logs/$name.log"
	mkdir -p "${logfile%/*}"
	if [[ -f $logfile ]]; then mv -f "$logfile" "$logfile.1"; fi
	: >"$logfile"
	SUP_NAME[i]=$name
	SUP_LOG[i]=$logfile
	SUP_DELAY[i]=0
	SUP_DUE[i]=0
	sup_set_cmd "$i" "$@"
	sup_launch "$i"
	log "started $name (pid ${SUP_PID[$i]}), log $logfile"
}

# sup_set_cmd SLOT CMD...: the command a restart runs (e.g. with the port the first start got).
sup_set_cmd() {
	local i=$1
	shift
	SUP_CMD[i]=$(printf '%q ' "$@")
}

# Pids of the processes that run now.
sup_live_pids() {
	local i
	SUP_LIVE=()
	for i in "${!SUP_NAME[@]}"; do
		if [[ -n ${SUP_PID[$i]} ]]; then SUP_LIVE+=("${SUP_PID[$i]}"); fi
	done
}

sup_slot_of() {
	local i
	for i in "${!SUP_NAME[@]}"; do
		if [[ ${SUP_PID[$i]} == "$1" ]]; then
			printf '%s\n' "$i"
			return 0
		fi
	done
	return 1
}

# How a wait status reads: "exit status N" or "killed by SIGNAME (status 128+N)".
describe_status() {
	local status=$1 sig
	if ((status > 128)) && sig=$(kill -l "$((status - 128))" 2>/dev/null); then
		printf 'killed by SIG%s (status %s)\n' "$sig" "$status"
	else
		printf 'exit status %s\n' "$status"
	fi
}

# sup_died SLOT STATUS: reports the death and schedules the restart.
sup_died() {
	local i=$1 status=$2 pid=${SUP_PID[$1]} name=${SUP_NAME[$1]} logfile=${SUP_LOG[$1]} ran delay
	SUP_PID[i]=''
	rm -f "$(sup_pidfile "$i")"
	sup_now
	ran=$((SUP_NOW - SUP_STARTED[i]))
	delay=${SUP_DELAY[$i]}
	if ((delay == 0 || ran >= SUP_BACKOFF_RESET_MS)); then
		delay=$SUP_BACKOFF_MIN_MS
	else
		delay=$((delay * 2 > SUP_BACKOFF_MAX_MS ? SUP_BACKOFF_MAX_MS : delay * 2))
	fi
	SUP_DELAY[i]=$delay
	SUP_DUE[i]=$((SUP_NOW + delay))
	log "$name (pid $pid) died: $(describe_status "$status"), after running $((ran / 1000))s; the end of $logfile:"
	tail -n 20 "$logfile" | sed 's/^/    /' >&2 || true
	log "restarting $name in $((delay / 1000))s, at $(printf '%(%H:%M:%S)T' "$((SUP_DUE[i] / 1000))") (the rest of the fleet keeps running)"
}

# sup_restart_due: restarts every process whose back-off is over.
sup_restart_due() {
	local i
	sup_now
	for i in "${!SUP_NAME[@]}"; do
		if [[ -z ${SUP_PID[$i]} ]] && ((SUP_DUE[i] <= SUP_NOW)); then
			printf -- '--- ops/up: restarting %s at %(%F %T)T ---\n' "${SUP_NAME[$i]}" -1 >>"${SUP_LOG[$i]}"
			sup_launch "$i"
			log "restarted ${SUP_NAME[$i]} (pid ${SUP_PID[$i]}), log appended to ${SUP_LOG[$i]}"
		fi
	done
}

sup_stop_timer() {
	if [[ -n $SUP_TIMER ]]; then
		kill -KILL "$SUP_TIMER" 2>/dev/null || true
		wait "$SUP_TIMER" 2>/dev/null || true
		SUP_TIMER=''
	fi
}

# supervise: runs until a stop signal (the INT/TERM trap exits): every process of the fleet
# that dies is reported and restarted after its back-off, the others keep running.
supervise() {
	local i status done_pid wait_ms
	while :; do
		# Deaths that `wait -n` did not report (see above).
		for i in "${!SUP_NAME[@]}"; do
			if [[ -n ${SUP_PID[$i]} ]] && ! kill -0 "${SUP_PID[$i]}" 2>/dev/null; then
				status=0
				wait "${SUP_PID[$i]}" 2>/dev/null || status=$?
				sup_died "$i" "$status"
			fi
		done
		sup_restart_due
		# Sleep until the next restart is due, at most a second.
		wait_ms=1000
		for i in "${!SUP_NAME[@]}"; do
			if [[ -z ${SUP_PID[$i]} ]] && ((SUP_DUE[i] - SUP_NOW < wait_ms)); then
				wait_ms=$((SUP_DUE[i] - SUP_NOW))
			fi
		done
		((wait_ms > 0)) || wait_ms=1
		SUP_CRITICAL=1
		sleep "$((wait_ms / 1000)).$(printf '%03d' "$((wait_ms % 1000))")" &
		SUP_TIMER=$!
		SUP_CRITICAL=0
		((SUP_STOP == 0)) || on_stop_signal
		sup_live_pids
		done_pid=''
		status=0
		# A trapped signal interrupts `wait` and runs the INT/TERM trap.
		wait -n -p done_pid "${SUP_LIVE[@]}" "$SUP_TIMER" 2>/dev/null || status=$?
		if [[ $done_pid == "$SUP_TIMER" ]]; then
			SUP_TIMER=''
			continue
		fi
		sup_stop_timer
		if [[ -n $done_pid ]] && i=$(sup_slot_of "$done_pid"); then
			sup_died "$i" "$status"
		fi
	done
}

# stop_procs [SECONDS]: SIGTERM to every running process of the fleet, then waits for them
# (engines drain), polling; after SECONDS the stragglers get SIGKILL. Returns non-zero when
# one of them did not exit cleanly (0, or 143 for a process that had not yet installed its
# SIGTERM handler, or a script like the mail platform that SIGTERM ends).
stop_procs() {
	local limit=${1:-45} rc=0 i pid status deadline left
	sup_stop_timer
	for i in "${!SUP_NAME[@]}"; do
		if [[ -n ${SUP_PID[$i]} ]]; then kill -TERM "${SUP_PID[$i]}" 2>/dev/null || true; fi
	done
	sup_now
	deadline=$((SUP_NOW + limit * 1000))
	while :; do
		left=0
		for i in "${!SUP_NAME[@]}"; do
			pid=${SUP_PID[$i]}
			[[ -n $pid ]] || continue
			if kill -0 "$pid" 2>/dev/null; then
				left=$((left + 1))
				continue
			fi
			status=0
			wait "$pid" 2>/dev/null || status=$?
			SUP_PID[i]=''
			rm -f "$(sup_pidfile "$i")"
			case "$status" in
			0 | 143) log "${SUP_NAME[$i]} stopped" ;;
			*)
				log "${SUP_NAME[$i]} exited with $(describe_status "$status")"
				rc=1
				;;
			esac
		done
		((left > 0)) || break
		sup_now
		if ((SUP_NOW >= deadline)); then
			for i in "${!SUP_NAME[@]}"; do
				pid=${SUP_PID[$i]}
				[[ -n $pid ]] || continue
				log "${SUP_NAME[$i]} (pid $pid) still runs after ${limit}s: SIGKILL"
				kill -KILL "$pid" 2>/dev/null || true
				wait "$pid" 2>/dev/null || true
				SUP_PID[i]=''
				rm -f "$(sup_pidfile "$i")"
			done
			rc=1
			break
		fi
		sleep 0.1
	done
	return "$rc"
}

# True when at least one process of the fleet runs.
sup_any_running() {
	local i
	for i in "${!SUP_NAME[@]}"; do
		if [[ -n ${SUP_PID[$i]} ]]; then return 0; fi
	done
	return 1
}

# wait_listening SLOT SECONDS: waits for the process's "listening on http://ADDR" line;
# prints ADDR.
wait_listening() {
	local i=$1 limit=$2
	local pid=${SUP_PID[$1]} name=${SUP_NAME[$1]} logfile=${SUP_LOG[$1]}
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

# Path of a release binary.
release_bin() { printf '%s\n' "$PROVISIO_TARGET/release/$1"; }

ensure_curl() {
	have curl || apt_install curl ca-certificates
}
