#!/usr/bin/env bash
# Single-node SLURM "cluster" on this machine, for the hydra-submitit-launcher
# integration test (CI containers / dev VMs without systemd).
#   scripts/slurm-local.sh start|stop|status
# start is idempotent; on failure it prints one reason line to stderr and exits 2
# (the test suite skips with that line).
set -euo pipefail

CONF=/etc/slurm/slurm.conf          # compiled-in default of Debian's slurm-wlm
LOGDIR=/var/log/slurm
NODE=$(hostname -s)
PARTITION=debug

die() { echo "slurm: cannot start: $*" >&2; exit 2; }
# Last line of the first non-empty file: daemon stderr (config errors) or its log.
lastlog() {
  local f
  for f; do [[ -s $f ]] && { tail -n 1 "$f"; return; }; done
  echo "no log in $*"
}
node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1; }
up() { case "$(node_state)" in idle|mix|alloc|comp) return 0 ;; *) return 1 ;; esac; }
# Wait for the exit, so an immediate restart does not find the port still taken.
# Zombies count as gone: a container's PID 1 may never reap the daemons.
alive() { ps -o stat= -p "$1" 2>/dev/null | grep -qv Z; }
killpid() {
  local pid _
  pid=$(cat "$1" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 20); do alive "$pid" || break; sleep 0.5; done
  rm -f "$1"
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  # slurmctld marks the node INVAL if RealMemory exceeds what slurmd measures:
  # stay ~5% below.
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
  # Addresses are pinned to 127.0.0.1 so a hostname that does not resolve
  # (common in CI containers) does not matter; NodeName must still equal
  # `hostname -s`, which is how slurmd finds its own line.
  cat <<EOF
ClusterName=rnnlab
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
# No cgroup plugins: there is no systemd/cgroup delegation in containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Without a default, a job that gives no --mem takes the whole node's memory
# and blocks concurrent jobs.
DefMemPerCPU=$((mem / cpus))
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

stop() {
  squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
  killpid /run/slurmd.pid
  killpid /run/slurmctld.pid
  killpid /run/munge/munged.pid
}

start() {
  mkdir -p "$LOGDIR"
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
      >"$LOGDIR/apt.log" 2>&1 || die "apt-get install slurm-wlm munge failed: $(lastlog "$LOGDIR/apt.log")"
  fi
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  mkdir -p /var/spool/slurmctld /var/spool/slurmd /etc/slurm

  # A changed config (e.g. different nproc/memory) needs fresh daemons.
  local conf
  conf=$(write_conf)
  if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$conf" ]]; then
    stop
    printf '%s\n' "$conf" >"$CONF"
  fi

  # Run munged as the munge user the package's dirs belong to; /run/munge is
  # normally made by systemd-tmpfiles, which does not run here. --force gets
  # past a stale socket left by a killed container.
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 755 /run/munge
    chown -R munge:munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged --force 2>"$LOGDIR/munged.err" \
      || die "munged failed: $(lastlog "$LOGDIR/munged.err" /var/log/munge/munged.log)"
  fi

  # Both daemons fork into the background by themselves; stderr catches
  # config errors raised before the log file is open.
  if ! scontrol ping 2>/dev/null | grep -q UP; then
    slurmctld 2>"$LOGDIR/slurmctld.err" || die "slurmctld failed: $(lastlog "$LOGDIR"/slurmctld.{err,log})"
  fi
  if ! { [[ -s /run/slurmd.pid ]] && alive "$(cat /run/slurmd.pid)"; }; then
    slurmd 2>"$LOGDIR/slurmd.err" || die "slurmd failed: $(lastlog "$LOGDIR"/slurmd.{err,log})"
  fi

  local _
  for _ in $(seq 60); do
    up && break
    # Node state survives restarts in StateSaveLocation; a node marked down or
    # drained by an earlier run would never take jobs again on its own.
    case "$(node_state)" in
      down*|drain*|drng*|fail*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
      inval*) break ;;  # config does not match the hardware; waiting will not help
    esac
    sleep 1
  done
  up && { echo "slurm: ready (partition $PARTITION, $(sinfo -h -n "$NODE" -o %c) cpus)"; return; }
  scontrol ping 2>/dev/null | grep -q UP \
    || die "slurmctld not answering: $(lastlog "$LOGDIR"/slurmctld.{err,log})"
  die "node $NODE is '$(node_state)': $(sinfo -h -n "$NODE" -o %E | grep -v '^none$' \
    || lastlog "$LOGDIR"/slurmd.{err,log})"
}

# Packages, /etc and the daemons need root; CI runners usually have sudo.
if [[ ${1:-} =~ ^(start|stop)$ && $EUID -ne 0 ]]; then
  sudo -n true 2>/dev/null || die "$1 needs root or passwordless sudo"
  exec sudo -n "$0" "$@"
fi

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) up ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
