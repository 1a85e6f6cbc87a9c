//! The security record from the command line: `serin audit [--since …]` (the audit log of every
//! mutating call) and `serin hosts revoke HOST` (admin: end the host's stream and refuse its
//! certificate from now on).

use serin_proto::wire;

use super::OutputFormat;
use super::args::{AuditArgs, HostsAction};
use super::client::Control;
use super::commands::emit;
use super::exit::{CliError, Exit};
use super::watch::now_ms;

/// `serin hosts revoke HOST`.
pub async fn hosts_action(
    c: &mut Control,
    output: OutputFormat,
    action: HostsAction,
) -> Result<Exit, CliError> {
    match action {
        HostsAction::Pending => super::enrol::pending(c, output).await,
        HostsAction::Approve { host } => super::enrol::approve(c, output, host).await,
        HostsAction::Revoke { host, reason } => {
            let resp = c
                .client
                .revoke_host(wire::RevokeHostRequest {
                    host_id: host.clone(),
                    reason,
                })
                .await
                .map_err(|s| c.err(&format!("revoke host {host}"), s))?
                .into_inner();
            emit(
                output,
                || {
                    serde_json::json!({
                        "host_id": resp.host_id,
                        "disconnected": resp.disconnected,
                        "already_revoked": resp.already_revoked,
                    })
                },
                |_| {
                    let mut line = if resp.already_revoked {
                        format!("host {} was already revoked", resp.host_id)
                    } else {
                        format!(
                            "host {} revoked: its certificate is refused from now on",
                            resp.host_id
                        )
                    };
                    if resp.disconnected {
                        line.push_str("; its stream was closed");
                    }
                    line
                },
            );
            Ok(Exit::Success)
        }
    }
}

/// The `--since` value as unix ms: a duration ago, or an RFC 3339 time.
fn since_ms(since: Option<&str>, now_ms: u64) -> Result<u64, CliError> {
    let Some(s) = since else { return Ok(0) };
    if let Ok(d) = humantime::parse_duration(s.trim()) {
        return Ok(now_ms.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s.trim()) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
    }
    Err(CliError::Usage(format!(
        "--since {s:?} is neither a duration (e.g. \"1h\") nor a time (e.g. \"2026-11-27T15:00:00Z\")"
    )))
}

/// `serin audit`.
pub async fn audit(
    c: &mut Control,
    output: OutputFormat,
    args: AuditArgs,
) -> Result<Exit, CliError> {
    let since_unix_ms = since_ms(args.since.as_deref(), now_ms())?;
    let entries = c
        .client
        .list_audit(wire::ListAuditRequest { since_unix_ms })
        .await
        .map_err(|s| c.err("read the audit log", s))?
        .into_inner()
        .entries;
    emit(
        output,
        || {
            serde_json::json!({
                "entries": entries.iter().map(|e| serde_json::json!({
                    "seq": e.seq,
                    "at_unix_ms": e.at_unix_ms,
                    "who": e.who,
                    "what": e.what,
                    "arguments": e.arguments,
                    "result": e.result,
                })).collect::<Vec<_>>()
            })
        },
        |_| {
            if entries.is_empty() {
                return "no audit entries".to_string();
            }
            entries
                .iter()
                .map(|e| {
                    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at_unix_ms);
                    format!(
                        "{}  {}  {}  {}  -> {}",
                        humantime::format_rfc3339_seconds(at),
                        e.who,
                        e.what,
                        e.arguments,
                        e.result
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        },
    );
    Ok(Exit::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_ago_or_a_time() {
        assert_eq!(since_ms(None, 10_000).unwrap(), 0);
        assert_eq!(since_ms(Some("2s"), 10_000).unwrap(), 8_000);
        assert_eq!(
            since_ms(Some("1970-01-01T00:00:05Z"), 10_000).unwrap(),
            5_000
        );
        let e = since_ms(Some("yesterday-ish"), 10_000).unwrap_err();
        assert_eq!(e.exit().code(), 2);
    }
}
