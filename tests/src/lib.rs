//! serin's test harness: real agent processes, a scripted coordinator, and the demo service.
//!
//! The integration tests in `tests/` drive real `serin-agent` processes (built fresh by
//! [`binaries`]) against a [`fake_coordinator::FakeCoordinator`] and check what users care about:
//! what is on disk, what is serving, and what was reported.
//!
//! - [`binaries`]: builds the workspace once per test process and finds its binaries.
//! - [`wait`]: `wait_for` polling with a context dump instead of sleeps.
//! - [`demo_release`]: releases of the demo service, behaviour carried in a trailer.
//! - [`fake_coordinator`]: a tonic `AgentService` that records and sends by hand.
//! - [`orders`]: builders for stage, activate, rollback, confirm and cancel orders.
//! - [`agent_proc`]: a `serin-agent` process with its config, state directory and log.
//! - [`agent_fixture`]: one agent attached to one fake coordinator, with the shared test steps.
//! - [`http`]: a blocking HTTP client for the demo service and an artifact server for URL releases.
//! - [`fault_report`]: the outcome table and verdict every fault suite ends with.
//! - [`fleet`]: a real coordinator (`serin serve`) and N agents for end-to-end rollout tests.
//! - [`haproxy`]: Debian's HAProxy on loopback with a test config and its runtime API.
//! - [`load`]: a bounded HTTP load generator counting failures by kind.
//! - [`proxy`]: a TCP link between an agent and the coordinator that a test can cut and heal.
//! - [`tls`]: the throwaway PKI every coordinator, agent and CLI of the harness uses (mutual TLS).

pub mod agent_fixture;
pub mod agent_proc;
pub mod binaries;
pub mod demo_release;
pub mod fake_coordinator;
pub mod fault_report;
pub mod fleet;
pub mod haproxy;
pub mod http;
pub mod load;
pub mod orders;
pub mod proxy;
pub mod tls;
pub mod wait;
