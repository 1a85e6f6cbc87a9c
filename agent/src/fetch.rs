//! Artifact downloads: from the coordinator's content-addressed store (`FetchArtifact`, in
//! chunks, resumable from an offset) or from an http(s) URL (resumable with a Range request).

use serin_proto::wire::agent_service_client::AgentServiceClient;
use serin_proto::wire::{self, ArtifactChunk};
use serin_proto::{ArtifactSource, Release};
use tonic::transport::Channel;

/// Opens artifact downloads.
#[derive(Debug, Clone)]
pub struct Fetcher {
    coordinator: AgentServiceClient<Channel>,
    http: reqwest::Client,
}

/// A download in progress.
pub enum Download {
    /// From the coordinator.
    Coordinator {
        /// The chunk stream.
        stream: tonic::Streaming<ArtifactChunk>,
        /// Offset of the next byte expected.
        offset: u64,
    },
    /// From an http(s) URL.
    Http {
        /// The response body.
        response: reqwest::Response,
        /// Bytes still to skip because the server ignored the Range header.
        skip: u64,
    },
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Download::Coordinator { offset, .. } => write!(f, "Download::Coordinator({offset})"),
            Download::Http { skip, .. } => write!(f, "Download::Http(skip {skip})"),
        }
    }
}

/// Installs ring as the process's rustls crypto provider (once; later calls do nothing).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Fetcher {
    /// A fetcher using `channel` for the coordinator.
    pub fn new(channel: Channel) -> Result<Self, String> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Fetcher {
            coordinator: AgentServiceClient::new(channel).max_decoding_message_size(16 << 20),
            http,
        })
    }

    /// Starts downloading `release` from byte `offset`.
    pub async fn open(&self, release: &Release, offset: u64) -> Result<Download, String> {
        match &release.source {
            ArtifactSource::Coordinator => {
                let mut client = self.coordinator.clone();
                let stream = client
                    .fetch_artifact(wire::FetchArtifactRequest {
                        sha256: release.sha256.to_hex(),
                        offset,
                    })
                    .await
                    .map_err(|s| {
                        format!(
                            "coordinator refused artifact {}: {} {}",
                            release.sha256,
                            s.code(),
                            s.message()
                        )
                    })?
                    .into_inner();
                Ok(Download::Coordinator { stream, offset })
            }
            ArtifactSource::Url(url) => {
                let mut req = self.http.get(url);
                if offset > 0 {
                    req = req.header("Range", format!("bytes={offset}-"));
                }
                let response = req.send().await.map_err(|e| format!("GET {url}: {e}"))?;
                let status = response.status();
                let skip = if status.as_u16() == 206 {
                    0
                } else if status.is_success() {
                    offset
                } else {
                    return Err(format!("GET {url}: HTTP {status}"));
                };
                Ok(Download::Http { response, skip })
            }
        }
    }
}

impl Download {
    /// The next chunk of bytes, `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, String> {
        match self {
            Download::Coordinator { stream, offset } => match stream.message().await {
                Ok(Some(chunk)) => {
                    if chunk.offset != *offset {
                        return Err(format!(
                            "coordinator sent a chunk at offset {}, expected {offset}",
                            chunk.offset
                        ));
                    }
                    *offset += chunk.data.len() as u64;
                    Ok(Some(chunk.data))
                }
                Ok(None) => Ok(None),
                Err(s) => Err(format!(
                    "artifact stream broke: {} {}",
                    s.code(),
                    s.message()
                )),
            },
            Download::Http { response, skip } => loop {
                match response.chunk().await {
                    Ok(Some(bytes)) => {
                        let len = bytes.len() as u64;
                        if *skip >= len {
                            *skip -= len;
                            continue;
                        }
                        let start = *skip as usize;
                        *skip = 0;
                        return Ok(Some(bytes[start..].to_vec()));
                    }
                    Ok(None) => return Ok(None),
                    Err(e) => return Err(format!("download broke: {e}")),
                }
            },
        }
    }
}
