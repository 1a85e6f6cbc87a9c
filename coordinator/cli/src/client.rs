//! The gRPC connection from the CLI to a coordinator's ControlService.

use std::time::Duration;

use serin_proto::wire::control_service_client::ControlServiceClient;
use tonic::transport::{Channel, Endpoint};

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
}

impl Control {
    /// Connects to the coordinator at `url` (e.g. `http://127.0.0.1:7700`).
    ///
    /// A malformed URL is a usage error; a refused or timed-out connection says which address
    /// could not be reached.
    pub async fn connect(url: &str) -> Result<Self, CliError> {
        let endpoint = endpoint(url)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| CliError::Unreachable {
                addr: url.to_string(),
                cause: error_chain(&e),
            })?;
        Ok(Control {
            client: ControlServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
            addr: url.to_string(),
        })
    }

    /// Wraps an RPC error with what was being done and the address.
    pub fn err(&self, what: &str, status: tonic::Status) -> CliError {
        CliError::rpc(what, &self.addr, status)
    }
}

/// Checks `url` and builds the endpoint: only `http://` for now (TLS comes later).
pub fn endpoint(url: &str) -> Result<Endpoint, CliError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(CliError::Usage(format!(
            "--coordinator {url:?} must be a URL such as http://127.0.0.1:7700"
        )));
    }
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| {
        CliError::Usage(format!(
            "--coordinator {url:?} is not a valid URL: {}",
            error_chain(&e)
        ))
    })?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_scheme_is_a_usage_error() {
        let e = endpoint("127.0.0.1:7700").expect_err("no scheme");
        assert_eq!(e.exit().code(), 2);
        assert!(e.to_string().contains("127.0.0.1:7700"));
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
