#!/usr/bin/env bash
# The `socket` swap mode of a systemd unit on a real booted systemd (issue 11), ~20 s.
#
# As root, on the system suite's cached debootstrap root (run tests/system/run.sh once first, or
# set SERIN_SYSTEM_CACHE). Boots one systemd-nspawn host that shares the host's loopback, with
# README.md's `web.socket` and `web.service` (ExecStart pointed at the demo service) next to a
# plain unit that binds its port itself. Each unit is restarted 20 times with `systemctl restart
# UNIT`, the one command the agent's swap runs (only the service unit), while 4 clients send
# requests: the socket-activated unit must fail none, the plain one must fail some (so the test
# can tell). Cleans up the container, mount and cgroup on exit, also on failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${SERIN_SYSTEM_CACHE:-/var/cache/serin-system-tests}"
W="${SERIN_SOCKET_SWAP_WORK:-/var/tmp/serin-socket-swap}"
NAME=sersock
P1="${SERIN_SOCKET_SWAP_PORTS:-18931}"
P2=$((P1 + 1))
R="$W/root"
SWAPS=20
START=$(date +%s)
log() { printf '[%4ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root"
[[ -d "$CACHE/rootfs" ]] || die "no cached root in $CACHE/rootfs: run tests/system/run.sh once"

NPID=""
cleanup() {
  if [[ -n "$NPID" ]]; then
    kill -TERM "$NPID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$NPID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$NPID" 2>/dev/null || true
  fi
  umount "$R" 2>/dev/null || true
  rm -rf "$W"
  local h d
  for h in systemd unified; do
    [[ -d "/sys/fs/cgroup/$h/serin-$NAME" ]] || continue
    find "/sys/fs/cgroup/$h/serin-$NAME" -depth -type d | while read -r d; do rmdir "$d" 2>/dev/null || true; done
  done
}
trap cleanup EXIT
trap 'exit 1' INT TERM
cleanup

(cd "$ROOT" && cargo build --quiet -p serin-tests --bin serin-demo-service) || die "building the demo service"
mkdir -p "$W/upper" "$W/work" "$R"
mount -t overlay overlay -o "lowerdir=$CACHE/rootfs,upperdir=$W/upper,workdir=$W/work" "$R"
echo "$NAME" >"$R/etc/hostname"
printf '%032x\n' "$((RANDOM * 32768 + RANDOM))" >"$R/etc/machine-id"
install -D -m 755 "$ROOT/target/debug/serin-demo-service" "$R/opt/demo/serin-demo-service"

# README's units, as documented, only the address and executable changed (and no start rate
# limit: 20 restarts in a few seconds is not how deployments go).
readme_unit() {
  awk -v start="# $1" '$0 == "```ini" { getline; on = ($0 == start); next } /^```/ { on = 0 } on' "$ROOT/README.md"
}
U="$R/etc/systemd/system"
readme_unit web.socket | sed "s|^ListenStream=.*|ListenStream=127.0.0.1:$P1|" >"$U/web.socket"
readme_unit web.service |
  sed -e "s|^ExecStart=.*|ExecStart=/opt/demo/serin-demo-service --port $P1 --bind 127.0.0.1|" \
    -e 's|^\[Unit\]$|[Unit]\nStartLimitIntervalSec=0|' >"$U/web.service"
grep -q '^Accept=no$' "$U/web.socket" || die "README's web.socket lost Accept=no:\n$(cat "$U/web.socket")"
grep -q '^Requires=web.socket$' "$U/web.service" || die "README's web.service lost Requires=web.socket"
printf '[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/opt/demo/serin-demo-service --port %s --bind 127.0.0.1\n[Install]\nWantedBy=multi-user.target\n' "$P2" >"$U/plain.service"
mkdir -p "$U/sockets.target.wants" "$U/multi-user.target.wants"
ln -sf /etc/systemd/system/web.socket "$U/sockets.target.wants/web.socket"
ln -sf /etc/systemd/system/plain.service "$U/multi-user.target.wants/plain.service"

# The container in a cgroup of its own, as in run.sh (removed by the cleanup once it is empty).
(
  for h in systemd unified; do
    mkdir -p "/sys/fs/cgroup/$h/serin-$NAME" && echo $BASHPID >"/sys/fs/cgroup/$h/serin-$NAME/cgroup.procs"
  done
  exec systemd-nspawn -q -b -D "$R" --register=no --keep-unit -M "$NAME" --console=passive
) >"$W/nspawn.log" 2>&1 &
NPID=$!
C=""
state=""
for _ in $(seq 150); do
  C="$(pgrep -P "$NPID" | head -1 || true)"
  if [[ -n "$C" ]]; then
    state="$(nsenter -t "$C" -a systemctl is-system-running 2>/dev/null || true)"
    [[ "$state" == running || "$state" == degraded ]] && break
  fi
  sleep 0.2
done
[[ "$state" == running || "$state" == degraded ]] || die "the host did not boot ($state): $(tail -20 "$W/nspawn.log")"
log "host booted ($state)"
hx() { nsenter -t "$C" -a "$@"; }
curl -sf -o /dev/null --max-time 5 "http://127.0.0.1:$P1/version" || die "web.socket did not activate web.service"

# Restarts UNIT $SWAPS times while 4 clients send requests to PORT; prints "ok failed".
swaps_under_load() {
  local unit=$1 port=$2 pids=() c ok=0 bad=0 o b
  rm -f "$W/stop" "$W/load".*
  for c in 1 2 3 4; do
    (
      o=0 b=0
      while [[ ! -e "$W/stop" ]]; do
        if curl -sf -o /dev/null --max-time 5 "http://127.0.0.1:$port/version"; then o=$((o + 1)); else b=$((b + 1)); fi
      done
      echo "$o $b" >"$W/load.$c"
    ) &
    pids+=($!)
  done
  sleep 0.5
  for _ in $(seq "$SWAPS"); do
    hx systemctl restart "$unit"
    for _ in $(seq 100); do [[ "$(hx systemctl is-active "$unit")" == active ]] && break; sleep 0.05; done
    sleep 0.2
  done
  touch "$W/stop"
  wait "${pids[@]}"
  for c in 1 2 3 4; do
    read -r o b <"$W/load.$c"
    ok=$((ok + o)) bad=$((bad + b))
  done
  echo "$ok $bad"
}
read -r ok bad < <(swaps_under_load web.service "$P1")
log "socket-activated web.service: $SWAPS restarts under 4 clients: $ok ok, $bad failed"
read -r pok pbad < <(swaps_under_load plain.service "$P2")
log "plain unit: $SWAPS restarts under 4 clients: $pok ok, $pbad failed"
((ok > 0)) || die "no request reached the socket-activated unit"
((bad == 0)) || die "$bad requests failed across the socket-activated unit's restarts"
((pbad > 0)) || die "the plain unit failed no request: this test cannot tell the modes apart"
log "PASSED"
