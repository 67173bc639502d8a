#!/usr/bin/env bash
# Stop the daemons tests/slurm/setup.sh started, by their PID files, and remove the PID files.
#
#   bash tests/slurm/teardown.sh [STATE_DIR] [--purge]
#
# Only processes named in STATE_DIR/run/*.pid are stopped (a munged that was already running
# before setup.sh has no PID file there and is left alone). --purge also deletes STATE_DIR and
# the /etc/slurm/{slurm,gres}.conf that setup.sh wrote (recognised by its marker line).
# Packages stay installed.
set -uo pipefail

STATE_DIR=${KNOBSWEEP_SLURM_DIR:-/tmp/knobsweep-slurm}
purge=0
for arg in "$@"; do
    case $arg in
        --purge) purge=1 ;;
        *) STATE_DIR=$arg ;;
    esac
done
WAIT_S=${KNOBSWEEP_SLURM_WAIT_S:-30}

log() { echo "[slurm-teardown] $*" >&2; }
# running PID: the process exists and is not a zombie (killed daemons may stay <defunct> when
# PID 1 does not reap orphans, as in containers).
running() { [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }

# stop NAME: SIGTERM the PID in STATE_DIR/run/NAME.pid (NAME may hold a subdirectory), wait, then SIGKILL; remove the file.
stop() {
    local pidfile=$STATE_DIR/run/$1.pid pid
    [[ -s $pidfile ]] || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    if running "$pid"; then
        kill -TERM "$pid"
        local deadline=$((SECONDS + WAIT_S))
        while running "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
        if running "$pid"; then
            log "$1 (pid $pid) ignored SIGTERM for ${WAIT_S}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
        log "stopped $1 (pid $pid)"
    fi
    rm -f "$pidfile"
}

if [[ -d $STATE_DIR ]]; then
    # Jobs first (their steps are children of slurmstepd, which slurmd does not stop), then the
    # daemons in reverse start order.
    if [[ -s $STATE_DIR/run/slurmctld.pid ]] && running "$(cat "$STATE_DIR/run/slurmctld.pid")"; then
        timeout 20 scancel --full --quiet --user="$(id -un)" || true
    fi
    stop slurmd
    stop slurmctld
    stop munge/munged
fi
if ((purge)); then
    rm -rf "$STATE_DIR"
    for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
        grep -qxF "# written by knobsweep tests/slurm/setup.sh" "$f" 2>/dev/null && rm -f "$f"
    done
fi
exit 0
