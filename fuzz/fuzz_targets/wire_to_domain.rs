//! The wire → domain conversions of serin-proto (`Order`, `Release`, `HoldConfirm`) on arbitrary
//! protobuf bytes.
//!
//! Properties: no panic; a value that converts is within the documented bounds and survives
//! domain → wire → domain unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use serin_proto::{HoldConfirm, MAX_ARTIFACT_SIZE, MAX_ORDER_SEQ, Order, Release, wire};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let Ok(w) = wire::Order::decode(bytes) else {
                return;
            };
            if let Ok(order) = Order::try_from(w) {
                assert!(
                    order.seq <= MAX_ORDER_SEQ,
                    "sequence {} accepted",
                    order.seq
                );
                assert!(order.epoch <= MAX_ORDER_SEQ, "epoch {} accepted", order.epoch);
                let back = Order::try_from(wire::Order::from(order.clone()));
                assert_eq!(back.as_ref(), Ok(&order), "order round trip");
            }
        }
        1 => {
            let Ok(w) = wire::Release::decode(bytes) else {
                return;
            };
            if let Ok(release) = Release::try_from(w) {
                assert!(release.size > 0 && release.size <= MAX_ARTIFACT_SIZE);
                let back = Release::try_from(wire::Release::from(release.clone()));
                assert_eq!(back.as_ref(), Ok(&release), "release round trip");
            }
        }
        _ => {
            let Ok(w) = wire::HoldConfirm::decode(bytes) else {
                return;
            };
            if let Ok(hold) = HoldConfirm::try_from(w) {
                let back = HoldConfirm::try_from(wire::HoldConfirm::from(hold.clone()));
                assert_eq!(back.as_ref(), Ok(&hold), "hold round trip");
            }
        }
    }
});
