#!/usr/bin/env bash
# Start a real single-node SLURM (Debian 12 packages, slurm 22.05) for the end-to-end test.
#
#   bash tests/slurm/setup.sh [STATE_DIR]      (as root; default STATE_DIR=/tmp/knobsweep-slurm)
#
# Everything the daemons write lives in STATE_DIR: spool dirs, logs, PID files. The configuration
# goes to the default place, /etc/slurm/{slurm,gres}.conf, because the plugin's job step strips
# SLURM_CONF from the environment of its inner srun; setup.sh refuses to overwrite configuration
# files it did not write itself.
# The node has one fake GPU (gres with File=/dev/null) so `--gpus=1` jobs schedule and a second
# GPU job waits. No accounting (no slurmdbd): Snakemake polls with squeue (see profiles/slurm).
# Idempotent: packages are installed only when missing; daemons already started by us are reused.
# Stop everything with tests/slurm/teardown.sh STATE_DIR.
set -euo pipefail

STATE_DIR=${1:-${KNOBSWEEP_SLURM_DIR:-/tmp/knobsweep-slurm}}
WAIT_S=${KNOBSWEEP_SLURM_WAIT_S:-60}

log() { echo "[slurm-setup] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, starts munged/slurmctld/slurmd)"

# wait_for SECONDS COMMAND...: poll every 0.5 s; return 1 after SECONDS.
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# running PID: the process exists and is not a zombie (killed daemons may stay <defunct> when
# PID 1 does not reap orphans, as in containers).
running() { [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }
pid_alive() { [[ -s $1 ]] && running "$(cat "$1")"; }

# --- packages ---------------------------------------------------------------------------------
packages=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    # Keep the packages' init scripts from starting daemons we would not know the PIDs of.
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    ((created_policy)) && rm -f /usr/sbin/policy-rc.d
else
    log "packages already installed"
fi

mkdir -p "$STATE_DIR"/{spool/ctld,spool/d,log,run}
STATE_DIR=$(cd "$STATE_DIR" && pwd)
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
MARKER="# written by knobsweep tests/slurm/setup.sh"
for f in "$CONF" "$GRES_CONF"; do
    if [[ -e $f ]] && ! grep -qxF "$MARKER" "$f"; then
        die "$f exists and was not written by this script; refusing to overwrite a real cluster's configuration"
    fi
done
mkdir -p /etc/slurm

# --- munge ------------------------------------------------------------------------------------
# Reuse a munged that already answers (a real cluster node); otherwise start our own.
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munge already running"
else
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    # munged daemonises and writes its PID file into a directory it owns, where teardown looks.
    install -d -o munge -g munge -m 755 "$STATE_DIR/run/munge"
    runuser -u munge -- /usr/sbin/munged --pid-file="$STATE_DIR/run/munge/munged.pid" --force
    wait_for "$WAIT_S" bash -c 'munge -n | unmunge' || die "munged did not answer within ${WAIT_S}s"
    log "munged started (pid $(cat "$STATE_DIR/run/munge/munged.pid"))"
fi

# --- configuration ----------------------------------------------------------------------------
host=$(hostname -s)
getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >>/etc/hosts

# The node line from the hardware itself (a bare CPUs=N triggers socket/core warnings); leave
# 2 GiB (at least 20 %) of memory to the OS.
node_line=$(slurmd -C | head -n1)
real_mb=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
slurm_mb=$((real_mb - (real_mb / 5 > 2048 ? real_mb / 5 : 2048)))
node_line=$(sed "s/RealMemory=[0-9]*/RealMemory=$slurm_mb/" <<<"$node_line")

cat >"$CONF" <<EOF
$MARKER
# Single-node test cluster (state in $STATE_DIR)
ClusterName=knobsweep
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MailProg=/bin/true
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
# squeue-based status polling needs finished jobs to stay visible for >= 3 x the poll interval;
# the test also reads every job of a run back with scontrol afterwards.
MinJobAge=3600
SchedulerParameters=sched_interval=5
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
StateSaveLocation=$STATE_DIR/spool/ctld
SlurmdSpoolDir=$STATE_DIR/spool/d
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
$node_line Gres=gpu:1 State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
# slurmd 22.05 drops a GPU without a device file, so the fake GPU points at /dev/null.
cat >"$GRES_CONF" <<EOF
$MARKER
AutoDetect=off
NodeName=$host Name=gpu File=/dev/null
EOF

# --- daemons ----------------------------------------------------------------------------------
if pid_alive "$STATE_DIR/run/slurmctld.pid"; then
    log "slurmctld already running"
else
    rm -f "$STATE_DIR/run/slurmctld.pid"
    slurmctld -f "$CONF"
    wait_for "$WAIT_S" scontrol ping || die "slurmctld did not answer within ${WAIT_S}s (see $STATE_DIR/log)"
fi
if pid_alive "$STATE_DIR/run/slurmd.pid"; then
    log "slurmd already running"
else
    rm -f "$STATE_DIR/run/slurmd.pid"
    slurmd -f "$CONF"
fi

node_idle() { sinfo -h -n "$host" -o %T | grep -Eq '^(idle|mixed|allocated)$'; }
# A drain flag from an earlier broken configuration persists in the state dir: resume once.
if ! wait_for 20 node_idle; then
    scontrol update nodename="$host" state=resume || true
    wait_for "$WAIT_S" node_idle || die "node $host not idle: $(sinfo -h -N -o '%N %T %E') (see $STATE_DIR/log)"
fi
log "SLURM ready: $(sinfo -h -o '%P %T %D %G')  (config $CONF, state $STATE_DIR)"
