#!/usr/bin/env bash
# Builds serin's packages into target/packages/:
#   serin-agent_<v>_amd64.deb  serin_<v>_amd64.deb  serin-agent-<v>-1.x86_64.rpm  serin-<v>-1.x86_64.rpm
# One command, from this repository alone: it installs what it needs (cargo-deb with
# `cargo install --locked`, rpmbuild from Debian's `rpm` package), builds stripped release
# binaries without any test-only feature, checks that they carry no fault hooks, generates the
# man pages and shell completions, then packages. Set SERIN_PACKAGES_LINT=1 to run lintian and
# rpmlint on the results (installed with apt-get when missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# cargo-deb and the spec find the binaries under target/release: build exactly there.
export CARGO_TARGET_DIR="$ROOT/target"
OUT="$ROOT/target/packages"
GEN="$ROOT/target/packaging"

log() { printf '== %s\n' "$*" >&2; }
apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "packaging/build.sh: $1 is missing and there is no apt-get to install it" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

command -v cargo-deb >/dev/null || { log "installing cargo-deb"; cargo install --locked --quiet cargo-deb; }
command -v rpmbuild >/dev/null || { log "installing rpm (rpmbuild)"; apt_install rpm; }

VERSION="$(cargo pkgid -p serin-agent | sed 's/.*[@#]//')"
log "serin $VERSION"

# A release build of the two product binaries only: no crate enables `fault-injection`, and
# selecting just these packages keeps dev-only crates out of feature unification.
log "building stripped release binaries"
CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked --quiet \
  -p serin-agent -p serin-cli --bins
for needle in SERIN_AGENT_CRASH_AT SERIN_AGENT_WEDGE_FILE; do
  if grep -q "$needle" target/release/serin-agent; then
    echo "packaging/build.sh: target/release/serin-agent contains the test hook $needle" >&2
    exit 1
  fi
done

log "generating the man pages and completions"
rm -rf "$GEN" && mkdir -p "$GEN" "$OUT"
# serin.1 and one page per subcommand (serin-rollout.1, serin-rollout-start.1, …): the pages
# serin(1) refers to.
mkdir -p "$GEN/man"
target/release/serin man --dir "$GEN/man" >/dev/null
gzip -9n "$GEN"/man/*.1
target/release/serin completions bash > "$GEN/serin.bash"
target/release/serin completions zsh > "$GEN/_serin"
target/release/serin completions fish > "$GEN/serin.fish"

log "building the .deb packages"
rm -f "$OUT"/*.deb "$OUT"/*.rpm
cargo deb --quiet --no-build --no-strip -p serin-agent -o "$OUT/serin-agent_${VERSION}_amd64.deb"
cargo deb --quiet --no-build --no-strip -p serin-cli -o "$OUT/serin_${VERSION}_amd64.deb"

log "building the .rpm packages"
rpmbuild -bb --quiet \
  --define "_topdir $GEN/rpm" \
  --define "_rpmdir $OUT" \
  --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
  --define "srcroot $ROOT" \
  --define "genroot $GEN" \
  --define "pkgversion $VERSION" \
  packaging/rpm/serin.spec >/dev/null

if [[ "${SERIN_PACKAGES_LINT:-0}" == 1 ]]; then
  command -v lintian >/dev/null || apt_install lintian
  command -v rpmlint >/dev/null || apt_install rpmlint
  log "lintian"
  # Warnings are explained in packaging/README.md; errors fail the build.
  lintian --fail-on error "$OUT"/*.deb
  log "rpmlint"
  rpmlint --rpmlintrc packaging/rpmlintrc "$OUT"/*.rpm
fi

ls -1 "$OUT"/*.deb "$OUT"/*.rpm
