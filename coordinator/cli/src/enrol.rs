//! Enrolment from the command line (admin): `serin token create [--host-id H] --expires 1h`
//! makes a one-time join token for `serin-agent enroll`; `serin hosts pending` lists the
//! enrolments held because a known host id presented a new key; `serin hosts approve HOST`
//! approves one. Tokens and approvals are written to the audit log by the coordinator.

use serin_proto::wire;
use serin_proto::wire::enrol_admin_service_client::EnrolAdminServiceClient;

use super::OutputFormat;
use super::args::TokenCommand;
use super::client::Control;
use super::commands::emit;
use super::exit::{CliError, Exit};

fn client(c: &Control) -> EnrolAdminServiceClient<tonic::transport::Channel> {
    EnrolAdminServiceClient::new(c.channel.clone())
}

/// A clearer error when the coordinator serves no enrolment at all.
fn enrol_err(c: &Control, what: &str, s: tonic::Status) -> CliError {
    if s.code() == tonic::Code::Unimplemented {
        return CliError::Other(format!(
            "{what}: the coordinator at {} has no enrolment configured (the [enrolment] section)",
            c.addr
        ));
    }
    c.err(what, s)
}

/// `serin token create`.
pub async fn token(
    c: &mut Control,
    output: OutputFormat,
    cmd: TokenCommand,
) -> Result<Exit, CliError> {
    let TokenCommand::Create { host_id, expires } = cmd;
    let resp = client(c)
        .create_token(wire::CreateTokenRequest {
            host_id: host_id.unwrap_or_default(),
            expires_in_secs: expires.as_secs().max(1),
        })
        .await
        .map_err(|s| enrol_err(c, "create a join token", s))?
        .into_inner();
    let expires_at = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(resp.expires_unix_ms),
    );
    emit(
        output,
        || {
            serde_json::json!({
                "token": resp.token,
                "host_id": resp.host_id,
                "expires_unix_ms": resp.expires_unix_ms,
            })
        },
        |_| {
            let host = if resp.host_id.is_empty() {
                "any host id".to_string()
            } else {
                format!("host {}", resp.host_id)
            };
            format!(
                "{}\n(one-time join token for {host}, valid until {expires_at}; shown once)",
                resp.token
            )
        },
    );
    Ok(Exit::Success)
}

/// `serin hosts pending`.
pub async fn pending(c: &mut Control, output: OutputFormat) -> Result<Exit, CliError> {
    let resp = client(c)
        .list_pending(wire::ListPendingRequest {})
        .await
        .map_err(|s| enrol_err(c, "list held enrolments", s))?
        .into_inner();
    emit(
        output,
        || {
            serde_json::Value::Array(
                resp.hosts
                    .iter()
                    .map(|h| {
                        serde_json::json!({
                            "host_id": h.host_id,
                            "key_sha256": h.key_sha256,
                            "known_key_sha256": h.known_key_sha256,
                            "requested_unix_ms": h.requested_unix_ms,
                            "approved": h.approved,
                        })
                    })
                    .collect(),
            )
        },
        |_| {
            if resp.hosts.is_empty() {
                return "no enrolment is held".to_string();
            }
            let mut out = String::from("HOST  NEW KEY (sha256)  KNOWN KEY (sha256)  STATE");
            for h in &resp.hosts {
                out.push_str(&format!(
                    "\n{}  {}  {}  {}",
                    h.host_id,
                    h.key_sha256,
                    h.known_key_sha256,
                    if h.approved { "approved" } else { "held" }
                ));
            }
            out
        },
    );
    Ok(Exit::Success)
}

/// `serin hosts approve HOST`.
pub async fn approve(
    c: &mut Control,
    output: OutputFormat,
    host: String,
) -> Result<Exit, CliError> {
    let resp = client(c)
        .approve_host(wire::ApproveHostRequest {
            host_id: host.clone(),
        })
        .await
        .map_err(|s| enrol_err(c, &format!("approve host {host}"), s))?
        .into_inner();
    emit(
        output,
        || serde_json::json!({ "host_id": resp.host_id, "key_sha256": resp.key_sha256 }),
        |_| {
            format!(
                "host {} approved with key sha256 {}: its agent collects its certificate",
                resp.host_id, resp.key_sha256
            )
        },
    );
    Ok(Exit::Success)
}
