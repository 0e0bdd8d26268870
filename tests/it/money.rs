//! Money: currencies, minor units and the half-to-even rounding rule.

use commission_ledger::money::{Currency, Rate};

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

#[test]
fn half_even_rounds_ties_to_the_even_cent() {
    let usd = usd();
    assert_eq!(
        usd.round_half_even("0.125".parse().unwrap()).to_string(),
        "0.12"
    );
    assert_eq!(
        usd.round_half_even("0.135".parse().unwrap()).to_string(),
        "0.14"
    );
    assert_eq!(
        usd.round_half_even("-0.125".parse().unwrap()).to_string(),
        "-0.12"
    );
    assert_eq!(
        usd.round_half_even("2".parse().unwrap()).to_string(),
        "2.00"
    );
}

#[test]
fn minor_units_follow_iso_4217() {
    assert_eq!(Currency::parse("JPY").unwrap().minor_units(), 0);
    assert_eq!(Currency::parse("KWD").unwrap().minor_units(), 3);
    assert_eq!(Currency::parse("BGN").unwrap().minor_units(), 2);
    assert!(Currency::parse("usd").is_err());
    assert!(Currency::parse("XYZ").is_err());
}

#[test]
fn amounts_beyond_the_minor_unit_are_refused() {
    let usd = usd();
    assert!(usd.parse_positive("10.001").is_err());
    assert_eq!(usd.parse_positive("10.500").unwrap().to_string(), "10.500");
    assert!(usd.parse_positive("0").is_err());
    assert!(usd.parse_positive("-1").is_err());
    assert!(usd.parse_positive("1e3").is_err());
    let jpy = Currency::parse("JPY").unwrap();
    assert!(jpy.parse_positive("1.5").is_err());
}

#[test]
fn percent_of_rounds_once() {
    let usd = usd();
    let rate = Rate::parse("20").unwrap();
    assert_eq!(
        usd.percent_of("3.85".parse().unwrap(), rate).to_string(),
        "0.77"
    );
    assert_eq!(
        usd.percent_of("0.125".parse().unwrap(), Rate::parse("100").unwrap())
            .to_string(),
        "0.12"
    );
    assert!(Rate::parse("100.01").is_err());
    assert!(Rate::parse("-1").is_err());
}
