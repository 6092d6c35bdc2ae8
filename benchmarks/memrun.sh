#!/usr/bin/env bash
# usage: memrun.sh <cmd...>: prints wall and peak (MemTotal-MemAvailable) above the idle figure taken before
used() { awk '/MemTotal/{t=$2}/MemAvailable/{a=$2}END{print t-a}' /proc/meminfo; }
idle=$(used); peak=$idle; start=$(date +%s.%N)
"$@" & pid=$!
while kill -0 $pid 2>/dev/null; do u=$(used); [ $u -gt $peak ] && peak=$u; sleep 0.5; done
wait $pid; rc=$?
end=$(date +%s.%N)
echo "MEMRUN rc=$rc wall=$(echo "$end - $start" | bc) s idle=$((idle/1024)) MB peak_above_idle=$(((peak-idle)/1024)) MB"
