//! Artifact fan-out: many agents fetching one artifact at once, against a plain loopback copy of
//! the same bytes to the same number of readers, measured in the same run.
//!
//! Both sides only count bytes (one extra download is hash-checked separately), so the figure
//! compares transports, not sha256 speed.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serin_proto::wire;
use serin_proto::wire::agent_service_client::AgentServiceClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::connect::Connector;

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
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let block = std::sync::Arc::new(vec![0x5au8; 256 * 1024]);
    let server = tokio::spawn(async move {
        let mut writers = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (mut s, _) = listener.accept().await?;
            let block = block.clone();
            writers.spawn(async move {
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
    let mut streams = Vec::new();
    for _ in 0..clients {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        streams.push(s);
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
