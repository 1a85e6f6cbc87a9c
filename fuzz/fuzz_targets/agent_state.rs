//! The agent's state/journal parser (`serin_agent::state::parse`, what `state.json` goes through
//! at every start) on arbitrary bytes.
//!
//! Properties: no panic; a parsed state carries no sequence beyond the wire's limit (a poisoned
//! one is repaired), and it survives serialise → parse unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serin_agent::state::parse;
use serin_proto::MAX_ORDER_SEQ;

fuzz_target!(|data: &[u8]| {
    let Ok((state, _)) = parse(data) else {
        return;
    };
    assert!(state.last_seq <= MAX_ORDER_SEQ, "last_seq {} kept", state.last_seq);
    let bytes = serde_json::to_vec(&state).expect("a parsed state serialises");
    let (again, repair) = parse(&bytes).expect("a serialised state parses");
    assert!(repair.is_none(), "a repaired state needed repairing again");
    assert_eq!(again, state, "state round trip");
});
