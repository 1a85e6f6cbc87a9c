//! A drained server's open sessions, from HAProxy's runtime API (`show stat` on its stats
//! socket), for the wait until idle before a swap; and the server's request counter (`stot`),
//! which the agent sends with each health report for the rollout's request gate.
//!
//! Optional: configured with `[service.traffic] haproxy_socket` and `haproxy_server`. HAProxy's
//! `scur` counts the sessions it has open to the server; the status column says whether HAProxy
//! has already seen the drain (it polls the agent-check port, so a drain takes up to one
//! `agent-inter` to reach it, and until then `scur` may read 0 between two requests).
//!
//! The same `show stat` tells whether draining the server would leave its backend with no
//! serving server ([`HaproxyServer::others_serving`], [`serving_others`]): an activation refuses
//! such a drain before anything is swapped.

use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// One server of a backend on HAProxy's stats socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaproxyServer {
    /// The admin (or operator) stats socket.
    pub socket: PathBuf,
    /// The backend's name (`pxname`).
    pub backend: String,
    /// The server's name in that backend (`svname`).
    pub server: String,
}

/// What HAProxy says about the server right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSessions {
    /// HAProxy's status column: `UP`, `DRAIN`, `MAINT`, `DOWN`, ….
    pub status: String,
    /// Sessions open to the server (`scur`).
    pub scur: u64,
    /// Sessions HAProxy sent to the server since it started (`stot`): one per request in `mode
    /// http`, one per connection in `mode tcp`. Only grows, across the service's swaps.
    pub stot: u64,
}

impl ServerSessions {
    /// HAProxy no longer sends new sessions to the server (it saw the drain, or the server is
    /// down or in maintenance): a `scur` of 0 then means idle.
    pub fn out_of_rotation(&self) -> bool {
        !self.status.starts_with("UP")
    }
}

/// Why the session count could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SessionsError {
    /// The stats socket could not be used.
    #[error("haproxy stats socket {path}: {source}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `show stat` did not list the server, or not in the expected shape.
    #[error("haproxy `show stat` has no usable row for {backend}/{server}: {why}")]
    NoRow {
        /// The backend.
        backend: String,
        /// The server.
        server: String,
        /// What was missing.
        why: String,
    },
}

impl HaproxyServer {
    async fn show_stat(&self) -> Result<String, SessionsError> {
        let io = |source| SessionsError::Socket {
            path: self.socket.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.socket).await.map_err(io)?;
        s.write_all(b"show stat\n").await.map_err(io)?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.map_err(io)?;
        Ok(out)
    }

    fn no_row(&self, why: String) -> SessionsError {
        SessionsError::NoRow {
            backend: self.backend.clone(),
            server: self.server.clone(),
            why,
        }
    }

    /// The other servers of the backend that take new connections now (see
    /// [`serving_others`]); empty: draining this one would leave the backend with none.
    pub async fn others_serving(&self) -> Result<Vec<String>, SessionsError> {
        let out = self.show_stat().await?;
        serving_others(&out, &self.backend, &self.server).map_err(|why| self.no_row(why))
    }

    /// Reads the server's status and `scur` with one `show stat`.
    pub async fn sessions(&self) -> Result<ServerSessions, SessionsError> {
        let out = self.show_stat().await?;
        parse_show_stat(&out, &self.backend, &self.server).map_err(|why| self.no_row(why))
    }
}

/// Finds `backend`/`server` in `show stat` CSV output (columns located by the header line).
pub fn parse_show_stat(csv: &str, backend: &str, server: &str) -> Result<ServerSessions, String> {
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| "no `# pxname,…` header line".to_owned())?;
    let cols: Vec<&str> = header.split(',').collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| format!("no {name} column"))
    };
    let (px, sv, scur, status, stot) = (
        col("pxname")?,
        col("svname")?,
        col("scur")?,
        col("status")?,
        col("stot")?,
    );
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        if f.get(px) == Some(&backend) && f.get(sv) == Some(&server) {
            let scur = f
                .get(scur)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("scur {:?} is not a number", f.get(scur)))?;
            let stot = f
                .get(stot)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("stot {:?} is not a number", f.get(stot)))?;
            return Ok(ServerSessions {
                status: f.get(status).copied().unwrap_or_default().to_owned(),
                scur,
                stot,
            });
        }
    }
    Err("no such server row".to_owned())
}

/// The servers of `backend` other than `server` that take new connections in `show stat` CSV:
/// status `UP` (or going down, `UP 1/3`), or `no check` (a server HAProxy does not
/// health-check), with a weight above 0. The server itself must be listed
/// (a misnamed `haproxy_server` must not pass for "the others serve").
pub fn serving_others(csv: &str, backend: &str, server: &str) -> Result<Vec<String>, String> {
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| "no `# pxname,…` header line".to_owned())?;
    let cols: Vec<&str> = header.split(',').collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| format!("no {name} column"))
    };
    let (px, sv, status, weight) = (
        col("pxname")?,
        col("svname")?,
        col("status")?,
        col("weight")?,
    );
    let mut found = false;
    let mut serving = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        let name = f.get(sv).copied().unwrap_or_default();
        if f.get(px) != Some(&backend) || name == "BACKEND" || name == "FRONTEND" {
            continue;
        }
        if name == server {
            found = true;
            continue;
        }
        // A server without health checks shows "no check" and serves.
        let up = f
            .get(status)
            .is_some_and(|s| s.starts_with("UP") || *s == "no check");
        let weighted = f
            .get(weight)
            .and_then(|w| w.parse::<u32>().ok())
            .is_some_and(|w| w > 0);
        if up && weighted {
            serving.push(name.to_owned());
        }
    }
    if !found {
        return Err("no such server row".to_owned());
    }
    Ok(serving)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight\n\
        fe,FRONTEND,,,3,9,4000,120,0,0,0,0,0,,,,,OPEN,\n\
        be,h1,0,0,2,4,,60,0,0,,0,,0,0,0,0,DRAIN,100\n\
        be,h2,0,0,0,4,,60,0,0,,0,,0,0,0,0,UP,100\n\
        be,BACKEND,0,0,2,8,400,120,0,0,0,0,,0,0,0,0,UP,200\n";

    #[test]
    fn reads_status_and_sessions_of_the_named_server() {
        let h1 = parse_show_stat(STAT, "be", "h1").unwrap();
        assert_eq!(
            h1,
            ServerSessions {
                status: "DRAIN".into(),
                scur: 2,
                stot: 60
            }
        );
        assert!(h1.out_of_rotation());
        let h2 = parse_show_stat(STAT, "be", "h2").unwrap();
        assert!(
            !h2.out_of_rotation(),
            "an UP server with 0 sessions is not idle"
        );
        let e = parse_show_stat(STAT, "be", "h9").unwrap_err();
        assert_eq!(e, "no such server row");
        assert!(parse_show_stat("garbage", "be", "h1").is_err());
    }

    #[test]
    fn lists_the_other_serving_servers_of_the_backend() {
        assert_eq!(serving_others(STAT, "be", "h1").unwrap(), ["h2"]);
        // h2's only peer is draining: draining h2 would leave the backend with none.
        assert!(serving_others(STAT, "be", "h2").unwrap().is_empty());
        let weightless = STAT.replace(",UP,100\nbe,BACKEND", ",UP,0\nbe,BACKEND");
        assert!(serving_others(&weightless, "be", "h1").unwrap().is_empty());
        let unchecked = STAT.replace(",UP,100\nbe,BACKEND", ",no check,100\nbe,BACKEND");
        assert_eq!(serving_others(&unchecked, "be", "h1").unwrap(), ["h2"]);
        assert_eq!(
            serving_others(STAT, "be", "h9").unwrap_err(),
            "no such server row"
        );
    }
}
