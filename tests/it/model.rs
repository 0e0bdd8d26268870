//! The ledger against a reference model of the money rules (sled's
//! model-based testing): random histories of clicks, signups, charges and
//! payments, refunds, closes (by hand and by the server's auto-closer),
//! withdrawals and their settlement, credits, group changes, closed
//! accounts, suspensions, rule changes (rates, bounty, threshold, the
//! attribution model and the cookie window), reassignments (dated or for
//! all time, retroactive or not) and what-if replays that correct a
//! customer's attribution (dated or for all time), an affiliate's own rate
//! from a date, the rules from a date, the attribution model or cookie
//! window, or exclude a click, a line, a refund or a signup (applied or
//! not; not applied, some restricted to a few statement months) run through the
//! ledger and through a small model written from DESIGN.md alone, with
//! plain collections and no memo, index or incremental path. Cases vary
//! the attribution model, the basis, the term (lifetime, months, first
//! order) the program starts with, a custom rate, the auto-close day, the
//! currency (USD, JPY or BHD: 2, 0 or 3 decimals to round to) and the time
//! zone the program's months are in (UTC, Amsterdam, Kiritimati at +14,
//! and Santiago, whose clocks change at midnight). The two must agree on
//! every outcome (appended, no-op, refused and why), on every reward,
//! bounty and claw-back each close posts, on every field of every balance
//! (the pending estimate among them), on every referral list (who, status,
//! billed, commission), and on this and last month's statements (opening,
//! totals by kind, closing) after every step, and across restarts from a
//! checkpoint and from the log alone; and, read as of the log position
//! after an earlier step, on the balances, referral lists and statements
//! of then. A twin program on the same server
//! gets every command too, with the same ids, and must answer and count
//! exactly the same: programs share nothing. A replay's diff must be what
//! the model posts when it folds the same history again with the
//! correction (per affiliate and statement month); once applied, the
//! ledger must be that corrected world from then on: its refunds, closes,
//! reassignments, estimates and lists.
//!
//! `properties` checks the ledger against itself (postings, replays,
//! reads of the past); this checks it against the rules.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use commission_ledger::events::*;
use commission_ledger::ledger::{AsOf, Submission, SubmitError};
use commission_ledger::rules::{Command, Noop, Rejection};
use proptest::prelude::*;
use rust_decimal::{Decimal, RoundingStrategy};

use crate::support::*;

const AFFILIATES: [&str; 3] = ["alice", "bob", "carol"];
const DAY_US: i64 = 86_400_000_000;

/// The program both run: percent rates; the default rate, the product
/// rate and the tier (each maybe none), whether staff customers earn
/// nothing (a forbidden group), the bounty, the
/// threshold, the attribution model, the cookie window, the basis (expenses
/// or payments) and the term (lifetime, two months or the first order) as
/// the version has them.
fn program(case: &Case, version: &Version) -> serde_json::Value {
    serde_json::json!({
        "timezone": case.zone.name(), "cookie_days": version.cookie_days,
        "attribution": if version.first_click { "first_click" } else { "last_click" },
        "basis": if case.payments_basis != version.other_basis { "payments" } else { "expenses" },
        "default_rate": version.default_rate.to_string(),
        "product_rates": match version.domains_rate {
            Some(rate) => serde_json::json!({"domains": rate.to_string()}),
            None => serde_json::json!({}),
        },
        "tiers": match version.tier_rate {
            Some(rate) => serde_json::json!([{"min_active_referrals": TIER_MIN, "rate": rate.to_string()}]),
            None => serde_json::json!([]),
        },
        "currency": case.currency.0,
        "bounty": version.bounty.then(|| money(BOUNTY_CENTS).to_string()),
        "payout_threshold": money(version.threshold_cents).to_string(),
        "forbidden_groups": if version.staff_forbidden { vec!["staff"] } else { vec![] },
        "auto_close_day": case.auto_close_day,
        "term": match version.term {
            Term::Months(months) => serde_json::json!({"kind": "months", "months": months}),
            Term::FirstOrder => serde_json::json!({"kind": "first_order"}),
            Term::Lifetime => serde_json::json!({"kind": "lifetime"}),
        },
    })
}

/// What varies between histories besides their steps.
#[derive(Clone, Debug)]
struct Case {
    /// The program's attribution model when it is defined.
    first_click: bool,
    /// Whether the program rewards payments when it is defined (else
    /// expenses).
    payments_basis: bool,
    /// The program's term when it is defined.
    term: Term,
    /// Bob's own rate (a custom deal), over every other.
    bob_rate: Option<i64>,
    /// The day of the month the server closes the month before by itself.
    auto_close_day: Option<u32>,
    /// The program's currency and its minor unit.
    currency: (&'static str, u32),
    /// The program's time zone: where its months begin and end.
    zone: chrono_tz::Tz,
}

/// Which lines of a referral earn.
#[derive(Clone, Copy, Debug, Default)]
enum Term {
    #[default]
    Lifetime,
    /// Those dated within this many months of the signup (or first line).
    Months(u32),
    /// Those of the customer's first order (or the first line, without orders).
    FirstOrder,
}

/// What a change of the program's rules changes here.
#[derive(Clone, Debug, Default)]
struct Version {
    default_rate: i64,
    bounty: bool,
    threshold_cents: i64,
    /// The attribution model: the first click in the window, or the last.
    first_click: bool,
    cookie_days: i64,
    term: Term,
    /// The rate of the `domains` product, if it has its own.
    domains_rate: Option<i64>,
    /// The rate of the tier of two active referrals a month, if any.
    tier_rate: Option<i64>,
    /// Staff customers (a forbidden group) earn nothing.
    staff_forbidden: bool,
    /// The basis is the other kind of line than the program was defined
    /// with (payments for expenses, or expenses for payments).
    other_basis: bool,
}

/// The rules the program is defined with.
fn first_version(case: &Case) -> Version {
    Version {
        default_rate: 20,
        bounty: true,
        threshold_cents: 500,
        first_click: case.first_click,
        cookie_days: 30,
        term: case.term,
        domains_rate: Some(5),
        tier_rate: Some(25),
        staff_forbidden: true,
        other_basis: false,
    }
}

/// Alice is also a customer of the provider: this one.
const ALICE_OWN_CUSTOMER: u8 = 0;
const TIER_MIN: usize = 2;
const BOUNTY_CENTS: i64 = 500;

#[derive(Clone, Debug)]
enum Op {
    Click {
        affiliate: usize,
        visitor: u8,
    },
    Signup {
        customer: u8,
        visitor: u8,
        promo: Option<usize>,
        /// The billing system says the customer is staff.
        staff: bool,
    },
    Line {
        /// Of the other kind than the program's first basis: an expense
        /// under payments, a payment under expenses.
        other_kind: bool,
        customer: u8,
        cents: u32,
        domains: bool,
        /// One of the customer's orders, or none.
        order: Option<u8>,
        /// Dated this many days before now (maybe in a closed month: late).
        days_back: Option<u8>,
    },
    Refund {
        line: usize,
        size: Size,
    },
    Close,
    /// The server's auto-closer looks at the clock: it closes every month
    /// whose day `auto_close_day` of the month after has come.
    AutoClose,
    Withdraw {
        affiliate: usize,
        cents: u32,
    },
    Settle {
        withdrawal: usize,
        pay: bool,
    },
    Credit {
        affiliate: usize,
        cents: u32,
    },
    /// Time passes (cookie windows run out, months end).
    Wait {
        days: u8,
    },
    /// Every balance, referral list and statement of the month as of the
    /// log position after an earlier step (`back` steps before this one,
    /// round) must be what it was then.
    PastRead {
        back: u8,
    },
    /// The ledger stops and starts again: from the checkpoint it saves
    /// when it stops, or (`rebuild`) from the log alone, its index store
    /// deleted. The state it starts with must be the same.
    Restart {
        rebuild: bool,
    },
    Group {
        customer: u8,
        staff: bool,
    },
    /// The billing system closed the customer's account (it earns on).
    CloseCustomer {
        customer: u8,
    },
    Suspend {
        affiliate: usize,
    },
    /// The program's rules change from now on.
    ChangeRules {
        version: Version,
    },
    /// An operator moves a customer, from some days back or for all time;
    /// `retroactive`: with what was posted for the lines since.
    Reassign {
        customer: u8,
        affiliate: usize,
        days_back: Option<u8>,
        retroactive: bool,
    },
    /// An operator replays history with a correction: the diff must be
    /// what the model says the same history with that correction would
    /// have posted; and with `apply`, the ledger becomes that world.
    /// `months`: the diff of only the statement months from one the whole
    /// diff changes (the `pick`th, round; with none, `pick` months ago),
    /// `span` more after it; applied, the case ends after the checks
    /// of what it did (the model does not follow a partly corrected world).
    Replay {
        correction: Correction,
        apply: bool,
        months: Option<(u8, u8)>,
    },
}

/// What a what-if replay corrects.
#[derive(Clone, Debug)]
enum Correction {
    /// The customer is the affiliate's referral (from some days back, or
    /// for all time).
    Attribution {
        customer: u8,
        affiliate: usize,
        days_back: Option<u8>,
    },
    /// The affiliate's own rate (a custom deal) for lines dated from some
    /// days back on.
    Rate {
        affiliate: usize,
        rate: i64,
        days_back: u8,
    },
    /// The program's rules from some days back on (over the versions
    /// recorded since).
    Rules { version: Version, days_back: u8 },
    /// The attribution model or the cookie window (over every version of
    /// the rules): signups that came by a click are attributed again.
    ClickModel {
        first_click: Option<bool>,
        cookie_days: Option<i64>,
    },
    /// One of the lines recorded (a test charge) should never have counted.
    ExcludeLine(usize),
    /// One of the refunds recorded.
    ExcludeRefund(usize),
    /// One of the signups attributed (a fraudulent one).
    ExcludeSignup(usize),
    /// One of the clicks recorded (click fraud): signups its visitor made
    /// by a click are attributed again from the clicks left.
    ExcludeClick(usize),
}

/// What happened to the model, in order: enough to fold the same history
/// again under corrections (the replay's world). Withdrawals and credits
/// move no commission and are not needed.
#[derive(Clone)]
enum Fact {
    Click {
        visitor: u8,
        affiliate: usize,
        at: i64,
    },
    Signup {
        customer: u8,
        affiliate: usize,
        at: i64,
        /// The visitor, when the signup came by its click.
        by_click: Option<u8>,
        /// The group the signup reported is staff.
        staff: bool,
    },
    Line(Line),
    Refund(Refund),
    Close(Month),
    Group {
        customer: u8,
        at: i64,
        staff: bool,
    },
    CloseCustomer(u8),
    Suspend {
        affiliate: usize,
        at: i64,
    },
    Rules {
        at: i64,
        version: Version,
    },
    Reassign {
        customer: u8,
        affiliate: usize,
        from: Option<i64>,
        retroactive: bool,
        now: i64,
    },
}

/// A correction of a customer's attribution: to `affiliate` from `from`
/// (or always). Applied at fact `until`, it holds over the facts before
/// it; not applied, over all.
#[derive(Clone, Debug)]
struct Layer {
    customer: u8,
    affiliate: usize,
    from: Option<i64>,
    until: Option<usize>,
}

/// How much of a line a refund takes back.
#[derive(Clone, Debug)]
enum Size {
    Cents(u32),
    /// This percentage of what is not refunded yet (at least a cent).
    Percent(u8),
    /// All that is not refunded yet.
    Rest,
}

fn op() -> impl Strategy<Value = Op> {
    // Small amounts as often as large ones: rounding to the cent, zero
    // rewards and one-cent claw-backs are where money rules go wrong.
    let cents = || prop_oneof![1..300u32, 300..60_000u32];
    prop_oneof![
        4 => (0..3usize, 0..5u8).prop_map(|(affiliate, visitor)| Op::Click { affiliate, visitor }),
        4 => (0..6u8, 0..5u8, proptest::option::weighted(0.5, 0..3usize), proptest::bool::weighted(0.15))
            .prop_map(|(customer, visitor, promo, staff)| Op::Signup { customer, visitor, promo, staff }),
        7 => (proptest::bool::weighted(0.15), 0..6u8, cents(), proptest::bool::weighted(0.25),
              proptest::option::of(0..3u8), proptest::option::weighted(0.2, 1..50u8))
            .prop_map(|(other_kind, customer, cents, domains, order, days_back)| Op::Line { other_kind, customer, cents, domains, order, days_back }),
        4 => (0..40usize, prop_oneof![
                (1..3_000u32).prop_map(Size::Cents),
                (1..=100u8).prop_map(Size::Percent),
                Just(Size::Rest),
            ]).prop_map(|(line, size)| Op::Refund { line, size }),
        3 => Just(Op::Close),
        2 => Just(Op::AutoClose),
        3 => (0..3usize, cents()).prop_map(|(affiliate, cents)| Op::Withdraw { affiliate, cents }),
        3 => (0..6usize, any::<bool>()).prop_map(|(withdrawal, pay)| Op::Settle { withdrawal, pay }),
        3 => (0..3usize, cents()).prop_map(|(affiliate, cents)| Op::Credit { affiliate, cents }),
        1 => (1..40u8).prop_map(|days| Op::Wait { days }),
        1 => any::<u8>().prop_map(|back| Op::PastRead { back }),
        1 => any::<bool>().prop_map(|rebuild| Op::Restart { rebuild }),
        1 => (0..6u8, proptest::bool::weighted(0.7)).prop_map(|(customer, staff)| Op::Group { customer, staff }),
        1 => (0..6u8).prop_map(|customer| Op::CloseCustomer { customer }),
        1 => (1..3usize).prop_map(|affiliate| Op::Suspend { affiliate }),
        1 => version().prop_map(|version| Op::ChangeRules { version }),
        2 => (0..6u8, 0..3usize, proptest::option::of(0..40u8), any::<bool>())
            .prop_map(|(customer, affiliate, days_back, retroactive)| Op::Reassign { customer, affiliate, days_back, retroactive }),
        3 => (correction(), proptest::bool::weighted(0.7), proptest::option::weighted(0.2, (0..4u8, 0..2u8)), proptest::bool::weighted(0.2))
            .prop_map(|(correction, apply, months, apply_months)| Op::Replay {
                correction,
                apply: if months.is_some() { apply_months } else { apply },
                months,
            }),
    ]
}

fn version() -> impl Strategy<Value = Version> {
    (
        prop_oneof![Just(20i64), Just(30)],
        proptest::bool::weighted(0.7),
        prop_oneof![Just(500i64), Just(2_000)],
        any::<bool>(),
        cookie_days(),
        proptest::bool::weighted(0.2),
        term(),
        prop_oneof![2 => Just(Some(5i64)), 1 => Just(Some(40)), 1 => Just(None)],
        // A tier below the default rate leaves it.
        prop_oneof![2 => Just(Some(25i64)), 1 => Just(Some(15)), 1 => Just(None)],
        proptest::bool::weighted(0.75),
    )
        .prop_map(
            |(
                default_rate,
                bounty,
                threshold_cents,
                first_click,
                cookie_days,
                other_basis,
                term,
                domains_rate,
                tier_rate,
                staff_forbidden,
            )| Version {
                default_rate,
                bounty,
                threshold_cents,
                first_click,
                cookie_days,
                term,
                domains_rate,
                tier_rate,
                staff_forbidden,
                other_basis,
            },
        )
}

/// A cookie window: the usual month, or a week (clicks run out sooner).
fn cookie_days() -> impl Strategy<Value = i64> {
    prop_oneof![3 => Just(30i64), 1 => Just(7)]
}

fn correction() -> impl Strategy<Value = Correction> {
    prop_oneof![
        3 => (0..6u8, 0..3usize, proptest::option::of(0..60u8))
            .prop_map(|(customer, affiliate, days_back)| Correction::Attribution { customer, affiliate, days_back }),
        1 => (0..3usize, prop_oneof![Just(10i64), Just(35)], 0..60u8)
            .prop_map(|(affiliate, rate, days_back)| Correction::Rate { affiliate, rate, days_back }),
        1 => (version(), 0..60u8).prop_map(|(version, days_back)| Correction::Rules { version, days_back }),
        1 => (0..40usize).prop_map(Correction::ExcludeLine),
        1 => (0..40usize).prop_map(Correction::ExcludeRefund),
        1 => (0..40usize).prop_map(Correction::ExcludeSignup),
        1 => (0..60usize).prop_map(Correction::ExcludeClick),
        1 => (proptest::option::of(any::<bool>()), proptest::option::of(cookie_days()))
            .prop_map(|(first_click, cookie_days)| Correction::ClickModel { first_click, cookie_days }),
    ]
}

fn term() -> impl Strategy<Value = Term> {
    prop_oneof![
        Just(Term::Lifetime),
        Just(Term::Months(2)),
        Just(Term::FirstOrder)
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        term(),
        proptest::option::of(Just(30i64)),
        proptest::option::of(1..29u32),
        prop_oneof![4 => Just(("USD", 2)), 1 => Just(("JPY", 0)), 1 => Just(("BHD", 3))],
        // UTC; summer time; 14 hours ahead; clocks changing at midnight.
        prop_oneof![
            Just(chrono_tz::UTC),
            Just(chrono_tz::Europe::Amsterdam),
            Just(chrono_tz::Pacific::Kiritimati),
            Just(chrono_tz::America::Santiago),
        ],
        proptest::bool::weighted(0.3),
    )
        .prop_map(
            |(first_click, term, bob_rate, auto_close_day, currency, zone, payments_basis)| Case {
                first_click,
                payments_basis,
                term,
                bob_rate,
                auto_close_day,
                currency,
                zone,
            },
        )
}

thread_local! {
    /// The minor unit of the history's currency (ISO 4217: 2 for USD, 0
    /// for JPY, 3 for BHD), set by [`run`] for the amounts below.
    static MINOR_UNIT: std::cell::Cell<u32> = const { std::cell::Cell::new(2) };
    /// The program's time zone, set by [`run`] for [`month_of`].
    static ZONE: std::cell::Cell<chrono_tz::Tz> = const { std::cell::Cell::new(chrono_tz::UTC) };
}

/// An amount of `units` of the currency's minor unit ("cents" in this
/// file, whatever the currency).
fn money(units: i64) -> Decimal {
    Decimal::new(units, MINOR_UNIT.get())
}

/// A percentage of an amount, rounded half to even to the minor unit.
fn percent(amount: Decimal, rate: i64) -> Decimal {
    (amount * Decimal::from(rate) / Decimal::ONE_HUNDRED)
        .round_dp_with_strategy(MINOR_UNIT.get(), RoundingStrategy::MidpointNearestEven)
}

/// The program's month of a moment.
fn month_of(micros: i64) -> Month {
    Timestamp::from_micros(micros).month_in(ZONE.get())
}

#[derive(Clone)]
struct Line {
    id: String,
    /// A payment (else an expense): it earns under a payments basis.
    payment: bool,
    customer: u8,
    order: Option<String>,
    amount: Decimal,
    domains: bool,
    at: i64,
    month: Month,
    /// Not yet taken by a close.
    open: bool,
    /// Recorded refunds, in all.
    refunded: Decimal,
    reward: Option<Reward>,
    /// Excluded by an applied replay (or, in a replay's world, by it): as
    /// if never recorded, but its id stays taken and refunds find it.
    excluded: bool,
}

#[derive(Clone)]
struct Reward {
    affiliate: usize,
    rate: i64,
    amount: Decimal,
    /// Refunds a close has taken, and what they clawed back.
    refunded: Decimal,
    clawed: Decimal,
}

#[derive(Clone)]
struct Refund {
    id: String,
    line: usize,
    amount: Decimal,
    at: i64,
    month: Month,
    open: bool,
    /// Excluded by a replay: it refunds nothing, and claws nothing back.
    excluded: bool,
}

#[derive(Clone, Copy, Default)]
struct Accounts {
    /// Earned and not in a withdrawal.
    free: Decimal,
    in_withdrawal: Decimal,
    paid_out: Decimal,
    credited: Decimal,
}

impl Accounts {
    fn earned(&self) -> Decimal {
        self.free + self.in_withdrawal
    }
    fn available(&self, threshold: Decimal) -> Decimal {
        let earned = self.earned();
        if earned >= threshold && earned >= Decimal::ZERO && self.free > Decimal::ZERO {
            self.free
        } else {
            Decimal::ZERO
        }
    }
}

/// What a close posts, in the order it posts it.
#[derive(Clone, Debug, PartialEq)]
enum Posted {
    Reward {
        affiliate: usize,
        line: String,
        rate: i64,
        amount: Decimal,
        late: bool,
    },
    Bounty {
        affiliate: usize,
        line: String,
        late: bool,
    },
    ClawBack {
        affiliate: usize,
        refund: String,
        amount: Decimal,
        late: bool,
    },
}

impl Posted {
    fn affiliate(&self) -> usize {
        match self {
            Posted::Reward { affiliate, .. }
            | Posted::Bounty { affiliate, .. }
            | Posted::ClawBack { affiliate, .. } => *affiliate,
        }
    }
    fn amount(&self) -> Decimal {
        match self {
            Posted::Reward { amount, .. } => *amount,
            Posted::Bounty { .. } => money(BOUNTY_CENTS),
            Posted::ClawBack { amount, .. } => -*amount,
        }
    }
}

#[derive(Clone, Default)]
struct Customer {
    /// Whose referral the customer is from when on (`None`: from the start).
    attribution: Vec<(Option<i64>, usize)>,
    signup_at: Option<i64>,
    /// The first line recorded: its moment, id and order.
    first_line_at: Option<i64>,
    first_line: Option<String>,
    first_order: Option<String>,
    /// Staff from when on (or not), in order.
    groups: Vec<(i64, bool)>,
    /// The account was closed.
    closed: bool,
}

impl Customer {
    fn affiliate_at(&self, at: i64) -> Option<usize> {
        self.attribution
            .iter()
            .rev()
            .find(|(from, _)| from.is_none_or(|from| from <= at))
            .map(|(_, a)| *a)
    }
    /// A group change applies from its moment; before the first one
    /// known, the customer was in that group already.
    fn staff_at(&self, at: i64) -> bool {
        self.groups
            .iter()
            .rev()
            .find(|(from, _)| *from <= at)
            .or(self.groups.first())
            .is_some_and(|(_, staff)| *staff)
    }
}

#[derive(Default)]
struct Model {
    case: Option<Case>,
    /// The program's rules, each from its moment on (the first also before).
    versions: Vec<(i64, Version)>,
    /// The rules the program was defined with.
    initial: (i64, Version),
    /// Each visitor's clicks: when, on whose link.
    clicks: HashMap<u8, Vec<(i64, usize)>>,
    /// Customers the ledger knows of: attributed, billed, or grouped.
    customers: HashMap<u8, Customer>,
    suspended_at: [Option<i64>; 3],
    /// Customers whose bounty was paid: to whom, with a line of when.
    bountied: HashMap<u8, (usize, i64)>,
    lines: Vec<Line>,
    refunds: Vec<Refund>,
    closed: BTreeSet<Month>,
    accounts: [Accounts; 3],
    /// Each affiliate's statement totals by month and kind.
    statements: HashMap<(usize, Month), BTreeMap<&'static str, Decimal>>,
    /// What each affiliate ever earned from each customer.
    commission: HashMap<(usize, u8), Decimal>,
    /// Affiliate, amount, still requested.
    withdrawals: Vec<(usize, Decimal, bool)>,
    /// The commission each affiliate was posted per statement month: as a
    /// replay compares it (rewards, bounties and claw-backs in the month
    /// of their close, reassignment adjustments in theirs, and an applied
    /// replay's changes in the month they corrected).
    posted: HashMap<(usize, Month), Decimal>,
    /// What happened, in order.
    facts: Vec<Fact>,
    /// Attribution corrections (applied ones, and while a replay folds the
    /// history again, the new one).
    layers: Vec<Layer>,
    /// The fact being folded: which layers hold over it.
    fact_index: usize,
    /// Facts excluded by applied replays (and, while a replay folds the
    /// history again, the new one): lines, refunds and signups, by index.
    excluded: BTreeSet<usize>,
    /// Rate corrections: the affiliate's own rate for lines dated from a
    /// moment on (the last that covers a line holds). They hold over every
    /// line, recorded before the replay or after it.
    rates: Vec<(usize, i64, i64)>,
    /// Rules corrections, over the versions recorded before fact `until`
    /// (applied), or all (the new one).
    rule_layers: Vec<(RuleFix, Option<usize>)>,
}

/// A correction of the program's rules.
#[derive(Clone, Debug)]
enum RuleFix {
    /// This version from a moment on.
    Version(i64, Version),
    /// This attribution model or cookie window in every version.
    ClickModel(Option<bool>, Option<i64>),
}

impl Model {
    /// An affiliate's referral list: its current referrals, by id, each
    /// with what expenses billed (less their refunds) and all the affiliate
    /// ever earned from it.
    fn referrals(&self, affiliate: usize) -> Vec<(String, &'static str, Decimal, Decimal)> {
        let mut list: Vec<(String, &'static str, Decimal, Decimal)> = self
            .customers
            .iter()
            .filter(|(_, c)| c.attribution.last().map(|(_, a)| *a) == Some(affiliate))
            .map(|(c, customer)| {
                let billed: Decimal = self
                    .lines
                    .iter()
                    .filter(|l| l.customer == *c && self.on_basis(l) && !l.excluded)
                    .map(|l| l.amount - l.refunded)
                    .sum();
                let commission = self.commission.get(&(affiliate, *c)).copied();
                let status = if customer.closed { "closed" } else { "active" };
                (
                    format!("c-{c}"),
                    status,
                    billed,
                    commission.unwrap_or_default(),
                )
            })
            .collect();
        list.sort();
        list
    }

    /// A movement of `earned` on the affiliate's statement of `month`.
    fn post(&mut self, affiliate: usize, month: Month, kind: &'static str, amount: Decimal) {
        if ["reward", "bounty", "clawback", "adjustment"].contains(&kind) {
            *self.posted.entry((affiliate, month)).or_default() += amount;
        }
        *self
            .statements
            .entry((affiliate, month))
            .or_default()
            .entry(kind)
            .or_default() += amount;
    }

    /// The statement of a month: opening balance, totals by kind, closing balance.
    fn statement(
        &self,
        affiliate: usize,
        month: Month,
    ) -> (Decimal, Vec<(String, Decimal)>, Decimal) {
        let opening: Decimal = self
            .statements
            .iter()
            .filter(|((a, m), _)| *a == affiliate && *m < month)
            .flat_map(|(_, totals)| totals.values())
            .sum();
        let totals: Vec<(String, Decimal)> = self
            .statements
            .get(&(affiliate, month))
            .into_iter()
            .flatten()
            .map(|(kind, amount)| (kind.to_string(), *amount))
            .collect();
        let closing = opening + totals.iter().map(|(_, amount)| *amount).sum::<Decimal>();
        (opening, totals, closing)
    }

    fn version_at(&self, at: i64) -> &Version {
        self.versions
            .iter()
            .rev()
            .find(|(from, _)| *from <= at)
            .or(self.versions.first())
            .map(|(_, version)| version)
            .unwrap()
    }

    fn current(&self) -> &Version {
        &self.versions.last().unwrap().1
    }

    /// Whether the line is of the basis the rules in force at its moment
    /// reward.
    fn on_basis(&self, line: &Line) -> bool {
        let payments_basis = self.case.as_ref().is_some_and(|c| c.payments_basis);
        line.payment == (payments_basis != self.version_at(line.at).other_basis)
    }

    /// Whether the customer has billed lines (that count).
    fn billed(&self, customer: u8) -> bool {
        self.lines
            .iter()
            .any(|l| l.customer == customer && !l.excluded)
    }

    /// The affiliate's own rate for a line of `at`: a correction's, else
    /// bob's custom deal.
    fn own_rate(&self, affiliate: usize, at: i64) -> Option<i64> {
        self.rates
            .iter()
            .rev()
            .find(|(a, _, from)| *a == affiliate && *from <= at)
            .map(|(_, rate, _)| *rate)
            .or(self
                .case
                .as_ref()
                .and_then(|c| c.bob_rate)
                .filter(|_| affiliate == 1))
    }

    /// Whom a line earns commission for, if anyone: the customer's
    /// affiliate at the line's moment, unless the line is not of the basis
    /// in force at its moment, the
    /// affiliate was suspended by then or is the customer, the customer was
    /// staff then, or the line falls outside the term (of the rules in
    /// force at its moment).
    fn earner(&self, line: &Line) -> Option<usize> {
        if line.excluded {
            return None;
        }
        let customer = self.customers.get(&line.customer)?;
        let affiliate = customer.affiliate_at(line.at)?;
        let suspended = self.suspended_at[affiliate].is_some_and(|s| s <= line.at);
        let own = affiliate == 0 && line.customer == ALICE_OWN_CUSTOMER;
        let version = self.version_at(line.at);
        let in_term = match version.term {
            Term::Lifetime => true,
            Term::FirstOrder => match (&customer.first_order, &line.order) {
                (Some(first), Some(order)) => first == order,
                _ => customer.first_line.as_ref() == Some(&line.id),
            },
            Term::Months(months) => {
                let start = customer
                    .signup_at
                    .or(customer.first_line_at)
                    .unwrap_or(line.at);
                let end = chrono::DateTime::from_timestamp_micros(start)
                    .unwrap()
                    .checked_add_months(chrono::Months::new(months))
                    .unwrap();
                line.at < end.timestamp_micros()
            }
        };
        let forbidden = version.staff_forbidden && customer.staff_at(line.at);
        (self.on_basis(line) && !suspended && !own && !forbidden && in_term).then_some(affiliate)
    }

    /// The active referrals of `affiliate` in `month`: those with a line
    /// dated in it that earns the affiliate commission.
    fn active(&self, affiliate: usize, month: Month) -> usize {
        self.lines
            .iter()
            .filter(|l| l.month == month && self.earner(l) == Some(affiliate))
            .map(|l| l.customer)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Whether `affiliate` may get a signup of `customer` now.
    fn eligible(&self, affiliate: usize, customer: u8, now: i64) -> bool {
        self.suspended_at[affiliate].is_none_or(|s| s > now)
            && !(affiliate == 0 && customer == ALICE_OWN_CUSTOMER)
    }

    /// Whose click, inside the cookie window at `now`, a signup of
    /// `customer` by `visitor` goes to.
    fn by_click(&self, visitor: u8, customer: u8, now: i64) -> Option<usize> {
        let rules = self.version_at(now);
        let inside = self.clicks.get(&visitor)?.iter().filter(|(click_at, a)| {
            *click_at >= now - rules.cookie_days * DAY_US && self.eligible(*a, customer, now)
        });
        let chosen = if rules.first_click {
            inside.min_by_key(|(click_at, _)| *click_at)
        } else {
            inside.max_by_key(|(click_at, _)| *click_at)
        };
        chosen.map(|(_, a)| *a)
    }

    /// What closing `month` would post: every open line and refund dated
    /// up to it (every one, for `None`: the pending estimate).
    fn close(&self, month: Option<Month>) -> Vec<Posted> {
        let statement_month = month.unwrap_or_else(|| Month::new(9999, 12).unwrap());
        let taken = |m: Month| month.is_none_or(|month| m <= month);
        let mut lines: Vec<usize> = (0..self.lines.len())
            .filter(|i| self.lines[*i].open && taken(self.lines[*i].month))
            .collect();
        lines.sort_by_key(|i| (self.lines[*i].month, self.lines[*i].at, *i));
        let mut posted = Vec::new();
        let mut new_rewards: HashMap<usize, Reward> = HashMap::new();
        let mut bountied: BTreeSet<u8> = self.bountied.keys().copied().collect();
        for i in lines {
            let line = &self.lines[i];
            let Some(affiliate) = self.earner(line) else {
                continue;
            };
            // The rules in force at the line's moment; the affiliate's
            // own rate over the product's over the tier's over the default.
            let version = self.version_at(line.at);
            let own = self.own_rate(affiliate, line.at);
            let rate = match (own, version.domains_rate, version.tier_rate) {
                (Some(rate), _, _) => rate,
                (None, Some(domains), _) if line.domains => domains,
                (None, _, Some(tier)) if self.active(affiliate, line.month) >= TIER_MIN => {
                    tier.max(version.default_rate)
                }
                _ => version.default_rate,
            };
            let amount = percent(line.amount, rate);
            let late = month.is_some() && line.month < statement_month;
            if !amount.is_zero() {
                posted.push(Posted::Reward {
                    affiliate,
                    line: line.id.clone(),
                    rate,
                    amount,
                    late,
                });
            }
            if version.bounty && bountied.insert(line.customer) {
                posted.push(Posted::Bounty {
                    affiliate,
                    line: line.id.clone(),
                    late,
                });
            }
            new_rewards.insert(
                i,
                Reward {
                    affiliate,
                    rate,
                    amount,
                    refunded: Decimal::ZERO,
                    clawed: Decimal::ZERO,
                },
            );
        }
        let mut refunds: Vec<usize> = (0..self.refunds.len())
            .filter(|i| self.refunds[*i].open && taken(self.refunds[*i].month))
            .collect();
        refunds.sort_by_key(|i| (self.refunds[*i].month, self.refunds[*i].at, *i));
        for i in refunds {
            let refund = &self.refunds[i];
            let line = &self.lines[refund.line];
            // The line's reward as this close leaves it so far.
            let reward = match new_rewards.entry(refund.line) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => match &line.reward {
                    Some(reward) => e.insert(reward.clone()),
                    None => continue,
                },
            };
            // A refund takes back the same rate of what it refunds; the one
            // that completes the line's refunds takes back all that is left.
            let remaining = reward.amount - reward.clawed;
            let amount = if reward.refunded + refund.amount >= line.amount {
                remaining
            } else {
                percent(refund.amount, reward.rate).min(remaining)
            };
            reward.refunded += refund.amount;
            reward.clawed += amount;
            if amount > Decimal::ZERO {
                posted.push(Posted::ClawBack {
                    affiliate: reward.affiliate,
                    refund: refund.id.clone(),
                    amount,
                    late: month.is_some() && refund.month < statement_month,
                });
            }
        }
        posted
    }

    /// Closes `month`: posts what [`Model::close`] says and takes its lines and refunds.
    fn apply_close(&mut self, month: Month) -> Vec<Posted> {
        let posted = self.close(Some(month));
        let lines_by_id: HashMap<String, usize> = self
            .lines
            .iter()
            .enumerate()
            .map(|(i, l)| (l.id.clone(), i))
            .collect();
        // Each posting on its statement and its customer's commission; the
        // lines' rewards and paid bounties.
        for p in &posted {
            self.accounts[p.affiliate()].free += p.amount();
            let (kind, line) = match p {
                Posted::Reward { line, .. } => ("reward", lines_by_id[line]),
                Posted::Bounty { line, .. } => ("bounty", lines_by_id[line]),
                Posted::ClawBack { refund, .. } => {
                    let refund = self.refunds.iter().find(|r| r.id == *refund).unwrap();
                    ("clawback", refund.line)
                }
            };
            let customer = self.lines[line].customer;
            self.post(p.affiliate(), month, kind, p.amount());
            *self
                .commission
                .entry((p.affiliate(), customer))
                .or_default() += p.amount();
            match p {
                Posted::Reward {
                    affiliate,
                    rate,
                    amount,
                    ..
                } => {
                    self.lines[line].reward = Some(Reward {
                        affiliate: *affiliate,
                        rate: *rate,
                        amount: *amount,
                        refunded: Decimal::ZERO,
                        clawed: Decimal::ZERO,
                    });
                }
                Posted::Bounty { affiliate, .. } => {
                    self.bountied
                        .insert(customer, (*affiliate, self.lines[line].at));
                }
                Posted::ClawBack { .. } => {}
            }
        }
        // What the refunds took back from the lines' rewards.
        let clawed: HashMap<&str, Decimal> = posted
            .iter()
            .filter_map(|p| match p {
                Posted::ClawBack { refund, amount, .. } => Some((refund.as_str(), *amount)),
                _ => None,
            })
            .collect();
        for refund in self
            .refunds
            .iter_mut()
            .filter(|r| r.open && r.month <= month)
        {
            refund.open = false;
            if let Some(reward) = self.lines[refund.line].reward.as_mut() {
                reward.refunded += refund.amount;
                reward.clawed += clawed.get(refund.id.as_str()).copied().unwrap_or_default();
            }
        }
        for line in self.lines.iter_mut().filter(|l| l.open && l.month <= month) {
            line.open = false;
        }
        self.closed.insert(month);
        posted
    }

    /// A retroactive reassignment of `customer` from `from` on, the
    /// customer already moved: what was posted for the lines since (net of
    /// claw-backs), and the bounty paid with one of them, moves to whoever
    /// has the customer at the line's moment now (a correction may hold
    /// over the reassignment), who also gets what those lines' refunds claw
    /// back from now on; lines a close took while they earned nobody wait
    /// for the next close again.
    fn move_posted(&mut self, customer: u8, from: i64, now: i64) {
        let moved = self.customers.get(&customer).cloned().unwrap_or_default();
        let mut moves = Vec::new();
        for line in &mut self.lines {
            if line.customer != customer || line.at < from || line.excluded {
                continue;
            }
            match line.reward.as_mut() {
                Some(reward) => {
                    if let Some(to) = moved.affiliate_at(line.at) {
                        // Nothing left to move is no movement.
                        let net = reward.amount - reward.clawed;
                        if reward.affiliate != to && !net.is_zero() {
                            moves.push((reward.affiliate, to, net));
                        }
                        reward.affiliate = to;
                    }
                }
                None if !line.open => line.open = true,
                None => {}
            }
        }
        if let Some((owner, at)) = self.bountied.get_mut(&customer)
            && *at >= from
            && let Some(to) = moved.affiliate_at(*at)
            && *owner != to
        {
            moves.push((*owner, to, money(BOUNTY_CENTS)));
            *owner = to;
        }
        for refund in &mut self.refunds {
            let line = &self.lines[refund.line];
            if !refund.open
                && !refund.excluded
                && line.customer == customer
                && line.at >= from
                && line.reward.is_none()
            {
                refund.open = true;
            }
        }
        for (owner, to, net) in moves {
            self.accounts[owner].free -= net;
            self.accounts[to].free += net;
            self.post(owner, month_of(now), "adjustment", -net);
            self.post(to, month_of(now), "adjustment", net);
            *self.commission.entry((owner, customer)).or_default() -= net;
            *self.commission.entry((to, customer)).or_default() += net;
        }
    }

    /// Records what happened and folds it; what a close posted.
    fn happen(&mut self, fact: Fact) -> Vec<Posted> {
        self.fact_index = self.facts.len();
        let posted = if self.excluded.contains(&self.fact_index) {
            self.fold_excluded(&fact);
            Vec::new()
        } else {
            self.fold(&fact)
        };
        self.facts.push(fact);
        posted
    }

    /// An excluded fact never happened: the customer stays known (the
    /// ledger heard of it), an excluded line or refund stays on record
    /// (its id taken) but counts for nothing.
    fn fold_excluded(&mut self, fact: &Fact) {
        match fact {
            // The customer and the group the billing system reported stay.
            Fact::Signup {
                customer,
                at,
                staff,
                ..
            } => {
                let c = self.customers.entry(*customer).or_default();
                if c.groups.is_empty() {
                    c.groups.push((*at, *staff));
                }
            }
            Fact::Line(line) => {
                self.customers.entry(line.customer).or_default();
                self.lines.push(Line {
                    open: false,
                    excluded: true,
                    ..line.clone()
                });
            }
            Fact::Refund(refund) => self.refunds.push(Refund {
                open: false,
                excluded: true,
                ..refund.clone()
            }),
            // Never seen: a signup by the visitor is decided without it.
            Fact::Click { .. } => {}
            _ => unreachable!("only clicks, signups, lines and refunds are excluded"),
        }
    }

    /// Folds one fact. The corrections that hold over it are imposed on
    /// the customer it concerns after a signup, a line or a reassignment.
    fn fold(&mut self, fact: &Fact) -> Vec<Posted> {
        match fact {
            Fact::Click {
                visitor,
                affiliate,
                at,
            } => self
                .clicks
                .entry(*visitor)
                .or_default()
                .push((*at, *affiliate)),
            Fact::Signup {
                customer,
                affiliate,
                at,
                by_click,
                staff,
            } => {
                // By a click: the clicks (those not excluded), under the
                // rules as corrected, decide again.
                let affiliate = match by_click {
                    Some(v) => match self.by_click(*v, *customer, *at) {
                        Some(a) => a,
                        None => {
                            self.fold_excluded(fact);
                            self.impose(*customer);
                            return Vec::new();
                        }
                    },
                    _ => *affiliate,
                };
                let c = self.customers.entry(*customer).or_default();
                c.attribution = vec![(None, affiliate)];
                c.signup_at = Some(*at);
                if c.groups.is_empty() {
                    c.groups.push((*at, *staff));
                }
                self.impose(*customer);
            }
            Fact::Line(line) => {
                let known = self.customers.entry(line.customer).or_default();
                if known.first_line.is_none() {
                    known.first_line_at = Some(line.at);
                    known.first_line = Some(line.id.clone());
                    known.first_order = line.order.clone();
                }
                self.lines.push(line.clone());
                self.impose(line.customer);
            }
            Fact::Refund(refund) => {
                self.lines[refund.line].refunded += refund.amount;
                self.refunds.push(refund.clone());
            }
            Fact::Close(month) => return self.apply_close(*month),
            Fact::Group {
                customer,
                at,
                staff,
            } => {
                let c = self.customers.entry(*customer).or_default();
                c.groups.push((*at, *staff));
            }
            Fact::CloseCustomer(customer) => {
                self.customers.entry(*customer).or_default().closed = true;
            }
            Fact::Suspend { affiliate, at } => self.suspended_at[*affiliate] = Some(*at),
            Fact::Rules { at, version } => {
                self.versions.push((*at, version.clone()));
                let k = self.fact_index;
                for (fix, _) in self
                    .rule_layers
                    .clone()
                    .into_iter()
                    .filter(|(_, until)| until.is_none_or(|until| k < until))
                {
                    self.impose_rules(fix);
                }
            }
            Fact::Reassign {
                customer,
                affiliate,
                from,
                retroactive,
                now,
            } => {
                let c = self.customers.entry(*customer).or_default();
                move_to(&mut c.attribution, *from, *affiliate);
                self.impose(*customer);
                if *retroactive {
                    self.move_posted(*customer, from.unwrap_or(i64::MIN), *now);
                }
            }
        }
        Vec::new()
    }

    /// The rules from `from` on are `version`; or every version has the
    /// click model.
    fn impose_rules(&mut self, fix: RuleFix) {
        match fix {
            RuleFix::Version(from, version) => {
                self.versions.retain(|(at, _)| *at < from);
                self.versions.push((from, version));
            }
            RuleFix::ClickModel(first_click, cookie_days) => {
                for (_, version) in &mut self.versions {
                    version.first_click = first_click.unwrap_or(version.first_click);
                    version.cookie_days = cookie_days.unwrap_or(version.cookie_days);
                }
            }
        }
    }

    /// The corrections of `customer` that hold over the fact being folded.
    fn impose(&mut self, customer: u8) {
        let k = self.fact_index;
        let holding: Vec<Layer> = self
            .layers
            .iter()
            .filter(|l| l.customer == customer && l.until.is_none_or(|until| k < until))
            .cloned()
            .collect();
        for l in holding {
            let c = self.customers.entry(customer).or_default();
            move_to(&mut c.attribution, l.from, l.affiliate);
        }
    }

    /// The same history folded again from the start with `layers` holding:
    /// the world a replay computes.
    fn replayed(
        &self,
        layers: Vec<Layer>,
        excluded: BTreeSet<usize>,
        rates: Vec<(usize, i64, i64)>,
        rule_layers: Vec<(RuleFix, Option<usize>)>,
    ) -> Model {
        let mut world = Model {
            case: self.case.clone(),
            versions: vec![self.initial.clone()],
            initial: self.initial.clone(),
            layers,
            excluded,
            rates,
            rule_layers,
            ..Model::default()
        };
        for (fix, _) in world.rule_layers.clone() {
            world.impose_rules(fix);
        }
        // Every correction is installed with the program.
        for l in world.layers.clone() {
            let c = world.customers.entry(l.customer).or_default();
            move_to(&mut c.attribution, l.from, l.affiliate);
        }
        for fact in &self.facts {
            world.happen(fact.clone());
        }
        world
    }

    /// The months the auto-closer owes at `now`, oldest first: each month
    /// from the program's definition on whose close moment (its day of the
    /// month after, at midnight) has come, after the last month closed.
    fn auto_close_due(&self, now: i64) -> Vec<Month> {
        let Some(day) = self.case.as_ref().and_then(|c| c.auto_close_day) else {
            return Vec::new();
        };
        let since = self.initial.0;
        let last_closed = self.closed.iter().next_back().copied();
        let mut due = Vec::new();
        let mut month = month_of(since).previous();
        while month < month_of(now) {
            let moment = month.next().day_start_in(day as u8, ZONE.get()).micros();
            if moment >= since && moment <= now && last_closed.is_none_or(|last| month > last) {
                due.push(month);
            }
            month = month.next();
        }
        due
    }

    fn pending(&self, affiliate: usize) -> Decimal {
        self.close(None)
            .iter()
            .filter(|p| p.affiliate() == affiliate)
            .map(Posted::amount)
            .sum()
    }

    /// Balance fields, as the API names them.
    fn balance(&self, affiliate: usize) -> Vec<(&'static str, Decimal)> {
        let a = &self.accounts[affiliate];
        let threshold = money(self.current().threshold_cents);
        vec![
            ("pending", self.pending(affiliate)),
            ("earned", a.earned()),
            ("threshold", threshold),
            ("to_threshold", (threshold - a.earned()).max(Decimal::ZERO)),
            ("available", a.available(threshold)),
            ("in_withdrawal", a.in_withdrawal),
            ("withdrawn_total", a.paid_out),
            ("credited_total", a.credited),
            ("lifetime_earned", a.earned() + a.paid_out + a.credited),
        ]
    }
}

/// An affiliate's balance (by field), referral list and the statement of
/// a month (opening, totals by kind, closing), as the model has them after
/// a step.
type Lists = (
    Vec<(&'static str, Decimal)>,
    Vec<(String, &'static str, Decimal, Decimal)>,
    (Month, Statement),
);
type Statement = (Decimal, Vec<(String, Decimal)>, Decimal);

/// A program's statement of `affiliate` and `month` (as of a log position).
fn statement(
    t: &TestLedger,
    program: &ProgramId,
    affiliate: &str,
    month: Month,
    as_of: Option<AsOf>,
) -> Statement {
    let d = |s: &str| s.parse::<Decimal>().unwrap();
    let s = t.ledger().statement(program, &aff(affiliate), month, as_of);
    let s = s.unwrap().unwrap();
    (
        d(&s.opening_balance),
        s.totals.iter().map(|(k, v)| (k.clone(), d(v))).collect(),
        d(&s.closing_balance),
    )
}

/// The ledger and the model agree on every balance (the twin's too), on
/// every referral list, and on this and last month's statements.
fn agree(t: &TestLedger, twin: &ProgramId, m: &Model, now: i64, context: &str) {
    for (a, name) in AFFILIATES.iter().enumerate() {
        let served = served_balance(&t.balance(name));
        assert_eq!(served, m.balance(a), "{name} after {context}");
        let twins = t.ledger().balance(twin, &aff(name), None).unwrap().unwrap();
        assert_eq!(
            served_balance(&twins),
            m.balance(a),
            "twin's {name} after {context}"
        );
        let listed = referrals(t, &t.program, name, None);
        assert_eq!(listed, m.referrals(a), "{name}'s referrals after {context}");
        // This month's statement and last month's: the months money
        // moves in (closes post in the month they close).
        for month in [month_of(now), month_of(now).previous()] {
            let served = statement(t, &t.program, name, month, None);
            assert_eq!(
                served,
                m.statement(a, month),
                "{name}'s {month} after {context}"
            );
        }
    }
}

/// Moves a customer to `affiliate` from `from` on (`None`: for all time).
fn move_to(attribution: &mut Vec<(Option<i64>, usize)>, from: Option<i64>, affiliate: usize) {
    match from {
        None => *attribution = vec![(None, affiliate)],
        Some(from) => {
            attribution.retain(|(start, _)| start.is_none_or(|start| start < from));
            attribution.push((Some(from), affiliate));
        }
    }
}

/// An affiliate's referral list as the ledger serves it, by id.
/// A program's referral list of `affiliate` (as of a log position).
fn referrals(
    t: &TestLedger,
    program: &ProgramId,
    affiliate: &str,
    as_of: Option<AsOf>,
) -> Vec<(String, &'static str, Decimal, Decimal)> {
    let d = |s: &str| s.parse::<Decimal>().unwrap();
    let query = first_hundred_referrals();
    let page = t
        .ledger()
        .referrals(program, &aff(affiliate), &query, as_of);
    let mut list: Vec<(String, &'static str, Decimal, Decimal)> = page
        .unwrap()
        .unwrap()
        .referrals
        .into_iter()
        .map(|r| {
            let id = r.customer_id.to_string();
            (id, r.status, d(&r.billed), d(&r.commission))
        })
        .collect();
    list.sort();
    list
}

fn served_balance(b: &commission_ledger::projections::Balance) -> Vec<(&'static str, Decimal)> {
    let d = |s: &str| s.parse::<Decimal>().unwrap();
    vec![
        ("pending", d(&b.pending)),
        ("earned", d(&b.earned)),
        ("threshold", d(&b.threshold)),
        ("to_threshold", d(&b.to_threshold)),
        ("available", d(&b.available)),
        ("in_withdrawal", d(&b.in_withdrawal)),
        ("withdrawn_total", d(&b.withdrawn_total)),
        ("credited_total", d(&b.credited_total)),
        ("lifetime_earned", d(&b.lifetime_earned)),
    ]
}

/// Each program refuses its what-if replay of `overrides` as `refusal`
/// expects.
fn both_refuse(
    t: &TestLedger,
    twin: &ProgramId,
    overrides: [Overrides; 2],
    context: &str,
    refusal: fn(&Rejection) -> bool,
) {
    for (program, o) in [&t.program, twin].into_iter().zip(overrides) {
        let refused = t.ledger().what_if(program, o, None);
        assert!(
            matches!(&refused, Err(SubmitError::Rejected(r)) if refusal(r)),
            "{program}: {context}: {refused:?}"
        );
    }
}

/// What became of a command, in words both sides can produce.
fn outcome(result: &Result<commission_ledger::ledger::Receipt, SubmitError>) -> String {
    match result {
        Err(SubmitError::Rejected(r)) => {
            let debug = format!("{r:?}");
            let name: String = debug.chars().take_while(|c| c.is_alphanumeric()).collect();
            format!("refused {name}")
        }
        Err(e) => panic!("{e}"),
        Ok(receipt) => match &receipt.noop {
            Some(Noop::SignupIgnored) => "ignored".into(),
            Some(Noop::AlreadyAttributed { .. }) => "already attributed".into(),
            Some(Noop::MonthAlreadyClosed(_)) => "already closed".into(),
            Some(other) => format!("no-op {other:?}"),
            None => {
                let mut words = Vec::new();
                for r in &receipt.events {
                    match &r.event {
                        Event::SignupAttributed(e) => words.push(format!(
                            "attributed to {} via {:?}",
                            e.affiliate_id.as_str(),
                            e.via
                        )),
                        Event::MonthClosed(e) => words.push(format!(
                            "closed {} with {} rewards of {}",
                            e.month, e.rewards, e.total
                        )),
                        _ => {}
                    }
                }
                if words.is_empty() {
                    "appended".into()
                } else {
                    words.join("; ")
                }
            }
        },
    }
}

fn posted_by_ledger(receipt: &commission_ledger::ledger::Receipt) -> Vec<Posted> {
    let index = |a: &AffiliateId| AFFILIATES.iter().position(|x| *x == a.as_str()).unwrap();
    receipt
        .events
        .iter()
        .filter_map(|r| match &r.event {
            Event::RewardAccrued(e) if e.kind == RewardKind::Reward => Some(Posted::Reward {
                affiliate: index(&e.affiliate_id),
                line: e.line.as_str().to_string(),
                rate: e.rate.percent().try_into().unwrap(),
                amount: e.amount,
                late: e.late,
            }),
            Event::RewardAccrued(e) => Some(Posted::Bounty {
                affiliate: index(&e.affiliate_id),
                line: e.line.as_str().to_string(),
                late: e.late,
            }),
            Event::RewardClawedBack(e) => Some(Posted::ClawBack {
                affiliate: index(&e.affiliate_id),
                refund: e.refund.as_str().to_string(),
                amount: e.amount,
                late: e.late,
            }),
            _ => None,
        })
        .collect()
}

/// Runs `ops` through the ledger and the model, asserting they agree after
/// each; then replays the whole history without overrides, which must
/// decide every close as it was decided (no money moves).
fn run(case: &Case, ops: &[Op]) {
    MINOR_UNIT.set(case.currency.1);
    ZONE.set(case.zone);
    let mut t = TestLedger::new_at("model", "2026-01-01T00:00:00Z");
    t.define(rules("model", program(case, &first_version(case))));
    let own = format!("c-{ALICE_OWN_CUSTOMER}");
    let codes: Vec<String> = AFFILIATES
        .iter()
        .map(|a| {
            let own = (*a == "alice").then_some(own.as_str());
            let rate = case.bob_rate.filter(|_| *a == "bob").map(|r| r.to_string());
            t.enroll_with(a, own, None, rate.as_deref()).referral_code
        })
        .collect();
    // A twin program on the same server gets every command too, with the
    // same customer, line and refund ids: programs share nothing, so it
    // must answer and count exactly as the first (and the model) do.
    let twin = program_id("twin");
    let on_twin = |command: Command| {
        let submission = Submission::new(Some(&twin), "model", command);
        t.ledger().submit_blocking(submission).unwrap().events
    };
    on_twin(Command::DefineProgram {
        rules: Box::new(rules("twin", program(case, &first_version(case)))),
        reason: None,
    });
    let twin_codes: Vec<String> = AFFILIATES
        .iter()
        .map(|a| {
            let own = (*a == "alice").then(|| cust(&own));
            let rate = case.bob_rate.filter(|_| *a == "bob");
            let enroll = Command::EnrollAffiliate {
                affiliate_id: aff(a),
                customer_id: own,
                group: None,
                rate: rate.map(|r| commission_ledger::money::Rate::parse(&r.to_string()).unwrap()),
            };
            match &on_twin(enroll)[0].event {
                Event::AffiliateEnrolled(e) => e.referral_code.clone(),
                other => panic!("{other:?}"),
            }
        })
        .collect();
    let twin_balance = |t: &TestLedger, name: &str| {
        let balance = t
            .ledger()
            .balance(&twin, &aff(name), None)
            .unwrap()
            .unwrap();
        served_balance(&balance)
    };
    let mut m = Model {
        case: Some(case.clone()),
        versions: vec![(ts("2026-01-01T00:00:00Z").micros(), first_version(case))],
        initial: (ts("2026-01-01T00:00:00Z").micros(), first_version(case)),
        ..Model::default()
    };
    let mut withdrawal_ids = Vec::new();
    let mut twin_withdrawal_ids = Vec::new();
    // The seq of each line, refund and signup fact, in each program.
    let mut seqs: HashMap<usize, (Seq, Seq)> = HashMap::new();
    let mut now = ts("2026-01-01T12:00:00Z").micros();
    // After each step: the log's head, and every affiliate's balance,
    // referral list and statement of the step's month.
    let mut past: Vec<(Seq, Vec<Lists>)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let month = month_of(now);
        let lists = (0..AFFILIATES.len())
            .map(|a| (m.balance(a), m.referrals(a), (month, m.statement(a, month))));
        past.push((t.head(), lists.collect()));
        now += DAY_US * 3 / 2;
        let facts_before = m.facts.len();
        let at = Timestamp::from_micros(now);
        // What a close posts, by the model.
        let mut posted = Vec::new();
        let customer = |c: u8| cust(&format!("c-{c}"));
        // The command, the moment it happened, and what the model expects of it.
        let (command, at, expected): (Command, Timestamp, String) = match op {
            Op::Wait { days } => {
                now += i64::from(*days) * DAY_US;
                continue;
            }
            Op::PastRead { back } => {
                let (seq, lists) = &past[past.len() - 1 - usize::from(*back) % past.len()];
                let as_of = Some(AsOf::Seq(*seq));
                for (name, (balance, listed, (month, stated))) in AFFILIATES.iter().zip(lists) {
                    for program in [&t.program, &twin] {
                        let served = t.ledger().balance(program, &aff(name), as_of);
                        let served = served_balance(&served.unwrap().unwrap());
                        let context = format!("{program}: {name} as of seq {seq}, op {i}");
                        assert_eq!(&served, balance, "{context}");
                        assert_eq!(&referrals(&t, program, name, as_of), listed, "{context}");
                        let served = statement(&t, program, name, *month, as_of);
                        assert_eq!(&served, stated, "{context}: {month}");
                    }
                }
                continue;
            }
            Op::AutoClose => {
                t.clock.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let mut closed: HashMap<ProgramId, Vec<(Month, Vec<Posted>)>> = HashMap::new();
                for (program, month, result) in runtime.block_on(t.ledger().auto_close()) {
                    let posted = posted_by_ledger(&result.unwrap());
                    closed.entry(program).or_default().push((month, posted));
                }
                let expected: Vec<(Month, Vec<Posted>)> = m
                    .auto_close_due(now)
                    .into_iter()
                    .map(|month| (month, m.happen(Fact::Close(month))))
                    .collect();
                for program in [&t.program, &twin] {
                    let closed = closed.remove(program).unwrap_or_default();
                    assert_eq!(closed, expected, "{program}: op {i} {op:?}");
                }
                for (a, name) in AFFILIATES.iter().enumerate() {
                    let served = served_balance(&t.balance(name));
                    assert_eq!(served, m.balance(a), "{name} after auto-close at op {i}");
                    assert_eq!(twin_balance(&t, name), m.balance(a), "twin's {name}");
                }
                continue;
            }
            Op::Restart { rebuild } => {
                if *rebuild {
                    t.rebuild();
                } else {
                    t.reopen();
                }
                for (a, name) in AFFILIATES.iter().enumerate() {
                    let served = served_balance(&t.balance(name));
                    assert_eq!(served, m.balance(a), "{name} after a restart at op {i}");
                    assert_eq!(twin_balance(&t, name), m.balance(a), "twin's {name}");
                }
                continue;
            }
            Op::Replay {
                correction,
                apply,
                months,
            } => {
                t.clock.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                let context = format!("op {i} {op:?}");
                // The correction, for the model and for each program (the
                // twin's seqs are its own).
                let mut layers = m.layers.clone();
                let mut excluded = m.excluded.clone();
                let mut rates = m.rates.clone();
                let mut rule_layers = m.rule_layers.clone();
                let mut rule_layer = None;
                let mut overrides = [Overrides::default(), Overrides::default()];
                let mut layer = None;
                let mut rate = None;
                let mut exclude = None;
                let fact_of = |wanted: &dyn Fn(&Fact) -> bool, n: usize| {
                    let facts: Vec<usize> = (0..m.facts.len())
                        .filter(|k| wanted(&m.facts[*k]))
                        .collect();
                    (!facts.is_empty()).then(|| facts[n % facts.len()])
                };
                match correction {
                    Correction::Attribution {
                        customer: c,
                        affiliate,
                        days_back,
                    } => {
                        let from = days_back.map(|days| now - i64::from(days) * DAY_US);
                        for o in &mut overrides {
                            o.attribution = vec![AttributionOverride {
                                customer_id: customer(*c),
                                affiliate_id: aff(AFFILIATES[*affiliate]),
                                from: from.map(Timestamp::from_micros),
                            }];
                        }
                        if *affiliate == 0 && *c == ALICE_OWN_CUSTOMER {
                            both_refuse(&t, &twin, overrides, &context, |r| {
                                matches!(r, Rejection::SelfReferral(_))
                            });
                            continue;
                        }
                        let l = Layer {
                            customer: *c,
                            affiliate: *affiliate,
                            from,
                            until: None,
                        };
                        layers.push(l.clone());
                        layer = Some(l);
                    }
                    Correction::Rate {
                        affiliate,
                        rate: r,
                        days_back,
                    } => {
                        let from = now - i64::from(*days_back) * DAY_US;
                        for o in &mut overrides {
                            o.affiliate_rates = vec![AffiliateRateOverride {
                                affiliate_id: aff(AFFILIATES[*affiliate]),
                                rate: commission_ledger::money::Rate::parse(&r.to_string())
                                    .unwrap(),
                                from: Timestamp::from_micros(from),
                            }];
                        }
                        rates.push((*affiliate, *r, from));
                        rate = Some((*affiliate, *r, from));
                    }
                    Correction::Rules { version, days_back } => {
                        let from = now - i64::from(*days_back) * DAY_US;
                        for (o, id) in overrides.iter_mut().zip(["model", "twin"]) {
                            o.rules = Some(RulesOverride {
                                from: Timestamp::from_micros(from),
                                rules: rules(id, program(case, version)),
                            });
                        }
                        rule_layers.push((RuleFix::Version(from, version.clone()), None));
                        rule_layer = Some(RuleFix::Version(from, version.clone()));
                    }
                    Correction::ClickModel {
                        first_click,
                        cookie_days,
                    } => {
                        for o in &mut overrides {
                            o.model = Some(ModelOverride {
                                attribution: first_click.map(|first| {
                                    if first {
                                        Attribution::FirstClick
                                    } else {
                                        Attribution::LastClick
                                    }
                                }),
                                cookie_days: cookie_days.map(|d| d as u32),
                            });
                        }
                        let fix = RuleFix::ClickModel(*first_click, *cookie_days);
                        rule_layers.push((fix.clone(), None));
                        rule_layer = Some(fix);
                    }
                    Correction::ExcludeLine(n)
                    | Correction::ExcludeRefund(n)
                    | Correction::ExcludeSignup(n)
                    | Correction::ExcludeClick(n) => {
                        let wanted = |f: &Fact| {
                            matches!(
                                (correction, f),
                                (Correction::ExcludeLine(_), Fact::Line(_))
                                    | (Correction::ExcludeRefund(_), Fact::Refund(_))
                                    | (Correction::ExcludeSignup(_), Fact::Signup { .. })
                                    | (Correction::ExcludeClick(_), Fact::Click { .. })
                            )
                        };
                        let Some(k) = fact_of(&wanted, *n) else {
                            continue;
                        };
                        let (main, twins) = seqs[&k];
                        overrides[0].exclude = vec![main];
                        overrides[1].exclude = vec![twins];
                        if m.excluded.contains(&k) {
                            // An applied replay excluded it already.
                            both_refuse(&t, &twin, overrides, &context, |r| {
                                matches!(r, Rejection::Invalid(_))
                            });
                            continue;
                        }
                        excluded.insert(k);
                        exclude = Some(k);
                    }
                }
                // The same history with the correction: what it changes,
                // per affiliate and statement month.
                let world = m.replayed(layers, excluded, rates, rule_layers);
                let mut full: BTreeMap<(usize, Month), Decimal> = BTreeMap::new();
                for key in world.posted.keys().chain(m.posted.keys()) {
                    let after = world.posted.get(key).copied().unwrap_or_default();
                    let before = m.posted.get(key).copied().unwrap_or_default();
                    if after != before {
                        full.insert(*key, after - before);
                    }
                }
                // From a month the diff has (else back from now). Applied,
                // a restriction of a diff of nothing would end the case for
                // nothing: that apply is whole.
                let changed: Vec<Month> = full
                    .keys()
                    .map(|(_, month)| *month)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let months = months.filter(|_| !(*apply && changed.is_empty()));
                let months = months.map(|(pick, span)| {
                    let from = match changed.len() {
                        0 => (0..pick).fold(month_of(now), |m, _| m.previous()),
                        n => changed[usize::from(pick) % n],
                    };
                    let to = (0..span).fold(from, |m, _| m.next());
                    MonthRange { from, to }
                });
                let in_range =
                    |month: &Month| months.is_none_or(|r| r.from <= *month && *month <= r.to);
                let (expected, left_out): (BTreeMap<_, _>, BTreeMap<_, _>) = full
                    .into_iter()
                    .partition(|((_, month), _)| in_range(month));
                let index =
                    |a: &AffiliateId| AFFILIATES.iter().position(|x| *x == a.as_str()).unwrap();
                let mut changes = Vec::new();
                for (program, o) in [&t.program, &twin].into_iter().zip(overrides) {
                    let replay = t.ledger().what_if(program, o, months).unwrap();
                    let served: BTreeMap<(usize, Month), Decimal> = replay
                        .diff
                        .rows
                        .iter()
                        .map(|r| ((index(&r.affiliate_id), r.month), r.change.parse().unwrap()))
                        .filter(|(_, change): &(_, Decimal)| !change.is_zero())
                        .collect();
                    assert_eq!(served, expected, "{program}: the diff of {context}");
                    if *apply {
                        let submission = t
                            .ledger()
                            .apply_replay_submission(program, &replay.replay_id, "ticket", "model")
                            .unwrap()
                            .unwrap();
                        t.ledger().submit_blocking(submission.at(at)).unwrap();
                        changes = replay.diff.changes;
                    }
                }
                if *apply && months.is_some() {
                    // Only the lines, refunds and bounties whose money lies
                    // in the months are corrected: the model does not follow
                    // such a world further. The money moved is the diff's,
                    // and replaying again finds exactly the rest of it.
                    for change in &changes {
                        m.accounts[index(&change.affiliate_id)].free += change.amount;
                    }
                    m.versions = world.versions;
                    let settled = |t: &TestLedger, when: &str| {
                        for (a, name) in AFFILIATES.iter().enumerate() {
                            let mut expected = m.balance(a);
                            expected.retain(|(field, _)| *field != "pending");
                            for served in [served_balance(&t.balance(name)), twin_balance(t, name)]
                            {
                                let mut served = served;
                                served.retain(|(field, _)| *field != "pending");
                                assert_eq!(served, expected, "{name} {when} {context}");
                            }
                        }
                        for program in [&t.program, &twin] {
                            let again = t.ledger().what_if(program, Overrides::default(), None);
                            let rows: BTreeMap<(usize, Month), Decimal> = again
                                .unwrap()
                                .diff
                                .rows
                                .iter()
                                .map(|r| {
                                    let change: Decimal = r.change.parse().unwrap();
                                    ((index(&r.affiliate_id), r.month), change)
                                })
                                .filter(|(_, change)| !change.is_zero())
                                .collect();
                            assert_eq!(
                                rows, left_out,
                                "{program}: replayed again {when} {context}"
                            );
                        }
                    };
                    settled(&t, "after");
                    t.rebuild();
                    settled(&t, "after a rebuild, after");
                    return;
                }
                if *apply {
                    // The ledger is the corrected world now, and the money
                    // moved by adjustments in this month's statement.
                    for change in &changes {
                        let a = index(&change.affiliate_id);
                        m.accounts[a].free += change.amount;
                        *m.statements
                            .entry((a, month_of(now)))
                            .or_default()
                            .entry("adjustment")
                            .or_default() += change.amount;
                    }
                    if let Some(l) = layer {
                        m.layers.push(Layer {
                            until: Some(m.facts.len()),
                            ..l
                        });
                    }
                    m.rates.extend(rate);
                    if let Some(fix) = rule_layer {
                        m.rule_layers.push((fix, Some(m.facts.len())));
                    }
                    m.versions = world.versions;
                    m.excluded.extend(exclude);
                    m.posted = world.posted;
                    m.commission = world.commission;
                    m.lines = world.lines;
                    m.refunds = world.refunds;
                    m.customers = world.customers;
                    m.bountied = world.bountied;
                    m.clicks = world.clicks;
                    agree(&t, &twin, &m, now, &context);
                }
                continue;
            }
            Op::Click { affiliate, visitor } => {
                let expected = if m.suspended_at[*affiliate].is_some() {
                    "refused AffiliateSuspended"
                } else {
                    m.happen(Fact::Click {
                        visitor: *visitor,
                        affiliate: *affiliate,
                        at: now,
                    });
                    "appended"
                };
                (
                    Command::RecordClick {
                        referral_code: codes[*affiliate].clone(),
                        visitor: Some(format!("v-{visitor}").into()),
                        creative: None,
                        referrer: None,
                        landing: None,
                        client_hash: None,
                    },
                    at,
                    expected.into(),
                )
            }
            Op::Signup {
                customer: c,
                visitor,
                promo,
                staff,
            } => {
                // Once someone's referral (by a signup or an operator), a
                // customer stays theirs until an operator moves them.
                let attributed = m
                    .customers
                    .get(c)
                    .is_some_and(|c| !c.attribution.is_empty());
                let expected = if attributed {
                    "already attributed".to_string()
                } else {
                    let by_promo = promo
                        .filter(|a| !m.billed(*c) && m.eligible(*a, *c, now))
                        .map(|a| (a, "PromoCode"));
                    let by_click = || m.by_click(*visitor, *c, now).map(|a| (a, "Click"));
                    match by_promo.or_else(by_click) {
                        Some((a, via)) => {
                            m.happen(Fact::Signup {
                                customer: *c,
                                affiliate: a,
                                at: now,
                                by_click: (via == "Click").then_some(*visitor),
                                staff: *staff,
                            });
                            format!("attributed to {} via {via}", AFFILIATES[a])
                        }
                        None => "ignored".into(),
                    }
                };
                (
                    Command::Signup {
                        customer_id: customer(*c),
                        visitor: Some(format!("v-{visitor}").into()),
                        promo_code: promo.map(|a| format!("HOST-{}", AFFILIATES[a])),
                        group: staff.then(|| "staff".into()),
                    },
                    at,
                    expected,
                )
            }
            Op::Line {
                other_kind,
                customer: c,
                cents,
                domains,
                order,
                days_back,
            } => {
                let order = order.map(|o| format!("o-{c}-{o}"));
                let line_at = now - i64::from(days_back.unwrap_or(0)) * DAY_US;
                let id = format!("l-{i}");
                let payment = case.payments_basis != *other_kind;
                m.happen(Fact::Line(Line {
                    id: id.clone(),
                    payment,
                    order: order.clone(),
                    customer: *c,
                    amount: money(i64::from(*cents)),
                    domains: *domains,
                    at: line_at,
                    month: month_of(line_at),
                    open: true,
                    refunded: Decimal::ZERO,
                    reward: None,
                    excluded: false,
                }));
                (
                    Command::RecordBasisLine {
                        kind: if payment {
                            LineKind::Payment
                        } else {
                            LineKind::Expense
                        },
                        id: line(&id),
                        customer_id: customer(*c),
                        amount: money(i64::from(*cents)).to_string(),
                        currency: case.currency.0.into(),
                        product: domains.then(|| "domains".to_string()),
                        order_id: order,
                    },
                    Timestamp::from_micros(line_at),
                    "appended".into(),
                )
            }
            Op::Refund { line: l, size } => {
                // Mostly a line of a customer someone referred: one that earns.
                let referred: Vec<usize> = (0..m.lines.len())
                    .filter(|i| m.earner(&m.lines[*i]).is_some())
                    .collect();
                let l = match (referred.len(), m.lines.len()) {
                    (_, 0) => continue,
                    (0, all) => *l % all,
                    (some, _) if *l % 4 != 0 => referred[*l % some],
                    (_, all) => *l % all,
                };
                let refunded = &m.lines[l];
                let left = refunded.amount - refunded.refunded;
                let amount = match size {
                    Size::Cents(c) => money(i64::from(*c)),
                    Size::Percent(p) => (left * Decimal::from(*p) / Decimal::ONE_HUNDRED)
                        .round_dp_with_strategy(MINOR_UNIT.get(), RoundingStrategy::ToZero)
                        .max(money(1)),
                    Size::Rest => left.max(money(1)),
                };
                let command = Command::RecordRefund {
                    id: line(&format!("r-{i}")),
                    customer_id: customer(refunded.customer),
                    refunds: line(&refunded.id),
                    amount: amount.to_string(),
                    currency: case.currency.0.into(),
                };
                let expected = if amount > left {
                    "refused RefundExceedsLine".to_string()
                } else {
                    m.happen(Fact::Refund(Refund {
                        id: format!("r-{i}"),
                        line: l,
                        amount,
                        at: now,
                        month: month_of(now),
                        open: true,
                        excluded: false,
                    }));
                    "appended".into()
                };
                (command, at, expected)
            }
            Op::Close => {
                let month = month_of(now).previous();
                let expected = if m.closed.contains(&month) {
                    "already closed".to_string()
                } else {
                    posted = m.happen(Fact::Close(month));
                    let total: Decimal = posted.iter().map(Posted::amount).sum();
                    let rewards = posted
                        .iter()
                        .filter(|p| !matches!(p, Posted::ClawBack { .. }))
                        .count();
                    format!(
                        "closed {month} with {rewards} rewards of {total:.minor$}",
                        minor = MINOR_UNIT.get() as usize
                    )
                };
                (Command::CloseMonth { month }, at, expected)
            }
            Op::Withdraw { affiliate, cents } => {
                let amount = money(i64::from(*cents));
                let threshold = money(m.current().threshold_cents);
                let a = &mut m.accounts[*affiliate];
                let expected = if a.earned() < Decimal::ZERO {
                    "refused NegativeEarned"
                } else if a.earned() < threshold {
                    "refused BelowThreshold"
                } else if amount > a.available(threshold) {
                    "refused InsufficientBalance"
                } else {
                    a.free -= amount;
                    a.in_withdrawal += amount;
                    m.withdrawals.push((*affiliate, amount, true));
                    "appended"
                };
                (
                    Command::RequestWithdrawal {
                        affiliate_id: aff(AFFILIATES[*affiliate]),
                        amount: amount.to_string(),
                    },
                    at,
                    expected.into(),
                )
            }
            Op::Settle { withdrawal, pay } => {
                let Some(&(affiliate, amount, requested)) = m.withdrawals.get(*withdrawal) else {
                    continue;
                };
                let expected = if requested {
                    let a = &mut m.accounts[affiliate];
                    a.in_withdrawal -= amount;
                    if *pay {
                        a.paid_out += amount;
                        m.post(affiliate, month_of(now), "withdrawal", -amount);
                    } else {
                        a.free += amount;
                    }
                    m.withdrawals[*withdrawal].2 = false;
                    "appended"
                } else {
                    "refused WithdrawalSettled"
                };
                let withdrawal_id = withdrawal_ids[*withdrawal];
                let command = if *pay {
                    Command::PayWithdrawal {
                        withdrawal_id,
                        reference: "wire".into(),
                    }
                } else {
                    Command::RejectWithdrawal {
                        withdrawal_id,
                        reason: "details wrong".into(),
                    }
                };
                (command, at, expected.into())
            }
            Op::CloseCustomer { customer: c } => {
                m.happen(Fact::CloseCustomer(*c));
                (
                    Command::CloseCustomer {
                        customer_id: customer(*c),
                        reason: Some("cancelled".into()),
                    },
                    at,
                    "appended".into(),
                )
            }
            Op::Group { customer: c, staff } => {
                m.happen(Fact::Group {
                    customer: *c,
                    at: now,
                    staff: *staff,
                });
                (
                    Command::ChangeCustomerGroup {
                        customer_id: customer(*c),
                        group: if *staff { "staff" } else { "default" }.into(),
                    },
                    at,
                    "appended".into(),
                )
            }
            Op::ChangeRules { version } => {
                m.happen(Fact::Rules {
                    at: now,
                    version: version.clone(),
                });
                (
                    Command::DefineProgram {
                        rules: Box::new(rules("model", program(case, version))),
                        reason: Some("new terms".into()),
                    },
                    at,
                    "appended".into(),
                )
            }
            Op::Suspend { affiliate } => {
                let expected = if m.suspended_at[*affiliate].is_some() {
                    "refused AffiliateSuspended"
                } else {
                    m.happen(Fact::Suspend {
                        affiliate: *affiliate,
                        at: now,
                    });
                    "appended"
                };
                (
                    Command::SuspendAffiliate {
                        affiliate_id: aff(AFFILIATES[*affiliate]),
                        reason: "fraud".into(),
                    },
                    at,
                    expected.into(),
                )
            }
            Op::Reassign {
                customer: c,
                affiliate,
                days_back,
                retroactive,
            } => {
                let from = days_back.map(|days| now - i64::from(days) * DAY_US);
                let expected = if *affiliate == 0 && *c == ALICE_OWN_CUSTOMER {
                    "refused SelfReferral"
                } else if m.customers.contains_key(c) {
                    m.happen(Fact::Reassign {
                        customer: *c,
                        affiliate: *affiliate,
                        from,
                        retroactive: *retroactive,
                        now,
                    });
                    "appended"
                } else {
                    "refused UnknownCustomer"
                };
                (
                    Command::Reassign {
                        customer_id: customer(*c),
                        to: aff(AFFILIATES[*affiliate]),
                        from: from.map(Timestamp::from_micros),
                        retroactive: *retroactive,
                        reason: "ticket".into(),
                    },
                    at,
                    expected.into(),
                )
            }
            Op::Credit { affiliate, cents } => {
                let amount = money(i64::from(*cents));
                let a = &mut m.accounts[*affiliate];
                let expected = if a.earned() < Decimal::ZERO {
                    "refused NegativeEarned"
                } else if amount > a.free {
                    "refused InsufficientBalance"
                } else {
                    a.free -= amount;
                    a.credited += amount;
                    m.post(*affiliate, month_of(now), "credit", -amount);
                    "appended"
                };
                (
                    Command::ApplyCredit {
                        affiliate_id: aff(AFFILIATES[*affiliate]),
                        amount: amount.to_string(),
                        invoice_id: format!("i-{i}"),
                    },
                    at,
                    expected.into(),
                )
            }
        };
        t.clock.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
        // The twin's own codes, ids and program id in its copy.
        let mut twin_command = command.clone();
        let twin_withdrawal = |id: &uuid::Uuid| {
            twin_withdrawal_ids[withdrawal_ids.iter().position(|w| w == id).unwrap()]
        };
        match &mut twin_command {
            Command::RecordClick { referral_code, .. } => {
                let a = codes.iter().position(|c| c == referral_code).unwrap();
                *referral_code = twin_codes[a].clone();
            }
            Command::PayWithdrawal { withdrawal_id, .. }
            | Command::RejectWithdrawal { withdrawal_id, .. } => {
                *withdrawal_id = twin_withdrawal(withdrawal_id);
            }
            Command::DefineProgram { rules, .. } => rules.id = twin.clone(),
            _ => {}
        }
        let submission = Submission::new(Some(&t.program), "model", command).at(at);
        let result = t.ledger().submit_blocking(submission);
        let context = || format!("op {i} {op:?}");
        assert_eq!(outcome(&result), expected, "{}", context());
        let twin_result = t
            .ledger()
            .submit_blocking(Submission::new(Some(&twin), "model", twin_command).at(at));
        assert_eq!(outcome(&twin_result), expected, "twin: {}", context());
        if let Ok(receipt) = &twin_result {
            assert_eq!(posted_by_ledger(receipt), posted, "twin: {}", context());
            for r in &receipt.events {
                if let Event::WithdrawalRequested(w) = &r.event {
                    twin_withdrawal_ids.push(w.withdrawal_id);
                }
            }
        }
        if let Ok(receipt) = &result {
            // Every reward, bounty and claw-back of a close, in order.
            assert_eq!(posted_by_ledger(receipt), posted, "{}", context());
            for r in &receipt.events {
                if let Event::WithdrawalRequested(w) = &r.event {
                    withdrawal_ids.push(w.withdrawal_id);
                }
            }
        }
        if let (Ok(main), Ok(twins)) = (&result, &twin_result)
            && m.facts.len() > facts_before
            && let (Some(main), Some(twins)) = (main.events.first(), twins.events.first())
        {
            seqs.insert(facts_before, (main.seq, twins.seq));
        }
        agree(&t, &twin, &m, now, &context());
    }
    for program in [&t.program, &twin] {
        let replay = t
            .ledger()
            .what_if(program, Default::default(), None)
            .unwrap();
        assert!(
            replay.diff.rows.is_empty(),
            "a replay of {program}'s history as it was moves money: {:?}",
            replay.diff.rows
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 400, .. ProptestConfig::default() })]

    #[test]
    fn the_ledger_agrees_with_a_reference_model_of_the_money_rules(case in case(), ops in proptest::collection::vec(op(), 1..150)) {
        run(&case, &ops);
    }
}
