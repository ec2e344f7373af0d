#!/usr/bin/env bash
# A real single-host SLURM (slurmctld + slurmd, Debian packages) for the test suite: no systemd, no cgroups,
# no accounting database, auth/none. CI-only: any local user could impersonate another to this SLURM.
#
#   scripts/slurm_local.sh start    # installs missing packages, starts the daemons, waits until the node is idle
#   scripts/slurm_local.sh stop     # stops the daemons it started
#   export SLURM_CONF=/tmp/medmae-slurm/slurm.conf   # then sbatch/srun/scontrol talk to it
#
# Several nodes (tests/test_multinode.py runs each in its own network namespace): MEDMAE_SLURM_NODES="node0=ADDR
# node1=ADDR" (the first hosts slurmctld), then the steps one at a time, each where its node lives:
#   slurm_local.sh conf; slurm_local.sh ctld; slurm_local.sh slurmd node0; slurm_local.sh slurmd node1; ... wait
#
# Settings: MEDMAE_SLURM_DIR (state, default /tmp/medmae-slurm), MEDMAE_SLURM_CPUS (CPUs advertised per node,
# default 4), MEDMAE_SLURM_GPUS (GPUs advertised per node as a count-only GRES, so GPU batch scripts are accepted
# unchanged; default 0), MEDMAE_SLURM_NODES (default: this host at 127.0.0.1).
set -euo pipefail
DIR="${MEDMAE_SLURM_DIR:-/tmp/medmae-slurm}"
CONF="$DIR/slurm.conf"
CPUS="${MEDMAE_SLURM_CPUS:-4}"
HOST="$(hostname -s)"
NODES="${MEDMAE_SLURM_NODES:-$HOST=127.0.0.1}"
GPUS="${MEDMAE_SLURM_GPUS:-0}"
read -r -a NODE_LIST <<< "$NODES"
NAMES=("${NODE_LIST[@]%%=*}")
export SLURM_CONF="$CONF"

die() { echo "slurm_local: $*" >&2; exit 1; }

install_packages() {
    local missing=() p
    # two SLURMs may be set up at once (the test suite runs test files in parallel): one at a time checks and
    # installs, so the second finds the packages there (fd 9 is closed for the daemons, so they never hold the lock)
    exec 9>/tmp/medmae-slurm-install.lock
    flock 9
    for p in slurmctld slurmd slurm-client; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && { exec 9>&-; return 0; }
    command -v apt-get >/dev/null || die "packages ${missing[*]} are missing and there is no apt-get"
    echo "slurm_local: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >"$DIR/apt.log" 2>&1 || {
        apt-get update -q >>"$DIR/apt.log" 2>&1 && \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$DIR/apt.log" 2>&1
    } || { tail -n 20 "$DIR/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
    exec 9>&-
}

write_conf() {
    local mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 / ${#NODE_LIST[@]} ))
    local first="${NODE_LIST[0]}" gres="" names
    names="$(IFS=,; echo "${NAMES[*]}")"
    if (( GPUS > 0 )); then
        gres=" Gres=gpu:$GPUS"
        # slurmd counts a GPU per device file; plain files stand in for /dev/nvidia0..N-1 (nothing opens them)
        mkdir -p "$DIR/gpus"
        for i in $(seq 0 $((GPUS - 1))); do : >"$DIR/gpus/nvidia$i"; done
        echo "NodeName=$names Name=gpu File=$DIR/gpus/nvidia[0-$((GPUS - 1))]" >"$DIR/gres.conf"
    fi
    cat >"$CONF" <<CONF
ClusterName=medmae
SlurmctldHost=${first%%=*}(${first#*=})
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
$( ((GPUS > 0)) && echo "GresTypes=gpu" )
$(for node in "${NODE_LIST[@]}"; do
    echo "NodeName=${node%%=*} NodeAddr=${node#*=} CPUs=$CPUS RealMemory=$mem_mb$gres State=UNKNOWN"
done)
PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP
CONF
}

alive() { [[ -r "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_ctld() {
    alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF" 9>&- || { tail -n 20 "$DIR/slurmctld.log" >&2; die "slurmctld failed"; }
}

start_slurmd() {
    local name="$1"
    alive "$DIR/slurmd.$name.pid" || slurmd -f "$CONF" -N "$name" 9>&- || {
        tail -n 20 "$DIR/slurmd.$name.log" >&2; die "slurmd $name failed"; }
}

wait_idle() {
    local name state
    for name in "${NAMES[@]}"; do
        for _ in $(seq 1 120); do
            state="$(sinfo -h -n "$name" -o %t 2>/dev/null || true)"
            [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]] && { echo "slurm_local: $name $state"; continue 2; }
            [[ "$state" == drain* || "$state" == down* ]] && scontrol update nodename="$name" state=resume 2>/dev/null || true
            sleep 0.5
        done
        tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.$name.log" >&2
        die "node $name did not become idle"
    done
}

prepare() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (slurmd runs as root)"
    mkdir -p "$DIR/state"
    for name in "${NAMES[@]}"; do mkdir -p "$DIR/spool.$name"; done
    install_packages
    write_conf
}

start() {
    prepare
    getent hosts "$HOST" >/dev/null || die "host name $HOST does not resolve; add it to /etc/hosts"
    start_ctld
    for name in "${NAMES[@]}"; do start_slurmd "$name"; done
    wait_idle
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
    conf) prepare ;;
    ctld) start_ctld ;;
    slurmd) start_slurmd "${2:?usage: $0 slurmd NODE_NAME}" ;;
    wait) wait_idle ;;
    *) die "usage: $0 start|stop|conf|ctld|slurmd NAME|wait" ;;
esac
