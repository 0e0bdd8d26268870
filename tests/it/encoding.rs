//! The encoding is part of the hash chain: golden bytes of one event per
//! type and version, JSON Schemas of every event kept in `schemas/`, and
//! round trips through postcard and the NDJSON export shape; the hash that
//! checkpoints count unique visitors by.

use std::collections::BTreeMap;

use commission_ledger::events::*;
use commission_ledger::ledger::ExportLine;
use commission_ledger::money::{Currency, Rate};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::support::*;

fn d(text: &str) -> Decimal {
    text.parse().unwrap()
}

/// One event of every type, with fixed values.
pub fn one_of_each() -> Vec<Event> {
    let rules = rules(
        "hosting",
        serde_json::json!({
            "product_rates": {"domains": "5"},
            "tiers": [{"min_active_referrals": 10, "rate": "25"}],
            "bounty": "10.00", "term": {"kind": "months", "months": 12},
        }),
    );
    let uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
    let at = ts("2026-08-01T10:00:00Z");
    vec![
        Event::ProgramDefined(Box::new(ProgramDefined {
            rules,
            reason: Some("launch".into()),
        })),
        Event::AffiliateEnrolled(AffiliateEnrolled {
            affiliate_id: aff("alice"),
            referral_code: "k3x9m2p7qa".into(),
            promo_code: Some("HOST-alice".into()),
            customer_id: Some(cust("c-alice")),
            group: "resellers".into(),
            rate: Some(Rate::parse("30").unwrap()),
        }),
        Event::AffiliateSuspended(AffiliateSuspended {
            affiliate_id: aff("alice"),
            reason: "fraud".into(),
        }),
        Event::ClickRecorded(ClickRecorded {
            click_id: uuid,
            affiliate_id: aff("alice"),
            visitor: "v-1".into(),
            creative: Some("banner-1".into()),
            referrer: Some("https://blog.example/post".into()),
            landing: None,
            client_hash: Some(Bytes([7; 16])),
        }),
        Event::SignupAttributed(SignupAttributed {
            customer_id: cust("cust-1"),
            affiliate_id: aff("alice"),
            via: Via::Click,
            visitor: Some("v-1".into()),
            promo_code: None,
            group: "default".into(),
        }),
        Event::BasisLineRecorded(BasisLineRecorded {
            kind: LineKind::Expense,
            id: line("inv-7-1"),
            customer_id: cust("cust-1"),
            amount: d("100.00"),
            product: Some("shared-hosting".into()),
            order_id: Some("o-7".into()),
        }),
        Event::RefundRecorded(RefundRecorded {
            id: line("cn-3"),
            customer_id: cust("cust-1"),
            refunds: line("inv-7-1"),
            amount: d("40.00"),
        }),
        Event::CustomerClosed(CustomerClosed {
            customer_id: cust("cust-1"),
            reason: None,
        }),
        Event::CustomerGroupChanged(CustomerGroupChanged {
            customer_id: cust("cust-1"),
            group: "staff".into(),
        }),
        Event::RewardAccrued(RewardAccrued {
            affiliate_id: aff("alice"),
            customer_id: cust("cust-1"),
            kind: RewardKind::Reward,
            line: line("inv-7-1"),
            product: Some("shared-hosting".into()),
            line_at: at,
            basis: d("100.00"),
            rate: Rate::parse("20").unwrap(),
            amount: d("20.00"),
            month: month("2026-08"),
            late: false,
        }),
        Event::RewardClawedBack(Box::new(RewardClawedBack {
            affiliate_id: aff("alice"),
            customer_id: cust("cust-1"),
            refund: line("cn-3"),
            line: line("inv-7-1"),
            product: None,
            refund_at: at,
            basis: d("40.00"),
            rate: Rate::parse("20").unwrap(),
            amount: d("8.00"),
            month: month("2026-08"),
            late: false,
        })),
        Event::MonthClosed(MonthClosed {
            month: month("2026-08"),
            rewards: 3,
            total: d("20.77"),
        }),
        Event::WithdrawalRequested(WithdrawalRequested {
            withdrawal_id: uuid,
            affiliate_id: aff("bob"),
            amount: d("60.00"),
        }),
        Event::WithdrawalPaid(WithdrawalPaid {
            withdrawal_id: uuid,
            affiliate_id: aff("bob"),
            amount: d("60.00"),
            reference: "wire 2026-09-02".into(),
        }),
        Event::WithdrawalRejected(WithdrawalRejected {
            withdrawal_id: uuid,
            affiliate_id: aff("bob"),
            amount: d("60.00"),
            reason: "bank details".into(),
        }),
        Event::CreditApplied(CreditApplied {
            affiliate_id: aff("bob"),
            amount: d("10.00"),
            invoice_id: "inv-12".into(),
        }),
        Event::ReferralReassigned(ReferralReassigned {
            customer_id: cust("cust-1"),
            from_affiliate: Some(aff("alice")),
            to: aff("bob"),
            from: Some(at),
            retroactive: true,
            reason: "ticket 4411".into(),
        }),
        Event::AdjustmentPosted(AdjustmentPosted {
            affiliate_id: aff("bob"),
            customer_id: Some(cust("cust-1")),
            line: Some(line("inv-7-1")),
            amount: d("-20.00"),
            month: month("2026-09"),
            cause: Cause::Reassignment { seq: 42 },
            reason: "ticket 4411".into(),
        }),
        Event::ApiKeyIssued(ApiKeyIssued {
            key_id: "k-1".into(),
            key_hash: Bytes([9; 32]),
            role: Role::Ingest,
            issuer: "cli".into(),
        }),
        Event::ApiKeyRevoked(ApiKeyRevoked {
            key_id: "k-1".into(),
            reason: "rotated".into(),
        }),
        Event::ReplayApplied(Box::new(ReplayApplied {
            replay_id: Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_00ff),
            at_seq: 99,
            overrides: Overrides {
                attribution: vec![AttributionOverride {
                    customer_id: cust("cust-1"),
                    affiliate_id: aff("bob"),
                    from: Some(ts("2026-05-01T00:00:00Z")),
                }],
                model: Some(ModelOverride {
                    attribution: Some(Attribution::FirstClick),
                    cookie_days: Some(60),
                }),
                rules: None,
                affiliate_rates: vec![AffiliateRateOverride {
                    affiliate_id: aff("alice"),
                    rate: commission_ledger::money::Rate::parse("25").unwrap(),
                    from: ts("2026-06-01T00:00:00Z"),
                }],
                exclude: vec![17, 23],
            },
            changes: vec![ReplayChange {
                affiliate_id: aff("bob"),
                month: month("2026-05"),
                kind: ChangeKind::Reward,
                customer_id: Some(cust("cust-1")),
                line: Some(line("inv-5-1")),
                amount: d("20.00"),
            }],
            months: Some(MonthRange {
                from: month("2026-05"),
                to: month("2026-07"),
            }),
            reason: "ticket 4411".into(),
        })),
        Event::ReplayCorrected(Box::new(ReplayCorrected {
            replay_id: Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_00ff),
            lines: vec![
                LineCorrection {
                    line: line("inv-5-1"),
                    state: CorrectedState::Closed {
                        reward: Some(CorrectedReward {
                            affiliate_id: aff("bob"),
                            rate: commission_ledger::money::Rate::parse("30").unwrap(),
                            amount: d("30.00"),
                            refunded: d("0"),
                            clawed: d("0"),
                        }),
                    },
                },
                LineCorrection {
                    line: line("inv-5-2"),
                    state: CorrectedState::Excluded,
                },
            ],
            refunds: vec![RefundCorrection {
                refund: line("ref-5-1"),
                state: CorrectedState::Open,
            }],
            customers: vec![CustomerCorrection {
                customer_id: cust("cust-1"),
                attribution: vec![AttributedFrom {
                    from: None,
                    affiliate_id: aff("bob"),
                }],
                signup_at: Some(ts("2026-05-02T10:05:00Z")),
                via: Some(Via::Click),
                bounty: Some(CorrectedBounty {
                    affiliate_id: aff("bob"),
                    amount: d("10.00"),
                    line_at: ts("2026-05-10T12:00:00Z"),
                }),
            }],
            clicks: vec![ExcludedClick {
                visitor: "v-9".into(),
                at: ts("2026-05-01T10:00:00Z"),
                affiliate_id: aff("alice"),
            }],
        })),
    ]
}

fn recorded(seq: Seq, event: Event) -> Recorded {
    Recorded {
        seq,
        id: Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + u128::from(seq)),
        recorded_at: ts("2026-08-01T10:00:01Z"),
        occurred_at: ts("2026-08-01T10:00:00Z"),
        actor: "k-ingest".into(),
        program: Some(program_id("hosting")),
        idempotency: Some(Idempotency {
            key: "req-1".into(),
            request_hash: Bytes([1; 32]),
        }),
        event,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn golden_bytes_of_every_event_type_v1() {
    let events = one_of_each();
    let names: Vec<&str> = events.iter().map(Event::type_name).collect();
    let schema_names: Vec<&str> = event_schemas().iter().map(|(n, _, _)| *n).collect();
    assert_eq!(names, schema_names, "one sample per event type, in order");
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| {
        for (i, event) in events.into_iter().enumerate() {
            let name = event.type_name();
            let r = recorded(i as u64 + 1, event);
            let bytes = encode(&r).unwrap();
            assert_eq!(decode(&bytes).unwrap(), r, "{name} round trip");
            insta::assert_snapshot!(format!("golden_{name}_v1"), hex(&bytes));
        }
    });
}

#[test]
fn export_lines_round_trip_every_event_type() {
    for (i, event) in one_of_each().into_iter().enumerate() {
        let r = recorded(i as u64 + 1, event);
        let line = ExportLine::new(&r, &[3; 32]);
        let text = serde_json::to_string(&line).unwrap();
        let back: ExportLine = serde_json::from_str(&text).unwrap();
        assert_eq!(back.into_recorded().unwrap(), r);
    }
}

#[test]
fn schemas_in_the_repository_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/events");
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let mut expected = BTreeMap::new();
    for (name, version, schema) in event_schemas() {
        let file = format!("{name}.v{version}.json");
        let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        expected.insert(file, text);
    }
    if update {
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in &expected {
            std::fs::write(dir.join(file), text).unwrap();
        }
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    present.sort();
    assert_eq!(
        present,
        expected.keys().cloned().collect::<Vec<_>>(),
        "schemas/events/ drifted from the event types: run `UPDATE_SCHEMAS=1 cargo test --test it schemas` and commit"
    );
    for (file, text) in &expected {
        let on_disk = std::fs::read_to_string(dir.join(file)).unwrap();
        assert_eq!(
            &on_disk, text,
            "schemas/events/{file} drifted: run `UPDATE_SCHEMAS=1 cargo test --test it schemas` and commit"
        );
    }
}

#[test]
fn every_sample_event_is_valid_json_for_its_schema_shape() {
    // The JSON a sample serializes to names exactly the properties its schema lists.
    let schemas: BTreeMap<&str, serde_json::Value> = event_schemas()
        .into_iter()
        .map(|(name, _, schema)| (name, serde_json::to_value(&schema).unwrap()))
        .collect();
    for event in one_of_each() {
        let name = event.type_name();
        let value = serde_json::to_value(&event).unwrap();
        let data = value.get(name).unwrap().as_object().unwrap();
        let properties = schemas[name]["properties"].as_object().unwrap();
        let mut keys: Vec<&String> = data.keys().collect();
        let mut expected: Vec<&String> = properties.keys().collect();
        keys.sort();
        expected.sort();
        assert_eq!(keys, expected, "{name}");
    }
}

#[test]
fn currencies_keep_their_code_in_json() {
    let usd = Currency::parse("USD").unwrap();
    assert_eq!(serde_json::to_string(&usd).unwrap(), "\"USD\"");
}

/// Checkpoints keep each day's unique visitors as these hashes, so a build
/// that hashed a visitor differently would count a visitor seen before the
/// checkpoint a second time after it. The values are SipHash-1-3 with zero
/// keys over the string's bytes and a 0xff, which std's `DefaultHasher`
/// gave when the first checkpoints were written.
#[test]
fn visitors_hash_as_the_checkpoints_kept_them() {
    use commission_ledger::projections::visitor_hash;
    assert_eq!(visitor_hash("v-1"), 0x49c1_a83b_e702_94f8);
    assert_eq!(visitor_hash(""), 0x3040_6ea5_23c5_3def);
    assert_eq!(
        visitor_hash("a-much-longer-visitor-identifier-0123456789"),
        0x0d11_0d98_b957_07d4
    );
}

/// Hex is hex digits only: `u8::from_str_radix` also takes a sign, so
/// `+8` read as `08` and two texts named one hash (found by `tools/fuzz`).
#[test]
fn hex_is_digits_only() {
    use commission_ledger::events::{Bytes, from_hex_digits};
    assert_eq!(
        Bytes::<2>::from_hex("0aff").map(|b| b.0),
        Some([0x0a, 0xff])
    );
    assert_eq!(
        Bytes::<2>::from_hex("0AFF").map(|b| b.0),
        Some([0x0a, 0xff])
    );
    for bad in ["+aff", "0a+f", "-0ff", " aff", "0af", "0aff0", "0agf", "éa"] {
        assert!(Bytes::<2>::from_hex(bad).is_none(), "{bad}");
    }
    assert_eq!(from_hex_digits(""), Some(vec![]));
    assert_eq!(from_hex_digits("+8"), None);
    assert_eq!(from_hex_digits("abc"), None);
}
