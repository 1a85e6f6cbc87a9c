//! The gRPC connection from the CLI to a coordinator's ControlService.
//!
//! The transport follows the URL and the operator's credentials ([`super::credentials`]):
//! `https://` needs an operator certificate (flags, environment or the per-user file) and dials
//! mutual TLS with the serin CA pinned; `http://` is plaintext for development, with a warning on
//! every command, and is refused when credentials are configured (no silent downgrade). A
//! coordinator that refuses the certificate is reported as such, with the reason.

use std::time::Duration;

use serin_proto::wire::control_service_client::ControlServiceClient;
use serin_security::transport::{self, ClientTransport};
use tonic::transport::{Channel, Endpoint};

use super::credentials::{self, TlsFlags};
use super::exit::{CliError, error_chain};

/// How long the CLI tries to open the connection before it reports the coordinator unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected ControlService client that remembers the address it dialled, for error messages.
#[derive(Debug, Clone)]
pub struct Control {
    /// The generated client.
    pub client: ControlServiceClient<Channel>,
    /// The coordinator URL, as given.
    pub addr: String,
    /// The channel, for the other services on the same port (enrolment admin).
    pub channel: Channel,
}

impl Control {
    /// Connects to the coordinator at `url` with the credentials of the environment and the
    /// per-user config file (no flags).
    pub async fn connect(url: &str) -> Result<Self, CliError> {
        Self::connect_with(url, &TlsFlags::default()).await
    }

    /// Connects to the coordinator at `url` (e.g. `https://serin.example.com:7700`), finding the
    /// operator certificate from `flags`, then the environment, then the per-user config file.
    ///
    /// A malformed URL or an unusable credential is a usage error; a refused or timed-out
    /// connection says which address could not be reached, and why when TLS says so.
    pub async fn connect_with(url: &str, flags: &TlsFlags) -> Result<Self, CliError> {
        let transport = transport_for(url, flags)?;
        let (endpoint, connector) = endpoint(url, &transport)?;
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| {
                let cause = error_chain(&e);
                CliError::Unreachable {
                    addr: url.to_string(),
                    cause: match transport::explain_failure(&cause) {
                        Some(hint) => format!("{hint}: {cause}"),
                        None => cause,
                    },
                }
            })?;
        Ok(Control {
            client: ControlServiceClient::new(channel.clone())
                .max_decoding_message_size(64 * 1024 * 1024),
            addr: url.to_string(),
            channel,
        })
    }

    /// Wraps an RPC error with what was being done and the address. A TLS refusal (the
    /// coordinator's alert arrives with the first call under TLS 1.3) says so plainly.
    pub fn err(&self, what: &str, status: tonic::Status) -> CliError {
        let text = format!("{}: {}", status.message(), error_chain(&status));
        if let Some(hint) = transport::explain_failure(&text) {
            return CliError::Other(format!(
                "the coordinator refused this certificate: {hint} ({what} at {}: {})",
                self.addr,
                status.message()
            ));
        }
        CliError::rpc(what, &self.addr, status)
    }
}

/// The transport for `url`: TLS from the operator's credentials for `https://`; plaintext (with
/// a warning) for `http://` when no credentials are configured.
fn transport_for(url: &str, flags: &TlsFlags) -> Result<ClientTransport, CliError> {
    let env = |k: &str| std::env::var(k).ok();
    let file = credentials::load_user_config(&env).map_err(|e| CliError::Usage(e.to_string()))?;
    let resolved = credentials::resolve(flags, &env, file.as_ref())
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let plaintext = url.starts_with("http://");
    if plaintext && resolved.is_none() {
        eprintln!(
            "warning: talking to {url} in plaintext (no TLS, no identity): development only; \
             use https:// with an operator certificate"
        );
    }
    if url.starts_with("https://") && resolved.is_none() {
        return Err(CliError::Usage(format!(
            "no operator certificate for {url}: pass --ca, --cert and --key, set {}, {} and {}, \
             or write them in ~/.config/serin/config.toml ([tls])",
            credentials::ENV_CA,
            credentials::ENV_CERT,
            credentials::ENV_KEY
        )));
    }
    credentials::client_transport(resolved.as_ref(), plaintext).map_err(CliError::Usage)
}

/// Checks `url` against `transport` and builds the endpoint and its connector.
pub fn endpoint(
    url: &str,
    transport: &ClientTransport,
) -> Result<(Endpoint, transport::Connector), CliError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(CliError::Usage(format!(
            "--coordinator {url:?} must be a URL such as https://127.0.0.1:7700"
        )));
    }
    let (endpoint, connector) = transport::endpoint(url, transport)
        .map_err(|e| CliError::Usage(format!("--coordinator {url:?}: {}", error_chain(&e))))?;
    Ok((
        endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true),
        connector,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_scheme_is_a_usage_error() {
        let e = endpoint("127.0.0.1:7700", &ClientTransport::Plaintext).expect_err("no scheme");
        assert_eq!(e.exit().code(), 2);
        assert!(e.to_string().contains("127.0.0.1:7700"));
    }

    #[test]
    fn https_without_tls_is_refused_not_downgraded() {
        let e = endpoint("https://127.0.0.1:7700", &ClientTransport::Plaintext)
            .expect_err("https without TLS");
        assert!(e.to_string().contains("refusing to talk cleartext"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_names_the_address() {
        // A port that was just free: bind, learn it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind")
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let e = Control::connect(&url).await.expect_err("nobody listens");
        assert_eq!(e.exit().code(), 1);
        assert!(
            e.to_string()
                .contains(&format!("cannot reach the coordinator at {url}")),
            "{e}"
        );
    }
}
