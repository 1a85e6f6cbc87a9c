//! Artifact fan-out: many agents fetching one artifact at once, against a plain loopback copy of
//! the same bytes to the same number of readers, measured in the same run.
//!
//! Both sides only count bytes (one extra download is hash-checked separately), so the figure
//! compares transports, not sha256 speed. Under mutual TLS the same copy is also made over TLS
//! with the coordinator's own TLS settings ([`tls_loopback_copy`]): what encryption alone costs,
//! the ceiling of any fetch over mutual TLS on this machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use rustls::pki_types::ServerName;
use serin_proto::wire;
use serin_proto::wire::agent_service_client::AgentServiceClient;
use serin_security::tls::{NoRevocation, TlsMaterial, server_config};
use serin_security::transport::ClientTransport;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::connect::{BenchPki, Connector};

/// `clients` concurrent `FetchArtifact` calls of `sha256` (each on its own connection, dialled
/// before the clock starts); returns the bytes received in all and the wall time.
pub async fn fetch_all(
    connector: &Connector,
    sha256: &str,
    size: u64,
    clients: u32,
) -> anyhow::Result<(u64, Duration)> {
    let mut channels = Vec::new();
    for i in 0..clients {
        channels.push(connector.channel(&format!("fetch-{i}")).await?);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(clients as usize + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for ch in channels {
        let sha = sha256.to_string();
        let barrier = barrier.clone();
        tasks.spawn(async move {
            barrier.wait().await;
            let mut client =
                AgentServiceClient::new(ch).max_decoding_message_size(16 * 1024 * 1024);
            let mut chunks = client
                .fetch_artifact(wire::FetchArtifactRequest {
                    sha256: sha,
                    offset: 0,
                })
                .await?
                .into_inner();
            let mut got = 0u64;
            while let Some(c) = chunks.next().await {
                got += c?.data.len() as u64;
            }
            anyhow::Ok(got)
        });
    }
    barrier.wait().await;
    let t = Instant::now();
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        let got = r??;
        anyhow::ensure!(got == size, "a fetch got {got} bytes of {size}");
        total += got;
    }
    Ok((total, t.elapsed()))
}

/// The baseline: a loopback TCP server writes `size` bytes (from memory, 256 KiB writes) to
/// each of `clients` concurrent readers; returns the bytes read in all and the wall time.
pub async fn loopback_copy(size: u64, clients: u32) -> anyhow::Result<(u64, Duration)> {
    copy(size, clients, None).await
}

/// [`loopback_copy`] over mutual TLS: the coordinator's own server configuration (rustls with
/// ring, TLS 1.3, a client certificate required) with the certificate the run's coordinator
/// serves, and an agent's client configuration, issued by the run's CA. What encrypting and decrypting every byte costs on this machine, with no
/// HTTP/2, gRPC or file read on the way: the ceiling of any fetch over mutual TLS.
pub async fn tls_loopback_copy(
    pki: &BenchPki,
    size: u64,
    clients: u32,
) -> anyhow::Result<(u64, Duration)> {
    let material = TlsMaterial::load(&pki.issued_coordinator_files())?;
    let server = server_config(&material, Arc::new(NoRevocation))?;
    let ClientTransport::Tls { config, .. } = pki.client("fetch-tls")? else {
        anyhow::bail!("the bench PKI issued a plaintext transport");
    };
    copy(
        size,
        clients,
        Some((TlsAcceptor::from(server), TlsConnector::from(config))),
    )
    .await
}

/// A byte stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The copy of [`loopback_copy`], over TLS when `tls` is given; every connection (and TLS
/// handshake) is made before the clock starts.
async fn copy(
    size: u64,
    clients: u32,
    tls: Option<(TlsAcceptor, TlsConnector)>,
) -> anyhow::Result<(u64, Duration)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let block = Arc::new(vec![0x5au8; 256 * 1024]);
    let acceptor = tls.as_ref().map(|(a, _)| a.clone());
    let server = tokio::spawn(async move {
        let mut writers = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (s, _) = listener.accept().await?;
            s.set_nodelay(true)?;
            let block = block.clone();
            let acceptor = acceptor.clone();
            writers.spawn(async move {
                let mut s: Box<dyn Io> = match acceptor {
                    Some(a) => Box::new(a.accept(s).await?),
                    None => Box::new(s),
                };
                let mut left = size;
                while left > 0 {
                    let n = usize::try_from(left.min(block.len() as u64)).unwrap_or(block.len());
                    s.write_all(&block[..n]).await?;
                    left -= n as u64;
                }
                s.shutdown().await?;
                anyhow::Ok(())
            });
        }
        while let Some(r) = writers.join_next().await {
            r??;
        }
        anyhow::Ok(())
    });
    let mut streams: Vec<Box<dyn Io>> = Vec::new();
    for _ in 0..clients {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        streams.push(match &tls {
            Some((_, connector)) => {
                let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
                Box::new(connector.connect(name, s).await?)
            }
            None => Box::new(s),
        });
    }
    let t = Instant::now();
    let mut readers = tokio::task::JoinSet::new();
    for mut s in streams {
        readers.spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return anyhow::Ok(got);
                }
                got += n as u64;
            }
        });
    }
    let mut total = 0;
    while let Some(r) = readers.join_next().await {
        total += r??;
    }
    let elapsed = t.elapsed();
    server.await??;
    anyhow::ensure!(
        total == size * u64::from(clients),
        "the loopback copy moved {total} bytes"
    );
    Ok((total, elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both baselines move every byte to every reader, the TLS one through a real mutual-TLS
    /// handshake with the run's certificates.
    #[tokio::test]
    async fn the_plain_and_the_tls_loopback_copies_move_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let pki = BenchPki::create(&dir.path().join("pki")).unwrap();
        pki.coordinator_files().unwrap();
        let size = 3 * 256 * 1024 + 17;
        let (plain, _) = loopback_copy(size, 3).await.unwrap();
        assert_eq!(plain, 3 * size);
        let (tls, _) = tls_loopback_copy(&pki, size, 3).await.unwrap();
        assert_eq!(tls, 3 * size);
    }
}
