//! Every parser of text that reaches the ledger from a request (path,
//! query, header or body field), given arbitrary text: each must accept
//! or refuse, never panic, and what it accepts must write back to text
//! that parses to the same value.

use commission_ledger::events::{
    AffiliateId, Bytes, CustomerId, LineId, Month, ProgramId, Role, Text, Timestamp, check_site_url,
};
use commission_ledger::money::{Currency, Rate};
use commission_ledger::projections::{ReferralCursor, ReferralSort, visitor_hash};
use commission_ledger::rules::origin_and_path;

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(month) = Month::parse(text) {
        assert_eq!(Month::parse(&month.to_string()).ok(), Some(month));
        let _ = (month.next(), month.previous(), month.first_day());
        let _ = month.start_in(chrono_tz::Pacific::Kiritimati);
    }
    if let Ok(at) = Timestamp::parse(text) {
        assert_eq!(Timestamp::parse(&at.to_rfc3339()).ok(), Some(at));
        let _ = at.month_in(chrono_tz::America::Santiago);
        let _ = at.plus_days(3650);
    }
    if let Ok(id) = ProgramId::parse(text) {
        assert_eq!(id.as_str(), text);
    }
    let _ = (
        AffiliateId::parse(text),
        CustomerId::parse(text),
        LineId::parse(text),
    );
    if let Some(bytes) = Bytes::<16>::from_hex(text) {
        assert_eq!(bytes.hex(), text.to_ascii_lowercase());
    }
    let _ = Bytes::<32>::from_hex(text);
    let _ = Role::parse(text);
    let _ = check_site_url(text);
    let _ = ReferralSort::parse(text);
    if let Some(cursor) = ReferralCursor::parse(text) {
        let _ = cursor.sort();
    }
    for code in ["USD", "JPY", "BHD"] {
        let currency = Currency::parse(code).expect("a known code");
        if let Ok(amount) = currency.parse_amount(text) {
            let written = currency.format(amount);
            assert_eq!(
                currency.parse_amount(&written).ok(),
                Some(amount),
                "{written}"
            );
            let _ = currency.round_half_even(amount);
        }
    }
    let _ = Currency::parse(text);
    if let Ok(rate) = Rate::parse(text) {
        assert_eq!(Rate::parse(&rate.to_string()).ok(), Some(rate));
        let usd = Currency::parse("USD").expect("a known code");
        let _ = usd.percent_of(commission_ledger::events::MAX_EVENT_AMOUNT, rate);
    }
    let kept = origin_and_path(&Text::from(text));
    assert!(text.starts_with(kept.as_str().split("://").next().unwrap_or("")));
    let _ = visitor_hash(text);
}
