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
    /// The client for URL releases, or why there is none (e.g. a host without a CA bundle):
    /// that fails URL releases with the reason, never the agent's start.
    http: Result<reqwest::Client, String>,
    /// `[download] allowed_url_prefixes`; `None`: any URL.
    allowed_url_prefixes: Option<std::sync::Arc<Vec<String>>>,
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
            .map_err(|e| {
                let why = format!(
                    "cannot build the HTTP client for URL releases (is a CA bundle installed?): {e}"
                );
                tracing::warn!("{why}; releases from the coordinator are not affected");
                why
            });
        Ok(Fetcher {
            coordinator: AgentServiceClient::new(channel).max_decoding_message_size(16 << 20),
            http,
            allowed_url_prefixes: None,
        })
    }

    /// Restricts URL releases to URLs under `prefixes` (`None`: any URL, with a warning).
    pub fn with_allowed_url_prefixes(mut self, prefixes: Option<Vec<String>>) -> Self {
        if prefixes.is_none() {
            tracing::warn!(
                "[download] allowed_url_prefixes is not set: URL releases are fetched from any url the coordinator names"
            );
        }
        self.allowed_url_prefixes = prefixes.map(std::sync::Arc::new);
        self
    }

    /// Whether `release` may be downloaded: a URL release only from an allowed prefix. Checked
    /// before any connection; the error names the URL (truncated) and no more.
    pub fn check_source(&self, release: &Release) -> Result<(), String> {
        let (ArtifactSource::Url(url), Some(allowed)) =
            (&release.source, &self.allowed_url_prefixes)
        else {
            return Ok(());
        };
        if allowed.iter().any(|p| url.starts_with(p.as_str())) {
            return Ok(());
        }
        Err(format!(
            "release {} comes from url {:?}, which is not under a prefix in [download] allowed_url_prefixes; nothing was fetched",
            release.id,
            serin_proto::truncated(url)
        ))
    }

    /// Whether downloads of `release` come from a URL (whose content must never be described
    /// back to the coordinator).
    pub fn is_foreign(release: &Release) -> bool {
        matches!(release.source, ArtifactSource::Url(_))
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
                self.check_source(release)?;
                let mut req = self.http.as_ref().map_err(Clone::clone)?.get(url);
                if offset > 0 {
                    req = req.header("Range", format!("bytes={offset}-"));
                }
                let response = req.send().await.map_err(|e| format!("GET {url}: {e}"))?;
                let status = response.status();
                let skip = if status.as_u16() == 206 {
                    let range = response
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if range_start(range) != Some(offset) {
                        return Err(format!(
                            "GET {url}: asked for bytes from {offset}, got Content-Range {range:?}"
                        ));
                    }
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

/// The first byte of a `Content-Range: bytes START-END/TOTAL` value.
fn range_start(value: &str) -> Option<u64> {
    let spec = value.trim().strip_prefix("bytes")?.trim_start();
    spec.split_once('-')?.0.trim().parse().ok()
}

impl Download {
    /// The next chunk of bytes, `None` at the end.
    pub async fn next(&mut self) -> Result<Option<prost::bytes::Bytes>, String> {
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
                        return Ok(Some(bytes.slice(start..)));
                    }
                    Ok(None) => return Ok(None),
                    Err(e) => return Err(format!("download broke: {e}")),
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    //! Downloads from a URL against a tiny HTTP/1.1 server on 127.0.0.1:0, through the release
    //! store, so each case is checked as the operator sees it: the result code and message.

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use serin_proto::wire::ResultCode;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::release_store::tests::{release_for, store};
    use crate::release_store::{FetchOpener, StageError, Staged};

    /// How the test server answers.
    #[derive(Clone, Default)]
    struct Behaviour {
        /// The body served.
        data: Vec<u8>,
        /// Status other than 200 for every request (with an empty body).
        status: Option<u16>,
        /// On the first request, close the connection after this many body bytes (while the
        /// Content-Length announces the whole body).
        cut_first: Option<usize>,
        /// Answer `Range: bytes=N-` with 206; otherwise always 200 with the whole body.
        honour_range: bool,
    }

    /// The server; `requests` holds the `Range` start of each request (`None`: no Range).
    struct Server {
        url: String,
        requests: Arc<Mutex<Vec<Option<u64>>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn serve(b: Behaviour) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/artifacts/web-1", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let range = head
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|r| r.trim().trim_end_matches('-').parse::<u64>().ok());
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(range);
                    seen.len() == 1
                };
                let total = b.data.len();
                let (status_line, extra, body) = match (b.status, range) {
                    (Some(code), _) => (format!("{code} Oops"), String::new(), Vec::new()),
                    (None, Some(from)) if b.honour_range => (
                        "206 Partial Content".to_string(),
                        format!("Content-Range: bytes {from}-{}/{total}\r\n", total - 1),
                        b.data[from as usize..].to_vec(),
                    ),
                    (None, _) => ("200 OK".to_string(), String::new(), b.data.clone()),
                };
                let head = format!(
                    "HTTP/1.1 {status_line}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                    body.len()
                );
                let body = match b.cut_first {
                    Some(cut) if first => &body[..cut.min(body.len())],
                    _ => &body[..],
                };
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body).await;
                let _ = conn.shutdown().await;
            }
        });
        Server {
            url,
            requests,
            task,
        }
    }

    fn fetcher() -> Fetcher {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        Fetcher::new(channel).unwrap()
    }

    async fn stage_from(
        server: &Server,
        expect: &[u8],
        dir: &std::path::Path,
    ) -> Result<Staged, StageError> {
        let mut release = release_for(expect, "web-1", expect.len() as u64);
        release.source = ArtifactSource::Url(server.url.clone());
        let fetcher = fetcher();
        let opener = FetchOpener {
            fetcher: &fetcher,
            release: &release,
        };
        store(dir)
            .stage(
                &release,
                &opener,
                &|_| {},
                &CancellationToken::new(),
                crate::release_store::tests::policy(Duration::from_millis(1)),
            )
            .await
    }

    fn artifact() -> Vec<u8> {
        (0..50_000u32).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn url_download_installs_the_verified_release() {
        let dir = tempfile::tempdir().unwrap();
        let data = artifact();
        let server = serve(Behaviour {
            data: data.clone(),
            ..Default::default()
        })
        .await;
        assert_eq!(
            stage_from(&server, &data, dir.path()).await.unwrap(),
            Staged::Installed
        );
        assert_eq!(*server.requests.lock().unwrap(), vec![None]);
        assert_eq!(
            std::fs::read(store(dir.path()).binary_path("web-1")).unwrap(),
            data
        );
    }

    #[tokio::test]
    async fn url_serving_other_bytes_is_a_hash_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let data = artifact();
        let mut evil = data.clone();
        evil[100] ^= 0xff;
        let server = serve(Behaviour {
            data: evil,
            ..Default::default()
        })
        .await;
        let e = stage_from(&server, &data, dir.path()).await.unwrap_err();
        assert_eq!(e.code(), ResultCode::HashMismatch, "{e}");
        assert!(store(dir.path()).list().is_empty());
    }

    #[tokio::test]
    async fn a_connection_closed_early_resumes_with_a_range_request() {
        let dir = tempfile::tempdir().unwrap();
        let data = artifact();
        let server = serve(Behaviour {
            data: data.clone(),
            cut_first: Some(20_000),
            honour_range: true,
            ..Default::default()
        })
        .await;
        assert_eq!(
            stage_from(&server, &data, dir.path()).await.unwrap(),
            Staged::Installed
        );
        assert_eq!(*server.requests.lock().unwrap(), vec![None, Some(20_000)]);
        assert_eq!(
            std::fs::read(store(dir.path()).binary_path("web-1")).unwrap(),
            data
        );
    }

    #[tokio::test]
    async fn a_server_ignoring_range_still_yields_the_right_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let data = artifact();
        let server = serve(Behaviour {
            data: data.clone(),
            cut_first: Some(20_000),
            honour_range: false,
            ..Default::default()
        })
        .await;
        assert_eq!(
            stage_from(&server, &data, dir.path()).await.unwrap(),
            Staged::Installed
        );
        assert_eq!(*server.requests.lock().unwrap(), vec![None, Some(20_000)]);
        assert_eq!(
            std::fs::read(store(dir.path()).binary_path("web-1")).unwrap(),
            data
        );
    }

    #[tokio::test]
    async fn not_found_is_a_download_failure_naming_url_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let data = artifact();
        let server = serve(Behaviour {
            status: Some(404),
            ..Default::default()
        })
        .await;
        let e = stage_from(&server, &data, dir.path()).await.unwrap_err();
        assert_eq!(e.code(), ResultCode::DownloadFailed, "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&server.url) && msg.contains("404"), "{msg}");
        assert!(store(dir.path()).list().is_empty());
    }

    #[test]
    fn content_range_start_is_parsed() {
        assert_eq!(range_start("bytes 20000-49999/50000"), Some(20_000));
        assert_eq!(range_start("bytes 0-9/*"), Some(0));
        assert_eq!(range_start("items 1-2/3"), None);
        assert_eq!(range_start(""), None);
    }
}
