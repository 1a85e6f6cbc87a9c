//! The operator commands: each one is a ControlService call and a rendering of its answer.

use std::io::Write;
use std::path::Path;

use serin_proto::wire;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::args::{
    ArtifactCommand, ControlArgs, OutputFormat, ReleaseCommand, RolloutCommand, SpecArgs, StartArgs,
};
use super::client::Control;
use super::exit::{CliError, Exit, error_chain};
use super::render::{self, Palette};
use super::watch::{self, now_ms};

/// Size of the chunks `artifact push` streams.
pub const PUSH_CHUNK: usize = 1024 * 1024;

/// Prints a JSON value (pretty) or a text block to stdout.
pub(crate) fn emit(
    output: OutputFormat,
    json: impl FnOnce() -> serde_json::Value,
    text: impl FnOnce(&Palette) -> String,
) {
    match output {
        OutputFormat::Json => {
            let v = json();
            // anstream's macros ignore a closed pipe (`serin hosts -o json | head`).
            anstream::println!(
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
            );
        }
        OutputFormat::Text => {
            let p = Palette::for_stdout();
            anstream::print!("{}", text(&p));
        }
    }
}

/// Client-side checks of a service name and release id (the server checks them again).
fn check_names(service: &str, release: &str) -> Result<(), CliError> {
    serin_proto::ServiceName::new(service)
        .map_err(|e| CliError::Usage(format!("--service: {e}")))?;
    serin_proto::ReleaseId::new(release).map_err(|e| CliError::Usage(format!("--release: {e}")))?;
    Ok(())
}

/// `serin hosts`: a summary of every selected host and the first page, or with `all` every page
/// as it arrives (a fleet of any size, one bounded message at a time).
pub async fn hosts(
    c: &mut Control,
    output: OutputFormat,
    selector: Option<String>,
    all: bool,
    page_size: u32,
) -> Result<Exit, CliError> {
    let selector = selector.unwrap_or_default();
    let mut page_token = String::new();
    let mut first = true;
    loop {
        let resp = c
            .client
            .list_hosts(wire::ListHostsRequest {
                selector: selector.clone(),
                page_size,
                page_token: std::mem::take(&mut page_token),
                summary: !all,
            })
            .await
            .map_err(|s| c.err("list hosts", s))?
            .into_inner();
        let now = now_ms();
        if !all {
            emit(
                output,
                || render::hosts_json(&resp),
                |p| render::hosts_summary_text(&resp, now, p),
            );
            return Ok(Exit::Success);
        }
        match output {
            OutputFormat::Json => {
                for h in &resp.hosts {
                    anstream::println!("{}", render::host_json(h));
                }
            }
            OutputFormat::Text => {
                let p = render::Palette::for_stdout();
                let text = render::hosts_text(&resp.hosts, now, &p);
                // One header for the whole listing; each page sizes its own columns.
                let text = match (first, text.split_once('\n')) {
                    (false, Some((_, rows))) => rows.to_string(),
                    _ => text,
                };
                anstream::print!("{text}");
            }
        }
        first = false;
        if resp.next_page_token.is_empty() {
            return Ok(Exit::Success);
        }
        page_token = resp.next_page_token;
    }
}

/// `serin artifact ...`.
pub async fn artifact(
    c: &mut Control,
    output: OutputFormat,
    cmd: ArtifactCommand,
) -> Result<Exit, CliError> {
    match cmd {
        ArtifactCommand::Push {
            file,
            service,
            release,
            manifest,
        } => {
            let manifest = read_manifest(manifest.as_deref()).await?;
            push(c, output, &file, &service, &release, manifest).await
        }
    }
}

/// The text of the manifest file given with `--manifest`, empty without one.
async fn read_manifest(path: Option<&Path>) -> Result<String, CliError> {
    let Some(path) = path else {
        return Ok(String::new());
    };
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| CliError::Usage(format!("cannot read manifest {}: {e}", path.display())))?;
    if bytes.len() > serin_proto::MAX_MANIFEST_BYTES {
        return Err(CliError::Usage(format!(
            "manifest {} is {} bytes long; a manifest has at most {} bytes",
            path.display(),
            bytes.len(),
            serin_proto::MAX_MANIFEST_BYTES
        )));
    }
    String::from_utf8(bytes)
        .map_err(|_| CliError::Usage(format!("manifest {} is not UTF-8 text", path.display())))
}

/// Streams `file` in [`PUSH_CHUNK`] chunks, then checks the coordinator's sha256 and size
/// against what was read.
async fn push(
    c: &mut Control,
    output: OutputFormat,
    file: &Path,
    service: &str,
    release: &str,
    manifest: String,
) -> Result<Exit, CliError> {
    check_names(service, release)?;
    let mut f = tokio::fs::File::open(file)
        .await
        .map_err(|e| CliError::Usage(format!("cannot open artifact {}: {e}", file.display())))?;
    let meta = f
        .metadata()
        .await
        .map_err(|e| CliError::Other(format!("cannot stat artifact {}: {e}", file.display())))?;
    if !meta.is_file() {
        return Err(CliError::Usage(format!(
            "artifact {} is not a regular file",
            file.display()
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<wire::PushArtifactChunk>(4);
    let display = file.display().to_string();
    let (service_s, release_s) = (service.to_string(), release.to_string());
    let mut manifest = Some(manifest);
    // Reads the file and feeds the request stream; yields the hash and size it read.
    let reader = async move {
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        let mut first = true;
        loop {
            let mut buf = vec![0u8; PUSH_CHUNK];
            let mut filled = 0;
            while filled < PUSH_CHUNK {
                let n = f
                    .read(&mut buf[filled..])
                    .await
                    .map_err(|e| CliError::Other(format!("cannot read artifact {display}: {e}")))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            buf.truncate(filled);
            hasher.update(&buf);
            total += filled as u64;
            let last = filled < PUSH_CHUNK;
            if filled > 0 || first {
                let chunk = wire::PushArtifactChunk {
                    service: if first {
                        service_s.clone()
                    } else {
                        String::new()
                    },
                    release_id: if first {
                        release_s.clone()
                    } else {
                        String::new()
                    },
                    data: buf.into(),
                    manifest: manifest.take().unwrap_or_default(),
                };
                first = false;
                if tx.send(chunk).await.is_err() {
                    // The call ended early; its error is reported by the RPC side.
                    break;
                }
            }
            if last {
                break;
            }
        }
        drop(tx);
        Ok::<_, CliError>((hex::encode(hasher.finalize()), total))
    };
    let call = c
        .client
        .push_artifact(tokio_stream::wrappers::ReceiverStream::new(rx));
    let (read, answer) = tokio::join!(reader, call);
    let info = answer
        .map_err(|s| c.err(&format!("push {}", file.display()), s))?
        .into_inner();
    let (sha, size) = read?;
    if let Some(rel) = &info.release
        && (rel.sha256 != sha || rel.size != size)
    {
        return Err(CliError::Other(format!(
            "the coordinator stored release {service} {release} with sha256 {} and size {}, but {} has sha256 {sha} and size {size}",
            rel.sha256,
            rel.size,
            file.display()
        )));
    }
    emit(
        output,
        || render::release_info_json(&info),
        |p| render::release_info_text(&info, "pushed", p),
    );
    Ok(Exit::Success)
}

/// `serin release ...`.
pub async fn release(
    c: &mut Control,
    output: OutputFormat,
    cmd: ReleaseCommand,
) -> Result<Exit, CliError> {
    match cmd {
        ReleaseCommand::Add {
            service,
            release,
            url,
            sha256,
            size,
            manifest,
        } => {
            check_names(&service, &release)?;
            let manifest = read_manifest(manifest.as_deref()).await?;
            serin_proto::Sha256::from_hex("--sha256", &sha256)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(CliError::Usage(format!(
                    "--url {url:?} must be an http:// or https:// URL"
                )));
            }
            let info = c
                .client
                .register_release(wire::Release {
                    service,
                    id: release,
                    sha256,
                    size,
                    url,
                    manifest,
                })
                .await
                .map_err(|s| c.err("register release", s))?
                .into_inner();
            emit(
                output,
                || render::release_info_json(&info),
                |p| render::release_info_text(&info, "registered", p),
            );
        }
        ReleaseCommand::Pack(_) | ReleaseCommand::Sign(_) | ReleaseCommand::Verify(_) => {
            return Err(CliError::Other(
                "internal error: an offline command reached the coordinator client".to_string(),
            ));
        }
        ReleaseCommand::List { service } => {
            let resp = c
                .client
                .list_releases(wire::ListReleasesRequest {
                    service: service.unwrap_or_default(),
                })
                .await
                .map_err(|s| c.err("list releases", s))?
                .into_inner();
            emit(
                output,
                || render::releases_json(&resp),
                |p| render::releases_text(&resp.releases, p),
            );
        }
    }
    Ok(Exit::Success)
}

/// `serin rollout ...`.
pub async fn rollout(
    c: &mut Control,
    output: OutputFormat,
    cmd: RolloutCommand,
) -> Result<Exit, CliError> {
    match cmd {
        RolloutCommand::Plan(spec) => plan(c, output, &spec).await,
        RolloutCommand::Start(start) => start_rollout(c, output, start).await,
        RolloutCommand::Status {
            id,
            watch,
            timeout,
            page,
        } => {
            let page = watch::HostPage::from(page);
            if watch {
                return watch::follow(c, &id, None, output, timeout, page).await;
            }
            let s = get(c, &id, page).await?;
            let now = now_ms();
            emit(
                output,
                || render::status_json(&s),
                |p| render::status_text(&s, now, p),
            );
            Ok(Exit::Success)
        }
        RolloutCommand::List { service } => {
            let resp = c
                .client
                .list_rollouts(wire::ListRolloutsRequest {
                    service: service.unwrap_or_default(),
                })
                .await
                .map_err(|s| c.err("list rollouts", s))?
                .into_inner();
            emit(
                output,
                || render::rollouts_json(&resp),
                |p| render::rollouts_text(&resp.rollouts, p),
            );
            Ok(Exit::Success)
        }
        RolloutCommand::Pause(a) => control(c, output, wire::ControlAction::Pause, a).await,
        RolloutCommand::Resume(a) => control(c, output, wire::ControlAction::Resume, a).await,
        RolloutCommand::Promote(a) => control(c, output, wire::ControlAction::Promote, a).await,
        RolloutCommand::Abort(a) => control(c, output, wire::ControlAction::Abort, a).await,
        RolloutCommand::Retry(a) => control(c, output, wire::ControlAction::Retry, a).await,
        RolloutCommand::Rollback(a) => control(c, output, wire::ControlAction::Rollback, a).await,
        RolloutCommand::Explain { id } => {
            let e = c
                .client
                .explain_rollout(wire::RolloutRef {
                    rollout_id: id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| c.err(&format!("explain rollout {id}"), s))?
                .into_inner();
            emit(
                output,
                || render::explanation_json(&e),
                |p| render::explanation_text(&e, p),
            );
            Ok(Exit::Success)
        }
    }
}

fn check_spec(spec: &SpecArgs) -> Result<(), CliError> {
    check_names(&spec.service, &spec.release)?;
    if spec.max_domains.is_some() && spec.spread_by.is_none() {
        return Err(CliError::Usage(
            "--max-domains needs --spread-by LABEL (the failure-domain label)".to_string(),
        ));
    }
    Ok(())
}

async fn plan(c: &mut Control, output: OutputFormat, spec: &SpecArgs) -> Result<Exit, CliError> {
    check_spec(spec)?;
    let plan = c
        .client
        .plan_rollout(spec.to_spec())
        .await
        .map_err(|s| c.err("plan rollout", s))?
        .into_inner();
    emit(
        output,
        || render::plan_json(&plan),
        |p| render::plan_text(&plan, p),
    );
    Ok(Exit::Success)
}

async fn start_rollout(
    c: &mut Control,
    output: OutputFormat,
    start: StartArgs,
) -> Result<Exit, CliError> {
    check_spec(&start.spec)?;
    let status = c
        .client
        .start_rollout(start.spec.to_spec())
        .await
        .map_err(|s| c.err("start rollout", s))?
        .into_inner();
    if start.wait {
        let id = status.rollout_id.clone();
        if output == OutputFormat::Text {
            let mut err = anstream::stderr().lock();
            let _ = writeln!(
                err,
                "started rollout {id}; following it (Ctrl-C stops watching, not the rollout)"
            );
        }
        return watch::follow(
            c,
            &id,
            Some(status),
            output,
            start.timeout,
            watch::HostPage::default(),
        )
        .await;
    }
    let now = now_ms();
    emit(
        output,
        || render::status_json(&status),
        |p| {
            format!(
                "started rollout {}\n\n{}\nfollow it with: serin rollout status {} --watch\n",
                p.bold(&status.rollout_id),
                render::status_text(&status, now, p),
                status.rollout_id
            )
        },
    );
    Ok(Exit::Success)
}

async fn get(
    c: &mut Control,
    id: &str,
    page: watch::HostPage,
) -> Result<wire::RolloutStatus, CliError> {
    Ok(c.client
        .get_rollout(page.request(id))
        .await
        .map_err(|s| c.err(&format!("get rollout {id}"), s))?
        .into_inner())
}

async fn control(
    c: &mut Control,
    output: OutputFormat,
    action: wire::ControlAction,
    args: ControlArgs,
) -> Result<Exit, CliError> {
    let verb = action
        .as_str_name()
        .trim_start_matches("CONTROL_ACTION_")
        .to_ascii_lowercase();
    let s = c
        .client
        .control_rollout(wire::ControlRequest {
            rollout_id: args.id.clone(),
            action: action as i32,
            reason: args.reason.unwrap_or_default(),
        })
        .await
        .map_err(|st| c.err(&format!("{verb} rollout {}", args.id), st))?
        .into_inner();
    let now = now_ms();
    emit(
        output,
        || render::status_json(&s),
        |p| {
            format!(
                "{verb}: rollout {} is now {}\n\n{}",
                p.bold(&s.rollout_id),
                p.state(s.state().as_str()),
                render::status_text(&s, now, p)
            )
        },
    );
    Ok(Exit::Success)
}

/// Runs an operator command against the coordinator at `url`.
pub async fn run_operator(
    url: &str,
    output: OutputFormat,
    command: super::args::Command,
) -> Result<Exit, CliError> {
    run_operator_with(url, &Default::default(), output, command).await
}

/// [`run_operator`] with the TLS flags of the command line.
pub async fn run_operator_with(
    url: &str,
    tls: &super::credentials::TlsFlags,
    output: OutputFormat,
    command: super::args::Command,
) -> Result<Exit, CliError> {
    use super::args::Command;
    let mut c = Control::connect_with(url, tls).await?;
    match command {
        Command::Hosts(h) => match h.action {
            Some(action) => super::audit::hosts_action(&mut c, output, action).await,
            None => hosts(&mut c, output, h.selector, h.all, h.page_size).await,
        },
        Command::Audit(a) => super::audit::audit(&mut c, output, a).await,
        Command::Token(t) => super::enrol::token(&mut c, output, t).await,
        Command::Artifact(a) => artifact(&mut c, output, a).await,
        Command::Release(r) => release(&mut c, output, r).await,
        Command::Rollout(r) => rollout(&mut c, output, r).await,
        Command::Serve(_)
        | Command::Ca(_)
        | Command::Keygen(_)
        | Command::CheckConfig(_)
        | Command::Completions { .. }
        | Command::Man { .. } => Err(CliError::Other(
            "internal error: not an operator command".to_string(),
        )),
    }
}

/// Writes the shell completion script for `shell` to `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    let mut cmd = <super::args::Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "serin", out);
}

/// The command tree the man pages are made from: built (so every subcommand knows its full
/// name, `serin-rollout-start`) and without clap's `help` subcommand, which has no page.
fn man_command() -> clap::Command {
    let mut cmd =
        <super::args::Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// Writes the man page serin(1) (roff) to `out`. Its SUBCOMMANDS section refers to
/// `serin-<sub>(1)`, the pages [`man_pages_to`] writes.
pub fn man_page(out: &mut dyn Write) -> Result<(), CliError> {
    clap_mangen::Man::new(man_command())
        .render(out)
        .map_err(|e| CliError::Other(format!("cannot write the man page: {}", error_chain(&e))))
}

/// Writes `serin.1` and one page per subcommand, nested ones included (`serin-rollout.1`,
/// `serin-rollout-start.1`, …), into `dir`, which must exist. Returns the files written.
pub fn man_pages_to(dir: &Path) -> Result<Vec<std::path::PathBuf>, CliError> {
    if !dir.is_dir() {
        return Err(CliError::Usage(format!(
            "cannot write the man pages into {}: not a directory",
            dir.display()
        )));
    }
    fn walk(
        cmd: clap::Command,
        dir: &Path,
        written: &mut Vec<std::path::PathBuf>,
    ) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            walk(sub, dir, written)?;
        }
        written.push(clap_mangen::Man::new(cmd).generate_to(dir)?);
        Ok(())
    }
    let mut written = Vec::new();
    walk(man_command(), dir, &mut written).map_err(|e| {
        CliError::Other(format!(
            "cannot write the man pages into {}: {}",
            dir.display(),
            error_chain(&e)
        ))
    })?;
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_and_man_page_are_generated() {
        let mut bash = Vec::new();
        completions(clap_complete::Shell::Bash, &mut bash);
        let bash = String::from_utf8(bash).expect("utf-8");
        assert!(
            bash.contains("rollout"),
            "bash completion mentions subcommands"
        );
        let mut man = Vec::new();
        man_page(&mut man).expect("man page");
        let man = String::from_utf8(man).expect("utf-8");
        assert!(man.contains(".TH serin"), "{}", &man[..man.len().min(200)]);
        assert!(
            man.contains("Exit codes"),
            "the man page documents the exit codes"
        );
    }

    /// The `name(1)` pages a roff page refers to (roff escapes the hyphens: `serin\-rollout(1)`).
    fn referenced_pages(roff: &str) -> Vec<String> {
        let text = roff.replace("\\-", "-");
        let mut refs = Vec::new();
        for (at, _) in text.match_indices("(1)") {
            let name: String = text[..at]
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if name.starts_with("serin") {
                refs.push(name);
            }
        }
        refs
    }

    #[test]
    fn every_page_the_man_pages_refer_to_is_generated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = man_pages_to(dir.path()).expect("man pages");
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for page in [
            "serin.1",
            "serin-rollout.1",
            "serin-rollout-start.1",
            "serin-hosts.1",
        ] {
            assert!(
                names.iter().any(|n| n == page),
                "{page} missing from {names:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n.contains("help")),
            "clap's help subcommand has no page: {names:?}"
        );
        let mut checked = 0;
        for path in &written {
            let roff = std::fs::read_to_string(path).expect("a written page");
            for r in referenced_pages(&roff) {
                checked += 1;
                assert!(
                    dir.path().join(format!("{r}.1")).is_file(),
                    "{} refers to {r}(1), which is not generated",
                    path.display()
                );
            }
        }
        // serin(1) alone refers to every top-level subcommand.
        assert!(checked >= 10, "only {checked} references found");
        // `serin man` prints the same serin(1) as the one written.
        let mut printed = Vec::new();
        man_page(&mut printed).expect("man page");
        let written_serin = std::fs::read(dir.path().join("serin.1")).expect("serin.1");
        assert_eq!(printed, written_serin);
        assert!(
            referenced_pages(&String::from_utf8(printed).unwrap())
                .contains(&"serin-rollout".to_string())
        );
        let err = man_pages_to(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.exit(), Exit::Usage);
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn bad_names_are_usage_errors() {
        assert_eq!(
            check_names("Web!", "1.0").expect_err("bad").exit().code(),
            2
        );
        assert_eq!(
            check_names("web", "../x").expect_err("bad").exit().code(),
            2
        );
        assert!(check_names("web", "1.4.2").is_ok());
    }
}
