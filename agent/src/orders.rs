//! Order admission: each sequence number is applied at most once per service.
//!
//! An order of an older coordinator epoch than one already accepted is a replay and rejected
//! (`REPLAYED_ORDER`), whatever its sequence. Within that,
//! a repeated sequence gets the results stored for it again, a lower one is rejected as stale,
//! and a newer one is applied even while a stage is in progress (the service task lets it
//! preempt the stage).

use serin_proto::wire::{self, OrderPhase, ResultCode};
use serin_proto::{Order, OrderAction};

use crate::state::ServiceState;

/// What to do with an incoming order.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// A new sequence: persist it as applied, then act.
    Apply,
    /// The sequence was applied before: re-send these results.
    Duplicate(Vec<wire::OrderResult>),
    /// The sequence is lower than one already applied.
    Stale {
        /// The last applied sequence.
        last_seq: u64,
    },
    /// The order comes from an older coordinator epoch than one already accepted: a replay.
    Replayed {
        /// The highest epoch accepted.
        last_epoch: u64,
    },
}

/// Decides what to do with `order` given the durable state. A stage in progress does not make
/// a newer order wait: the service task lets it preempt the stage.
pub fn admit(state: &ServiceState, order: &Order) -> Admission {
    if order.epoch < state.last_epoch {
        return Admission::Replayed {
            last_epoch: state.last_epoch,
        };
    }
    if order.seq == state.last_seq {
        return Admission::Duplicate(state.results_for(order.seq));
    }
    if order.seq < state.last_seq {
        return Admission::Stale {
            last_seq: state.last_seq,
        };
    }
    Admission::Apply
}

/// The release an order is about (empty when none).
pub fn order_release(order: &Order) -> String {
    match &order.action {
        OrderAction::Stage { release } | OrderAction::Activate { release, .. } => {
            release.id.to_string()
        }
        OrderAction::Rollback { to } => to.as_ref().map(ToString::to_string).unwrap_or_default(),
        OrderAction::Confirm { release, .. } => release.to_string(),
        OrderAction::Cancel => String::new(),
    }
}

/// Builds a result for `order`.
pub fn result(
    order: &Order,
    phase: OrderPhase,
    code: ResultCode,
    message: impl Into<String>,
    current: Option<&str>,
) -> wire::OrderResult {
    wire::OrderResult {
        order_id: order.order_id.clone(),
        rollout_id: order.rollout_id.clone(),
        seq: order.seq,
        service: order.service.to_string(),
        release: order_release(order),
        phase: phase as i32,
        code: code as i32,
        message: message.into(),
        current_release: current.unwrap_or_default().to_string(),
        bytes_done: 0,
        last_seq: 0,
        last_epoch: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serin_proto::{ReleaseId, ServiceName};

    fn order(seq: u64, action: OrderAction) -> Order {
        Order {
            order_id: format!("o{seq}"),
            rollout_id: "r".into(),
            seq,
            epoch: 0,
            service: ServiceName::new("web").unwrap(),
            action,
        }
    }

    #[test]
    fn an_order_of_an_older_epoch_is_a_replay_whatever_its_sequence() {
        let s = ServiceState {
            last_seq: 5,
            last_epoch: 3,
            ..Default::default()
        };
        let mut o = order(9, OrderAction::Cancel);
        o.epoch = 2;
        assert_eq!(admit(&s, &o), Admission::Replayed { last_epoch: 3 });
        o.epoch = 3;
        assert_eq!(admit(&s, &o), Admission::Apply);
        o.epoch = 4;
        o.seq = 4;
        assert_eq!(admit(&s, &o), Admission::Stale { last_seq: 5 });
    }

    #[test]
    fn sequences_apply_once() {
        let mut s = ServiceState {
            last_seq: 5,
            ..Default::default()
        };
        let confirm = OrderAction::Confirm {
            release: ReleaseId::new("web-2").unwrap(),
            traffic_weight: None,
        };
        let r = result(
            &order(5, confirm.clone()),
            OrderPhase::Confirmed,
            ResultCode::Ok,
            "ok",
            Some("web-2"),
        );
        s.record(&r);
        assert_eq!(
            admit(&s, &order(5, confirm.clone())),
            Admission::Duplicate(vec![r])
        );
        assert_eq!(
            admit(&s, &order(4, confirm.clone())),
            Admission::Stale { last_seq: 5 }
        );
        assert_eq!(admit(&s, &order(6, confirm.clone())), Admission::Apply);
        assert_eq!(
            admit(&s, &order(6, OrderAction::Rollback { to: None })),
            Admission::Apply
        );
        assert_eq!(admit(&s, &order(6, OrderAction::Cancel)), Admission::Apply);
    }
}
