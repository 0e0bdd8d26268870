//! Events decoded from arbitrary bytes, folded into the model and the
//! projections as a start folds its log, then read back as the API reads.
//!
//! `import` checks only the frame of an export (its seqs, its times, its
//! hash chain, which anyone can recompute), so a log may hold any event
//! that decodes. Folding or reading such a log must answer or refuse,
//! never panic. The input is a sequence of `[u16 LE length][postcard bytes]`
//! records; each is numbered on from the last, as `import` requires, and
//! one whose time goes back is skipped, as `import` refuses it.

use commission_ledger::events::{Month, Timestamp};
use commission_ledger::ledger::ModelLines;
use commission_ledger::projections::{
    Projections, ReferralQuery, ReferralSort, ReferralStart, StatsBy,
};
use commission_ledger::rules::{Model, pending_estimate};

pub fn run(data: &[u8]) {
    let events = super::input::records(data, usize::MAX);
    let mut model = Model::default();
    let mut views = Projections::default();
    for recorded in &events {
        model.apply(recorded);
        views.apply(recorded, &ModelLines(&model));
    }
    let head = events.len() as u64;
    let now = events.last().map_or(Timestamp::MIN, |r| r.recorded_at);
    for (program, view) in &views.programs {
        let Some(pm) = model.program(program) else {
            continue;
        };
        let _ = pm.auto_close_due(now);
        for affiliate in view.affiliates.keys() {
            let pending = pending_estimate(pm, affiliate, now);
            let _ = view.balance(affiliate, pending, head);
            let month = now.month_in(view.rules.zone());
            for m in [
                month.previous(),
                month,
                Month::new(1970, 1).unwrap_or(month),
            ] {
                let _ = view.statement(affiliate, m, head, String::new());
            }
            let today = now.date_in(view.rules.zone());
            for by in [StatsBy::Day, StatsBy::Month, StatsBy::Creative] {
                let _ = view.stats(affiliate, today, today, by, head);
            }
            for sort in [
                ReferralSort::SignupDesc,
                ReferralSort::CommissionAsc,
                ReferralSort::BilledDesc,
            ] {
                let query = ReferralQuery {
                    status: None,
                    q: None,
                    sort,
                    limit: 10,
                    start: ReferralStart::First,
                };
                let _ = view.referrals(affiliate, &query, head);
            }
        }
    }
}
