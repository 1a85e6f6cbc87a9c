//! Identity extraction from certificates and `serin://` URIs on arbitrary bytes (the coordinator
//! runs it on every client certificate that chains to its CA).
//!
//! Properties: no panic; an identity that parses from a URI prints back to the same URI.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serin_security::PeerIdentity;

fuzz_target!(|data: &[u8]| {
    let _ = PeerIdentity::from_certificate(data);
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(id) = PeerIdentity::from_uri(text)
    {
        assert_eq!(id.uri(), text, "identity URI round trip");
    }
});
