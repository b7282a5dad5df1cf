#!/usr/bin/env bash
# The vault against PostgreSQL's own limits, in one run on one machine.
#
# pgbench measures what this PostgreSQL can do with the vault's own `cards` table (durable
# single-row inserts, prepared primary-key selects); then the vault, on PostgreSQL and on its
# embedded SQLite, is loaded with `cardvault-bench` at the same client count. The ratios say
# whether the vault's write batching outruns one-row-per-commit and how close reveal comes
# to a bare select. docs/benchmarks.md explains every number.
#
# Usage: scripts/bench-vs-postgres.sh --help
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/bench-vs-postgres.sh [options]

  --clients N        pgbench clients and vault load concurrency (default 32; env BENCH_CLIENTS)
  --duration S       seconds per measured run (default 10; env BENCH_DURATION)
  --database-url URL admin URL used to create and drop scratch databases
                     (default $DATABASE_URL, else postgres://postgres@127.0.0.1:5432/postgres)
  --connections N    HTTP/2 connections of the load tool (default 4; env BENCH_CONNECTIONS)
  --warmup S         load-tool warm-up seconds before each vault run (default 2; env BENCH_WARMUP)
  --rows N           rows loaded before the pgbench select run (default 100000; env BENCH_ROWS)
  --import N         cards bulk-imported into the PostgreSQL vault (default 1000000; 0 skips;
                     env BENCH_IMPORT)
  --wide N           connections (and callers) of the memory run (default 64; env BENCH_WIDE)
  --out DIR          keep the raw results (pgbench output, load-tool JSON, samples) in DIR
  --skip-build       use the existing target/release/cardvault and cardvault-bench
  --no-load          skip the vault load runs (start, readiness and memory only)
  -h, --help         this text

Everything talks plain text over loopback (PGSSLMODE=disable, database.tls_mode=disable).
CARDVAULT_* variables in the environment reach the vault (e.g.
CARDVAULT_DATABASE_MAX_CONNECTIONS), except the addresses and database URL set here.
EOF
}

clients=${BENCH_CLIENTS:-32}
duration=${BENCH_DURATION:-10}
connections=${BENCH_CONNECTIONS:-4}
warmup=${BENCH_WARMUP:-2}
rows=${BENCH_ROWS:-100000}
import_cards=${BENCH_IMPORT:-1000000}
wide=${BENCH_WIDE:-64}
admin_url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
out_dir=""
skip_build=0
no_load=0

need_value() {
    if [[ $# -lt 2 || -z $2 ]]; then
        echo "bench-vs-postgres: $1 needs a value" >&2
        exit 2
    fi
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --clients) need_value "$@"; clients=$2; shift 2 ;;
        --duration) need_value "$@"; duration=$2; shift 2 ;;
        --database-url) need_value "$@"; admin_url=$2; shift 2 ;;
        --connections) need_value "$@"; connections=$2; shift 2 ;;
        --warmup) need_value "$@"; warmup=$2; shift 2 ;;
        --rows) need_value "$@"; rows=$2; shift 2 ;;
        --import) need_value "$@"; import_cards=$2; shift 2 ;;
        --wide) need_value "$@"; wide=$2; shift 2 ;;
        --out) need_value "$@"; out_dir=$2; shift 2 ;;
        --skip-build) skip_build=1; shift ;;
        --no-load) no_load=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench-vs-postgres: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ ! $import_cards =~ ^[0-9]+$ ]]; then
    echo "bench-vs-postgres: --import '$import_cards' is not a whole number" >&2
    exit 2
fi
for number in "$clients" "$duration" "$connections" "$warmup" "$rows" "$wide"; do
    if [[ ! $number =~ ^[1-9][0-9]*$ ]]; then
        echo "bench-vs-postgres: '$number' is not a positive whole number" >&2
        exit 2
    fi
done

log() { printf '== %s\n' "$*" >&2; }
die() {
    printf 'bench-vs-postgres: %s\n' "$*" >&2
    exit 1
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="${CARGO_TARGET_DIR:-$root/target}/release/cardvault"
# The load tool: a workspace member of its own, not a subcommand of the production binary.
bench_bin="${CARGO_TARGET_DIR:-$root/target}/release/cardvault-bench"

# Debian installs the server tools off PATH, per major version; take the newest.
find_pg_tool() {
    local found
    if found=$(command -v "$1"); then
        echo "$found"
        return
    fi
    found=$(compgen -G "/usr/lib/postgresql/*/bin/$1" | sort -V | tail -n 1 || true)
    [[ -n $found ]] || die "$1 not found on PATH or under /usr/lib/postgresql/*/bin"
    echo "$found"
}
psql_bin=$(find_pg_tool psql)
pgbench_bin=$(find_pg_tool pgbench)
command -v python3 >/dev/null || die "python3 is needed to read the load tool's JSON"

# Loopback benchmarking: TLS would measure the cipher, not the database.
export PGSSLMODE=disable
# A decimal point in $EPOCHREALTIME and tool output, whatever the user's locale.
export LC_ALL=C

work=$(mktemp -d "${TMPDIR:-/tmp}/cardvault-bench.XXXXXX")
scratch_dbs=()
vault_pid=""
sampler_pid=""
samples=""

stop_vault() {
    if [[ -n $sampler_pid ]]; then
        kill "$sampler_pid" 2>/dev/null || true
        wait "$sampler_pid" 2>/dev/null || true
        sampler_pid=""
    fi
    if [[ -n $vault_pid ]]; then
        # SIGTERM drains in-flight calls; give it a moment before insisting.
        kill -TERM "$vault_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$vault_pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$vault_pid" 2>/dev/null || true
        wait "$vault_pid" 2>/dev/null || true
        vault_pid=""
    fi
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_vault
    for db in "${scratch_dbs[@]}"; do
        "$psql_bin" "$admin_url" -qAt -v ON_ERROR_STOP=1 \
            -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 ||
            echo "bench-vs-postgres: could not drop scratch database $db" >&2
    done
    if [[ -n $out_dir ]]; then
        # Results only: the vaults' data directories (a keyring beside its database) stay
        # behind and are removed with the rest.
        mkdir -p "$out_dir"
        for item in "$work"/*; do
            case ${item##*/} in
                *-data) ;;
                *) cp -R "$item" "$out_dir"/ 2>/dev/null || true ;;
            esac
        done
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The admin URL with its database swapped for `name`. `strip_tls` drops sslmode/sslrootcert,
# which the vault refuses in its URL (database.tls_mode says it instead).
database_url() {
    python3 - "$1" "$2" "${3:-}" <<'PY'
import sys
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

url, name, strip_tls = sys.argv[1:4]
parts = urlsplit(url)
query = parse_qsl(parts.query, keep_blank_values=True)
if strip_tls:
    query = [(k, v) for k, v in query if k not in ("sslmode", "sslrootcert")]
print(urlunsplit(parts._replace(path="/" + name, query=urlencode(query))))
PY
}

create_scratch_db() {
    "$psql_bin" "$admin_url" -qAt -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$1\"" >/dev/null
    scratch_dbs+=("$1")
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------------------------------
log "checking PostgreSQL at the admin URL"
"$psql_bin" "$admin_url" -qAt -v ON_ERROR_STOP=1 -c "SELECT 1" >/dev/null ||
    die "cannot reach PostgreSQL at the admin URL (set --database-url or DATABASE_URL)"
pg_version=$("$psql_bin" "$admin_url" -qAt -c "SHOW server_version")
pg_sync=$("$psql_bin" "$admin_url" -qAt -c "SHOW synchronous_commit")
pg_fsync=$("$psql_bin" "$admin_url" -qAt -c "SHOW fsync")
# Other work on the machine skews every number; the header shows how idle it was just
# before (over one second: a load average would still remember a previous run).
idle_at_start=$(python3 - <<'PY'
import time

def cpu():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total

(idle0, total0), _ = cpu(), time.sleep(1)
idle1, total1 = cpu()
print(round(100 * (idle1 - idle0) / max(1, total1 - total0)))
PY
)

if [[ $skip_build -eq 0 ]]; then
    log "building the release binaries (the vault and the load tool)"
    (cd "$root" && cargo build --release --locked -p cardvault -p cardvault-bench)
fi
[[ -x $bin ]] || die "$bin not found: build it, or drop --skip-build"

if [[ $no_load -eq 0 ]] && ! "$bench_bin" --help >/dev/null 2>&1; then
    die "$bench_bin (the load tool) not found: build it (cargo build --release -p cardvault-bench), or pass --no-load"
fi

suffix="$$_$(date +%s)"
pgbench_db="cardvault_bench_pgbench_$suffix"
vault_db="cardvault_bench_vault_$suffix"

# ---------------------------------------------------------------------------------------
# (a) and (b): pgbench against the vault's own schema.
log "scratch database $pgbench_db with the vault's migrations"
create_scratch_db "$pgbench_db"
pgbench_url=$(database_url "$admin_url" "$pgbench_db")
CARDVAULT_DATABASE_URL=$(database_url "$admin_url" "$pgbench_db" strip) \
    CARDVAULT_DATABASE_TLS_MODE=disable \
    CARDVAULT_DATA_DIR="$work/migrate-data" \
    "$bin" migrate >"$work/migrate.log" 2>&1 ||
    { cat "$work/migrate.log" >&2; die "cardvault migrate failed"; }

# The foreign keys of `cards` need a tenant and a DEK; their key bytes are never read here.
dek_id=00000000-0000-4000-8000-000000000001
"$psql_bin" "$pgbench_url" -qAt -v ON_ERROR_STOP=1 >/dev/null <<SQL
INSERT INTO tenants (id, wrapped_secret, secret_kek_version, created_at)
    VALUES ('bench', decode(repeat('00', 60), 'hex'), 1, now());
INSERT INTO data_keys (id, tenant_id, kek_version, wrapped_key, active, created_at)
    VALUES ('$dek_id', 'bench', 1, decode(repeat('00', 60), 'hex'), true, now());
SQL

# Row values shaped like the vault's: a tok_ + 22-character token, a 75-byte ciphertext
# (29-byte header, ~30-byte PAN-and-name record, 16-byte tag), a 32-byte fingerprint; random bytes so
# nothing compresses better than real ciphertext would.
cat >"$work/insert.sql" <<SQL
INSERT INTO cards (token, tenant_id, token_format, fingerprint, dek_id, ciphertext,
                   brand, last4, bin, exp_month, exp_year, metadata, canonical, created_at,
                   expires_at, honeytoken)
VALUES ('tok_' || substr(md5(random()::text) || md5(random()::text), 1, 22), 'bench', 'opaque',
        decode(md5(random()::text) || md5(random()::text), 'hex'), '$dek_id',
        substring(decode(md5(random()::text) || md5(random()::text) || md5(random()::text)
                         || md5(random()::text) || md5(random()::text), 'hex') from 1 for 75),
        'visa', '4242', '42424242', 12, 2030, '{}'::jsonb, false, now(), NULL, false);
SQL

# The vault's own reveal read: the whole row by token and tenant, live only.
cat >"$work/select.sql" <<'SQL'
\set id random(1, :rows)
SELECT token, tenant_id, token_format, fingerprint, dek_id, ciphertext, brand, last4, bin,
       exp_month, exp_year, metadata::text AS metadata, canonical, created_at, expires_at,
       honeytoken
FROM cards
WHERE token = 'tok_' || lpad(:id::text, 22, '0') AND tenant_id = 'bench'
  AND (expires_at IS NULL OR expires_at > now());
SQL

# Runs pgbench with per-transaction logs, then writes {tps, p50, p99, ...} to NAME.json.
run_pgbench() {
    local name=$1 script=$2
    shift 2
    log "pgbench $name: $clients clients, -j 2, prepared, ${duration}s"
    mkdir -p "$work/$name-log"
    "$pgbench_bin" -n -c "$clients" -j 2 -M prepared -T "$duration" \
        -f "$script" -l --log-prefix "$work/$name-log/tx" "$@" "$pgbench_url" \
        >"$work/$name.out" 2>&1 ||
        { cat "$work/$name.out" >&2; die "pgbench $name failed"; }
    python3 - "$work/$name.out" "$work/$name-log" "$duration" >"$work/$name.json" <<'PY'
import json, os, re, sys

out, log_dir, duration = sys.argv[1], sys.argv[2], float(sys.argv[3])
text = open(out).read()
tps = re.search(r"^tps = ([0-9.]+)", text, re.M)
failed = re.search(r"^number of failed transactions: (\d+)", text, re.M)
done = re.search(r"^number of transactions actually processed: (\d+)", text, re.M)
# Per-transaction log: client, transaction, latency (us), script, epoch s, epoch us.
latencies = []
for name in os.listdir(log_dir):
    with open(os.path.join(log_dir, name)) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2].isdigit():
                latencies.append(int(fields[2]) / 1000.0)
latencies.sort()

def pct(p):
    if not latencies:
        return None
    return latencies[min(len(latencies) - 1, int(p / 100.0 * len(latencies)))]

print(json.dumps({
    "throughput_rps": float(tps.group(1)) if tps else None,
    "requests": int(done.group(1)) if done else len(latencies),
    "failed": int(failed.group(1)) if failed else 0,
    "latency_ms": {"p50": pct(50), "p99": pct(99), "max": latencies[-1] if latencies else None},
}))
PY
}

run_pgbench insert "$work/insert.sql"

log "loading $rows rows for the select run"
"$psql_bin" "$pgbench_url" -qAt -v ON_ERROR_STOP=1 >/dev/null <<SQL
INSERT INTO cards (token, tenant_id, token_format, fingerprint, dek_id, ciphertext,
                   brand, last4, bin, exp_month, exp_year, metadata, canonical, created_at,
                   expires_at, honeytoken)
SELECT 'tok_' || lpad(i::text, 22, '0'), 'bench', 'opaque',
       decode(md5(i::text) || md5(random()::text), 'hex'), '$dek_id',
       substring(decode(md5(random()::text) || md5(random()::text) || md5(random()::text)
                        || md5(random()::text) || md5(random()::text), 'hex') from 1 for 75),
       'visa', '4242', '42424242', 12, 2030, '{}'::jsonb, false, now(), NULL, false
FROM generate_series(1, $rows) AS i;
VACUUM ANALYZE cards;
SQL

run_pgbench select "$work/select.sql" -D "rows=$rows"

# ---------------------------------------------------------------------------------------
# (c) and (d): the vault, on PostgreSQL and on SQLite.

# Whether GET $1 answers 2xx (urlopen raises on anything else).
is_ready() {
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
        "$1" 2>/dev/null
}

# Starts `serve --dev` with the data directory $2 and, when given, the PostgreSQL URL $3;
# sets vault_pid, grpc_port and admin_port, and samples the vault's memory and CPU into
# $1-samples.tsv once a second.
start_vault() {
    local name=$1 data_dir=$2 url=${3:-}
    grpc_port=$(free_port)
    admin_port=$(free_port)
    local -a env_args=(
        "CARDVAULT_GRPC_ADDR=127.0.0.1:$grpc_port"
        "CARDVAULT_ADMIN_ADDR=127.0.0.1:$admin_port"
        # Per-request logs would measure the terminal; warnings still land in the log file.
        "CARDVAULT_LOG_LEVEL=${CARDVAULT_LOG_LEVEL:-warn}"
        # The per-principal reveal limit (600/min) would cap the reveal run at 10 rps: this
        # measures capacity, so lift it (u32::MAX).
        "CARDVAULT_LIMITS_REVEAL_PER_MINUTE=4294967295"
        "CARDVAULT_LIMITS_REVEAL_BURST=4294967295"
    )
    if [[ -n $url ]]; then
        env_args+=("CARDVAULT_DATABASE_URL=$url" "CARDVAULT_DATABASE_TLS_MODE=disable")
    fi
    log "starting the vault ($name) on gRPC 127.0.0.1:$grpc_port, admin 127.0.0.1:$admin_port"
    env -u CARDVAULT_DATABASE_URL "${env_args[@]}" \
        "$bin" serve --dev --data-dir "$data_dir" >"$work/$name-vault.log" 2>&1 &
    vault_pid=$!

    local deadline=$((SECONDS + 60))
    until is_ready "http://127.0.0.1:$admin_port/readyz"; do
        if ! kill -0 "$vault_pid" 2>/dev/null; then
            cat "$work/$name-vault.log" >&2
            vault_pid=""
            die "the vault ($name) exited before it was ready"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$work/$name-vault.log" >&2
            die "the vault ($name) was not ready within 60 s"
        fi
        sleep 0.2
    done

    echo idle >"$work/phase"
    # The idle sample is taken here, not by the sampler: the first load run may start
    # before the sampler's first tick.
    samples="$work/$name-samples.tsv"
    sample_vault >"$samples"
    (
        while sample_vault; do
            sleep 1
        done
    ) >>"$samples" &
    sampler_pid=$!
}

# One line about the running vault: wall-clock time, phase, VmRSS (KiB), user + system CPU
# (clock ticks). Fails once the vault is gone.
sample_vault() {
    local rss cpu
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$vault_pid/status" 2>/dev/null) || return 1
    cpu=$(awk '{ print $14 + $15 }' "/proc/$vault_pid/stat" 2>/dev/null) || return 1
    [[ -n $rss && -n $cpu ]] || return 1
    printf '%s\t%s\t%s\t%s\n' "$EPOCHREALTIME" "$(cat "$work/phase")" "$rss" "$cpu"
}

# Runs the load tool; its JSON goes to NAME.json.
run_load() {
    local name=$1 rpc=$2
    shift 2
    echo "$name" >"$work/phase"
    log "cardvault-bench $name: --rpc $rpc --concurrency $clients --connections $connections $*"
    if ! "$bench_bin" --target "http://127.0.0.1:$grpc_port" --rpc "$rpc" \
        --concurrency "$clients" --connections "$connections" \
        --duration "${duration}s" --warmup "${warmup}s" --json "$@" \
        >"$work/$name.json" 2>"$work/$name.err"; then
        cat "$work/$name.err" >&2
        die "cardvault-bench $name failed"
    fi
    # Closes the phase on the dot, not up to a second early at the sampler's last tick.
    sample_vault >>"$samples"
}

# Tokenize with WIDE callers over as many connections: the memory run.
run_wide() {
    local name=$1
    echo "$name" >"$work/phase"
    log "cardvault-bench $name: --rpc tokenize --concurrency $wide --connections $wide"
    if ! "$bench_bin" --target "http://127.0.0.1:$grpc_port" --rpc tokenize \
        --concurrency "$wide" --connections "$wide" \
        --duration "${duration}s" --warmup "${warmup}s" --json \
        >"$work/$name.json" 2>"$work/$name.err"; then
        cat "$work/$name.err" >&2
        die "cardvault-bench $name failed"
    fi
    sample_vault >>"$samples"
}

# Bulk import of IMPORT cards, 1000 per chunk, over 2 streams.
run_import() {
    local name=$1
    echo "$name" >"$work/phase"
    log "cardvault-bench $name: --rpc import --requests $import_cards"
    if ! "$bench_bin" --target "http://127.0.0.1:$grpc_port" --rpc import \
        --requests "$import_cards" --chunk 1000 --concurrency 2 --connections 2 --json \
        >"$work/$name.json" 2>"$work/$name.err"; then
        cat "$work/$name.err" >&2
        die "cardvault-bench $name failed"
    fi
    sample_vault >>"$samples"
}

# Half of the closed-loop peak of NAME.json, at least 1 request per second.
half_rate() {
    python3 - "$work/$1.json" <<'PY'
import json, sys
print(max(1, int(json.load(open(sys.argv[1]))["throughput_rps"] // 2)))
PY
}

# The full run of one backend, then its memory high-water mark into NAME-hwm.
bench_vault() {
    local name=$1
    if [[ $no_load -eq 0 ]]; then
        run_load "$name-tokenize" tokenize
        run_load "$name-reveal" reveal
        run_load "$name-tokenize-half" tokenize --rate "$(half_rate "$name-tokenize")"
        run_load "$name-reveal-half" reveal --rate "$(half_rate "$name-reveal")"
        run_wide "$name-wide"
        if [[ $name == pg && $import_cards -gt 0 ]]; then
            run_import "$name-import"
        fi
    else
        log "--no-load: holding the idle vault for 3 s to sample its memory"
        sleep 3
    fi
    echo finished >"$work/phase"
    awk '/^VmHWM:/ { print $2 }' "/proc/$vault_pid/status" >"$work/$name-hwm"
    stop_vault
}

log "scratch database $vault_db for the vault"
create_scratch_db "$vault_db"
start_vault pg "$work/vault-pg-data" "$(database_url "$admin_url" "$vault_db" strip)"
bench_vault pg

start_vault sqlite "$work/vault-sqlite-data"
bench_vault sqlite

# ---------------------------------------------------------------------------------------
# (e) the table.
python3 - "$work" "$clients" "$duration" "$connections" "$no_load" \
    "$pg_version" "$pg_sync" "$pg_fsync" "$(nproc)" "$idle_at_start" "$(getconf CLK_TCK)" \
    "$wide" <<'PY'
import json, os, sys

(work, clients, duration, connections, no_load, pg_version, pg_sync, pg_fsync, cores,
 idle_at_start, clock_ticks, wide) = sys.argv[1:13]
clock_ticks = int(clock_ticks)
no_load = no_load == "1"


def load(name):
    path = os.path.join(work, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def num(value, digits=0):
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def errors_of(run):
    if "failed" in run:
        return run["failed"]
    return sum((run.get("errors") or {}).values())


interrupted = [name for name in sorted(os.listdir(work))
               if name.endswith(".json") and (load(name[:-5]) or {}).get("interrupted")]


def row(label, run):
    if run is None:
        return f"  {label:<34}{'n/a':>10}{'n/a':>10}{'n/a':>10}{'n/a':>9}"
    lat = run.get("latency_ms") or {}
    return (f"  {label:<34}{num(run.get('throughput_rps')):>10}"
            f"{num(lat.get('p50'), 2):>10}{num(lat.get('p99'), 2):>10}{errors_of(run):>9,}")


def ratio(a, b):
    if a is None or b is None or not b.get("throughput_rps"):
        return None
    return a["throughput_rps"] / b["throughput_rps"]


def verdict(ok):
    return "n/a" if ok is None else ("ok" if ok else "MISSED")


insert, select = load("insert"), load("select")
print()
print(f"cardvault vs PostgreSQL {pg_version} (synchronous_commit={pg_sync}, fsync={pg_fsync}); "
      f"{cores} cores ({idle_at_start} % idle at start); {clients} clients; "
      f"{duration} s per run; load tool: {connections} connections")
print()
print(f"  {'closed loop':<34}{'rps':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>9}")
print(row("pgbench insert (1 row/commit)", insert))
print(row("pgbench select (primary key)", select))
for backend, label in (("pg", "PostgreSQL"), ("sqlite", "SQLite")):
    print(row(f"vault tokenize ({label})", load(f"{backend}-tokenize")))
    print(row(f"vault reveal   ({label})", load(f"{backend}-reveal")))

print()
print(f"  {'ratio (PostgreSQL backend)':<34}{'value':>10}{'target':>10}{'':>10}")
tok = ratio(load("pg-tokenize"), insert)
rev = ratio(load("pg-reveal"), select)
print(f"  {'tokenize / pgbench insert':<34}{num(tok, 2):>10}{'>= 1.5':>10}"
      f"{verdict(None if tok is None else tok >= 1.5):>10}")
print(f"  {'reveal / pgbench select':<34}{num(rev, 2):>10}{'>= 0.5':>10}"
      f"{verdict(None if rev is None else rev >= 0.5):>10}")

print()
# late: sends that left over 1 ms after their slot because every worker was busy (the
# wait is in the latencies); the load tool reports it for open-loop runs.
print(f"  {'open loop at half of peak':<34}{'rate':>10}{'got rps':>10}{'p50 ms':>10}"
      f"{'p99 ms':>10}{'late':>8}{'p99 <= 5 ms':>13}")
for backend, label in (("pg", "PostgreSQL"), ("sqlite", "SQLite")):
    for rpc in ("tokenize", "reveal"):
        run = load(f"{backend}-{rpc}-half") or {}
        lat = run.get("latency_ms") or {}
        p99 = lat.get("p99")
        late = run.get("late_sends")
        print(f"  {f'vault {rpc:<8} ({label})':<34}{num(run.get('rate')):>10}"
              f"{num(run.get('throughput_rps')):>10}{num(lat.get('p50'), 2):>10}"
              f"{num(p99, 2):>10}{num(late):>8}"
              f"{verdict(None if p99 is None else p99 <= 5.0):>13}")

print()
# The memory run: as many HTTP/2 connections as callers.
print(f"  {f'tokenize, {wide} connections':<34}{'rps':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>9}")
for backend, label in (("pg", "PostgreSQL"), ("sqlite", "SQLite")):
    print(row(f"vault tokenize ({label})", load(f"{backend}-wide")))

imported = load("pg-import")
if imported is not None:
    print()
    seconds = imported["duration_s"]
    per_million = seconds * 1_000_000 / max(1, imported["cards"])
    lat = imported.get("chunk_latency_ms") or {}
    print(f"  {'bulk import (PostgreSQL)':<34}{'cards':>10}{'seconds':>10}{'cards/s':>10}"
          f"{'chunk p99':>10}{'1M <= 10 s':>12}")
    print(f"  {'ImportCards, 1000 per chunk':<34}{num(imported['cards']):>10}{num(seconds, 1):>10}"
          f"{num(imported['cards_per_s']):>10}{num(lat.get('p99'), 0):>10}"
          f"{verdict(per_million <= 10.0):>12}")
    print(f"  {'outcomes':<34}" + ", ".join(f"{k} {v:,}" for k, v in imported["outcomes"].items()))

print()
# Per phase: VmRSS at its last sample, and the vault's CPU between the end of the previous
# phase and the end of this one, in % of one core (warm-up and the reveal pool included).
phases = ["idle", "tokenize", "reveal", "tokenize-half", "reveal-half", "wide", "import"]
print(f"  {'vault, at end of each phase':<34}" + "".join(f"{p:>14}" for p in phases)
      + f"{'peak VmHWM':>12}")
for backend, label in (("pg", "PostgreSQL"), ("sqlite", "SQLite")):
    last = {}
    path = os.path.join(work, f"{backend}-samples.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 4:
                    phase = parts[1].removeprefix(backend + "-")
                    last[phase] = (float(parts[0]), int(parts[2]), int(parts[3]))
    rss, cpu = {}, {}
    previous = None
    for phase in phases:
        if phase not in last:
            continue
        t, kib, ticks = last[phase]
        rss[phase] = kib / 1024
        if previous is not None and t > previous[0]:
            cpu[phase] = (ticks - previous[2]) / clock_ticks / (t - previous[0]) * 100
        previous = last[phase]
    hwm_path = os.path.join(work, f"{backend}-hwm")
    hwm = None
    if os.path.exists(hwm_path):
        text = open(hwm_path).read().strip()
        hwm = int(text) / 1024 if text.isdigit() else None
    print(f"  {f'RSS MiB ({label})':<34}" + "".join(f"{num(rss.get(p), 1):>14}" for p in phases)
          + f"{num(hwm, 1):>12}")
    print(f"  {f'CPU % of one core ({label})':<34}"
          + "".join(f"{num(cpu.get(p)):>14}" for p in phases))
if interrupted:
    print()
    print("  interrupted runs (numbers cover part of the duration only): "
          + ", ".join(name[:-5] for name in interrupted))
if no_load:
    print()
    print("  --no-load: the vault was started and sampled idle; no load-tool runs.")
PY
