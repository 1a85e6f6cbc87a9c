//! HAProxy's runtime API (the admin stats socket), for the coordinator side of traffic control.
//!
//! Not wired into the rollout engine yet. It provides what the agent-check responders on the hosts
//! cannot: a view of the whole backend.
//! - [`RuntimeApi`]: one command per connection on the stats socket (`show stat`,
//!   `set server B/S weight N`, `set server B/S state drain|ready|maint`).
//! - [`check_drain`]: the refusal to drain the last serving server of a backend (draining every
//!   server of a backend turns every request into a 503). Pure: it reads a `show stat` snapshot.
//! - [`weights_for_share`]: the agent-check percentages that give a canary cohort a share of the
//!   backend's traffic independent of its host count (HAProxy percentages scale the configured
//!   weight, so the share depends on the other servers).

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Why a runtime API call or a traffic decision failed.
#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    /// The stats socket could not be used.
    #[error("haproxy runtime API at {socket}: {source}")]
    Io {
        /// The socket path.
        socket: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// HAProxy refused or did not understand a command.
    #[error("haproxy refused {command:?}: {answer}")]
    Refused {
        /// The command sent.
        command: String,
        /// HAProxy's answer.
        answer: String,
    },
    /// `show stat` output without its header line.
    #[error("unexpected `show stat` output (no \"# pxname,svname,…\" header): {0:?}")]
    BadStat(String),
    /// The server is not in the snapshot.
    #[error("no server {server} in backend {backend}")]
    UnknownServer {
        /// Backend name.
        backend: String,
        /// Server name.
        server: String,
    },
    /// Draining this server would leave its backend with no serving server.
    #[error(
        "refusing to drain {backend}/{server}: it is the last serving server of backend {backend} (others: {others})"
    )]
    LastServing {
        /// Backend name.
        backend: String,
        /// Server name.
        server: String,
        /// The other servers and their status, e.g. `s2 DRAIN, s3 MAINT`.
        others: String,
    },
    /// A share that cannot be given.
    #[error(
        "traffic share {share}% for {canary} canary and {baseline} baseline servers: {problem}"
    )]
    BadShare {
        /// The wanted share in percent.
        share: u32,
        /// Canary servers.
        canary: u32,
        /// Baseline servers.
        baseline: u32,
        /// What is wrong.
        problem: &'static str,
    },
}

/// One server line of `show stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    /// Backend (`pxname`).
    pub backend: String,
    /// Server (`svname`).
    pub server: String,
    /// `status`: `UP`, `DOWN`, `DRAIN`, `MAINT`, `NOLB`, or a transition such as `UP 1/3`.
    pub status: String,
    /// Effective weight (`weight`).
    pub weight: u32,
    /// Current sessions (`scur`).
    pub scur: u64,
    /// Sessions since start (`stot`).
    pub stot: u64,
}

impl ServerStat {
    /// Takes new connections: up (or going down but still up) with a weight above 0.
    pub fn serving(&self) -> bool {
        // A server HAProxy does not health-check shows "no check" and serves.
        (self.status.starts_with("UP") || self.status == "no check") && self.weight > 0
    }
}

/// Parses `show stat` CSV into server lines (frontend and backend summary lines are skipped).
pub fn parse_show_stat(text: &str) -> Result<Vec<ServerStat>, HaproxyError> {
    let mut lines = text.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| HaproxyError::BadStat(text.chars().take(200).collect()))?;
    let cols: Vec<&str> = header.split(',').collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| HaproxyError::BadStat(format!("no column {name} in {header:?}")))
    };
    let (px, sv, status, weight, scur, stot) = (
        col("pxname")?,
        col("svname")?,
        col("status")?,
        col("weight")?,
        col("scur")?,
        col("stot")?,
    );
    let mut out = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let get = |i: usize| f.get(i).copied().unwrap_or_default();
        if matches!(get(sv), "FRONTEND" | "BACKEND") {
            continue;
        }
        out.push(ServerStat {
            backend: get(px).to_owned(),
            server: get(sv).to_owned(),
            status: get(status).to_owned(),
            weight: get(weight).parse().unwrap_or(0),
            scur: get(scur).parse().unwrap_or(0),
            stot: get(stot).parse().unwrap_or(0),
        });
    }
    Ok(out)
}

/// Refuses a drain of `backend/server` that would leave `backend` with no serving server.
pub fn check_drain(stats: &[ServerStat], backend: &str, server: &str) -> Result<(), HaproxyError> {
    let in_backend: Vec<&ServerStat> = stats.iter().filter(|s| s.backend == backend).collect();
    if !in_backend.iter().any(|s| s.server == server) {
        return Err(HaproxyError::UnknownServer {
            backend: backend.to_owned(),
            server: server.to_owned(),
        });
    }
    let others: Vec<&&ServerStat> = in_backend.iter().filter(|s| s.server != server).collect();
    if others.iter().any(|s| s.serving()) {
        return Ok(());
    }
    Err(HaproxyError::LastServing {
        backend: backend.to_owned(),
        server: server.to_owned(),
        others: if others.is_empty() {
            "none".to_owned()
        } else {
            others
                .iter()
                .map(|s| format!("{} {} weight {}", s.server, s.status, s.weight))
                .collect::<Vec<_>>()
                .join(", ")
        },
    })
}

/// Agent-check percentages `(canary, baseline)` that give `canary` servers together `share`
/// percent of a backend's requests, the other `baseline` servers the rest, when every server has
/// the same configured weight. The larger of the two is 100 %, so no server is scaled up past its
/// configured weight; rounding is to the nearest percent (at least 1 %).
pub fn weights_for_share(
    share: u32,
    canary: u32,
    baseline: u32,
) -> Result<(u32, u32), HaproxyError> {
    let bad = |problem| HaproxyError::BadShare {
        share,
        canary,
        baseline,
        problem,
    };
    if share > 100 {
        return Err(bad("a share is at most 100%"));
    }
    if canary == 0 && share > 0 {
        return Err(bad("no canary server to give it to"));
    }
    if baseline == 0 && share < 100 {
        return Err(bad("no baseline server to give the rest to"));
    }
    match share {
        0 => return Ok((0, 100)),
        100 => return Ok((100, 0)),
        _ => {}
    }
    let (s, c, b) = (u64::from(share), u64::from(canary), u64::from(baseline));
    // share = c*pc / (c*pc + b*pb)  ⇔  pc/pb = share*b / ((100-share)*c)
    let round = |num: u64, den: u64| ((num * 2 + den) / (den * 2)).clamp(1, 100) as u32;
    if s * (b + c) <= 100 * c {
        Ok((round(s * b * 100, (100 - s) * c), 100))
    } else {
        Ok((100, round((100 - s) * c * 100, s * b)))
    }
}

/// A client of HAProxy's runtime API on its admin stats socket (`stats socket PATH level admin`).
#[derive(Debug, Clone)]
pub struct RuntimeApi {
    socket: PathBuf,
}

impl RuntimeApi {
    /// A client of the stats socket at `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        RuntimeApi {
            socket: socket.as_ref().to_owned(),
        }
    }

    /// Sends one command and returns HAProxy's whole answer.
    pub async fn command(&self, command: &str) -> Result<String, HaproxyError> {
        let io = |source| HaproxyError::Io {
            socket: self.socket.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&self.socket).await.map_err(io)?;
        stream
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(io)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.map_err(io)?;
        Ok(answer)
    }

    /// Sends a command whose success is an empty answer.
    async fn set(&self, command: String) -> Result<(), HaproxyError> {
        let answer = self.command(&command).await?;
        if answer.trim().is_empty() {
            Ok(())
        } else {
            Err(HaproxyError::Refused {
                command,
                answer: answer.trim().to_owned(),
            })
        }
    }

    /// Every server line of `show stat`.
    pub async fn show_stat(&self) -> Result<Vec<ServerStat>, HaproxyError> {
        parse_show_stat(&self.command("show stat").await?)
    }

    /// One server's line of `show stat`.
    pub async fn server(&self, backend: &str, server: &str) -> Result<ServerStat, HaproxyError> {
        self.show_stat()
            .await?
            .into_iter()
            .find(|s| s.backend == backend && s.server == server)
            .ok_or_else(|| HaproxyError::UnknownServer {
                backend: backend.to_owned(),
                server: server.to_owned(),
            })
    }

    /// `set server B/S weight N` (absolute, or `N%` of the configured weight).
    pub async fn set_weight(
        &self,
        backend: &str,
        server: &str,
        weight: &str,
    ) -> Result<(), HaproxyError> {
        self.set(format!("set server {backend}/{server} weight {weight}"))
            .await
    }

    /// `set server B/S state ready|drain|maint`.
    pub async fn set_state(
        &self,
        backend: &str,
        server: &str,
        state: &str,
    ) -> Result<(), HaproxyError> {
        self.set(format!("set server {backend}/{server} state {state}"))
            .await
    }

    /// Drains `backend/server` unless that leaves the backend with no serving server.
    pub async fn drain(&self, backend: &str, server: &str) -> Result<(), HaproxyError> {
        check_drain(&self.show_stat().await?, backend, server)?;
        self.set_state(backend, server, "drain").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight\n\
        fe,FRONTEND,,,0,1,2000,5,0,0,0,0,0,,,,,OPEN,\n\
        be,s1,0,0,2,2,,10,0,0,,0,,0,0,0,0,UP,33\n\
        be,s2,0,0,0,0,,10,0,0,,0,,0,0,0,0,DRAIN,0\n\
        be,s3,0,0,0,0,,10,0,0,,0,,0,0,0,0,MAINT,100\n\
        be,BACKEND,0,0,2,2,200,30,0,0,0,0,,0,0,0,0,UP,33\n";

    #[test]
    fn parses_server_lines_by_column_name() {
        let s = parse_show_stat(STAT).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0],
            ServerStat {
                backend: "be".into(),
                server: "s1".into(),
                status: "UP".into(),
                weight: 33,
                scur: 2,
                stot: 10
            }
        );
        assert!(s[0].serving() && !s[1].serving() && !s[2].serving());
        assert!(matches!(
            parse_show_stat("Unknown command"),
            Err(HaproxyError::BadStat(_))
        ));
    }

    #[test]
    fn refuses_to_drain_the_last_serving_server() {
        let s = parse_show_stat(STAT).unwrap();
        let e = check_drain(&s, "be", "s1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "refusing to drain be/s1: it is the last serving server of backend be (others: s2 DRAIN weight 0, s3 MAINT weight 100)"
        );
        // Draining another one while s1 serves is fine.
        check_drain(&s, "be", "s2").unwrap();
        assert!(matches!(
            check_drain(&s, "be", "s9"),
            Err(HaproxyError::UnknownServer { .. })
        ));
    }

    #[test]
    fn share_to_weights() {
        // 1 canary of 4 servers at 10 %: 33 / (33 + 300) = 9.9 %.
        assert_eq!(weights_for_share(10, 1, 3).unwrap(), (33, 100));
        // The natural share needs no scaling.
        assert_eq!(weights_for_share(25, 1, 3).unwrap(), (100, 100));
        // Above the natural share the baseline is scaled down.
        assert_eq!(weights_for_share(50, 1, 3).unwrap(), (100, 33));
        assert_eq!(weights_for_share(5, 2, 18).unwrap(), (47, 100));
        assert_eq!(weights_for_share(0, 1, 3).unwrap(), (0, 100));
        assert_eq!(weights_for_share(100, 1, 3).unwrap(), (100, 0));
        assert!(weights_for_share(101, 1, 3).is_err());
        assert!(weights_for_share(10, 0, 3).is_err());
        assert!(weights_for_share(10, 3, 0).is_err());
        assert_eq!(weights_for_share(1, 1, 1000).unwrap(), (100, 10));
        // Tiny percentages round up to 1 %, never to 0 (which would stop the canary).
        assert_eq!(weights_for_share(1, 100, 1).unwrap(), (1, 100));
    }
}
