//! serin's wire protocol and its validated domain types.
//!
//! The generated protobuf types live in [`wire`] and go no further than the edge of a program:
//! whatever arrives is converted with `TryFrom` into the types of [`domain`], which can only hold
//! valid values (a service name that is safe as a directory name, a 64-digit sha256, ...). A failed
//! conversion is a [`domain::ValidationError`] that names the field and the problem.

pub mod chaos;
pub mod codec;
pub mod domain;
pub mod grammar;

/// Generated code for the `serin.v1` protobuf package.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod wire {
    tonic::include_proto!("serin.v1");
}

pub use domain::*;
