#!/usr/bin/env bash
# Runs longer than one device call (each call has a 10-minute limit), on the GPU host:
#
#   bash benchmarks/device/background.sh start NAME 'COMMANDS'   # in its own session
#   bash benchmarks/device/background.sh poll SECONDS            # wait, report, copy
#
# `start` runs COMMANDS (a bash command line, e.g. several benchmarks joined by `;`) from
# the checkout with benchmarks/device/env.sh sourced, detached from the call, logging to
# /tmp/bg/NAME.log; each command's first line and exit status are logged too. `poll` waits
# up to SECONDS (returning early once nothing is running), prints the last lines of each
# log and copies /tmp/bg (logs, and the JSON and PNG files the commands wrote under /tmp/bg) to $OUT,
# so every call brings back what has finished so far. Make the next call within 30 s of
# the last one: the host is given back after that.
set -uo pipefail
BG=/tmp/bg
mkdir -p "$BG"
case "${1:-}" in
start)
    name=$2
    cmds=$3
    printf '%s\n' "$cmds" > "$BG/$name.cmd"
    {
        echo "cd '$PWD' && . benchmarks/device/env.sh > /dev/null"
        echo "echo \"== \$(date +%T) start:\"; cat '$BG/$name.cmd'"
        cat "$BG/$name.cmd"
        echo "rc=\$?; echo \"== \$(date +%T) exit status \$rc\""
    } > "$BG/$name.sh"
    setsid nohup bash "$BG/$name.sh" > "$BG/$name.log" 2>&1 < /dev/null &
    echo $! > "$BG/$name.pid"
    echo "started $name (pid $(cat "$BG/$name.pid")), log $BG/$name.log"
    ;;
poll)
    end=$((SECONDS + $2))
    running() {
        for p in "$BG"/*.pid; do
            [ -e "$p" ] && kill -0 "$(cat "$p")" 2> /dev/null && return 0
        done
        return 1
    }
    while [ $SECONDS -lt $end ] && running; do sleep 2; done
    for log in "$BG"/*.log; do
        [ -e "$log" ] || continue
        echo "---- $log"
        # progress bars rewrite one line with \r: keep only each bar's last state
        tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -n 15
    done
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader 2> /dev/null
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/bg"
        (cd "$BG" && find . -maxdepth 3 -type f \( -name '*.log' -o -name '*.json' -o -name '*.png' \) \
            -size -8M -exec cp --parents -t "$OUT/bg" {} +)
    fi
    ;;
*)
    echo "usage: $0 start NAME 'COMMANDS' | poll SECONDS" >&2
    exit 2
    ;;
esac
