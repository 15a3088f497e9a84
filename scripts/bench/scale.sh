#!/usr/bin/env bash
# The daemon's cost as users and database entries grow, against the RDS stand-in (release
# build, static keys from the environment), with short tokens so that refreshes, RELOADs and
# pool refreshes happen many times per run:
#   auth-query and passthrough mode with 1, 100 and 1,000 allowed users (one [[databases]]
#   entry, users = [...]); config mode with 1, 50 and 500 [[databases]] entries, each with a
#   user of its own (so one token per entry).
# Every (database, user) pair is an application: scripts/bench/scale_clients.py keeps one
# long-lived client per pair running `SELECT 1` every BENCH_QUERY_INTERVAL s and makes a fresh
# login per pair every BENCH_LOGIN_INTERVAL s. The stand-in gets one IAM role per user.
# Measured over BENCH_DURATION s once every long-lived client of the group has logged in:
#   - daemon CPU seconds per hour (utime + stime from /proc/PID/stat), and its PgBouncer's;
#   - daemon VmRSS sampled every second (max and at the end) and VmHWM;
#   - per token lifetime: RELOADs (the daemon's counter and PgBouncer's "RELOAD command
#     issued"), auth_query answers of the endpoint (PgBouncer's logins that ran auth_query),
#     server logins at the stand-in (its log_connections lines for the configuration's users),
#     token refreshes;
#   - failed client logins and queries over the whole run, ramp-up included (goal: zero).
# Passthrough mode needs a relay connection per server connection: past the relay's limit
# (512 by default) logins fail with "too many clients", and the failures column shows it.
# Configurations in one group run at the same time (BENCH_GROUPS: groups separated by spaces,
# configurations in a group by commas): CPU seconds and RSS are per process, so they stay
# meaningful, but the load average is shared and the summary says so.
#
# Environment (defaults in brackets):
#   BENCH_DURATION [600] s per group  BENCH_TOKEN_LIFETIME [30] s  BENCH_QUERY_INTERVAL [10] s
#   BENCH_LOGIN_INTERVAL [60] s  BENCH_STANDIN_MAX_CONNECTIONS [1300]
#   BENCH_GROUPS ["auth-query:1000,config:1,auth-query:1,passthrough:1
#                  passthrough:1000,config:50 config:500,auth-query:100,passthrough:100"]
#   BENCH_RESULTS [target/bench-results/...]  AWS_PGBOUNCER_BIN (else the release build)
set -euo pipefail
DURATION=${BENCH_DURATION:-600}
LIFETIME=${BENCH_TOKEN_LIFETIME:-30}
QUERY_INTERVAL=${BENCH_QUERY_INTERVAL:-10}
LOGIN_INTERVAL=${BENCH_LOGIN_INTERVAL:-60}
CONFIG_GROUPS=${BENCH_GROUPS:-"auth-query:1000,config:1,auth-query:1,passthrough:1 passthrough:1000,config:50 config:500,auth-query:100,passthrough:100"}
# Each pair holds a server connection: the stand-in must take a whole group's.
STANDIN_CONF="max_connections = ${BENCH_STANDIN_MAX_CONNECTIONS:-1300}"
# shellcheck source=scripts/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

machine_line | tee "$RESULTS/machine.txt" >&2
daemon_binary
start_standin
say "stand-in on 127.0.0.1:$STANDIN_PORT"
CLK_TCK=$(getconf CLK_TCK)

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; } # utime + stime
metric_sum() { # metric_sum NAME FILE: the sum of a counter's series in a /metrics dump
    awk -v n="$1" '$1 == n || index($1, n "{") == 1 {s += $2} END {printf "%d\n", s}' "$2"
}
scrape() { curl -s --max-time 10 "http://127.0.0.1:${bench_http[$1]}/metrics" >"$2"; }
server_logins() { grep -c "connection authorized: user=$1_u" "$RESULTS/standin.log" || true; }
pgbouncer_reloads() { cat "$RESULTS/$1-daemon.log" "${bench_dir[$1]}"/*.log 2>/dev/null | grep -c 'RELOAD command issued' || true; }

# IAM roles NAME_u1 .. NAME_uCOUNT at the stand-in.
create_roles() {
    standin_sql -d postgres <<EOF >/dev/null
SELECT format('CREATE ROLE %I LOGIN IN ROLE rds_iam', '$1_u' || i) FROM generate_series(1, $2) AS i
\gexec
EOF
}

# start_config MODE COUNT: the roles, the daemon's config, the daemon and the pairs file.
start_config() {
    local mode=$1 count=$2 i users # sets the caller's name
    name=${mode%%-*}$count # config50, auth1000, passthrough100
    create_roles "$name" "$count"
    prepare_aws "$name"
    {
        echo "mode = \"$mode\""
        echo "pgbouncer_dir = \"${bench_dir[$name]}\""
        echo "listen = \"127.0.0.1:${bench_port[$name]}\""
        echo "token_lifetime = $LIFETIME"
        echo "server_ca_file = \"$STANDIN_DIR/ca.crt\""
        echo
        echo "[pgbouncer]"
        echo 'pool_mode = "transaction"'
        echo "default_pool_size = 1"
        echo "max_client_conn = $((3 * count + 100))"
        entry() { # entry NAME USER_LINE
            printf '\n[[databases]]\nname = "%s"\nhost = "localhost"\nport = %s\ndbname = "appdb"\nregion = "us-east-1"\n%s\n' \
                "$1" "$STANDIN_PORT" "$2"
        }
        if [ "$mode" = config ]; then
            for ((i = 1; i <= count; i++)); do entry "${name}_d$i" "user = \"${name}_u$i\""; done
        else
            users=$(seq -f "\"${name}_u%g\"" 1 "$count" | paste -sd, -)
            entry appdb "users = [$users]"
        fi
    } >"$WORK/$name.toml"
    for ((i = 1; i <= count; i++)); do
        if [ "$mode" = config ]; then echo "${name}_d$i ${name}_u$i"; else echo "appdb ${name}_u$i"; fi
    done >"$WORK/$name.pairs"
    launch_aws "$name"
}

run_group() { # run_group INDEX CONFIGS (mode:count,...)
    local group=$1 spec name mode count pid t_start t_end sample
    local -a names=()
    declare -A load_pid pgb_pid
    IFS=, read -r -a specs <<<"$2"
    for spec in "${specs[@]}"; do
        mode=${spec%%:*}
        count=${spec##*:}
        start_config "$mode" "$count"
        names+=("$name")
        kind[$name]=$mode
        size[$name]=$count
    done
    say "group $group: ${names[*]}: clients logging in"
    for name in "${names[@]}"; do
        start_bg "$RESULTS/$name-clients.json" python3 "$REPO/scripts/bench/scale_clients.py" \
            --port "${bench_port[$name]}" --pairs "$WORK/$name.pairs" --ready "$WORK/$name.ready" \
            --stop "$WORK/group$group.stop" --query-interval "$QUERY_INTERVAL" --login-interval "$LOGIN_INTERVAL"
        load_pid[$name]=$LAST_PID
    done
    for name in "${names[@]}"; do
        until [ -f "$WORK/$name.ready" ]; do
            kill -0 "${load_pid[$name]}" 2>/dev/null || { cat "$RESULTS/$name-clients.json" >&2; say "$name: client load died"; exit 1; }
            sleep 1
        done
        ramp[$name]=$(cat "$WORK/$name.ready")
        say "$name: every long-lived client logged in after ${ramp[$name]} s"
    done
    for name in "${names[@]}"; do
        pid=${bench_daemon_pid[$name]}
        pgb_pid[$name]=$(pgrep -P "$pid" | head -n 1)
        scrape "$name" "$RESULTS/$name-metrics-before.txt"
        cpu0[$name]=$(cpu_ticks "$pid")
        pgbcpu0[$name]=$(cpu_ticks "${pgb_pid[$name]}")
        logins0[$name]=$(server_logins "$name")
        pgreloads0[$name]=$(pgbouncer_reloads "$name")
        rss_max[$name]=0
    done
    say "group $group: measuring for $DURATION s (load average $(loadavg))"
    load_start[$group]=$(cut -d' ' -f1-3 /proc/loadavg)
    t_start=$(date +%s.%N)
    while [ "$(awk -v s="$t_start" -v n="$(date +%s.%N)" 'BEGIN {print (n - s < '"$DURATION"')}')" = 1 ]; do
        for name in "${names[@]}"; do
            sample=$(rss_kib "${bench_daemon_pid[$name]}")
            [ "$sample" -le "${rss_max[$name]}" ] || rss_max[$name]=$sample
        done
        sleep 1
    done
    t_end=$(date +%s.%N)
    load_end[$group]=$(cut -d' ' -f1-3 /proc/loadavg)
    for name in "${names[@]}"; do
        pid=${bench_daemon_pid[$name]}
        window[$name]=$(awk -v a="$t_start" -v b="$t_end" 'BEGIN {printf "%.1f", b - a}')
        cpu1[$name]=$(cpu_ticks "$pid")
        pgbcpu1[$name]=$(cpu_ticks "${pgb_pid[$name]}")
        rss_end[$name]=$(rss_kib "$pid")
        hwm[$name]=$(hwm_kib "$pid")
        scrape "$name" "$RESULTS/$name-metrics-after.txt"
        logins1[$name]=$(server_logins "$name")
        pgreloads1[$name]=$(pgbouncer_reloads "$name")
        in_group[$name]=$group
    done
    touch "$WORK/group$group.stop"
    for name in "${names[@]}"; do
        wait "${load_pid[$name]}" || say "$name: client load exited $?"
    done
    for name in "${names[@]}"; do stop_started "${bench_daemon_pid[$name]}"; done
    order+=("${names[@]}")
}

declare -A kind size ramp cpu0 cpu1 pgbcpu0 pgbcpu1 logins0 logins1 pgreloads0 pgreloads1 \
    rss_max rss_end hwm window in_group load_start load_end
order=()
group=0
for configs in $CONFIG_GROUPS; do
    group=$((group + 1))
    run_group "$group" "$configs"
done

# --- summary -----------------------------------------------------------------------------------
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
per_hour() { awk -v t="$1" -v w="$2" -v hz="$CLK_TCK" 'BEGIN {printf "%.1f", t / hz / w * 3600}'; }
per_lifetime() { awk -v d="$1" -v w="$2" -v l="$LIFETIME" 'BEGIN {printf "%.1f", d / w * l}'; }
delta() { # delta METRIC NAME: the counter's growth over NAME's window
    echo $(($(metric_sum "$1" "$RESULTS/$2-metrics-after.txt") - $(metric_sum "$1" "$RESULTS/$2-metrics-before.txt")))
}
json() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$RESULTS/$1-clients.json" "$2"; }
{
    echo "command: BENCH_DURATION=$DURATION BENCH_TOKEN_LIFETIME=$LIFETIME BENCH_QUERY_INTERVAL=$QUERY_INTERVAL BENCH_LOGIN_INTERVAL=$LOGIN_INTERVAL BENCH_GROUPS=\"$CONFIG_GROUPS\" bash scripts/bench/scale.sh"
    cat "$RESULTS/machine.txt"
    echo "binary: $("$DAEMON" --version); token lifetime $LIFETIME s; each window ${DURATION} s after ramp-up"
    for ((g = 1; g <= group; g++)); do
        echo "group $g ran at the same time: $(for n in "${order[@]}"; do [ "${in_group[$n]}" != "$g" ] || printf '%s ' "$n"; done)(load average ${load_start[$g]} at start, ${load_end[$g]} at end)"
    done
    echo
    printf '%-16s %5s %6s | %8s %8s | %7s %7s %7s | %7s %7s %7s %7s %7s | %6s %6s %5s %5s\n' \
        config pairs ramp_s cpu_s/h pgb_cpu rss_max rss_end hwm reloads pgb_rld authq srv_in refresh \
        logins failed f_qry drop
    printf '%-16s %5s %6s | %17s | %23s | %39s | %s\n' "" "" "" "daemon, PgBouncer" "MiB" \
        "per token lifetime" "client logins, failures (whole run)"
    for name in "${order[@]}"; do
        w=${window[$name]}
        printf '%-16s %5s %6s | %8s %8s | %7s %7s %7s | %7s %7s %7s %7s %7s | %6s %6s %5s %5s\n' \
            "${kind[$name]}" "${size[$name]}" "${ramp[$name]}" \
            "$(per_hour $((cpu1[$name] - cpu0[$name])) "$w")" "$(per_hour $((pgbcpu1[$name] - pgbcpu0[$name])) "$w")" \
            "$(mib "${rss_max[$name]}")" "$(mib "${rss_end[$name]}")" "$(mib "${hwm[$name]}")" \
            "$(per_lifetime "$(delta aws_pgbouncer_pgbouncer_reloads_total "$name")" "$w")" \
            "$(per_lifetime $((pgreloads1[$name] - pgreloads0[$name])) "$w")" \
            "$(per_lifetime "$(delta aws_pgbouncer_auth_query_requests_total "$name")" "$w")" \
            "$(per_lifetime $((logins1[$name] - logins0[$name])) "$w")" \
            "$(per_lifetime "$(delta aws_pgbouncer_token_refreshes_total "$name")" "$w")" \
            "$(json "$name" logins)" "$(json "$name" failed_logins)" "$(json "$name" failed_queries)" \
            "$(json "$name" dropped)"
    done
    echo
    echo "columns: ramp_s = seconds until every long-lived client had logged in; cpu_s/h = utime + stime"
    echo "  per hour of the window, of the daemon and of its PgBouncer; rss = the daemon's VmRSS (max of"
    echo "  1-s samples, at the end) and VmHWM (ramp-up included); reloads = the daemon's reloads counter,"
    echo "  pgb_rld = PgBouncer's 'RELOAD command issued'; authq = auth_query answers of the endpoint (PgBouncer"
    echo "  logins that ran auth_query); srv_in = server logins at the stand-in; refresh = tokens minted"
    echo "goals: cost linear in users; RELOADs <= 1 per 2 s (<= $((LIFETIME / 2)) per token lifetime);"
    echo "       RSS < 20 MiB at 1,000 users; RSS < 10 MiB at 1 user; zero failed logins"
    for name in "${order[@]}"; do
        errors=$(python3 -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["errors"]))' "$RESULTS/$name-clients.json")
        [ -z "$errors" ] || printf '%s: first errors:\n%s\n' "$name" "$errors"
    done
} | tee "$RESULTS/summary.txt"
say "raw outputs in $RESULTS"
