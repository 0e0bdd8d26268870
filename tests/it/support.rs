//! Test support: a ledger on a temp directory with a clock the test drives,
//! and one helper per command.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use commission_ledger::events::*;
use commission_ledger::ledger::{Ledger, LedgerConfig, Receipt, Submission, SubmitError};
use commission_ledger::money::Rate;
use commission_ledger::projections::Balance;
use commission_ledger::rules::{Command, Noop};

pub fn ts(text: &str) -> Timestamp {
    Timestamp::parse(text).unwrap()
}

pub fn month(text: &str) -> Month {
    Month::parse(text).unwrap()
}

pub fn program_id(text: &str) -> ProgramId {
    ProgramId::parse(text).unwrap()
}

pub fn aff(text: &str) -> AffiliateId {
    AffiliateId::parse(text).unwrap()
}

pub fn cust(text: &str) -> CustomerId {
    CustomerId::parse(text).unwrap()
}

pub fn line(text: &str) -> LineId {
    LineId::parse(text).unwrap()
}

/// Program rules from the JSON document, with `overrides` merged in.
pub fn rules(id: &str, overrides: serde_json::Value) -> ProgramRules {
    let mut doc = serde_json::json!({
        "id": id, "name": "Hosting partners", "currency": "USD",
        "timezone": "Europe/Amsterdam", "site_url": "https://provider.example/signup",
        "cookie_days": 30, "attribution": "last_click", "basis": "expenses",
        "default_rate": "20", "payout_threshold": "50.00",
        "promo_code_template": "HOST-@ID@", "forbidden_groups": ["staff"],
        "auto_close_day": 1
    });
    if let (Some(doc), Some(extra)) = (doc.as_object_mut(), overrides.as_object()) {
        for (k, v) in extra {
            doc.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(doc).unwrap()
}

/// A ledger on its own temp directory, with a clock the test sets.
pub struct TestLedger {
    pub ledger: Option<Ledger>,
    pub dir: tempfile::TempDir,
    pub clock: Arc<AtomicI64>,
    pub program: ProgramId,
    /// The program's currency, for the amounts the helpers send.
    pub currency: std::sync::Mutex<String>,
}

impl TestLedger {
    pub fn new(program: &str) -> TestLedger {
        TestLedger::new_at(program, "2025-01-01T00:00:00Z")
    }

    /// A ledger whose clock starts at `now`.
    pub fn new_at(program: &str, now: &str) -> TestLedger {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicI64::new(ts(now).micros()));
        let mut t = TestLedger {
            ledger: None,
            dir,
            clock,
            program: program_id(program),
            currency: std::sync::Mutex::new("USD".into()),
        };
        t.reopen();
        t
    }

    pub fn config(&self) -> LedgerConfig {
        let clock = self.clock.clone();
        let mut config = LedgerConfig::new(self.dir.path());
        // Small preallocation steps keep a hundred test ledgers quick to create.
        config.preallocate_bytes = 64 << 10;
        config.clock = Arc::new(move || Timestamp::from_micros(clock.load(Ordering::SeqCst)));
        config
    }

    /// Closes the ledger and opens it again from the same directory.
    /// Stops the ledger, deletes its index store and starts it again: the
    /// state is folded from the log alone.
    pub fn rebuild(&mut self) {
        self.ledger = None;
        std::fs::remove_dir_all(self.dir.path().join("index")).unwrap();
        self.reopen();
    }

    pub fn reopen(&mut self) {
        self.ledger = None;
        self.ledger = Some(Ledger::open(self.config()).unwrap());
    }

    pub fn ledger(&self) -> &Ledger {
        self.ledger.as_ref().unwrap()
    }

    /// Moves the clock forward (never back: the ledger's time is monotonic).
    pub fn set_now(&self, at: &str) {
        let before = self.clock.fetch_max(ts(at).micros(), Ordering::SeqCst);
        assert!(
            before <= ts(at).micros(),
            "the test clock cannot go back to {at}"
        );
    }

    pub fn head(&self) -> Seq {
        self.ledger().state().head.seq
    }

    pub fn try_submit(&self, at: Option<&str>, command: Command) -> Result<Receipt, SubmitError> {
        let mut s = Submission::new(Some(&self.program), "test", command);
        if let Some(at) = at {
            // Time passes: the clock reaches the moment the billing system reports.
            self.clock.fetch_max(ts(at).micros(), Ordering::SeqCst);
            s = s.at(ts(at));
        }
        self.ledger().submit_blocking(s)
    }

    pub fn submit(&self, at: Option<&str>, command: Command) -> Receipt {
        self.try_submit(at, command).unwrap()
    }

    /// Submits and asserts the rejection, and that nothing was appended.
    pub fn rejected(
        &self,
        at: Option<&str>,
        command: Command,
    ) -> commission_ledger::rules::Rejection {
        let before = self.head();
        match self.try_submit(at, command) {
            Err(SubmitError::Rejected(r)) => {
                assert_eq!(self.head(), before, "a rejected command appended events");
                r
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    pub fn define(&self, rules: ProgramRules) -> Receipt {
        *self.currency.lock().unwrap() = rules.currency.code().to_string();
        self.submit(
            None,
            Command::DefineProgram {
                rules: Box::new(rules),
                reason: None,
            },
        )
    }

    /// The referral code of an enrolled affiliate, as the model keeps it.
    pub fn referral_code(&self, affiliate: &str) -> String {
        self.ledger()
            .state()
            .model
            .program(&self.program)
            .unwrap()
            .affiliates[&aff(affiliate)]
            .referral_code
            .clone()
    }

    pub fn enroll(&self, affiliate: &str) -> AffiliateEnrolled {
        self.enroll_with(affiliate, None, None, None)
    }

    pub fn enroll_with(
        &self,
        affiliate: &str,
        customer: Option<&str>,
        group: Option<&str>,
        rate: Option<&str>,
    ) -> AffiliateEnrolled {
        let receipt = self.submit(
            None,
            Command::EnrollAffiliate {
                affiliate_id: aff(affiliate),
                customer_id: customer.map(cust),
                group: group.map(str::to_string),
                rate: rate.map(|r| Rate::parse(r).unwrap()),
            },
        );
        match &receipt.events[0].event {
            Event::AffiliateEnrolled(e) => e.clone(),
            other => panic!("expected AffiliateEnrolled, got {other:?}"),
        }
    }

    pub fn click(&self, at: &str, referral_code: &str, visitor: &str) -> Receipt {
        self.click_creative(at, referral_code, visitor, None)
    }

    pub fn click_creative(
        &self,
        at: &str,
        referral_code: &str,
        visitor: &str,
        creative: Option<&str>,
    ) -> Receipt {
        self.submit(
            Some(at),
            Command::RecordClick {
                referral_code: referral_code.to_string(),
                visitor: Some(visitor.into()),
                creative: creative.map(Text::from),
                referrer: Some("https://blog.example/post?utm=x".into()),
                landing: None,
                client_hash: None,
            },
        )
    }

    /// A signup; returns the affiliate it was attributed to, if any.
    pub fn signup(
        &self,
        at: &str,
        customer: &str,
        visitor: Option<&str>,
        promo: Option<&str>,
    ) -> Option<String> {
        self.signup_group(at, customer, visitor, promo, None)
    }

    pub fn signup_group(
        &self,
        at: &str,
        customer: &str,
        visitor: Option<&str>,
        promo: Option<&str>,
        group: Option<&str>,
    ) -> Option<String> {
        let receipt = self.submit(
            Some(at),
            Command::Signup {
                customer_id: cust(customer),
                visitor: visitor.map(Text::from),
                promo_code: promo.map(str::to_string),
                group: group.map(str::to_string),
            },
        );
        match (&receipt.noop, receipt.events.first().map(|r| &r.event)) {
            (None, Some(Event::SignupAttributed(e))) => Some(e.affiliate_id.to_string()),
            (Some(Noop::SignupIgnored), _) => None,
            (Some(Noop::AlreadyAttributed { affiliate_id, .. }), _) => {
                Some(affiliate_id.to_string())
            }
            other => panic!("unexpected signup answer {other:?}"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn basis(
        &self,
        kind: LineKind,
        at: &str,
        id: &str,
        customer: &str,
        amount: &str,
        product: Option<&str>,
        order: Option<&str>,
    ) -> Receipt {
        self.submit(
            Some(at),
            Command::RecordBasisLine {
                kind,
                id: line(id),
                customer_id: cust(customer),
                amount: amount.to_string(),
                currency: self.currency.lock().unwrap().clone(),
                product: product.map(str::to_string),
                order_id: order.map(str::to_string),
            },
        )
    }

    pub fn expense(&self, at: &str, id: &str, customer: &str, amount: &str) -> Receipt {
        self.basis(LineKind::Expense, at, id, customer, amount, None, None)
    }

    pub fn payment(&self, at: &str, id: &str, customer: &str, amount: &str) -> Receipt {
        self.basis(LineKind::Payment, at, id, customer, amount, None, None)
    }

    /// An operator's reassignment of `customer` to `to`, from a moment on
    /// (`None`: for all time), for the reason `ticket`.
    pub fn reassign(
        &self,
        customer: &str,
        to: &str,
        from: Option<&str>,
        retroactive: bool,
        ticket: &str,
    ) -> Receipt {
        self.submit(
            None,
            Command::Reassign {
                customer_id: cust(customer),
                to: aff(to),
                from: from.map(ts),
                retroactive,
                reason: ticket.into(),
            },
        )
    }

    pub fn refund(
        &self,
        at: &str,
        id: &str,
        customer: &str,
        refunds: &str,
        amount: &str,
    ) -> Receipt {
        self.submit(
            Some(at),
            Command::RecordRefund {
                id: line(id),
                customer_id: cust(customer),
                refunds: line(refunds),
                amount: amount.to_string(),
                currency: self.currency.lock().unwrap().clone(),
            },
        )
    }

    /// Closes a month (setting the clock into the next month if needed).
    pub fn close(&self, m: &str) -> MonthClosed {
        let m = month(m);
        let zone = self
            .ledger()
            .state()
            .model
            .program(&self.program)
            .unwrap()
            .current_rules()
            .unwrap()
            .zone();
        let after = m.next().start_in(zone).micros() + 3_600_000_000;
        if self.clock.load(Ordering::SeqCst) < after {
            self.clock.store(after, Ordering::SeqCst);
        }
        let receipt = self.submit(None, Command::CloseMonth { month: m });
        match (&receipt.noop, receipt.events.last().map(|r| &r.event)) {
            (Some(Noop::MonthAlreadyClosed(closed)), _) => closed.clone(),
            (None, Some(Event::MonthClosed(closed))) => closed.clone(),
            other => panic!("unexpected close answer {other:?}"),
        }
    }

    pub fn withdraw(&self, affiliate: &str, amount: &str) -> Result<uuid::Uuid, SubmitError> {
        let receipt = self.try_submit(
            None,
            Command::RequestWithdrawal {
                affiliate_id: aff(affiliate),
                amount: amount.to_string(),
            },
        )?;
        match &receipt.events[0].event {
            Event::WithdrawalRequested(e) => Ok(e.withdrawal_id),
            other => panic!("expected WithdrawalRequested, got {other:?}"),
        }
    }

    pub fn statement(&self, affiliate: &str, m: &str) -> commission_ledger::projections::Statement {
        self.ledger()
            .statement(&self.program, &aff(affiliate), month(m), None)
            .unwrap()
            .unwrap()
    }

    /// The affiliate's statistics of the days `from..=to` (`YYYY-MM-DD`), now.
    pub fn stats(
        &self,
        affiliate: &str,
        from: &str,
        to: &str,
        by: commission_ledger::projections::StatsBy,
    ) -> commission_ledger::projections::Stats {
        let day = |text: &str| chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap();
        self.ledger()
            .stats(&self.program, &aff(affiliate), day(from), day(to), by, None)
            .unwrap()
            .unwrap()
    }

    /// Snapshots a statement as JSON under `snapshots/`, the log hash redacted
    /// (event ids are random, so the hash differs per run).
    pub fn snapshot_statement(&self, name: &str, affiliate: &str, m: &str) {
        let statement = self.statement(affiliate, m);
        let mut settings = insta::Settings::clone_current();
        settings.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"));
        settings.set_prepend_module_to_snapshot(false);
        settings.bind(|| {
            insta::assert_json_snapshot!(name, statement, {
                ".log_hash" => "[hash]",
                // Withdrawal ids are random UUIDs; line ids stay visible.
                ".lines[].ref" => insta::dynamic_redaction(|value, _| {
                    match value.as_str().map(uuid::Uuid::parse_str) {
                        Some(Ok(_)) => "[withdrawal id]".into(),
                        _ => value,
                    }
                }),
            });
        });
    }

    pub fn balance(&self, affiliate: &str) -> Balance {
        self.ledger()
            .balance(&self.program, &aff(affiliate), None)
            .unwrap()
            .unwrap()
    }

    /// earned, pending, available of the balance, as strings.
    pub fn money(&self, affiliate: &str) -> (String, String, String) {
        let b = self.balance(affiliate);
        (b.earned, b.pending, b.available)
    }

    /// The amounts of the reward events among `events`.
    pub fn reward_amounts(events: &[Recorded]) -> Vec<String> {
        events
            .iter()
            .filter_map(|r| match &r.event {
                Event::RewardAccrued(e) => Some(e.amount.to_string()),
                _ => None,
            })
            .collect()
    }

    /// An affiliate's referral list, newest signup first (100 at most).
    pub fn referrals(&self, affiliate: &str) -> Vec<commission_ledger::projections::Referral> {
        self.ledger()
            .referrals(
                &self.program,
                &aff(affiliate),
                &first_hundred_referrals(),
                None,
            )
            .unwrap()
            .unwrap()
            .referrals
    }

    /// The customer ids on an affiliate's referral list (newest signup
    /// first), with their commission.
    pub fn referral_list(&self, affiliate: &str) -> Vec<(String, String)> {
        self.referrals(affiliate)
            .into_iter()
            .map(|r| (r.customer_id.to_string(), r.commission))
            .collect()
    }

    pub fn verify_ok(&self) {
        let report = self.ledger().verify().unwrap();
        assert!(report.ok, "verify failed: {:?}", report.problem);
    }
}

/// A referral list's first page of 100, newest signup first, unfiltered.
pub fn first_hundred_referrals() -> commission_ledger::projections::ReferralQuery {
    commission_ledger::projections::ReferralQuery {
        status: None,
        q: None,
        sort: commission_ledger::projections::ReferralSort::SignupDesc,
        limit: 100,
        start: Default::default(),
    }
}
