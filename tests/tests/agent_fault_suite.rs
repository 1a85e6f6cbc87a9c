//! The agent's part of the fault suite (issue 8): whatever fails, the host ends on exactly one
//! complete, verified release that is the one serving, the journal parses, nothing is left in
//! `staging/`, and the agent goes on working.
//!
//! Three kinds of injections, each a *case* run against a real agent and a fake coordinator:
//!
//! - **crash**: the agent SIGKILLs itself (`SERIN_AGENT_CRASH_AT`, test builds only) right after a
//!   durable step of staging, activation, local rollback, an ordered rollback, or a state write;
//!   it is started again, the coordinator re-sends the order (as it does after a reconnect), and
//!   the invariants are checked; then a fresh activation must succeed.
//! - **disk**: the agent's state directory is a small tmpfs, full before staging, full during the
//!   download, full when an activation begins (its first durable write), full exactly at the
//!   activation's journal write, or read-only: the order
//!   fails with a clear code, the current release keeps serving without a restart, and a retry
//!   after the disk is fixed succeeds with no repair. Mounting needs root; CI runs as root. Where
//!   the suite cannot mount, these cases count as violations (never silently skipped) unless
//!   `SERIN_FAULT_SKIP_ROOT=1` says to skip them, which the summary then shows.
//! - **source**: the artifact comes from a hostile source — the coordinator's stream or an HTTP
//!   URL flipping bytes, ending early, stalling without closing, trickling, never ending, or
//!   refusing: the activation fails with a clear code within the download deadline, nothing is
//!   activated or left in staging, the release serving is not restarted, and the agent's peak
//!   memory stays below 256 MiB.
//! - **slow**: releases that listen only seconds after their start, replacing releases that drain
//!   for seconds on SIGTERM, for every check kind: never rolled back within the healthy deadline.
//!
//! At the end the suite prints, per kind, the injections, runs and invariant violations; it fails
//! if any violation happened, listing each with its case's dump. `SERIN_FAULT_ROUNDS=N` repeats
//! every case N times and `SERIN_FAULT_LONG=1` runs the whole slow-start matrix (RELIABILITY.md);
//! `SERIN_FAULT_JOBS` sets how many cases run at once (default 2), and `SERIN_FAULT_ONLY=TEXT`
//! keeps only the cases whose kind and name contain TEXT.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serin_proto::wire::{OrderPhase, ResultCode};
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::{AgentOptions, AgentProc, SERVICE};
use serin_tests::demo_release::{Behaviour, DemoRelease};
use serin_tests::fake_coordinator::{ArtifactFault, FakeCoordinator, describe_result};
use serin_tests::fault_report::{self, Outcome, SKIPPED, env_number};
use serin_tests::orders::{self, Deadlines};
use serin_tests::wait;

/// One case of the suite: a kind, a name, and the scenario (which panics on a violation).
struct Case {
    kind: &'static str,
    name: String,
    run: Box<dyn Fn() + Send + Sync>,
}

fn case(
    kind: &'static str,
    name: impl Into<String>,
    run: impl Fn() + Send + Sync + 'static,
) -> Case {
    Case {
        kind,
        name: name.into(),
        run: Box::new(run),
    }
}

#[test]
fn agent_fault_suite() {
    let rounds = env_number("SERIN_FAULT_ROUNDS", 1).max(1);
    let jobs = env_number("SERIN_FAULT_JOBS", 2).max(1);
    let long = std::env::var_os("SERIN_FAULT_LONG").is_some();
    let mut cases = crash_cases();
    cases.extend(disk_cases());
    cases.extend(transport_cases());
    cases.extend(slow_cases(long));
    if let Ok(only) = std::env::var("SERIN_FAULT_ONLY") {
        cases.retain(|c| format!("{} {}", c.kind, c.name).contains(&only));
    }
    let queue: Mutex<Vec<(usize, &Case)>> = Mutex::new(
        (0..rounds)
            .flat_map(|round| cases.iter().map(move |c| (round, c)))
            .rev()
            .collect(),
    );
    let outcomes: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let Some((round, c)) = next else { break };
                    let t = Instant::now();
                    let result = fault_report::run_case(|| (c.run)());
                    let name = fault_report::in_round(&c.name, round, rounds);
                    let outcome = Outcome::new(c.kind, name, result);
                    outcome.log("agent fault suite", t.elapsed());
                    outcomes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(outcome);
                }
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    fault_report::finish(
        &format!(
            "agent fault suite: {} cases x {rounds} round(s), {jobs} at a time, {:.0?}",
            cases.len(),
            started.elapsed()
        ),
        outcomes,
    );
}

// ---------------------------------------------------------------------------------------------
// Invariants

/// What must hold after any fault: `current` is a complete, verified release and the one
/// serving, exactly one service process runs, every release directory is complete, the state
/// file parses, and nothing is left in `staging/`. Returns the release serving.
fn check_invariants(fx: &AgentFixture, what: &str) -> String {
    let serving = fx.wait_consistent();
    wait::wait_for(
        &format!("exactly one service process ({what})"),
        Duration::from_secs(10),
        &|| fx.dump(),
        || fx.agent.service_processes().len() == 1,
    );
    for id in fx.agent.releases() {
        if let Err(e) = fx.agent.verify_release(&id) {
            panic!(
                "release {id} on disk is not complete ({what}): {e:#}\n{}",
                fx.dump()
            );
        }
    }
    if let Err(e) = fx.agent.state_json() {
        panic!("state.json does not parse ({what}): {e:#}\n{}", fx.dump());
    }
    wait::wait_for(
        &format!("staging/ to be empty ({what})"),
        Duration::from_secs(10),
        &|| format!("staging: {:?}\n{}", fx.agent.staging_entries(), fx.dump()),
        || fx.agent.staging_entries().is_empty(),
    );
    serving
}

/// The agent still works: a fresh activation of a new release becomes healthy and serves.
fn still_works(fx: &AgentFixture, seq: u64, id: &str) {
    let v = DemoRelease::healthy(id);
    fx.activate(seq, &v, Deadlines::quick());
    let r = fx.wait_activation_end(seq);
    assert_eq!(
        r.phase(),
        OrderPhase::Healthy,
        "a fresh activation after the fault: {}\n{}",
        describe_result(&r),
        fx.dump()
    );
    fx.wait_serving(id);
    assert_eq!(check_invariants(fx, "after the fresh activation"), id);
}

// ---------------------------------------------------------------------------------------------
// Crash points

/// Which order reaches a crash point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// A stage order of a healthy demo-2.0.
    Stage,
    /// An activate order of a healthy demo-2.0 that needs a confirm.
    Activate,
    /// An activate order of a demo-2.0 that crashes at start: the agent rolls back by itself.
    LocalRollback,
    /// demo-2.0 is kept; then the coordinator orders a rollback to demo-1.0.
    OrderedRollback,
}

/// Every crash point of the agent, and the order that reaches it.
const CRASH_POINTS: &[(&str, Via)] = &[
    ("order-admitted", Via::Stage),
    ("stage-downloaded", Via::Stage),
    ("stage-verified", Via::Stage),
    ("stage-install-prepared", Via::Stage),
    ("stage-installed", Via::Stage),
    ("result-recorded", Via::Stage),
    ("order-admitted", Via::Activate),
    ("activate-journaled", Via::Activate),
    ("activate-swapped", Via::Activate),
    ("activate-swapped-journaled", Via::Activate),
    ("activate-restarted", Via::Activate),
    ("confirm-wait", Via::Activate),
    ("activate-healthy-journaled", Via::Activate),
    ("rollback-journaled", Via::LocalRollback),
    ("rollback-swapped", Via::LocalRollback),
    ("rollback-swapped-journaled", Via::LocalRollback),
    ("rollback-restarted", Via::LocalRollback),
    ("activation-finished", Via::LocalRollback),
    ("order-admitted", Via::OrderedRollback),
    ("ordered-rollback-swapped", Via::OrderedRollback),
    ("ordered-rollback-saved", Via::OrderedRollback),
];

fn crash_cases() -> Vec<Case> {
    CRASH_POINTS
        .iter()
        .map(|&(point, via)| {
            case("crash", format!("{point} via {via:?}"), move || {
                crash_and_recover(point, via)
            })
        })
        .collect()
}

fn crash_and_recover(point: &str, via: Via) {
    let fx = AgentFixture::start(&format!("crash-{point}"));
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let mut seq = 2;
    if via == Via::OrderedRollback {
        fx.activate(seq, &DemoRelease::healthy("demo-2.0"), Deadlines::quick());
        fx.wait_phase(seq, OrderPhase::Healthy);
        fx.wait_serving("demo-2.0");
        seq += 1;
    }

    fx.agent.restart(Some(point));
    fx.wait_attached(2);
    let v2 = match via {
        Via::LocalRollback => {
            DemoRelease::build(Behaviour::healthy("demo-2.0").crashing_at_start())
        }
        _ => DemoRelease::healthy("demo-2.0"),
    };
    fx.publish(&v2);
    let order = match via {
        Via::Stage => orders::stage(seq, v2.wire(SERVICE, "")),
        Via::Activate | Via::LocalRollback => orders::activate(
            seq,
            v2.wire(SERVICE, ""),
            Deadlines::quick().confirm_within(30_000),
        ),
        Via::OrderedRollback => orders::rollback(seq, SERVICE, "demo-1.0"),
    };
    fx.send(order.clone());
    let status = fx.agent.wait_exit(Duration::from_secs(30), &|| fx.dump());
    assert_eq!(
        status.signal(),
        Some(9),
        "the agent should have SIGKILLed itself at {point}, exited with {status}\n{}",
        fx.dump()
    );

    fx.agent.spawn(None);
    fx.wait_attached(3);
    // The coordinator re-sends the order after the reconnect; it must be answered.
    fx.send(order);
    let r = fx.wait_result(
        &format!("an answer to order seq {seq} after the crash"),
        |r| r.seq == seq && r.phase() != OrderPhase::Progress,
    );
    let serving = check_invariants(&fx, &format!("after a crash at {point}"));
    match via {
        Via::Stage | Via::LocalRollback | Via::OrderedRollback => assert_eq!(
            serving,
            "demo-1.0",
            "after a crash at {point} via {via:?} (answer {})\n{}",
            describe_result(&r),
            fx.dump()
        ),
        Via::Activate => assert!(
            serving == "demo-1.0" || serving == "demo-2.0",
            "serving {serving}"
        ),
    }
    seq += 1;
    // An activation carried on after the crash awaits its confirm: give it.
    if via == Via::Activate && serving == "demo-2.0" {
        fx.send(orders::confirm(seq, SERVICE, "demo-2.0"));
        let r = fx.wait_outcome(seq);
        assert_eq!(
            r.phase(),
            OrderPhase::Confirmed,
            "{}\n{}",
            describe_result(&r),
            fx.dump()
        );
        seq += 1;
    }
    still_works(&fx, seq, "demo-3.0");
}

// ---------------------------------------------------------------------------------------------
// Disks

/// The page size tmpfs allocates in.
const PAGE: u64 = 4096;

/// Sizes of the files in the agent's `staging/`.
fn part_sizes(fx: &AgentFixture) -> Vec<u64> {
    let dir = fx.agent.service_dir().join("staging");
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the spare of the agent's `state.json` (see `serin_agent::durable`): its next durable
/// write then needs a page of its own, as one that grows the state does.
fn remove_state_spare(fx: &AgentFixture) {
    let state = fx.agent.service_dir().join("state.json");
    let spare = serin_agent::durable::spare_of(&state).expect("state.json has a file name");
    std::fs::remove_file(spare).expect("removing the state file's spare");
}

/// A tmpfs of `size_mib` MiB mounted on `dir`, unmounted (lazily) on drop.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(dir: &Path, size_mib: u32) -> Self {
        std::fs::create_dir_all(dir).expect("creating the mount point");
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Self {
                dir: dir.to_path_buf(),
            },
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                    Err(e) => e.to_string(),
                };
                if std::env::var_os("SERIN_FAULT_SKIP_ROOT").is_some() {
                    panic!("{SKIPPED} cannot mount a tmpfs ({why})");
                }
                panic!(
                    "cannot mount a tmpfs on {} ({why}): the disk cases need root (CI runs as \
                     root); set SERIN_FAULT_SKIP_ROOT=1 to skip them visibly",
                    dir.display()
                );
            }
        }
    }

    /// Fills the filesystem: one file grows until the disk refuses more.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).expect("creating the filler");
        let big = vec![0xa5u8; 1 << 20];
        while f.write_all(&big).is_ok() {}
        let small = [0x5au8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
        path
    }

    /// Fills the filesystem, then frees `pages` pages of it again.
    fn fill_but(&self, pages: u64) {
        let path = self.fill();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("opening the filler");
        let len = f.metadata().expect("filler size").len();
        // Down to a page boundary, then `pages` pages less.
        f.set_len((len / PAGE).saturating_sub(pages) * PAGE)
            .expect("shrinking the filler");
    }

    fn free(&self) {
        let _ = std::fs::remove_file(self.dir.join("filler"));
    }

    /// Makes the filesystem read-only for every new open: a read-only bind mount on top of it
    /// (the tmpfs itself cannot be remounted read-only while the service's log is open for
    /// writing; files already open keep writing below).
    fn make_read_only(&self) {
        run_mount(&["--bind"], &self.dir, &self.dir);
        run_mount(&["-o", "remount,bind,ro"], &self.dir, Path::new(""));
    }

    /// Undoes [`make_read_only`](Self::make_read_only).
    fn make_writable(&self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "unmounting the read-only bind on {}",
            self.dir.display()
        );
    }
}

fn run_mount(args: &[&str], source: &Path, target: &Path) {
    let mut cmd = std::process::Command::new("mount");
    cmd.args(args).arg(source);
    if !target.as_os_str().is_empty() {
        cmd.arg(target);
    }
    let out = cmd.output().expect("running mount");
    assert!(
        out.status.success(),
        "mount {args:?} {}: {}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // The read-only bind too, if a failing case left it.
        for _ in 0..2 {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// An agent on a small state directory. The agent goes first when dropped: it finds its service
/// processes through the state directory, which must still be mounted.
struct DiskFixture {
    fx: AgentFixture,
    fs: SmallFs,
}

/// An agent whose state directory is a fresh 64 MiB tmpfs (room for a few releases of the demo
/// service, ~10 MB each, and the stage's free-space margin), with demo-1.0 installed.
fn disk_fixture(name: &str) -> DiskFixture {
    let coord = FakeCoordinator::start();
    let agent = AgentProc::configure(&coord.url(), &AgentOptions::new(name));
    let fs = SmallFs::mount(agent.state_dir(), 64);
    agent.spawn(None);
    let fx = AgentFixture { agent, coord };
    fx.wait_attached(1);
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    DiskFixture { fx, fs }
}

/// The order failed with one of `codes`, the current release kept serving without a restart,
/// and the invariants hold.
fn refused_cleanly(fx: &AgentFixture, seq: u64, codes: &[ResultCode], pid_before: u32) {
    let r = fx.wait_outcome(seq);
    assert!(
        r.phase() == OrderPhase::Failed && codes.contains(&r.code()),
        "expected FAILED with one of {codes:?}: {}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert!(!r.message.is_empty(), "{}", describe_result(&r));
    assert_eq!(fx.agent.version().ok().as_deref(), Some("demo-1.0"));
    assert_eq!(
        fx.agent.service_pid().ok(),
        Some(pid_before),
        "the serving release was restarted\n{}",
        fx.dump()
    );
    assert_eq!(check_invariants(fx, "after the disk fault"), "demo-1.0");
}

fn disk_cases() -> Vec<Case> {
    vec![
        case("disk", "full before staging", || {
            let DiskFixture { fx, fs } = &disk_fixture("disk-full-before-stage");
            let pid = fx.agent.service_pid().expect("service pid");
            fs.fill();
            let v2 = DemoRelease::healthy("demo-2.0");
            fx.publish(&v2);
            fx.send(orders::stage(2, v2.wire(SERVICE, "")));
            refused_cleanly(
                fx,
                2,
                &[ResultCode::InsufficientSpace, ResultCode::IoError],
                pid,
            );
            fs.free();
            still_works(fx, 3, "demo-3.0");
        }),
        case("disk", "full during the download", || {
            let DiskFixture { fx, fs } = &disk_fixture("disk-full-during-download");
            let pid = fx.agent.service_pid().expect("service pid");
            let v2 = DemoRelease::healthy("demo-2.0");
            fx.publish(&v2);
            fx.coord
                .set_fault(&v2.sha256, Some(ArtifactFault::HoldAfter(3 << 20)));
            fx.send(orders::stage(2, v2.wire(SERVICE, "")));
            // Watch the partial file itself: progress reports come every tenth of the artifact
            // (at least 1 MiB), so on a large build of the demo service none may fall below the
            // 3 MiB the source holds at.
            let staging = fx.agent.service_dir().join("staging");
            let part_len = || {
                std::fs::read_dir(&staging)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .max()
                    .unwrap_or(0)
            };
            wait::wait_for(
                "2 MiB of the artifact in staging/",
                Duration::from_secs(20),
                &|| {
                    format!(
                        "largest file in staging/: {} bytes\n{}",
                        part_len(),
                        fx.dump()
                    )
                },
                || part_len() >= 2 << 20,
            );
            fs.fill();
            fx.coord.set_fault(&v2.sha256, None);
            refused_cleanly(fx, 2, &[ResultCode::IoError], pid);
            fs.free();
            still_works(fx, 3, "demo-3.0");
        }),
        case("disk", "full when an activation begins", || {
            let DiskFixture { fx, fs } = &disk_fixture("disk-full-at-activation");
            let pid = fx.agent.service_pid().expect("service pid");
            let v2 = DemoRelease::healthy("demo-2.0");
            fx.publish(&v2);
            fx.send(orders::stage(2, v2.wire(SERVICE, "")));
            assert_eq!(fx.wait_outcome(2).phase(), OrderPhase::Staged);
            // A durable write overwrites its file's spare in place, which a full disk does not
            // stop while the state keeps its size; without a spare it needs a new page.
            remove_state_spare(fx);
            fs.fill();
            fx.send(orders::activate(
                3,
                v2.wire(SERVICE, ""),
                Deadlines::quick(),
            ));
            refused_cleanly(fx, 3, &[ResultCode::IoError], pid);
            fs.free();
            // The retry needs no repair: the staged release is still there.
            still_works(fx, 4, "demo-2.0");
        }),
        case("disk", "full at the journal write", || {
            // The download is held just before its end, with its last page already written;
            // the disk is filled but for one page, which the release's `release.json` takes
            // when the download ends. The next durable write is the activation's journal.
            let DiskFixture { fx, fs } = &disk_fixture("disk-full-at-journal");
            let pid = fx.agent.service_pid().expect("service pid");
            let v2 = DemoRelease::healthy("demo-2.0");
            fx.publish(&v2);
            let hold_at = (v2.size - 1) / PAGE * PAGE + 1;
            fx.coord
                .set_fault(&v2.sha256, Some(ArtifactFault::HoldAfter(hold_at)));
            fx.send(orders::activate(
                2,
                v2.wire(SERVICE, ""),
                Deadlines::quick(),
            ));
            wait::wait_for(
                "the download to reach the hold",
                Duration::from_secs(20),
                &|| format!("staging: {:?}\n{}", part_sizes(fx), fx.dump()),
                || part_sizes(fx).iter().any(|n| *n >= hold_at),
            );
            // As above: the journal write has to find a new page.
            remove_state_spare(fx);
            fs.fill_but(1);
            fx.coord.set_fault(&v2.sha256, None);
            refused_cleanly(fx, 2, &[ResultCode::IoError], pid);
            let r = fx.wait_outcome(2);
            assert!(
                r.message.contains("journal"),
                "the failure should be the journal write: {}\n{}",
                describe_result(&r),
                fx.dump()
            );
            fs.free();
            // The release was installed before the journal failed: the retry needs no download.
            still_works(fx, 3, "demo-2.0");
        }),
        case("disk", "read-only state directory", || {
            let DiskFixture { fx, fs } = &disk_fixture("disk-read-only");
            let pid = fx.agent.service_pid().expect("service pid");
            let v2 = DemoRelease::healthy("demo-2.0");
            fx.publish(&v2);
            fs.make_read_only();
            fx.send(orders::activate(
                2,
                v2.wire(SERVICE, ""),
                Deadlines::quick(),
            ));
            let r = fx.wait_outcome(2);
            fs.make_writable();
            assert!(
                r.phase() == OrderPhase::Failed && r.code() == ResultCode::IoError,
                "{}\n{}",
                describe_result(&r),
                fx.dump()
            );
            refused_cleanly(fx, 2, &[ResultCode::IoError], pid);
            still_works(fx, 3, "demo-3.0");
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// Hostile artifact sources

/// Downloads below 64 KiB/s over a second are abandoned, and any download after 20 s.
const STRICT_DOWNLOADS: &str =
    "[download]\nmin_bytes_per_sec = 65536\nrate_window = \"1s\"\ndeadline = \"20s\"\n";

/// How a hostile source misbehaves.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    /// The coordinator's stream flips a byte.
    CoordinatorFlipped,
    /// The coordinator's stream ends early, every time.
    CoordinatorTruncated,
    /// The coordinator's stream stops sending without closing.
    CoordinatorStalled,
    /// The coordinator's stream trickles a byte every 200 ms.
    CoordinatorSlow,
    /// The coordinator's stream goes on after the artifact's end.
    CoordinatorEndless,
    /// The coordinator refuses the fetch.
    CoordinatorUnavailable,
    /// The HTTP source serves other bytes.
    HttpFlipped,
    /// The HTTP source closes every connection mid-body.
    HttpCut,
    /// The HTTP source trickles a byte every 200 ms.
    HttpSlow,
}

fn transport_cases() -> Vec<Case> {
    use Hostile::*;
    [
        (CoordinatorFlipped, &[ResultCode::HashMismatch][..]),
        (
            CoordinatorTruncated,
            &[ResultCode::SizeMismatch, ResultCode::DownloadFailed][..],
        ),
        (CoordinatorStalled, &[ResultCode::DownloadFailed][..]),
        (CoordinatorSlow, &[ResultCode::DownloadFailed][..]),
        (CoordinatorEndless, &[ResultCode::SizeMismatch][..]),
        (CoordinatorUnavailable, &[ResultCode::DownloadFailed][..]),
        (HttpFlipped, &[ResultCode::HashMismatch][..]),
        (
            HttpCut,
            &[ResultCode::SizeMismatch, ResultCode::DownloadFailed][..],
        ),
        (HttpSlow, &[ResultCode::DownloadFailed][..]),
    ]
    .into_iter()
    .map(|(how, codes)| {
        case("source", format!("{how:?}"), move || {
            hostile_source(how, codes)
        })
    })
    .collect()
}

/// An activation whose artifact comes from a hostile source ends with one of `codes` within the
/// download deadline; nothing is activated or left in staging, and the release serving is not
/// restarted.
fn hostile_source(how: Hostile, codes: &[ResultCode]) {
    let mut opts = AgentOptions::new(&format!("hostile-{how:?}"));
    opts.extra_top_toml = STRICT_DOWNLOADS.to_owned();
    let fx = AgentFixture::start_with(opts);
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let pid = fx.agent.service_pid().expect("service pid");
    let v2 = DemoRelease::healthy("demo-2.0");
    let server = serin_tests::http::ArtifactServer::start();
    let url = match how {
        Hostile::HttpFlipped => {
            let mut evil = v2.bytes.clone();
            evil[v2.bytes.len() / 3] ^= 0xff;
            server.put("/demo-2.0", evil)
        }
        Hostile::HttpCut => server.put_cut("/demo-2.0", v2.bytes.clone(), v2.bytes.len() / 2),
        Hostile::HttpSlow => {
            server.put_trickle("/demo-2.0", v2.bytes.clone(), 1, Duration::from_millis(200))
        }
        _ => {
            fx.publish(&v2);
            let fault = match how {
                Hostile::CoordinatorFlipped => ArtifactFault::WrongBytes,
                Hostile::CoordinatorTruncated => ArtifactFault::TruncateAfter(v2.size / 2),
                Hostile::CoordinatorStalled => ArtifactFault::HoldAfter(1 << 20),
                Hostile::CoordinatorSlow => ArtifactFault::Trickle {
                    bytes: 1,
                    every: Duration::from_millis(200),
                },
                Hostile::CoordinatorEndless => ArtifactFault::Endless,
                _ => ArtifactFault::Fail,
            };
            fx.coord.set_fault(&v2.sha256, Some(fault));
            String::new()
        }
    };
    let sent = Instant::now();
    fx.send(orders::activate(
        2,
        v2.wire(SERVICE, &url),
        Deadlines::quick(),
    ));
    refused_cleanly(&fx, 2, codes, pid);
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(25),
        "the download took {took:?}, past its 20 s deadline\n{}",
        fx.dump()
    );
    assert!(!fx.agent.releases().contains(&v2.id), "{}", fx.dump());
    // Memory stayed bounded: a hostile source cannot make the agent buffer the artifact, let
    // alone an endless one (the agent streams chunks to disk; its peak is a few tens of MiB).
    let peak = peak_rss_kib(fx.agent.pid().expect("agent pid"));
    eprintln!("fault suite: source {how:?}: agent peak RSS {peak:?} KiB");
    assert!(
        peak.is_some_and(|kib| kib < 256 * 1024),
        "agent peak RSS {peak:?} KiB, expected below 256 MiB\n{}",
        fx.dump()
    );
    fx.coord.set_fault(&v2.sha256, None);
    still_works(&fx, 3, "demo-3.0");
}

/// The peak resident set size of process `pid` (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Slow starters and slow stoppers

/// The `[[service.check]]` table of one check kind, probing every 200 ms.
fn check_toml(kind: &str) -> String {
    let body = match kind {
        "http" => "kind = \"http\"\nurl = \"http://127.0.0.1:{port}/healthz\"".to_owned(),
        "tcp" => "kind = \"tcp\"\naddress = \"127.0.0.1:{port}\"".to_owned(),
        "command" => {
            "kind = \"command\"\ncommand = [\"bash\", \"-c\", \"exec 3<>/dev/tcp/127.0.0.1/{port}\"]"
                .to_owned()
        }
        "restarts" => "kind = \"restarts\"\nmax = 0".to_owned(),
        other => panic!("unknown check kind {other}"),
    };
    format!(
        "\n[[service.check]]\nname = \"{kind}\"\n{body}\ninterval = \"200ms\"\ntimeout = \"500ms\"\nfailure_threshold = 2\nsuccess_threshold = 1\n"
    )
}

const KINDS: [&str; 4] = ["http", "tcp", "command", "restarts"];
const LISTEN_AFTER_MS: [u64; 3] = [500, 2_000, 5_000];
const DRAIN_MS: [u64; 2] = [0, 1_500];

fn slow_cases(long: bool) -> Vec<Case> {
    let mut combos = Vec::new();
    if long {
        for kind in KINDS {
            for listen in LISTEN_AFTER_MS {
                for drain in DRAIN_MS {
                    combos.push((kind, listen, drain));
                }
            }
        }
    } else {
        // Quick mode: every kind once, the delays rotating over the matrix.
        for (i, kind) in KINDS.into_iter().enumerate() {
            combos.push((
                kind,
                LISTEN_AFTER_MS[i % LISTEN_AFTER_MS.len()],
                DRAIN_MS[(i + 1) % DRAIN_MS.len()],
            ));
        }
    }
    combos
        .into_iter()
        .map(|(kind, listen, drain)| {
            case(
                "slow",
                format!("{kind} listen after {listen} ms, drain {drain} ms"),
                move || slow_swap(kind, listen, drain),
            )
        })
        .collect()
}

/// demo-1.0 draining `drain_ms` on SIGTERM is replaced by demo-2.0 listening after `listen_ms`:
/// HEALTHY, never rolled back, and demo-2.0 serves.
fn slow_swap(kind: &str, listen_ms: u64, drain_ms: u64) {
    let mut opts = AgentOptions::new(&format!("slow-{kind}-{listen_ms}-{drain_ms}"));
    opts.checks_toml = check_toml(kind);
    let fx = AgentFixture::start_with(opts);
    let mut v1 = Behaviour::healthy("demo-1.0");
    if drain_ms > 0 {
        v1 = v1.slow_stop(drain_ms);
    }
    fx.install_first(1, &DemoRelease::build(v1));
    let v2 = DemoRelease::build(Behaviour::healthy("demo-2.0").listen_after(listen_ms));
    fx.publish(&v2);
    fx.send(orders::activate(
        2,
        v2.wire(SERVICE, ""),
        Deadlines {
            healthy_deadline_ms: listen_ms + drain_ms + 10_000,
            min_healthy_ms: 1_000,
            confirm_deadline_ms: 0,
        },
    ));
    let r = fx.wait_result("HEALTHY, ROLLED_BACK or FAILED for seq 2", |r| {
        r.seq == 2
            && matches!(
                r.phase(),
                OrderPhase::Healthy | OrderPhase::RolledBack | OrderPhase::Failed
            )
    });
    assert_eq!(
        r.phase(),
        OrderPhase::Healthy,
        "a healthy slow release was not reported healthy: {}\n{}",
        describe_result(&r),
        fx.dump()
    );
    fx.wait_serving("demo-2.0");
    assert_eq!(check_invariants(&fx, "after the slow swap"), "demo-2.0");
}
