//! `serin ca init` and `serin ca issue coordinator|agent|operator`: the serin CA and the
//! certificates of every identity, made with no outside tools.
//!
//! Offline commands: they read and write files in the PKI directory (`--pki-dir`,
//! `SERIN_PKI_DIR`, default `/etc/serin/pki`) and never talk to a coordinator. Private keys are
//! written 0600 and nothing is ever overwritten (see [`serin_security::pki`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand, ValueEnum};
use serin_proto::HostId;
use serin_security::pki::{self, Ca, IdentityFiles, Subject, Validity};
use serin_security::{OperatorName, PeerIdentity, Role};
use sha2::Digest as _;

use super::args::OutputFormat;
use super::exit::{CliError, Exit};

/// Default PKI directory.
pub const DEFAULT_PKI_DIR: &str = "/etc/serin/pki";

/// `serin ca ...`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new CA: ca.crt and ca.key (0600) in the PKI directory; refuses to overwrite.
    Init {
        /// The PKI directory.
        #[command(flatten)]
        dir: PkiDir,
        /// The CA's common name.
        #[arg(long, default_value = "serin CA")]
        name: String,
        /// How long the CA certificate is valid, e.g. "10y".
        #[arg(long, value_parser = super::args::parse_duration, value_name = "DURATION")]
        valid_for: Option<Duration>,
    },
    /// Issue a certificate and a fresh key, signed by the CA.
    #[command(subcommand)]
    Issue(IssueCommand),
    /// Print the CA certificate's sha256 fingerprint (for `serin-agent enroll --ca-fingerprint`).
    Fingerprint {
        /// The PKI directory.
        #[command(flatten)]
        dir: PkiDir,
    },
}

/// The PKI directory flag shared by the `ca` commands.
#[derive(Debug, Args)]
pub struct PkiDir {
    /// Directory holding ca.crt and ca.key.
    #[arg(long = "pki-dir", env = "SERIN_PKI_DIR", default_value = DEFAULT_PKI_DIR, value_name = "DIR")]
    pub dir: PathBuf,
}

/// Options of every `ca issue` command.
#[derive(Debug, Args)]
pub struct IssueOptions {
    /// The PKI directory.
    #[command(flatten)]
    pub pki: PkiDir,
    /// Where to write <stem>.crt and <stem>.key (default: the PKI directory).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// How long the certificate is valid (defaults: coordinator 1y, agent 30d, operator 90d).
    #[arg(long, value_parser = super::args::parse_duration, value_name = "DURATION")]
    pub valid_for: Option<Duration>,
}

/// `serin ca issue ...`.
#[derive(Debug, Subcommand)]
pub enum IssueCommand {
    /// The coordinator's server certificate (coordinator.crt/.key), for the names and addresses
    /// agents and operators dial.
    Coordinator {
        /// A DNS name of the coordinator (repeatable).
        #[arg(long = "name", value_name = "DNS", required_unless_present = "ips")]
        names: Vec<String>,
        /// An IP address of the coordinator (repeatable).
        #[arg(long = "ip", value_name = "IP")]
        ips: Vec<IpAddr>,
        /// Shared options.
        #[command(flatten)]
        opts: IssueOptions,
    },
    /// An agent's client certificate (agent-<host-id>.crt/.key), bound to its host id.
    Agent {
        /// The host id the agent will claim; the coordinator accepts no other from it.
        #[arg(long, value_name = "ID")]
        host_id: String,
        /// Shared options.
        #[command(flatten)]
        opts: IssueOptions,
    },
    /// An operator's client certificate (operator-<name>.crt/.key) with a role.
    Operator {
        /// Who (shown in the audit log), e.g. alice or alice@example.com.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// What they may do.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Shared options.
        #[command(flatten)]
        opts: IssueOptions,
    },
}

/// `--role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Read only.
    Viewer,
    /// Start and steer rollouts, push releases.
    Deployer,
    /// Everything, including certificates, tokens and revocation.
    Admin,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Viewer => Role::Viewer,
            RoleArg::Deployer => Role::Deployer,
            RoleArg::Admin => Role::Admin,
        }
    }
}

/// Runs a `ca` command at time `now`.
pub fn run(output: OutputFormat, cmd: CaCommand, now: SystemTime) -> Result<Exit, CliError> {
    match cmd {
        CaCommand::Init {
            dir,
            name,
            valid_for,
        } => {
            create_private_dir(&dir.dir)?;
            let validity = Validity::starting(now, valid_for.unwrap_or(pki::DEFAULT_CA_VALIDITY));
            let files = Ca::init(&dir.dir, &name, validity).map_err(other)?;
            let fingerprint = fingerprint(&files.cert)?;
            report(output, "CA", &files, validity, Some(&fingerprint));
            Ok(Exit::Success)
        }
        CaCommand::Fingerprint { dir } => {
            let fp = fingerprint(&dir.dir.join(pki::CA_CERT_FILE))?;
            match output {
                OutputFormat::Json => println!("{}", serde_json::json!({ "fingerprint": fp })),
                _ => println!("{fp}"),
            }
            Ok(Exit::Success)
        }
        CaCommand::Issue(issue) => {
            let (subject, opts, default_validity) = match issue {
                IssueCommand::Coordinator { names, ips, opts } => (
                    Subject::Coordinator {
                        dns_names: names,
                        ips,
                    },
                    opts,
                    pki::DEFAULT_COORDINATOR_VALIDITY,
                ),
                IssueCommand::Agent { host_id, opts } => {
                    let host_id = HostId::new(host_id)
                        .map_err(|e| CliError::Usage(format!("--host-id: {e}")))?;
                    (
                        Subject::Client(PeerIdentity::Agent { host_id }),
                        opts,
                        pki::DEFAULT_AGENT_VALIDITY,
                    )
                }
                IssueCommand::Operator { name, role, opts } => {
                    let name = OperatorName::new(name)
                        .map_err(|e| CliError::Usage(format!("--name: {e}")))?;
                    (
                        Subject::Client(PeerIdentity::Operator {
                            name,
                            role: role.into(),
                        }),
                        opts,
                        pki::DEFAULT_OPERATOR_VALIDITY,
                    )
                }
            };
            let ca = Ca::load(&opts.pki.dir).map_err(other)?;
            let validity = Validity::starting(now, opts.valid_for.unwrap_or(default_validity));
            let issued = ca.issue(&subject, validity).map_err(|e| match e {
                pki::PkiError::BadDnsName(_) | pki::PkiError::NoCoordinatorName => {
                    CliError::Usage(e.to_string())
                }
                e => other(e),
            })?;
            let out = opts.out.unwrap_or(opts.pki.dir);
            let files = IdentityFiles::in_dir(&out, &subject.file_stem());
            pki::write_identity(&files, &issued).map_err(other)?;
            report(
                output,
                &subject.identity().to_string(),
                &files,
                validity,
                None,
            );
            Ok(Exit::Success)
        }
    }
}

/// Creates `dir` (0700) if it does not exist yet.
fn create_private_dir(dir: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CliError::Other(format!("cannot create {}: {e}", dir.display())))
}

/// `sha256:<hex>` of the DER of the first certificate in `path`: what an enrolling agent pins.
fn fingerprint(path: &Path) -> Result<String, CliError> {
    let pem = std::fs::read(path)
        .map_err(|e| CliError::Other(format!("cannot read {}: {e}", path.display())))?;
    let der = serin_security::tls::parse_certs(&pem)
        .map_err(|e| CliError::Other(format!("{}: {e}", path.display())))?;
    Ok(format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(&der[0]))
    ))
}

fn report(
    output: OutputFormat,
    what: &str,
    files: &IdentityFiles,
    validity: Validity,
    fingerprint: Option<&str>,
) {
    let not_after = humantime::format_rfc3339_seconds(validity.not_after).to_string();
    match output {
        OutputFormat::Json => {
            let mut v = serde_json::json!({
                "identity": what,
                "cert": files.cert.display().to_string(),
                "key": files.key.display().to_string(),
                "not_after": not_after,
            });
            if let Some(fp) = fingerprint {
                v["fingerprint"] = serde_json::Value::String(fp.to_string());
            }
            println!("{v:#}");
        }
        OutputFormat::Text => {
            println!("{what}: valid until {not_after}");
            println!("  certificate  {}", files.cert.display());
            println!(
                "  private key  {} (0600, keep it secret)",
                files.key.display()
            );
            if let Some(fp) = fingerprint {
                println!("  fingerprint  {fp}");
            }
        }
    }
}

fn other(e: impl std::fmt::Display) -> CliError {
    CliError::Other(e.to_string())
}
