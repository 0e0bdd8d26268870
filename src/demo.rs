//! `serve --demo`: a demo program with three months of realistic activity
//! (the two before this one, closed, and this one up to now), generated
//! from a fixed seed (the same numbers every time, dated relative to
//! today), so a newcomer sees balances, statistics and statements at once.

use crate::events::*;
use crate::ledger::{Ledger, Submission, SubmitError};
use crate::money::Rate;
use crate::rules::Command;

/// The demo program's id.
pub const DEMO_PROGRAM: &str = "demo-hosting";

/// What the demo loaded, for the server to print.
#[derive(Debug, Clone)]
pub struct Demo {
    pub program: ProgramId,
    /// (affiliate id, referral code)
    pub affiliates: Vec<(String, String)>,
    pub loaded: bool,
}

/// A small deterministic generator (splitmix64): demo data, not secrets.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn id<T>(parse: fn(&str) -> Result<T, InvalidValue>, text: &str) -> Result<T, SubmitError> {
    parse(text).map_err(|e| SubmitError::Rejected(e.into()))
}

/// Loads the demo unless the program exists already.
pub fn load(ledger: &Ledger) -> Result<Demo, SubmitError> {
    let program = id(ProgramId::parse, DEMO_PROGRAM)?;
    let codes = |ledger: &Ledger| -> Vec<(String, String)> {
        let state = ledger.state();
        state
            .model
            .program(&program)
            .map(|pm| {
                pm.affiliates
                    .iter()
                    .map(|(id, a)| (id.to_string(), a.referral_code.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    if ledger.state().model.program(&program).is_some() {
        return Ok(Demo {
            affiliates: codes(ledger),
            program,
            loaded: false,
        });
    }
    let submit = |at: Option<Timestamp>, command: Command| {
        let mut s = Submission::new(Some(&program), "demo", command);
        s.at = at;
        ledger.submit_blocking(s)
    };
    let rules: ProgramRules = serde_json::from_value(serde_json::json!({
        "id": DEMO_PROGRAM, "name": "Demo hosting partners", "currency": "USD",
        "timezone": "Europe/Amsterdam", "site_url": "https://provider.example/signup",
        "cookie_days": 30, "attribution": "last_click", "basis": "expenses",
        "default_rate": "20", "product_rates": {"domains": "5"},
        "tiers": [{"min_active_referrals": 5, "rate": "25"}],
        "bounty": "10.00", "payout_threshold": "50.00",
        "promo_code_template": "DEMO-@ID@", "forbidden_groups": ["staff"]
    }))
    .map_err(|e| SubmitError::Rejected(InvalidValue::new("rules", e.to_string()).into()))?;
    let zone = rules.zone();
    submit(
        None,
        Command::DefineProgram {
            rules: Box::new(rules),
            reason: Some("demo".into()),
        },
    )?;
    let affiliates = [("alice", None), ("bob", Some("30")), ("carol", None)];
    for (name, rate) in affiliates {
        submit(
            None,
            Command::EnrollAffiliate {
                affiliate_id: id(AffiliateId::parse, name)?,
                customer_id: Some(id(CustomerId::parse, &format!("c-{name}"))?),
                group: None,
                rate: rate
                    .map(Rate::parse)
                    .transpose()
                    .map_err(|e| SubmitError::Rejected(e.into()))?,
            },
        )?;
    }
    let demo_codes = codes(ledger);
    // The two months before this one, closed, and this month up to now:
    // the portal's default window (the last 30 days) is never empty.
    let now = ledger.now();
    let this_month = now.month_in(zone);
    let first = this_month.previous().previous();
    let mut rng = Seeded(2026);
    let mut customers: Vec<(String, Timestamp)> = Vec::new();
    let products = ["shared-hosting", "vps", "domains", "ssl"];
    let prices = ["4.95", "19.90", "12.00", "49.00"];
    let mut line = 0u32;
    for m in 0..3 {
        let month = Month::new(first.year(), first.month()).map(|mut x| {
            for _ in 0..m {
                x = x.next();
            }
            x
        });
        let Some(month) = month else { continue };
        let start = month.start_in(zone).micros();
        let day = 86_400_000_000i64;
        // This month's activity lies between its start and now.
        let past = |micros: i64| Timestamp::from_micros(micros.min(now.micros()));
        let seconds = if month == this_month {
            ((now.micros() - start) / 1_000_000).max(1) as u64
        } else {
            26 * 86_400
        };
        // clicks and signups through the affiliates' links
        for v in 0..40u64 {
            let (_, code) = &demo_codes[(rng.below(3)) as usize];
            let at = past(start + rng.below(seconds) as i64 * 1_000_000);
            let visitor = format!("demo-v-{m}-{v}");
            submit(
                Some(at),
                Command::RecordClick {
                    referral_code: code.clone(),
                    visitor: Some(Text::from(visitor.as_str())),
                    creative: Some(
                        ["banner-468x60", "text-link", "review-post"][rng.below(3) as usize].into(),
                    ),
                    referrer: Some("https://blog.example/hosting-review".into()),
                    landing: None,
                    client_hash: None,
                },
            )?;
            if rng.below(10) < 3 {
                let customer = format!("demo-{m}-{v}");
                let signed_up = past(at.micros() + 3_600_000_000);
                submit(
                    Some(signed_up),
                    Command::Signup {
                        customer_id: id(CustomerId::parse, &customer)?,
                        visitor: Some(Text::from(visitor)),
                        promo_code: None,
                        group: None,
                    },
                )?;
                customers.push((customer, signed_up));
            }
        }
        // every customer is billed monthly; some buy a domain or SSL
        for (customer, since) in customers.clone() {
            let billed = Timestamp::from_micros(since.micros().max(start) + 2 * day);
            if billed.month_in(zone) != month || billed > now {
                continue;
            }
            let p = rng.below(4) as usize;
            line += 1;
            submit(
                Some(billed),
                Command::RecordBasisLine {
                    kind: LineKind::Expense,
                    id: id(LineId::parse, &format!("demo-inv-{line}"))?,
                    customer_id: id(CustomerId::parse, &customer)?,
                    amount: prices[p].into(),
                    currency: "USD".into(),
                    product: Some(products[p].into()),
                    order_id: Some(format!("demo-o-{line}")),
                },
            )?;
        }
        if m == 1 && line > 2 {
            let refunded = format!("demo-inv-{}", line - 1);
            let owner = ledger.state().model.program(&program).and_then(|pm| {
                pm.lines
                    .get(refunded.as_str())
                    .map(|l| (l.customer_id.clone(), l.amount))
            });
            if let Some((customer_id, amount)) = owner {
                submit(
                    Some(Timestamp::from_micros(start + 20 * day)),
                    Command::RecordRefund {
                        id: id(LineId::parse, "demo-cn-1")?,
                        customer_id,
                        refunds: id(LineId::parse, &refunded)?,
                        amount: amount.to_string(),
                        currency: "USD".into(),
                    },
                )?;
            }
        }
        if m < 2 {
            submit(None, Command::CloseMonth { month })?;
        }
    }
    // Whoever reached the threshold was paid out once.
    for (affiliate, _) in &demo_codes {
        let affiliate_id = id(AffiliateId::parse, affiliate)?;
        let available = ledger
            .balance(&program, &affiliate_id, None)
            .ok()
            .flatten()
            .and_then(|b| b.available.parse::<rust_decimal::Decimal>().ok())
            .unwrap_or_default();
        if available >= rust_decimal::Decimal::new(5000, 2) {
            let receipt = submit(
                None,
                Command::RequestWithdrawal {
                    affiliate_id,
                    amount: "50.00".into(),
                },
            )?;
            if let Some(Event::WithdrawalRequested(w)) = receipt.events.first().map(|r| &r.event) {
                submit(
                    None,
                    Command::PayWithdrawal {
                        withdrawal_id: w.withdrawal_id,
                        reference: "demo wire".into(),
                    },
                )?;
            }
        }
    }
    Ok(Demo {
        program,
        affiliates: demo_codes,
        loaded: true,
    })
}
