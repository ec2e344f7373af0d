#!/usr/bin/env bash
# A real single-host SLURM (slurmctld + slurmd, Debian packages) for the test suite: no systemd, no cgroups,
# no accounting database, auth/none. CI-only: any local user could impersonate another to this SLURM.
#
#   scripts/slurm_local.sh start    # installs missing packages, starts the daemons, waits until the node is idle
#   scripts/slurm_local.sh stop     # stops the daemons it started
#   export SLURM_CONF=/tmp/medmae-slurm/slurm.conf   # then sbatch/srun/scontrol talk to it
#
# Settings: MEDMAE_SLURM_DIR (state, default /tmp/medmae-slurm), MEDMAE_SLURM_CPUS (CPUs advertised, default 4).
set -euo pipefail
DIR="${MEDMAE_SLURM_DIR:-/tmp/medmae-slurm}"
CONF="$DIR/slurm.conf"
CPUS="${MEDMAE_SLURM_CPUS:-4}"
HOST="$(hostname -s)"
export SLURM_CONF="$CONF"

die() { echo "slurm_local: $*" >&2; exit 1; }

install_packages() {
    local missing=()
    for p in slurmctld slurmd slurm-client; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "packages ${missing[*]} are missing and there is no apt-get"
    echo "slurm_local: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >"$DIR/apt.log" 2>&1 || {
        apt-get update -q >>"$DIR/apt.log" 2>&1 && \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$DIR/apt.log" 2>&1
    } || { tail -20 "$DIR/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
}

write_conf() {
    local mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
    cat >"$CONF" <<CONF
ClusterName=medmae
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmctldPort=${MEDMAE_SLURM_CTLD_PORT:-6817}
SlurmdPort=${MEDMAE_SLURM_SLURMD_PORT:-6818}
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool.%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
KillWait=10
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
}

alive() { [[ -r "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (slurmd runs as root)"
    mkdir -p "$DIR/state"
    install_packages
    getent hosts "$HOST" >/dev/null || die "host name $HOST does not resolve; add it to /etc/hosts"
    write_conf
    alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF" 9>&- || { tail -20 "$DIR/slurmctld.log" >&2; die "slurmctld failed"; }
    alive "$DIR/slurmd.$HOST.pid" || slurmd -f "$CONF" -N "$HOST" 9>&- || { tail -20 "$DIR/slurmd.$HOST.log" >&2; die "slurmd failed"; }
    for _ in $(seq 1 120); do
        state="$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)"
        [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]] && { echo "slurm_local: $HOST $state"; return 0; }
        [[ "$state" == drain* || "$state" == down* ]] && scontrol update nodename="$HOST" state=resume 2>/dev/null || true
        sleep 0.5
    done
    tail -20 "$DIR/slurmctld.log" "$DIR/slurmd.$HOST.log" >&2
    die "node $HOST did not become idle"
}

stop() {
    scancel --quiet --full --user=root 2>/dev/null || true
    for pidfile in "$DIR"/slurmd.*.pid "$DIR/slurmctld.pid"; do
        alive "$pidfile" && kill -TERM "$(cat "$pidfile")"
        rm -f "$pidfile"
    done
    return 0
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop" ;;
esac
