//! The event vocabulary of the ledger (past tense), the versioned envelope
//! every event is recorded in, its compact encoding, and the double-entry
//! postings each money event implies.
//!
//! Pure: no I/O, no clock. Encoding rules (postcard, see STACK.md): a struct
//! never gains a field once an event of it is on disk; a changed event becomes
//! a new struct and a new variant, and old ones are upcast on read. Golden
//! bytes of every event type are kept in `snapshots/` so that a rename can
//! never silently change the bytes the hash chain covers.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Datelike, NaiveDate, Offset, TimeZone, Utc};
use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smol_str::SmolStr;
use uuid::Uuid;

use crate::money::{Currency, Rate};

/// The hash map of the ledger's in-memory state: foldhash, seeded per
/// process (keys such as visitor ids come from the public internet).
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The hash set counterpart of [`HashMap`].
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Free text that the most numerous events carry (a click's visitor,
/// creative, referrer and landing; a signup's visitor; every event's
/// actor): held inline up to [`INLINE_IDENTIFIER_LEN`] bytes, so decoding
/// or deciding them allocates nothing for it. Encoded, and described in
/// the schemas, exactly as a `String`, so the log, the checkpoints and the
/// golden bytes are unchanged.
pub type Text = SmolStr;

/// A position in the log: the global, gapless sequence number of an event (from 1).
pub type Seq = u64;

/// Why a value could not become one of the ledger's domain types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidValue {
    pub field: &'static str,
    pub message: String,
}

impl InvalidValue {
    pub fn new(field: &'static str, message: impl Into<String>) -> InvalidValue {
        InvalidValue {
            field,
            message: message.into(),
        }
    }
}

thread_local! {
    /// The identifiers decoded so far while [`decode_shared`] runs.
    static SHARED: std::cell::RefCell<Option<HashSet<SmolStr>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `decode` with every identifier longer than
/// [`INLINE_IDENTIFIER_LEN`] it decodes shared by text: a state decoded
/// from a checkpoint then shares one allocation per such id, as the state
/// folded from the log does (measured: a restart from the checkpoint
/// of 1M events held 214 MiB with a copy per occurrence).
pub fn decode_shared<T>(decode: impl FnOnce() -> T) -> T {
    SHARED.with(|shared| *shared.borrow_mut() = Some(HashSet::default()));
    let result = decode();
    SHARED.with(|shared| *shared.borrow_mut() = None);
    result
}

/// The text of an identifier, shared while [`decode_shared`] runs (a
/// short one is held inline: nothing to share).
fn shared_text(text: &str) -> SmolStr {
    if text.len() <= INLINE_IDENTIFIER_LEN {
        return SmolStr::new(text);
    }
    SHARED.with(|shared| match &mut *shared.borrow_mut() {
        Some(set) => match set.get(text) {
            Some(known) => known.clone(),
            None => {
                let text = SmolStr::new(text);
                set.insert(text.clone());
                text
            }
        },
        None => SmolStr::new(text),
    })
}

/// Identifiers up to this long are held inline, without an allocation.
pub const INLINE_IDENTIFIER_LEN: usize = 23;

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        ///
        /// Cheap to clone (the folds do it for every event): up to
        /// [`INLINE_IDENTIFIER_LEN`] bytes are held inline, so cloning one
        /// does not allocate, and a table lookup or a checkpoint reads it
        /// where it is, without following a pointer; a longer one is
        /// shared by reference count.
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(SmolStr);

        impl $name {
            /// Accepts 1 to 128 characters of `A-Z a-z 0-9 . _ : @ -`.
            pub fn parse(text: &str) -> Result<$name, InvalidValue> {
                check_identifier($field, text)?;
                Ok($name(SmolStr::new(text)))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = InvalidValue;
            fn try_from(text: String) -> Result<$name, InvalidValue> {
                check_identifier($field, &text)?;
                Ok($name(SmolStr::new(text)))
            }
        }
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                check_identifier($field, &text).map_err(serde::de::Error::custom)?;
                Ok($name(shared_text(&text)))
            }
        }
        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string", "minLength": 1, "maxLength": MAX_IDENTIFIER_LEN,
                    "pattern": "^[A-Za-z0-9._:@-]+$"
                })
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }
    };
}

/// The longest identifier the ledger accepts.
pub const MAX_IDENTIFIER_LEN: usize = 128;

fn check_identifier(field: &'static str, text: &str) -> Result<(), InvalidValue> {
    if text.is_empty() || text.len() > MAX_IDENTIFIER_LEN {
        return Err(InvalidValue::new(
            field,
            format!("must be 1 to {MAX_IDENTIFIER_LEN} characters"),
        ));
    }
    if let Some(bad) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-')))
    {
        return Err(InvalidValue::new(
            field,
            format!("may hold only letters, digits and . _ : @ -, not {bad:?}"),
        ));
    }
    Ok(())
}

identifier!(
    /// A program's id, chosen by the provider (`hosting`).
    ProgramId,
    "program"
);
identifier!(
    /// An affiliate's id within a program (`alice`).
    AffiliateId,
    "affiliate_id"
);
identifier!(
    /// A customer's id in the provider's billing system.
    CustomerId,
    "customer_id"
);
identifier!(
    /// The billing system's id of a basis line or a refund (`inv-7-1`), unique per program.
    LineId,
    "id"
);

/// A moment, in microseconds since the Unix epoch (UTC). Written as RFC 3339
/// in JSON and as a plain integer in the log.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const MIN: Timestamp = Timestamp(i64::MIN);
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    pub const fn from_micros(micros: i64) -> Timestamp {
        Timestamp(micros)
    }
    pub fn micros(&self) -> i64 {
        self.0
    }
    pub fn from_datetime(at: DateTime<Utc>) -> Timestamp {
        Timestamp(at.timestamp_micros())
    }
    pub fn to_datetime(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.0).unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
    /// Parses RFC 3339 (`2026-08-01T10:00:00Z`, any offset).
    pub fn parse(text: &str) -> Result<Timestamp, InvalidValue> {
        DateTime::parse_from_rfc3339(text)
            .map(|at| Timestamp::from_datetime(at.with_timezone(&Utc)))
            .map_err(|e| InvalidValue::new("at", format!("`{text}` is not an RFC 3339 time: {e}")))
    }
    pub fn to_rfc3339(&self) -> String {
        self.to_datetime()
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    }
    /// The calendar month this moment falls in, in the given time zone.
    pub fn month_in(&self, zone: chrono_tz::Tz) -> Month {
        let local = self.to_datetime().with_timezone(&zone);
        Month::new(local.year(), local.month()).unwrap_or(Month(0))
    }
    /// The calendar day this moment falls on, in the given time zone.
    pub fn date_in(&self, zone: chrono_tz::Tz) -> NaiveDate {
        self.to_datetime().with_timezone(&zone).date_naive()
    }
    /// The UTC hour this moment falls in, as hours since the epoch.
    fn utc_hour(&self) -> i64 {
        self.0.div_euclid(MICROS_PER_HOUR)
    }
    pub fn plus_days(&self, days: u32) -> Timestamp {
        Timestamp(self.0.saturating_add(i64::from(days) * 86_400_000_000))
    }
}

const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// Remembers the calendar day of the last UTC hour asked about, in one time
/// zone, for a caller that asks [`Timestamp::date_in`] for every event:
/// events come in time order, and a zone conversion cost about a fifth of
/// the instructions of applying a click to the projections. An hour is
/// remembered only when it lies wholly on one local day at one offset (its
/// first and last microsecond fall on the same local day, exactly as far
/// apart as in UTC), so an hour holding a local midnight or an offset
/// change is converted each time.
/// Not state: equal to any other, and never saved.
#[derive(Clone, Copy, Debug, Default)]
pub struct DayMemo {
    hour: Option<(i64, NaiveDate)>,
}

impl PartialEq for DayMemo {
    fn eq(&self, _: &DayMemo) -> bool {
        true
    }
}
impl Eq for DayMemo {}

impl DayMemo {
    /// `at.date_in(zone)`; the caller asks with one zone only (else [`Self::clear`]).
    pub fn date_in(&mut self, at: Timestamp, zone: chrono_tz::Tz) -> NaiveDate {
        let hour = at.utc_hour();
        if let Some((known, date)) = self.hour
            && known == hour
        {
            return date;
        }
        let first = Timestamp(hour.saturating_mul(MICROS_PER_HOUR));
        let last = Timestamp(first.0.saturating_add(MICROS_PER_HOUR - 1));
        let (first_local, last_local) = (
            first.to_datetime().with_timezone(&zone).naive_local(),
            last.to_datetime().with_timezone(&zone).naive_local(),
        );
        let whole = first_local.date() == last_local.date()
            && (last_local - first_local).num_microseconds() == Some(MICROS_PER_HOUR - 1);
        if whole {
            self.hour = Some((hour, first_local.date()));
            first_local.date()
        } else {
            at.date_in(zone)
        }
    }

    /// Forgets the hour remembered (the zone changed).
    pub fn clear(&mut self) {
        self.hour = None;
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}
impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_rfc3339())
        } else {
            serializer.serialize_i64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            Timestamp::parse(&text).map_err(serde::de::Error::custom)
        } else {
            i64::deserialize(deserializer).map(Timestamp)
        }
    }
}

impl JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "date-time"})
    }
}

/// A calendar month, `YYYY-MM` in JSON; the months since year 0 in the log.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month(i32);

impl Month {
    pub fn new(year: i32, month: u32) -> Option<Month> {
        if !(1..=12).contains(&month) || !(1..=9999).contains(&year) {
            return None;
        }
        Some(Month(year * 12 + month as i32 - 1))
    }
    pub fn year(&self) -> i32 {
        self.0.div_euclid(12)
    }
    pub fn month(&self) -> u32 {
        self.0.rem_euclid(12) as u32 + 1
    }
    pub fn next(&self) -> Month {
        Month(self.0 + 1)
    }
    pub fn previous(&self) -> Month {
        Month(self.0 - 1)
    }
    /// The month whose statement money moved in this month goes to: this
    /// one, or the first after `last_closed` when this one is closed (a
    /// zone changed since a close can put a moment back in a closed month;
    /// a closed month is never rewritten).
    pub fn open_after(self, last_closed: Option<Month>) -> Month {
        match last_closed {
            Some(last) if self <= last => last.next(),
            _ => self,
        }
    }
    /// Parses `YYYY-MM`.
    pub fn parse(text: &str) -> Result<Month, InvalidValue> {
        let bad = || InvalidValue::new("month", format!("`{text}` is not a month YYYY-MM"));
        let (year, month) = text.split_once('-').ok_or_else(bad)?;
        if year.len() != 4 || month.len() != 2 {
            return Err(bad());
        }
        let year: i32 = year.parse().map_err(|_| bad())?;
        let month: u32 = month.parse().map_err(|_| bad())?;
        Month::new(year, month).ok_or_else(bad)
    }
    /// The first day of the month.
    pub fn first_day(&self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.year(), self.month(), 1).unwrap_or(NaiveDate::MIN)
    }
    /// The instant the month starts in the given zone.
    pub fn start_in(&self, zone: chrono_tz::Tz) -> Timestamp {
        self.day_start_in(1, zone)
    }
    /// The instant day `day` of the month (1 to 28) starts in the given zone.
    pub fn day_start_in(&self, day: u8, zone: chrono_tz::Tz) -> Timestamp {
        let date = self
            .first_day()
            .with_day(u32::from(day.clamp(1, 28)))
            .unwrap_or_else(|| self.first_day());
        let midnight = date.and_hms_opt(0, 0, 0).unwrap_or_default();
        match zone.from_local_datetime(&midnight).earliest() {
            Some(at) => Timestamp::from_datetime(at.with_timezone(&Utc)),
            // The zone skips midnight that day (Asunción on 1 October
            // 2023: 00:00 at -04 became 01:00 at -03): the day starts at
            // that jump, which is midnight at the offset in force before.
            None => {
                let before = zone
                    .offset_from_local_datetime(&(midnight - chrono::Duration::hours(12)))
                    .earliest()
                    .map_or(0, |offset| offset.fix().local_minus_utc());
                let at = midnight - chrono::Duration::seconds(i64::from(before));
                Timestamp::from_datetime(Utc.from_utc_datetime(&at))
            }
        }
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year(), self.month())
    }
}
impl fmt::Debug for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Month {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_string())
        } else {
            serializer.serialize_i32(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Month {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            Month::parse(&text).map_err(serde::de::Error::custom)
        } else {
            i32::deserialize(deserializer).map(Month)
        }
    }
}

impl JsonSchema for Month {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Month".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$"})
    }
}

/// Fixed-size bytes (hashes): lower-case hex in JSON, raw bytes in the log.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes<const N: usize>(pub [u8; N]);

impl<const N: usize> Bytes<N> {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    pub fn from_hex(text: &str) -> Option<Bytes<N>> {
        if text.len() != 2 * N {
            return None;
        }
        Some(Bytes(from_hex_digits(text)?.try_into().ok()?))
    }
}

/// Bytes from hex digits, two to a byte, and nothing else: not the sign
/// that `u8::from_str_radix` also takes (it read `+8` as 8, so two texts
/// named one value, found by `tools/fuzz`).
pub fn from_hex_digits(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|pair| {
            let high = char::from(pair[0]).to_digit(16)?;
            let low = char::from(pair[1]).to_digit(16)?;
            u8::try_from(high << 4 | low).ok()
        })
        .collect()
}

impl<const N: usize> fmt::Debug for Bytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl<const N: usize> Serialize for Bytes<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.hex())
        } else {
            use serde::ser::SerializeTuple;
            let mut tuple = serializer.serialize_tuple(N)?;
            for byte in &self.0 {
                tuple.serialize_element(byte)?;
            }
            tuple.end()
        }
    }
}

impl<'de, const N: usize> Deserialize<'de> for Bytes<N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            Bytes::from_hex(&text)
                .ok_or_else(|| serde::de::Error::custom(format!("expected {} hex digits", 2 * N)))
        } else {
            struct Visitor<const N: usize>;
            impl<'de, const N: usize> serde::de::Visitor<'de> for Visitor<N> {
                type Value = Bytes<N>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    write!(f, "{N} bytes")
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<Bytes<N>, A::Error> {
                    let mut out = [0u8; N];
                    for (i, byte) in out.iter_mut().enumerate() {
                        *byte = seq
                            .next_element()?
                            .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                    }
                    Ok(Bytes(out))
                }
            }
            deserializer.deserialize_tuple(N, Visitor::<N>)
        }
    }
}

impl<const N: usize> JsonSchema for Bytes<N> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        format!("Hex{N}").into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let pattern = format!("^[0-9a-f]{{{}}}$", 2 * N);
        schemars::json_schema!({"type": "string", "pattern": pattern})
    }
}

/// Which of a visitor's clicks inside the cookie window wins a signup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    #[default]
    LastClick,
    FirstClick,
}

/// Which billed amounts earn commission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// What was charged (BILLmanager).
    #[default]
    Expenses,
    /// What the customer has paid (Yourhosting, WHMCS).
    Payments,
}

/// How long a referred customer earns their affiliate commission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Term {
    /// For as long as the customer is billed (Host.bg's "forever").
    #[default]
    Lifetime,
    /// Lines dated within this many months of the signup.
    Months(u32),
    /// Only the lines of the customer's first order.
    FirstOrder,
}

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[schemars(rename = "Term")]
enum TermJson {
    Lifetime,
    Months { months: u32 },
    FirstOrder,
}

#[derive(Serialize, Deserialize)]
enum TermWire {
    Lifetime,
    Months(u32),
    FirstOrder,
}

impl Serialize for Term {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            match *self {
                Term::Lifetime => TermJson::Lifetime,
                Term::Months(months) => TermJson::Months { months },
                Term::FirstOrder => TermJson::FirstOrder,
            }
            .serialize(serializer)
        } else {
            match *self {
                Term::Lifetime => TermWire::Lifetime,
                Term::Months(months) => TermWire::Months(months),
                Term::FirstOrder => TermWire::FirstOrder,
            }
            .serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Term {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            Ok(match TermJson::deserialize(deserializer)? {
                TermJson::Lifetime => Term::Lifetime,
                TermJson::Months { months } => Term::Months(months),
                TermJson::FirstOrder => Term::FirstOrder,
            })
        } else {
            Ok(match TermWire::deserialize(deserializer)? {
                TermWire::Lifetime => Term::Lifetime,
                TermWire::Months(months) => Term::Months(months),
                TermWire::FirstOrder => Term::FirstOrder,
            })
        }
    }
}

impl JsonSchema for Term {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Term".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        TermJson::json_schema(generator)
    }
}

/// A tier: affiliates with at least `min_active_referrals` customers that
/// produced a basis line in a month earn `rate` on that month.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub min_active_referrals: u32,
    pub rate: Rate,
}

fn default_cookie_days() -> u32 {
    30
}

/// The rules of one program, as `PUT /v1/programs/{program}` takes them and as
/// `ProgramDefined` records them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgramRules {
    pub id: ProgramId,
    pub name: String,
    pub currency: Currency,
    /// An IANA time zone name: months close at midnight there.
    pub timezone: String,
    pub site_url: String,
    #[serde(default = "default_cookie_days")]
    pub cookie_days: u32,
    #[serde(default)]
    pub attribution: Attribution,
    #[serde(default)]
    pub basis: Basis,
    pub default_rate: Rate,
    #[serde(default)]
    pub product_rates: BTreeMap<String, Rate>,
    #[serde(default)]
    pub tiers: Vec<Tier>,
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    #[serde(deserialize_with = "bounded_optional_amount")]
    pub bounty: Option<Decimal>,
    #[serde(default)]
    pub term: Term,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub payout_threshold: Decimal,
    #[serde(default)]
    pub promo_code_template: Option<String>,
    #[serde(default)]
    pub eligible_groups: Vec<String>,
    #[serde(default)]
    pub forbidden_groups: Vec<String>,
    #[serde(default)]
    pub auto_close_day: Option<u8>,
}

/// The longest free text (names, reasons, references) the ledger keeps.
pub const MAX_TEXT_LEN: usize = 500;

/// The largest amount, either sign, that an event (or a program's rules)
/// may carry: 10^18. An amount from outside has at most 15 integer digits,
/// and what the rules make of them (rewards, a close's total, adjustments)
/// stays below this; an amount past it does not decode, so neither an
/// import nor a damaged log can hand the fold a sum that overflows: 7.9·10^10
/// events at the bound still add up inside a `Decimal` (±7.9·10^28).
pub const MAX_EVENT_AMOUNT: Decimal = Decimal::from_parts(0xA764_0000, 0x0DE0_B6B3, 0, false, 0);

/// Refuses an amount whose magnitude is past [`MAX_EVENT_AMOUNT`].
pub fn check_event_amount(amount: Decimal) -> Result<Decimal, InvalidValue> {
    if amount.abs() > MAX_EVENT_AMOUNT {
        return Err(InvalidValue::new(
            "amount",
            format!("{amount} is beyond ±{MAX_EVENT_AMOUNT}, the most an event may carry"),
        ));
    }
    Ok(amount)
}

fn bounded_amount<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
    check_event_amount(<Decimal as Deserialize>::deserialize(deserializer)?)
        .map_err(serde::de::Error::custom)
}

fn bounded_optional_amount<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Decimal>, D::Error> {
    Option::<Decimal>::deserialize(deserializer)?
        .map(check_event_amount)
        .transpose()
        .map_err(serde::de::Error::custom)
}

impl ProgramRules {
    /// Checks everything a type cannot: the zone exists, amounts fit the
    /// currency, limits are sane. Returns the parsed time zone.
    pub fn validate(&self) -> Result<chrono_tz::Tz, InvalidValue> {
        let zone: chrono_tz::Tz = self.timezone.parse().map_err(|_| {
            InvalidValue::new(
                "timezone",
                format!("`{}` is not an IANA time zone", self.timezone),
            )
        })?;
        if self.name.trim().is_empty() || self.name.len() > MAX_TEXT_LEN {
            return Err(InvalidValue::new("name", "must be 1 to 500 characters"));
        }
        check_site_url(&self.site_url)?;
        if !(1..=3650).contains(&self.cookie_days) {
            return Err(InvalidValue::new("cookie_days", "must be 1 to 3650"));
        }
        if let Some(bounty) = self.bounty {
            self.currency
                .check_amount(bounty)
                .map_err(|e| InvalidValue::new("bounty", e.to_string()))?;
            if bounty <= Decimal::ZERO {
                return Err(InvalidValue::new("bounty", "must be greater than zero"));
            }
        }
        self.currency
            .check_amount(self.payout_threshold)
            .map_err(|e| InvalidValue::new("payout_threshold", e.to_string()))?;
        if self.payout_threshold < Decimal::ZERO {
            return Err(InvalidValue::new(
                "payout_threshold",
                "must not be negative",
            ));
        }
        if let Term::Months(months) = self.term
            && !(1..=1200).contains(&months)
        {
            return Err(InvalidValue::new("term.months", "must be 1 to 1200"));
        }
        if let Some(template) = &self.promo_code_template
            && (!template.contains("@ID@") || template.len() > 64)
        {
            return Err(InvalidValue::new(
                "promo_code_template",
                "must contain @ID@ and be at most 64 characters",
            ));
        }
        if let Some(day) = self.auto_close_day
            && !(1..=28).contains(&day)
        {
            return Err(InvalidValue::new(
                "auto_close_day",
                "must be 1 to 28, or null",
            ));
        }
        if self.tiers.len() > 32 || self.product_rates.len() > 1000 {
            return Err(InvalidValue::new(
                "tiers",
                "at most 32 tiers and 1000 product rates",
            ));
        }
        let groups = self.eligible_groups.iter().chain(&self.forbidden_groups);
        if groups.clone().count() > 1000 || groups.clone().any(|g| g.is_empty() || g.len() > 128) {
            return Err(InvalidValue::new(
                "groups",
                "at most 1000 groups of 1 to 128 characters",
            ));
        }
        Ok(zone)
    }

    /// The program's time zone; the rules were validated when recorded.
    pub fn zone(&self) -> chrono_tz::Tz {
        self.timezone.parse().unwrap_or(chrono_tz::UTC)
    }
}

/// An absolute http(s) URL with a host (a program's `site_url`).
pub fn check_site_url(url: &str) -> Result<(), InvalidValue> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| InvalidValue::new("site_url", "must be an absolute http(s) URL"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || url.len() > 2000 || url.chars().any(|c| c.is_whitespace() || c == '\\') {
        return Err(InvalidValue::new(
            "site_url",
            "must be an absolute http(s) URL with a host",
        ));
    }
    Ok(())
}

/// Who may do what with an API key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// The billing system: clicks, signups, basis lines, customer changes.
    Ingest,
    /// A billing portal: reads any affiliate, requests withdrawals, mints tokens.
    Portal,
}

impl Role {
    pub fn parse(text: &str) -> Result<Role, InvalidValue> {
        match text {
            "admin" => Ok(Role::Admin),
            "ingest" => Ok(Role::Ingest),
            "portal" => Ok(Role::Portal),
            _ => Err(InvalidValue::new(
                "role",
                format!("`{text}` is not admin, ingest or portal"),
            )),
        }
    }
}

/// Expense (charge) or payment: the two kinds of basis line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    Expense,
    Payment,
}

impl LineKind {
    pub fn earns_under(&self, basis: Basis) -> bool {
        matches!(
            (self, basis),
            (LineKind::Expense, Basis::Expenses) | (LineKind::Payment, Basis::Payments)
        )
    }
}

/// How a customer came to an affiliate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Click,
    PromoCode,
}

/// A percentage reward on a basis line, or the fixed per-customer bounty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    Reward,
    Bounty,
}

/// What caused a compensating adjustment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The `ReferralReassigned` event at this seq.
    Reassignment { seq: Seq },
    /// A what-if replay, computed at log position `at_seq`.
    Replay { replay_id: Uuid, at_seq: Seq },
}

// ---------------------------------------------------------------------------
// The events. Each is its own struct so that each has its own JSON Schema and
// its own golden bytes; a changed event becomes a new struct (…V2).

/// A program was defined, or its rules changed (from `occurred_at` on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProgramDefined {
    pub rules: ProgramRules,
    pub reason: Option<String>,
}

/// A client of the provider joined the program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AffiliateEnrolled {
    pub affiliate_id: AffiliateId,
    pub referral_code: String,
    pub promo_code: Option<String>,
    /// Their own billing account, never attributed to them.
    pub customer_id: Option<CustomerId>,
    pub group: String,
    /// A custom deal: beats every program rate.
    pub rate: Option<Rate>,
}

/// An affiliate was suspended: no new clicks or signups are attributed to them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AffiliateSuspended {
    pub affiliate_id: AffiliateId,
    pub reason: String,
}

/// A visitor followed an affiliate's link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClickRecorded {
    pub click_id: Uuid,
    pub affiliate_id: AffiliateId,
    /// A random id the ledger or the tracker gave the browser; never personal data.
    pub visitor: Text,
    pub creative: Option<Text>,
    /// Origin and path only: no query string.
    pub referrer: Option<Text>,
    pub landing: Option<Text>,
    /// A keyed hash of the client address, for rate limits and fraud checks.
    pub client_hash: Option<Bytes<16>>,
}

/// A new customer was attributed to an affiliate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SignupAttributed {
    pub customer_id: CustomerId,
    pub affiliate_id: AffiliateId,
    pub via: Via,
    pub visitor: Option<Text>,
    pub promo_code: Option<String>,
    pub group: String,
}

/// A billed amount that can earn commission: an expense or a payment. Kept
/// for every customer, referred or not, so a later reassignment can reward it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BasisLineRecorded {
    pub kind: LineKind,
    pub id: LineId,
    pub customer_id: CustomerId,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub amount: Decimal,
    pub product: Option<String>,
    pub order_id: Option<String>,
}

/// Part or all of a basis line was refunded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RefundRecorded {
    pub id: LineId,
    pub customer_id: CustomerId,
    pub refunds: LineId,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub amount: Decimal,
}

/// The customer's account was closed in the billing system.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CustomerClosed {
    pub customer_id: CustomerId,
    pub reason: Option<String>,
}

/// The customer moved to another client group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CustomerGroupChanged {
    pub customer_id: CustomerId,
    pub group: String,
}

/// A month close turned a basis line into a reward (or paid a bounty).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RewardAccrued {
    pub affiliate_id: AffiliateId,
    pub customer_id: CustomerId,
    pub kind: RewardKind,
    /// The basis line rewarded (for a bounty: the customer's first line).
    pub line: LineId,
    pub product: Option<String>,
    /// When the basis line happened.
    pub line_at: Timestamp,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub basis: Decimal,
    pub rate: Rate,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub amount: Decimal,
    /// The month whose close posted it: the statement it appears on.
    pub month: Month,
    /// The line belongs to a month before `month`.
    pub late: bool,
}

/// A month close clawed back the reward of a refunded amount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RewardClawedBack {
    pub affiliate_id: AffiliateId,
    pub customer_id: CustomerId,
    pub refund: LineId,
    pub line: LineId,
    pub product: Option<String>,
    pub refund_at: Timestamp,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub basis: Decimal,
    pub rate: Rate,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub amount: Decimal,
    pub month: Month,
    pub late: bool,
}

/// A month was closed: every reward of it is posted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MonthClosed {
    pub month: Month,
    pub rewards: u32,
    /// Rewards and bounties less clawbacks posted by this close.
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub total: Decimal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WithdrawalRequested {
    pub withdrawal_id: Uuid,
    pub affiliate_id: AffiliateId,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub amount: Decimal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WithdrawalPaid {
    pub withdrawal_id: Uuid,
    pub affiliate_id: AffiliateId,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub amount: Decimal,
    pub reference: String,
}

/// An operator refused a withdrawal: the money returns to `earned`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WithdrawalRejected {
    pub withdrawal_id: Uuid,
    pub affiliate_id: AffiliateId,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub amount: Decimal,
    pub reason: String,
}

/// Commission applied to the affiliate's own invoice (Host.bg).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CreditApplied {
    pub affiliate_id: AffiliateId,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub amount: Decimal,
    pub invoice_id: String,
}

/// An operator moved a customer to another affiliate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReferralReassigned {
    pub customer_id: CustomerId,
    pub from_affiliate: Option<AffiliateId>,
    pub to: AffiliateId,
    /// Lines from this moment on follow the new affiliate; `None` = all time.
    pub from: Option<Timestamp>,
    pub retroactive: bool,
    pub reason: String,
}

/// A compensating money movement in the open period (reassignment, replay).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AdjustmentPosted {
    pub affiliate_id: AffiliateId,
    pub customer_id: Option<CustomerId>,
    pub line: Option<LineId>,
    /// Positive credits the affiliate, negative debits.
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub amount: Decimal,
    pub month: Month,
    pub cause: Cause,
    pub reason: String,
}

/// Overrides of a what-if replay: the corrected assumptions history is
/// replayed under. Every part is optional; an empty set changes nothing.
/// (No `skip_serializing_if` here or in any event: postcard is not
/// self-describing, a skipped field would make the record undecodable.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Customers who belong to another affiliate (from a moment, or always).
    #[serde(default)]
    pub attribution: Vec<AttributionOverride>,
    /// Another attribution model for signups that came by a click.
    #[serde(default)]
    pub model: Option<ModelOverride>,
    /// Corrected rules (a whole program-rules document) from a moment on.
    #[serde(default)]
    pub rules: Option<RulesOverride>,
    /// Corrected per-affiliate rates (custom deals) from a moment on.
    #[serde(default)]
    pub affiliate_rates: Vec<AffiliateRateOverride>,
    /// Events that should never have counted, by seq: fraudulent clicks or
    /// signups, test charges or refunds.
    #[serde(default)]
    pub exclude: Vec<Seq>,
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        self == &Overrides::default()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AttributionOverride {
    pub customer_id: CustomerId,
    pub affiliate_id: AffiliateId,
    /// Lines from this moment on; absent = all time.
    #[serde(default)]
    pub from: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelOverride {
    #[serde(default)]
    pub attribution: Option<Attribution>,
    #[serde(default)]
    pub cookie_days: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RulesOverride {
    pub from: Timestamp,
    pub rules: ProgramRules,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AffiliateRateOverride {
    pub affiliate_id: AffiliateId,
    pub rate: Rate,
    pub from: Timestamp,
}

/// One money item a replay changes: a reward, bounty, claw-back or
/// reassignment adjustment of one affiliate, in the statement month it was
/// (or would have been) posted in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReplayChange {
    pub affiliate_id: AffiliateId,
    pub month: Month,
    pub kind: ChangeKind,
    pub customer_id: Option<CustomerId>,
    /// The basis line (or, for a claw-back, the refund) behind the amount.
    pub line: Option<LineId>,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub amount: Decimal,
}

/// What kind of money a replay change is about.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Reward,
    Bounty,
    Clawback,
    Adjustment,
}

impl ChangeKind {
    /// The name the JSON gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Reward => "reward",
            ChangeKind::Bounty => "bounty",
            ChangeKind::Clawback => "clawback",
            ChangeKind::Adjustment => "adjustment",
        }
    }
}

/// An operator applied a what-if replay: its overrides hold for history
/// from now on (later replays include them), and the `AdjustmentPosted`
/// events that follow (cause `replay`) move the money of `changes` into the
/// open month.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReplayApplied {
    pub replay_id: Uuid,
    /// The log position the diff was computed at.
    pub at_seq: Seq,
    pub overrides: Overrides,
    /// Per affiliate and the month the money was (or should have been)
    /// posted in, the change.
    pub changes: Vec<ReplayChange>,
    /// The statement months the replay was restricted to; absent = all.
    pub months: Option<MonthRange>,
    pub reason: String,
}

/// What an applied replay's corrected world leaves in the write model,
/// beside the money its adjustments move: recorded right after its
/// `ReplayApplied`, so that what follows (refunds of the corrected lines,
/// later reassignments, closes) acts on the corrected world, exactly as a
/// later replay would. Only what differs from what was recorded is named.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReplayCorrected {
    pub replay_id: Uuid,
    /// Lines whose close, reward or exclusion the replay changed.
    pub lines: Vec<LineCorrection>,
    /// Refunds whose close or exclusion the replay changed.
    pub refunds: Vec<RefundCorrection>,
    /// Customers whose attribution, signup or bounty the replay changed.
    pub customers: Vec<CustomerCorrection>,
    /// Excluded clicks: they no longer count for signups.
    pub clicks: Vec<ExcludedClick>,
}

impl ReplayCorrected {
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
            && self.refunds.is_empty()
            && self.customers.is_empty()
            && self.clicks.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LineCorrection {
    pub line: LineId,
    pub state: CorrectedState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RefundCorrection {
    pub refund: LineId,
    pub state: CorrectedState,
}

/// A line's (or refund's) state in the corrected world.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CorrectedState {
    /// No close has taken it yet.
    Open,
    /// A close took it; a line with the reward posted for it, if any.
    Closed { reward: Option<CorrectedReward> },
    /// It no longer counts (excluded by the replay).
    Excluded,
}

/// A line's reward in the corrected world: whose, at what rate, and what
/// refunds have taken back of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CorrectedReward {
    pub affiliate_id: AffiliateId,
    pub rate: Rate,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub amount: Decimal,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub refunded: Decimal,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub clawed: Decimal,
}

/// A customer in the corrected world.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CustomerCorrection {
    pub customer_id: CustomerId,
    /// Whose referral from when on, in order (none: nobody's).
    pub attribution: Vec<AttributedFrom>,
    pub signup_at: Option<Timestamp>,
    pub via: Option<Via>,
    /// The bounty paid for the customer, if one was.
    pub bounty: Option<CorrectedBounty>,
}

/// A customer belongs to an affiliate from a moment on (`from` absent:
/// from the start).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AttributedFrom {
    pub from: Option<Timestamp>,
    pub affiliate_id: AffiliateId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CorrectedBounty {
    pub affiliate_id: AffiliateId,
    #[schemars(with = "String")]
    #[serde(deserialize_with = "bounded_amount")]
    pub amount: Decimal,
    /// The moment of the line it was paid with.
    pub line_at: Timestamp,
}

/// A click that no longer counts: its visitor, moment and affiliate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExcludedClick {
    pub visitor: Text,
    pub at: Timestamp,
    pub affiliate_id: AffiliateId,
}

/// Statement months `from` to `to`, both included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MonthRange {
    pub from: Month,
    pub to: Month,
}

/// An API key was issued; only its keyed hash is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiKeyIssued {
    pub key_id: String,
    pub key_hash: Bytes<32>,
    pub role: Role,
    pub issuer: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiKeyRevoked {
    pub key_id: String,
    pub reason: String,
}

macro_rules! events {
    ($($name:ident($payload:ty)),* $(,)?) => {
        /// Every event of the ledger. Append new variants at the end only: the
        /// variant index is part of the encoded bytes. The two large, rare
        /// events are boxed (the same bytes: serde encodes a `Box<T>` as a
        /// `T`), which keeps an `Event` at 160 bytes instead of 464: a
        /// replay moves a million of them (measured: a seventh of its time
        /// was memmove).
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub enum Event {
            $($name($payload),)*
        }

        impl Event {
            /// The event's type name, as `GET /v1/events?type=` and the export use it.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(Event::$name(_) => stringify!($name),)*
                }
            }
        }

        /// Every event type name with its current version and JSON Schema.
        pub fn event_schemas() -> Vec<(&'static str, u32, schemars::Schema)> {
            vec![$((stringify!($name), 1, schemars::schema_for!($name)),)*]
        }
    };
}

events!(
    ProgramDefined(Box<ProgramDefined>),
    AffiliateEnrolled(AffiliateEnrolled),
    AffiliateSuspended(AffiliateSuspended),
    ClickRecorded(ClickRecorded),
    SignupAttributed(SignupAttributed),
    BasisLineRecorded(BasisLineRecorded),
    RefundRecorded(RefundRecorded),
    CustomerClosed(CustomerClosed),
    CustomerGroupChanged(CustomerGroupChanged),
    RewardAccrued(RewardAccrued),
    RewardClawedBack(Box<RewardClawedBack>),
    MonthClosed(MonthClosed),
    WithdrawalRequested(WithdrawalRequested),
    WithdrawalPaid(WithdrawalPaid),
    WithdrawalRejected(WithdrawalRejected),
    CreditApplied(CreditApplied),
    ReferralReassigned(ReferralReassigned),
    AdjustmentPosted(AdjustmentPosted),
    ApiKeyIssued(ApiKeyIssued),
    ApiKeyRevoked(ApiKeyRevoked),
    ReplayApplied(Box<ReplayApplied>),
    ReplayCorrected(Box<ReplayCorrected>),
);

// A replay moves every event from the decoding thread to the folding one:
// keep events small (box a large new variant rather than grow them all).
const _: () = assert!(std::mem::size_of::<Event>() <= 168);

/// The idempotency key a command was submitted with, and a hash of the
/// request, so a retry with another body is told apart (409).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Idempotency {
    pub key: String,
    pub request_hash: Bytes<32>,
}

/// An event as the log records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub seq: Seq,
    pub id: Uuid,
    pub recorded_at: Timestamp,
    pub occurred_at: Timestamp,
    /// The key id (or `cli`, `system`) that caused it.
    pub actor: Text,
    pub program: Option<ProgramId>,
    pub idempotency: Option<Idempotency>,
    pub event: Event,
}

/// The versioned envelope on disk. A new envelope layout is a new variant;
/// old variants are upcast to [`Recorded`] on read, after the hash is checked.
#[derive(Serialize, Deserialize)]
enum Envelope {
    V1(Recorded),
}

#[derive(Serialize)]
enum EnvelopeRef<'a> {
    V1(&'a Recorded),
}

/// The compact encoding of a recorded event, as the hash chain covers it.
pub fn encode(recorded: &Recorded) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_extend(&EnvelopeRef::V1(recorded), Vec::with_capacity(256))
}

/// [`encode`] onto the end of `out` (the writer lays records out in one
/// buffer as it decides them). On error, what it wrote stays: the caller
/// cuts `out` back.
pub fn encode_into(recorded: &Recorded, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
    /// `postcard::to_extend` takes its output by value; this lends it the
    /// buffer, which an error would otherwise drop.
    struct Tail<'a>(&'a mut Vec<u8>);
    impl Extend<u8> for Tail<'_> {
        fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
            self.0.extend(bytes);
        }
    }
    postcard::to_extend(&EnvelopeRef::V1(recorded), Tail(out)).map(|_| ())
}

/// Decodes (and upcasts) a recorded event.
pub fn decode(bytes: &[u8]) -> Result<Recorded, postcard::Error> {
    match postcard::from_bytes::<Envelope>(bytes)? {
        Envelope::V1(recorded) => Ok(recorded),
    }
}

// ---------------------------------------------------------------------------
// Double entry.

/// A ledger account of one program.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Account {
    /// What the provider spends on commission.
    CommissionExpense,
    /// Owed to the affiliate, free to withdraw or credit.
    Earned(AffiliateId),
    /// Requested for withdrawal, not yet settled.
    InWithdrawal(AffiliateId),
    PaidOut(AffiliateId),
    Credited(AffiliateId),
}

/// One side of a double-entry movement: debits positive, credits negative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Posting {
    pub account: Account,
    pub amount: Decimal,
}

fn transfer(debit: Account, credit: Account, amount: Decimal) -> Vec<Posting> {
    vec![
        Posting {
            account: debit,
            amount,
        },
        Posting {
            account: credit,
            amount: -amount,
        },
    ]
}

impl Event {
    /// The balanced postings this event makes; empty for events that move no money.
    pub fn postings(&self) -> Vec<Posting> {
        use Account::*;
        match self {
            Event::RewardAccrued(e) => {
                transfer(CommissionExpense, Earned(e.affiliate_id.clone()), e.amount)
            }
            Event::RewardClawedBack(e) => {
                transfer(Earned(e.affiliate_id.clone()), CommissionExpense, e.amount)
            }
            Event::AdjustmentPosted(e) => {
                transfer(CommissionExpense, Earned(e.affiliate_id.clone()), e.amount)
            }
            Event::WithdrawalRequested(e) => transfer(
                Earned(e.affiliate_id.clone()),
                InWithdrawal(e.affiliate_id.clone()),
                e.amount,
            ),
            Event::WithdrawalPaid(e) => transfer(
                InWithdrawal(e.affiliate_id.clone()),
                PaidOut(e.affiliate_id.clone()),
                e.amount,
            ),
            Event::WithdrawalRejected(e) => transfer(
                InWithdrawal(e.affiliate_id.clone()),
                Earned(e.affiliate_id.clone()),
                e.amount,
            ),
            Event::CreditApplied(e) => transfer(
                Earned(e.affiliate_id.clone()),
                Credited(e.affiliate_id.clone()),
                e.amount,
            ),
            _ => Vec::new(),
        }
    }

    /// The affiliate whose money or statistics this event touches, if one.
    pub fn affiliate(&self) -> Option<&AffiliateId> {
        match self {
            Event::AffiliateEnrolled(e) => Some(&e.affiliate_id),
            Event::AffiliateSuspended(e) => Some(&e.affiliate_id),
            Event::ClickRecorded(e) => Some(&e.affiliate_id),
            Event::SignupAttributed(e) => Some(&e.affiliate_id),
            Event::RewardAccrued(e) => Some(&e.affiliate_id),
            Event::RewardClawedBack(e) => Some(&e.affiliate_id),
            Event::WithdrawalRequested(e) => Some(&e.affiliate_id),
            Event::WithdrawalPaid(e) => Some(&e.affiliate_id),
            Event::WithdrawalRejected(e) => Some(&e.affiliate_id),
            Event::CreditApplied(e) => Some(&e.affiliate_id),
            Event::AdjustmentPosted(e) => Some(&e.affiliate_id),
            Event::ReferralReassigned(e) => Some(&e.to),
            _ => None,
        }
    }
}

/// An affiliate's accounts, folded from postings. Liabilities are kept
/// positive here (what the program owes), the opposite sign of the postings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffiliateAccounts {
    /// Free to withdraw or credit: `earned − in_withdrawal` of the balance.
    pub free: Decimal,
    pub in_withdrawal: Decimal,
    pub paid_out: Decimal,
    pub credited: Decimal,
}

impl AffiliateAccounts {
    pub fn apply(&mut self, posting: &Posting) {
        let owed = -posting.amount;
        match posting.account {
            Account::Earned(_) => self.free += owed,
            Account::InWithdrawal(_) => self.in_withdrawal += owed,
            Account::PaidOut(_) => self.paid_out += owed,
            Account::Credited(_) => self.credited += owed,
            Account::CommissionExpense => {}
        }
    }

    /// Closed rewards − clawbacks ± adjustments − paid withdrawals − credits.
    pub fn earned(&self) -> Decimal {
        self.free + self.in_withdrawal
    }

    /// Everything ever earned: what is held, paid out and credited.
    pub fn lifetime_earned(&self) -> Decimal {
        self.free + self.in_withdrawal + self.paid_out + self.credited
    }

    /// What may be withdrawn: nothing below the threshold or while earned is negative.
    pub fn available(&self, threshold: Decimal) -> Decimal {
        let earned = self.earned();
        if earned >= threshold && earned >= Decimal::ZERO && self.free > Decimal::ZERO {
            self.free
        } else {
            Decimal::ZERO
        }
    }
}
