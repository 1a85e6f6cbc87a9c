#!/usr/bin/env bash
# serin's system suite: real packages on real booted systemd machines with their own addresses.
#
# As root. Builds the packages (packaging/build.sh), boots a coordinator host and four agent hosts
# (systemd-nspawn on a cached debootstrap root, an overlay per host, each in its own network
# namespace on a private bridge, 10.79.0.0/24), installs `serin` and `serin-agent` from their
# packages (the agent from the .rpm on one host), installs the demo service as a systemd unit
# whose ExecStart runs the `current` release, and then checks what an operator would:
#
#   1. a canary rollout of a healthy release reaches every host (checked through systemd: the
#      unit's MainPID executable resolves into releases/<id>/), with SERIN_AGENT_CRASH_AT set for
#      every packaged agent, which must ignore it (no restart of any agent);
#   2. a release that crashes at start is rolled back automatically and only the canary host ever
#      ran it (the units' journals, which log every start of the demo service with its version);
#   3. the agent SIGKILLed on one host mid-rollout (after its activation, before the gate):
#      systemd restarts it, it comes back consistent, the rollout finishes;
#   4. a wedged agent main loop (fault hook of a test build, on one host only) is killed by the
#      watchdog and restarted by systemd;
#   5. a host cut off the network mid-rollout: its wave waits as unreachable, and continues after
#      the link is restored;
#   6. an upgrade of the serin-agent package under client load: no failed request, the demo
#      service's PID unchanged;
#   7. purging serin-agent leaves no process, unit or state;
#   8. `systemd-analyze verify` passes for both units; the packaged agent has no fault hooks;
#   9. both daemons log to the journal with structured fields (ROLLOUT=, SERVICE=, RELEASE=).
#
# Cleans up namespaces, the bridge, mounts, machines and cgroups on exit (also on failure) and
# sweeps leftovers of an earlier run at start. SERIN_SYSTEM_KEEP=1 keeps the logs directory.
# The debootstrap root is cached in $SERIN_SYSTEM_CACHE (default /var/cache/serin-system-tests).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${SERIN_SYSTEM_CACHE:-/var/cache/serin-system-tests}"
WORK="${SERIN_SYSTEM_WORK:-/var/tmp/serin-system}"
BRIDGE=sersys0
NET=10.79.0
PREFIX=sersys          # netns, machine and cgroup names
COORD_IP="$NET.10"
COORD_URL="https://$COORD_IP:7700"   # mutual TLS, certificates made below with `serin ca`
AGENTS=(h1 h2 h3 h4)   # h4 gets the agent from the .rpm
ALL_HOSTS=(c "${AGENTS[@]}")
START=$(date +%s)

log() { printf '[%4ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() {
  log "FAILED: $*"
  if declare -F dump >/dev/null; then dump || true; fi
  exit 1
}

ip_of() { case "$1" in c) echo "$COORD_IP" ;; h*) echo "$NET.1${1#h}" ;; esac; }

# ---------------------------------------------------------------------------------------------
# Cleanup: the trap and the start-of-run sweep share it. Everything it touches is named after
# $PREFIX or lives under $WORK, so it never touches anything else on the machine.

cleanup() {
  local h pid
  for h in "${ALL_HOSTS[@]}"; do
    pid="$(cat "$WORK/$h.nspawn.pid" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for h in "${ALL_HOSTS[@]}"; do
    if mountpoint -q "$WORK/$h/root" 2>/dev/null; then
      umount "$WORK/$h/root" 2>/dev/null || umount -l "$WORK/$h/root" || true
    fi
    ip netns del "$PREFIX-$h" 2>/dev/null || true
    ip link del "veth-$PREFIX-$h" 2>/dev/null || true
    for cg in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
      [[ -d "$cg/$PREFIX-$h" ]] && find "$cg/$PREFIX-$h" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
  done
  if [[ -n "${LOAD_PID:-}" ]]; then kill $LOAD_PID 2>/dev/null || true; fi
  ip link del "$BRIDGE" 2>/dev/null || true
}

on_exit() {
  local rc=$?
  cleanup
  if [[ $rc -ne 0 ]]; then
    log "system suite FAILED (exit $rc) after $(($(date +%s) - START)) s; logs in $WORK/logs"
  elif [[ "${SERIN_SYSTEM_KEEP:-0}" != 1 ]]; then
    rm -rf "$WORK"
  fi
}

[[ $(id -u) -eq 0 ]] || { echo "tests/system/run.sh must run as root" >&2; exit 1; }
cleanup # leftovers of an earlier run
rm -rf "$WORK"
mkdir -p "$WORK/logs"
trap on_exit EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Tools, packages, binaries.

need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v rpmbuild >/dev/null || need+=(rpm)
command -v curl >/dev/null || need+=(curl)
command -v jq >/dev/null || need+=(jq)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

log "building the packages"
"$ROOT/packaging/build.sh" >"$WORK/logs/build.log" 2>&1 || { cat "$WORK/logs/build.log" >&2; die "packaging/build.sh failed"; }
PKGS="$ROOT/target/packages"
VERSION="$(cargo pkgid -p serin-agent --manifest-path "$ROOT/Cargo.toml" | sed 's/.*[@#]//')"
# The upgrade: the same binaries as a newer package version.
UPGRADE_VERSION="$VERSION+systest1"
(cd "$ROOT" && cargo deb --quiet --no-build --no-strip -p serin-agent --deb-version "$UPGRADE_VERSION" \
  -o "$WORK/serin-agent_upgrade.deb") || die "cannot build the upgrade package"

log "building the demo service and the test build of the agent (fault hooks)"
(cd "$ROOT" && cargo build --quiet -p serin-tests --bin serin-demo-service &&
  cargo build --quiet -p serin-agent --bin serin-agent --features fault-injection \
    --target-dir "$ROOT/target/fault-injection") >"$WORK/logs/test-build.log" 2>&1 ||
  { cat "$WORK/logs/test-build.log" >&2; die "building the test binaries failed"; }
DEMO_BIN="$ROOT/target/debug/serin-demo-service"
FAULT_AGENT="$ROOT/target/fault-injection/debug/serin-agent"
SERIN="$ROOT/target/release/serin"
export SERIN_COORDINATOR="$COORD_URL" NO_COLOR=1

# A CA and every identity, made on the build host with `serin ca` (as an operator would on an
# admin machine), then copied to the hosts: the coordinator's certificate for its address, one
# agent certificate per host id, and an admin operator certificate for this script's CLI.
PKI="$WORK/pki"
rm -rf "$PKI"
"$SERIN" ca init --pki-dir "$PKI" >/dev/null || die "serin ca init failed"
"$SERIN" ca issue coordinator --pki-dir "$PKI" --ip "$COORD_IP" >/dev/null ||
  die "issuing the coordinator certificate failed"
for h in "${AGENTS[@]}"; do
  "$SERIN" ca issue agent --pki-dir "$PKI" --host-id "sys-$h" >/dev/null ||
    die "issuing the agent certificate of $h failed"
done
"$SERIN" ca issue operator --pki-dir "$PKI" --name system-test --role admin >/dev/null ||
  die "issuing the operator certificate failed"
export SERIN_CA="$PKI/ca.crt" SERIN_CERT="$PKI/operator-system-test.crt" SERIN_KEY="$PKI/operator-system-test.key"

mkdir -p "$WORK/releases"
make_release() { # version [flags...]
  local v=$1
  shift
  "$DEMO_BIN" make-release --version "$v" --out "$WORK/releases/demo-$v" "$@" >/dev/null
}
make_release 1.0.0
make_release 2.0.0
make_release 3.0.0 --crash-at-start
make_release 4.0.0
make_release 5.0.0

# ---------------------------------------------------------------------------------------------
# The root file system, cached outside the checkout.

if [[ ! -x "$CACHE/rootfs/usr/bin/systemctl" || ! -x "$CACHE/rootfs/usr/bin/rpm" ]]; then
  log "debootstrap of bookworm into $CACHE (once)"
  mkdir -p "$CACHE"
  rm -rf "$CACHE/rootfs.tmp"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2,rpm,procps,passwd \
    bookworm "$CACHE/rootfs.tmp" >"$WORK/logs/debootstrap.log" 2>&1 || die "debootstrap failed"
  rm -rf "$CACHE/rootfs"
  mv "$CACHE/rootfs.tmp" "$CACHE/rootfs"
fi

# ---------------------------------------------------------------------------------------------
# Hosts: a network namespace on the bridge, an overlay root, a booted systemd.

ip link add "$BRIDGE" type bridge
ip addr add "$NET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up

hexec() { # host cmd... : run a command inside the booted host
  local h=$1
  shift
  nsenter -t "$(cat "$WORK/$h.leader")" -a -- "$@"
}
hsh() { local h=$1; shift; hexec "$h" /bin/sh -c "$*"; }

# wait_until "what" timeout_s cmd... : poll a condition, fail with a dump when it never holds.
wait_until() {
  local what=$1 timeout=$2
  shift 2
  local end=$(($(date +%s) + timeout))
  until "$@" >/dev/null 2>&1; do
    (($(date +%s) < end)) || die "timed out after ${timeout}s waiting for: $what"
    sleep 0.2
  done
}

boot_host() {
  local h=$1 ns="$PREFIX-$1" dir="$WORK/$1"
  ip netns add "$ns"
  ip link add "veth-$ns" type veth peer name eth0 netns "$ns"
  ip link set "veth-$ns" master "$BRIDGE" up
  ip -n "$ns" addr add "$(ip_of "$h")/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" route add default via "$NET.1"
  mkdir -p "$dir/upper" "$dir/work" "$dir/root"
  mount -t overlay overlay -o "lowerdir=$CACHE/rootfs,upperdir=$dir/upper,workdir=$dir/work" "$dir/root"
  echo "$ns" >"$dir/root/etc/hostname"
  printf '%s\n' "$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$dir/root/etc/machine-id"
  printf '127.0.0.1 localhost %s\n' "$ns" >"$dir/root/etc/hosts"
  mkdir -p "$dir/root/root/pkgs"
  cp "$PKGS"/*.deb "$PKGS"/*.rpm "$WORK/serin-agent_upgrade.deb" "$dir/root/root/pkgs/"
  # Each launcher gets a cgroup of its own, or the machines share one (RECIPES.md).
  (
    for cg in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified; do
      if [[ -d $cg ]]; then mkdir -p "$cg/$ns" && echo $BASHPID >"$cg/$ns/cgroup.procs"; fi
    done
    exec systemd-nspawn -q -b -D "$dir/root" --register=no --keep-unit -M "$ns" \
      --network-namespace-path="/run/netns/$ns" --console=passive
  ) >"$WORK/logs/$h.console.log" 2>&1 &
  echo $! >"$WORK/$h.nspawn.pid"
}

leader_of() { # the container's PID 1, as seen from here
  local pid
  pid="$(pgrep -P "$(cat "$WORK/$1.nspawn.pid")" | head -1)"
  [[ -n "$pid" ]] && echo "$pid" >"$WORK/$1.leader"
}
booted() {
  leader_of "$1" || return 1
  local s
  s="$(hexec "$1" systemctl is-system-running 2>/dev/null || true)"
  [[ "$s" == running || "$s" == degraded ]]
}

log "booting ${#ALL_HOSTS[@]} hosts"
for h in "${ALL_HOSTS[@]}"; do boot_host "$h"; done
for h in "${ALL_HOSTS[@]}"; do wait_until "host $h to boot" 60 booted "$h"; done

dump() {
  local h
  for h in "${ALL_HOSTS[@]}"; do
    [[ -f "$WORK/$h.leader" ]] || continue
    {
      echo "===== $h"
      hexec "$h" systemctl --no-pager status serin-agent serin-coordinator demo 2>&1 || true
      hexec "$h" journalctl --no-pager -n 200 -u serin-agent -u serin-coordinator -u demo 2>&1 || true
    } >"$WORK/logs/$h.dump.log" 2>&1 || true
  done
  "$SERIN" hosts >"$WORK/logs/hosts.txt" 2>&1 || true
  "$SERIN" rollout list --service demo >"$WORK/logs/rollouts.txt" 2>&1 || true
  log "host dumps in $WORK/logs/*.dump.log"
}

# ---------------------------------------------------------------------------------------------
# Install: the coordinator from its .deb, the agents from .deb (h1-h3) and .rpm (h4).

log "installing serin (coordinator) on c"
hexec c dpkg -i /root/pkgs/"serin_${VERSION}_amd64.deb" >"$WORK/logs/c.install.log" 2>&1 ||
  die "dpkg -i serin failed: $(cat "$WORK/logs/c.install.log")"
mkdir -p "$WORK/c/root/etc/serin/pki"
cp "$PKI/ca.crt" "$PKI/coordinator.crt" "$PKI/coordinator.key" "$WORK/c/root/etc/serin/pki/"
# The coordinator runs as the unprivileged user `serin`: its key is readable by it only.
hexec c chown serin:serin /etc/serin/pki/coordinator.key
hexec c chmod 0600 /etc/serin/pki/coordinator.key
cat >"$WORK/c/root/etc/serin/coordinator.toml" <<EOF
listen = "0.0.0.0:7700"
state_dir = "/var/lib/serin"
heartbeat_interval = "1s"
unreachable_after = "3s"

[tls]
ca = "/etc/serin/pki/ca.crt"
cert = "/etc/serin/pki/coordinator.crt"
key = "/etc/serin/pki/coordinator.key"
EOF
hexec c systemctl restart serin-coordinator || die "the coordinator did not start"
wait_until "the coordinator to be active" 30 hexec c systemctl is-active serin-coordinator
wait_until "the coordinator to answer on $COORD_URL" 30 "$SERIN" hosts

demo_unit() {
  cat <<'EOF'
[Unit]
Description=serin demo service (runs the release `current` points at)

[Service]
ExecStart=/var/lib/serin-agent/demo/current/serin-demo-service --port 8080 --bind 0.0.0.0
Restart=on-failure
RestartSec=1s

[Install]
WantedBy=multi-user.target
EOF
}
agent_config() {
  cat <<EOF
coordinator = "$COORD_URL"
host_id = "sys-$1"
hostname = "$PREFIX-$1"
heartbeat_interval = "1s"
report_interval = "1s"
reconnect_initial = "200ms"
reconnect_max = "1s"

[tls]
ca = "/etc/serin/pki/ca.crt"
cert = "/etc/serin/pki/agent-sys-$1.crt"
key = "/etc/serin/pki/agent-sys-$1.key"

[labels]
role = "demo"
zone = "z$1"

[[service]]
name = "demo"
binary = "serin-demo-service"
keep_releases = 6

[service.run]
kind = "systemd"
unit = "demo.service"

[[service.check]]
kind = "http"
url = "http://127.0.0.1:8080/healthz"
interval = "300ms"
timeout = "1s"
failure_threshold = 2
success_threshold = 1
EOF
}
ALL_POINTS="stage-downloaded,stage-verified,stage-installed,activate-journaled,activate-swapped,activate-restarted,confirm-wait,rollback-swapped"

for h in "${AGENTS[@]}"; do
  log "installing serin-agent on $h ($([[ $h == h4 ]] && echo rpm || echo deb))"
  if [[ $h == h4 ]]; then
    hexec "$h" rpm -i --nodeps /root/pkgs/"serin-agent-${VERSION}-1.x86_64.rpm" >"$WORK/logs/$h.install.log" 2>&1
  else
    hexec "$h" dpkg -i /root/pkgs/"serin-agent_${VERSION}_amd64.deb" >"$WORK/logs/$h.install.log" 2>&1
  fi || die "installing serin-agent on $h failed: $(cat "$WORK/logs/$h.install.log")"
  hexec "$h" systemctl is-enabled serin-agent >/dev/null || die "serin-agent is not enabled on $h after install"
  # Not configured yet: the unit is skipped, not failed, and not restarting.
  state="$(hexec "$h" systemctl show -p ActiveState --value serin-agent)"
  [[ "$state" == inactive ]] || die "unconfigured serin-agent on $h is $state, expected inactive"
  demo_unit >"$WORK/$h/root/etc/systemd/system/demo.service"
  mkdir -p "$WORK/$h/root/etc/serin/pki"
  cp "$PKI/ca.crt" "$PKI/agent-sys-$h.crt" "$PKI/agent-sys-$h.key" "$WORK/$h/root/etc/serin/pki/"
  agent_config "$h" >"$WORK/$h/root/etc/serin/agent.toml"
  # Every packaged agent gets every crash point: a shipped binary must ignore them.
  mkdir -p "$WORK/$h/root/etc/systemd/system/serin-agent.service.d"
  printf '[Service]\nEnvironment=SERIN_AGENT_CRASH_AT=%s\n' "$ALL_POINTS" \
    >"$WORK/$h/root/etc/systemd/system/serin-agent.service.d/crash-points.conf"
  hexec "$h" systemctl daemon-reload
  hexec "$h" systemctl enable demo.service >/dev/null 2>&1
  hexec "$h" systemctl restart serin-agent || die "serin-agent did not start on $h"
done

connected_count() {
  "$SERIN" hosts -o json | jq '[.hosts[] | select(.connected == true)] | length'
}
all_connected() { [[ "$(connected_count)" == "${#AGENTS[@]}" ]]; }
wait_until "all ${#AGENTS[@]} agents to connect" 30 all_connected

log "pushing releases"
for v in 1.0.0 2.0.0 3.0.0 4.0.0 5.0.0; do
  "$SERIN" artifact push "$WORK/releases/demo-$v" --service demo --release "$v" >/dev/null ||
    die "artifact push of $v failed"
done

# ---------------------------------------------------------------------------------------------
# Observing what systemd actually runs.

# The release the demo unit's main process runs: MainPID's executable inside the host.
unit_release() {
  local pid exe
  pid="$(hexec "$1" systemctl show -p MainPID --value demo.service)"
  [[ "$pid" != 0 && -n "$pid" ]] || return 1
  exe="$(hexec "$1" readlink "/proc/$pid/exe")" || return 1
  exe="${exe% (deleted)}"
  case "$exe" in
    /var/lib/serin-agent/demo/releases/*) exe="${exe#/var/lib/serin-agent/demo/releases/}"; echo "${exe%%/*}" ;;
    *) return 1 ;;
  esac
}
all_run() { # release: every agent host's unit runs it and answers it
  local h
  for h in "${AGENTS[@]}"; do
    [[ "$(unit_release "$h")" == "$1" ]] || return 1
    [[ "$(curl -fsS --max-time 2 "http://$(ip_of "$h"):8080/version")" == "$1" ]] || return 1
  done
}
# Every start of the demo service logs its version: which hosts ever started `version`.
hosts_that_ran() {
  local h
  for h in "${AGENTS[@]}"; do
    if hexec "$h" journalctl --no-pager -o cat -u demo.service | grep -q "version: \"$1\""; then
      echo "sys-$h"
    fi
  done
}
agent_restarts() { hexec "$1" systemctl show -p NRestarts --value serin-agent; }
agent_pid() { hexec "$1" systemctl show -p MainPID --value serin-agent; }

rollout() { # release [flags...]: start, wait, print the final state
  local v=$1
  shift
  "$SERIN" rollout start --service demo --release "$v" --min-healthy 1s \
    --wait --timeout 120s "$@" >"$WORK/logs/rollout-$v.log" 2>&1 || true
  rollout_state "$v" || echo "not started: $(tail -3 "$WORK/logs/rollout-$v.log")"
}
rollout_id() {
  "$SERIN" rollout list --service demo -o json |
    jq -r --arg v "$1" '[.rollouts[] | select(.spec.release == $v)] | last | .rollout_id'
}
rollout_state() {
  local id
  id="$(rollout_id "$1")"
  [[ -n "$id" && "$id" != null ]] || return 1
  "$SERIN" rollout status "$id" -o json | jq -r '.state'
}

# ---------------------------------------------------------------------------------------------
log "scenario: bootstrap every host to 1.0.0"
state="$(rollout 1.0.0 --waves 100% --bake 500ms --healthy-deadline 20s)"
[[ "$state" == succeeded ]] || die "bootstrap rollout of 1.0.0 ended $state"
wait_until "every unit to run 1.0.0" 30 all_run 1.0.0

restarts_before=()
for h in "${AGENTS[@]}"; do restarts_before+=("$(agent_restarts "$h"):$(agent_pid "$h")"); done

log "scenario: canary rollout of healthy 2.0.0 reaches every host"
state="$(rollout 2.0.0 --waves 1,50%,100% --canary-bake 2s --bake 1s --healthy-deadline 20s)"
[[ "$state" == succeeded ]] || die "rollout of 2.0.0 ended $state"
wait_until "every unit to run 2.0.0 (MainPID exe)" 30 all_run 2.0.0

log "scenario: 3.0.0 crashes at start: rolled back, only the canary ever ran it"
state="$(rollout 3.0.0 --waves 1,50%,100% --canary-bake 4s --bake 1s --healthy-deadline 8s)"
[[ "$state" == rolled_back ]] || die "rollout of 3.0.0 ended $state, expected rolled_back"
wait_until "every unit to run 2.0.0 again" 30 all_run 2.0.0
ran="$(hosts_that_ran 3.0.0 | tr '\n' ' ')"
canary="$("$SERIN" rollout status "$(rollout_id 3.0.0)" -o json | jq -r '[.hosts[] | select(.wave == 0) | .host_id] | join(" ")')"
[[ "${ran% }" == "$canary" ]] || die "hosts that ever started 3.0.0: '$ran', canary: '$canary'"
log "  only $canary ever started 3.0.0"

log "  the packaged agents ignored SERIN_AGENT_CRASH_AT through three rollouts"
i=0
for h in "${AGENTS[@]}"; do
  now="$(agent_restarts "$h"):$(agent_pid "$h")"
  [[ "$now" == "${restarts_before[$i]}" ]] ||
    die "serin-agent on $h restarted (NRestarts:MainPID ${restarts_before[$i]} -> $now) with crash points set"
  hexec "$h" grep -q SERIN_AGENT_CRASH_AT /usr/bin/serin-agent && die "/usr/bin/serin-agent on $h contains fault hooks"
  i=$((i + 1))
done

# ---------------------------------------------------------------------------------------------
log "scenario: SIGKILL the agent on h2 mid-rollout of 4.0.0"
# Killed once h2 has activated 4.0.0 and before the wave's gate: the agent must replay its
# activation journal, keep the service, report and be confirmed. (A kill while an order is being
# staged is the agent fault suite's business: its crash points cover every durable step.)
before="$(agent_restarts h2)"
"$SERIN" rollout start --service demo --release 4.0.0 --waves 1,100% --canary-bake 2s --bake 5s \
  --min-healthy 1s --healthy-deadline 20s >/dev/null
h2_activated() {
  "$SERIN" rollout status "$(rollout_id 4.0.0)" -o json |
    jq -e '.hosts[] | select(.host_id == "sys-h2") | .phase == "activated" or .phase == "healthy"'
}
wait_until "h2 to activate 4.0.0" 40 h2_activated
[[ "$(rollout_state 4.0.0)" == running ]] || die "the rollout of 4.0.0 is $(rollout_state 4.0.0), not running, at the kill"
demo_pid_h2="$(hexec h2 systemctl show -p MainPID --value demo.service)"
hexec h2 kill -KILL "$(agent_pid h2)"
restarted() { (($(agent_restarts h2) > before)) && hexec h2 systemctl is-active serin-agent; }
wait_until "systemd to restart the SIGKILLed agent on h2" 30 restarted
finished() { [[ "$(rollout_state 4.0.0)" == succeeded ]]; }
wait_until "the rollout of 4.0.0 to succeed" 90 finished
wait_until "every unit to run 4.0.0" 30 all_run 4.0.0
# The restarted agent saw through MainPID's executable that the unit already runs 4.0.0.
[[ "$(hexec h2 systemctl show -p MainPID --value demo.service)" == "$demo_pid_h2" ]] ||
  die "the restarted agent restarted the demo service on h2 although it already ran 4.0.0"

# ---------------------------------------------------------------------------------------------
log "scenario: a wedged main loop on h3 (test build) is restarted by the watchdog"
install -m 0755 "$FAULT_AGENT" "$WORK/h3/root/usr/local/bin/serin-agent-test"
mkdir -p "$WORK/h3/root/etc/systemd/system/serin-agent.service.d"
cat >"$WORK/h3/root/etc/systemd/system/serin-agent.service.d/test-build.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/usr/local/bin/serin-agent-test --config /etc/serin/agent.toml
Environment=SERIN_AGENT_WEDGE_FILE=/var/lib/serin-agent/wedge
WatchdogSec=4s
EOF
hexec h3 systemctl daemon-reload
hexec h3 systemctl restart serin-agent
wait_until "the test build to run on h3" 20 hexec h3 systemctl is-active serin-agent
before="$(agent_restarts h3)"
pid_before="$(agent_pid h3)"
echo main-loop >"$WORK/h3/root/var/lib/serin-agent/wedge"
watchdog_fired() { hexec h3 journalctl --no-pager -u serin-agent | grep -qi "watchdog timeout"; }
wait_until "systemd's watchdog to fire on h3" 30 watchdog_fired
restarted() {
  (($(agent_restarts h3) > before)) && [[ "$(agent_pid h3)" != "$pid_before" ]] &&
    hexec h3 systemctl is-active serin-agent
}
wait_until "systemd to restart the wedged agent on h3" 30 restarted
wait_until "h3 to reconnect" 30 all_connected
rm -f "$WORK/h3/root/etc/systemd/system/serin-agent.service.d/test-build.conf"
hexec h3 systemctl daemon-reload
hexec h3 systemctl restart serin-agent
wait_until "the packaged agent back on h3" 30 all_connected

# ---------------------------------------------------------------------------------------------
log "scenario: h4 cut off mid-rollout of 5.0.0: its wave waits, then continues"
"$SERIN" rollout start --service demo --release 5.0.0 --waves 1,100% --canary-bake 8s --bake 1s \
  --min-healthy 1s --healthy-deadline 30s >/dev/null
canary_started() {
  "$SERIN" rollout status "$(rollout_id 5.0.0)" -o json | jq -e '.waves[0].state != "pending"'
}
wait_until "the canary of 5.0.0 to start" 20 canary_started
ip -n "$PREFIX-h4" link set eth0 down
waiting() { [[ "$(rollout_state 5.0.0)" == waiting ]]; }
wait_until "the rollout of 5.0.0 to wait for unreachable h4" 60 waiting
h4_unreachable() {
  "$SERIN" rollout status "$(rollout_id 5.0.0)" -o json |
    jq -e '.hosts[] | select(.host_id == "sys-h4") | .phase == "unreachable" or (.detail | test("unreachable"))'
}
h4_unreachable >/dev/null || die "the rollout status does not show sys-h4 unreachable"
ip -n "$PREFIX-h4" link set eth0 up
ip -n "$PREFIX-h4" route replace default via "$NET.1"
finished() { [[ "$(rollout_state 5.0.0)" == succeeded ]]; }
wait_until "the rollout of 5.0.0 to succeed after h4 is back" 90 finished
wait_until "every unit to run 5.0.0" 30 all_run 5.0.0

# ---------------------------------------------------------------------------------------------
log "scenario: upgrade serin-agent on h1 under client load"
demo_pid="$(hexec h1 systemctl show -p MainPID --value demo.service)"
agent_pid_before="$(agent_pid h1)"
client() { # n: request /version until load.stop, then write "ok fail" to load.result.n
  local ok=0 fail=0
  while [[ ! -f "$WORK/load.stop" ]]; do
    if curl -fsS --max-time 2 "http://$(ip_of h1):8080/version" >/dev/null 2>&1; then
      ok=$((ok + 1))
      if [[ $ok == 1 ]]; then touch "$WORK/load.started.$1"; fi
    else
      fail=$((fail + 1))
    fi
  done
  echo "$ok $fail" >"$WORK/load.result.$1"
}
LOAD_PIDS=()
for i in 1 2 3; do
  client "$i" &
  LOAD_PIDS+=($!)
done
LOAD_PID="${LOAD_PIDS[*]}"
load_started() { [[ -f "$WORK/load.started.1" && -f "$WORK/load.started.2" && -f "$WORK/load.started.3" ]]; }
wait_until "the clients to get answers" 10 load_started
hexec h1 dpkg -i /root/pkgs/serin-agent_upgrade.deb >"$WORK/logs/h1.upgrade.log" 2>&1 ||
  die "upgrading serin-agent on h1 failed: $(cat "$WORK/logs/h1.upgrade.log")"
new_agent() { [[ "$(agent_pid h1)" != "$agent_pid_before" ]] && hexec h1 systemctl is-active serin-agent; }
wait_until "the upgraded agent to run on h1" 30 new_agent
wait_until "h1 to reconnect after the upgrade" 30 all_connected
touch "$WORK/load.stop"
wait "${LOAD_PIDS[@]}"
LOAD_PID=
ok=0 fail=0
for i in 1 2 3; do
  read -r o f <"$WORK/load.result.$i"
  ok=$((ok + o)) fail=$((fail + f))
done
installed="$(hexec h1 dpkg-query -W -f '${Version}' serin-agent)"
[[ "$installed" == "$UPGRADE_VERSION"* ]] || die "h1 has serin-agent $installed after the upgrade"
[[ "$fail" == 0 && "$ok" -gt 0 ]] || die "client saw $fail failed of $((ok + fail)) requests during the upgrade"
[[ "$(hexec h1 systemctl show -p MainPID --value demo.service)" == "$demo_pid" ]] ||
  die "the demo service's PID changed during the agent upgrade"
log "  $ok requests, 0 failed; demo PID $demo_pid unchanged; agent $installed"

# ---------------------------------------------------------------------------------------------
log "scenario: purge serin-agent on h2"
hexec h2 dpkg --purge serin-agent >"$WORK/logs/h2.purge.log" 2>&1 || die "dpkg --purge failed on h2"
hexec h2 pgrep -x serin-agent >/dev/null && die "a serin-agent process survived the purge on h2"
[[ -z "$(hexec h2 systemctl list-unit-files 'serin-agent*' --no-legend)" ]] || die "a serin-agent unit file survived the purge on h2"
hexec h2 systemctl is-active serin-agent >/dev/null && die "serin-agent is still active on h2"
for p in /var/lib/serin-agent /etc/serin/agent.toml /usr/bin/serin-agent /etc/systemd/system/multi-user.target.wants/serin-agent.service; do
  hexec h2 test -e "$p" && die "$p survived the purge on h2"
done

# ---------------------------------------------------------------------------------------------
log "scenario: systemd-analyze verify of both units"
hexec c systemd-analyze verify --man=no /usr/lib/systemd/system/serin-coordinator.service >"$WORK/logs/verify.log" 2>&1 ||
  die "systemd-analyze verify serin-coordinator.service: $(cat "$WORK/logs/verify.log")"
hexec h1 systemd-analyze verify --man=no /usr/lib/systemd/system/serin-agent.service >>"$WORK/logs/verify.log" 2>&1 ||
  die "systemd-analyze verify serin-agent.service: $(cat "$WORK/logs/verify.log")"

log "scenario: the daemons log structured fields to the journal"
hexec c journalctl --no-pager -o json -u serin-coordinator | jq -e -s \
  'any(.[]; .ROLLOUT != null and .SERVICE == "demo" and .RELEASE != null)' >/dev/null ||
  die "no journal entry of serin-coordinator carries ROLLOUT, SERVICE and RELEASE fields"
hexec h1 journalctl --no-pager -o json -u serin-agent | jq -e -s 'any(.[]; .SERVICE == "demo")' >/dev/null ||
  die "no journal entry of serin-agent carries a SERVICE field"

log "system suite passed in $(($(date +%s) - START)) s"
