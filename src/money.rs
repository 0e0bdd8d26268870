//! Money: exact decimal amounts, ISO 4217 currencies with their minor units,
//! percent rates, and the one named rounding rule of the ledger.
//!
//! Pure: no I/O, no clock. Every amount that flows through the ledger is a
//! [`Decimal`]; there is no floating point anywhere in this module or above it.

use std::fmt;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an amount, a currency or a rate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("`{0}` is not an ISO 4217 currency code")]
    UnknownCurrency(String),
    #[error("`{0}` is not a decimal amount")]
    NotAnAmount(String),
    #[error("{amount} has more decimals than {currency} allows ({minor_units})")]
    TooPrecise {
        amount: String,
        currency: Currency,
        minor_units: u32,
    },
    #[error("the amount must be greater than zero, got {0}")]
    NotPositive(String),
    #[error("an amount has at most 15 integer digits, got {0}")]
    TooLarge(String),
    #[error("a rate is a percent from 0 to 100, got {0}")]
    RateOutOfRange(String),
}

/// The most integer digits an amount may have: far beyond any real
/// commission, far below where a `Decimal` product could overflow.
const MAX_INTEGER_DIGITS: usize = 15;

/// The most digits after the point a written amount or rate may have.
const MAX_FRACTION_DIGITS: usize = 10;

/// Parses `-?[0-9]+(\.[0-9]+)?` only: no exponent, no sign `+`, no spaces,
/// no thousands separators; at most [`MAX_INTEGER_DIGITS`] integer and
/// [`MAX_FRACTION_DIGITS`] fraction digits.
fn parse_plain_decimal(text: &str) -> Option<Decimal> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = match digits.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (digits, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || int.len() > MAX_INTEGER_DIGITS {
        return None;
    }
    if let Some(frac) = frac
        && (!all_digits(frac) || frac.len() > MAX_FRACTION_DIGITS)
    {
        return None;
    }
    text.parse().ok()
}

/// Active ISO 4217 codes with a minor unit other than 2.
const MINOR_UNITS_NOT_TWO: &[(&str, u32)] = &[
    ("BIF", 0),
    ("CLP", 0),
    ("DJF", 0),
    ("GNF", 0),
    ("ISK", 0),
    ("JPY", 0),
    ("KMF", 0),
    ("KRW", 0),
    ("PYG", 0),
    ("RWF", 0),
    ("UGX", 0),
    ("UYI", 0),
    ("VND", 0),
    ("VUV", 0),
    ("XAF", 0),
    ("XOF", 0),
    ("XPF", 0),
    ("BHD", 3),
    ("IQD", 3),
    ("JOD", 3),
    ("KWD", 3),
    ("LYD", 3),
    ("OMR", 3),
    ("TND", 3),
    ("CLF", 4),
    ("UYW", 4),
];

/// Active ISO 4217 codes whose minor unit is 2 (cents).
const MINOR_UNITS_TWO: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN",
    "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHE",
    "CHF", "CHW", "CNY", "COP", "COU", "CRC", "CUP", "CVE", "CZK", "DKK", "DOP", "DZD", "EGP",
    "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GTQ", "GYD", "HKD",
    "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IRR", "JMD", "KES", "KGS", "KHR", "KPW", "KYD",
    "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP",
    "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR",
    "NZD", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "QAR", "RON", "RSD", "RUB", "SAR", "SBD",
    "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL",
    "THB", "TJS", "TMT", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "USD", "USN", "UYU", "UZS",
    "VED", "VES", "WST", "XCD", "XCG", "YER", "ZAR", "ZMW", "ZWG",
];

/// An ISO 4217 currency code known to the ledger, with its minor unit.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency {
    code: [u8; 3],
    minor_units: u8,
}

impl Currency {
    /// Parses an upper-case ISO 4217 code such as `USD`.
    pub fn parse(code: &str) -> Result<Currency, MoneyError> {
        let unknown = || MoneyError::UnknownCurrency(code.to_string());
        let bytes: [u8; 3] = code.as_bytes().try_into().map_err(|_| unknown())?;
        let minor_units =
            if let Some((_, units)) = MINOR_UNITS_NOT_TWO.iter().find(|(c, _)| *c == code) {
                *units
            } else if MINOR_UNITS_TWO.contains(&code) {
                2
            } else {
                return Err(unknown());
            };
        Ok(Currency {
            code: bytes,
            minor_units: minor_units as u8,
        })
    }

    pub fn code(&self) -> &str {
        // The code was checked against the ASCII table at construction.
        std::str::from_utf8(&self.code).unwrap_or("XXX")
    }

    /// Digits after the decimal point in this currency (2 for USD, 0 for JPY).
    pub fn minor_units(&self) -> u32 {
        u32::from(self.minor_units)
    }

    /// Parses a positive amount in this currency: a decimal string with at
    /// most [`Self::minor_units`] decimals, greater than zero.
    pub fn parse_positive(&self, text: &str) -> Result<Decimal, MoneyError> {
        let amount = self.parse_amount(text)?;
        if amount <= Decimal::ZERO {
            return Err(MoneyError::NotPositive(text.to_string()));
        }
        Ok(amount)
    }

    /// Parses an amount of any sign in this currency.
    pub fn parse_amount(&self, text: &str) -> Result<Decimal, MoneyError> {
        let amount =
            parse_plain_decimal(text).ok_or_else(|| MoneyError::NotAnAmount(text.to_string()))?;
        self.check_scale(amount)?;
        Ok(amount)
    }

    /// Refuses an amount that carries more decimals than the minor unit
    /// (trailing zeros do not count: `10.500` is a valid USD amount).
    pub fn check_scale(&self, amount: Decimal) -> Result<(), MoneyError> {
        if amount.normalize().scale() > self.minor_units() {
            return Err(MoneyError::TooPrecise {
                amount: amount.to_string(),
                currency: *self,
                minor_units: self.minor_units(),
            });
        }
        Ok(())
    }

    /// Checks an amount that arrived as a number rather than as text (a
    /// program's bounty and threshold) as [`Self::parse_amount`] checks text:
    /// at most 15 integer digits and the minor unit.
    pub fn check_amount(&self, amount: Decimal) -> Result<(), MoneyError> {
        if amount.abs().trunc().to_string().len() > MAX_INTEGER_DIGITS {
            return Err(MoneyError::TooLarge(amount.to_string()));
        }
        self.check_scale(amount)
    }

    /// Rounds half-to-even (banker's rounding) to the minor unit: the one
    /// rounding rule of the ledger, applied once per reward line.
    pub fn round_half_even(&self, value: Decimal) -> Decimal {
        let mut rounded =
            value.round_dp_with_strategy(self.minor_units(), RoundingStrategy::MidpointNearestEven);
        rounded.rescale(self.minor_units());
        rounded
    }

    /// The amount written with exactly the currency's minor unit: `20.5` → `"20.50"`.
    pub fn format(&self, amount: Decimal) -> String {
        let mut shown = amount;
        shown.rescale(self.minor_units());
        shown.to_string()
    }

    /// `rate` percent of `basis`, rounded half-to-even to the minor unit.
    pub fn percent_of(&self, basis: Decimal, rate: Rate) -> Decimal {
        self.round_half_even(basis * rate.percent() / Decimal::ONE_HUNDRED)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        Currency::parse(&code).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Currency {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Currency".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217 code"})
    }
}

/// The JSON Schema of an amount a request writes as text, which
/// [`Currency::parse_positive`] reads: the syntax of `parse_plain_decimal`
/// without a sign, as far as a pattern can say it. The amount must also be
/// above zero and carry no more decimals than the currency's minor unit,
/// trailing zeros aside (`10.500` is a USD amount).
pub struct PositiveAmount;

impl schemars::JsonSchema for PositiveAmount {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PositiveAmount".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let pattern =
            format!("^[0-9]{{1,{MAX_INTEGER_DIGITS}}}(\\.[0-9]{{1,{MAX_FRACTION_DIGITS}}})?$");
        let description = format!(
            "a decimal above zero: at most {MAX_INTEGER_DIGITS} digits before the point, and no more decimals than the currency's minor unit (trailing zeros aside)"
        );
        schemars::json_schema!({"type": "string", "pattern": pattern, "description": description})
    }
}

/// A commission rate in percent, an exact decimal from 0 to 100.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Rate(Decimal);

impl Rate {
    pub fn new(percent: Decimal) -> Result<Rate, MoneyError> {
        if percent < Decimal::ZERO || percent > Decimal::ONE_HUNDRED {
            return Err(MoneyError::RateOutOfRange(percent.to_string()));
        }
        Ok(Rate(percent.normalize()))
    }

    pub fn parse(text: &str) -> Result<Rate, MoneyError> {
        let percent = parse_plain_decimal(text)
            .ok_or_else(|| MoneyError::RateOutOfRange(text.to_string()))?;
        Rate::new(percent)
    }

    pub fn percent(&self) -> Decimal {
        self.0
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Rate::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Rate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Rate".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "description": "percent, exact decimal from 0 to 100", "pattern": "^[0-9]+(\\.[0-9]+)?$"})
    }
}
