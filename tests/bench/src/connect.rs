//! The one place where the simulator makes gRPC channels to the coordinator.
//!
//! Every simulated agent, the fan-out clients and the operator calls dial through a
//! [`Connector`], so transport security is decided here and nowhere else. Today the only
//! transport is plaintext HTTP/2 on loopback; a TLS client identity per host (the security
//! work's TLS config builders) plugs in as another [`Transport`] variant, chosen per host id in
//! [`Connector::endpoint`].

use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::{Channel, Endpoint};

/// How channels are secured.
#[derive(Debug, Clone, Default)]
pub enum Transport {
    /// Plain HTTP/2 (loopback benchmarks).
    #[default]
    Plaintext,
}

/// Makes channels to one coordinator, one per simulated host.
#[derive(Debug, Clone)]
pub struct Connector {
    url: String,
    transport: Transport,
}

impl Connector {
    /// A connector for the coordinator at `url` (`http://127.0.0.1:PORT`).
    pub fn new(url: impl Into<String>, transport: Transport) -> Self {
        Self {
            url: url.into(),
            transport,
        }
    }

    /// The URL dialled.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The endpoint `host` dials: its own connection, `TCP_NODELAY`, the agent's maximum frame
    /// size, bounded connect time, and otherwise tonic's defaults, as the real agent uses them.
    pub fn endpoint(&self, host: &str) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(self.url.clone())
            .with_context(|| format!("invalid coordinator URL {}", self.url))?
            .tcp_nodelay(true)
            // serin_agent::connection::MAX_FRAME_SIZE
            .max_frame_size(256 * 1024)
            .connect_timeout(Duration::from_secs(10));
        match &self.transport {
            Transport::Plaintext => {
                let _ = host;
                Ok(endpoint)
            }
        }
    }

    /// Connects a fresh channel for `host`.
    pub async fn channel(&self, host: &str) -> anyhow::Result<Channel> {
        self.endpoint(host)?
            .connect()
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", self.url))
    }
}
