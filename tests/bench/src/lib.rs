//! `serin-bench`: a fleet simulator and the scale measurements of serin.
//!
//! Thousands of simulated agents per process ([`sim_agent`]), each a real gRPC `Attach` stream
//! speaking the real protocol, run against a real `serin serve` process ([`coordinator`]) started
//! by the bench. Fleets beyond one process's open-files limit are split over worker processes
//! ([`swarm`]). Each scenario ([`scenario`]) is one command and prints its figures as a table and
//! as JSON ([`report`]). Channels are made in one place ([`connect`]) so a TLS client identity
//! can be plugged in there.

pub mod connect;
pub mod control;
pub mod coordinator;
pub mod fanout;
pub mod report;
pub mod scenario;
pub mod sim_agent;
pub mod stats;
pub mod swarm;
