//! Money as the contracts carry it (`orderflow.orders.v1.Money`), parsed once for every
//! service: a positive amount of minor units in an active ISO-4217 currency. Every service
//! parses the wire value with [`Money::from_wire`] at its edge, so an amount that passed one
//! service is valid in the next (a code that merely has three bytes, `"E\0R"`, is not a
//! currency anywhere).
//!
//! ISO-4217 alphabetic codes of the currencies in use (list of 2024), with their minor-unit
//! exponent. A currency not in this list is refused at the edge.

/// (code, minor-unit exponent)
const CURRENCIES: &[(&str, u8)] = &[
    ("AED", 2),
    ("AFN", 2),
    ("ALL", 2),
    ("AMD", 2),
    ("ANG", 2),
    ("AOA", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("AWG", 2),
    ("AZN", 2),
    ("BAM", 2),
    ("BBD", 2),
    ("BDT", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BIF", 0),
    ("BMD", 2),
    ("BND", 2),
    ("BOB", 2),
    ("BRL", 2),
    ("BSD", 2),
    ("BTN", 2),
    ("BWP", 2),
    ("BYN", 2),
    ("BZD", 2),
    ("CAD", 2),
    ("CDF", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("CRC", 2),
    ("CUP", 2),
    ("CVE", 2),
    ("CZK", 2),
    ("DJF", 0),
    ("DKK", 2),
    ("DOP", 2),
    ("DZD", 2),
    ("EGP", 2),
    ("ERN", 2),
    ("ETB", 2),
    ("EUR", 2),
    ("FJD", 2),
    ("FKP", 2),
    ("GBP", 2),
    ("GEL", 2),
    ("GHS", 2),
    ("GIP", 2),
    ("GMD", 2),
    ("GNF", 0),
    ("GTQ", 2),
    ("GYD", 2),
    ("HKD", 2),
    ("HNL", 2),
    ("HTG", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("IQD", 3),
    ("IRR", 2),
    ("ISK", 0),
    ("JMD", 2),
    ("JOD", 3),
    ("JPY", 0),
    ("KES", 2),
    ("KGS", 2),
    ("KHR", 2),
    ("KMF", 0),
    ("KPW", 2),
    ("KRW", 0),
    ("KWD", 3),
    ("KYD", 2),
    ("KZT", 2),
    ("LAK", 2),
    ("LBP", 2),
    ("LKR", 2),
    ("LRD", 2),
    ("LSL", 2),
    ("LYD", 3),
    ("MAD", 2),
    ("MDL", 2),
    ("MGA", 2),
    ("MKD", 2),
    ("MMK", 2),
    ("MNT", 2),
    ("MOP", 2),
    ("MRU", 2),
    ("MUR", 2),
    ("MVR", 2),
    ("MWK", 2),
    ("MXN", 2),
    ("MYR", 2),
    ("MZN", 2),
    ("NAD", 2),
    ("NGN", 2),
    ("NIO", 2),
    ("NOK", 2),
    ("NPR", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PAB", 2),
    ("PEN", 2),
    ("PGK", 2),
    ("PHP", 2),
    ("PKR", 2),
    ("PLN", 2),
    ("PYG", 0),
    ("QAR", 2),
    ("RON", 2),
    ("RSD", 2),
    ("RUB", 2),
    ("RWF", 0),
    ("SAR", 2),
    ("SBD", 2),
    ("SCR", 2),
    ("SDG", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("SHP", 2),
    ("SLE", 2),
    ("SOS", 2),
    ("SRD", 2),
    ("SSP", 2),
    ("STN", 2),
    ("SVC", 2),
    ("SYP", 2),
    ("SZL", 2),
    ("THB", 2),
    ("TJS", 2),
    ("TMT", 2),
    ("TND", 3),
    ("TOP", 2),
    ("TRY", 2),
    ("TTD", 2),
    ("TWD", 2),
    ("TZS", 2),
    ("UAH", 2),
    ("UGX", 0),
    ("USD", 2),
    ("UYU", 2),
    ("UZS", 2),
    ("VES", 2),
    ("VND", 0),
    ("VUV", 0),
    ("WST", 2),
    ("XAF", 0),
    ("XCD", 2),
    ("XOF", 0),
    ("XPF", 0),
    ("YER", 2),
    ("ZAR", 2),
    ("ZMW", 2),
    ("ZWG", 2),
];

/// A known ISO-4217 currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: &'static str,
    minor_unit_exponent: u8,
}

impl Currency {
    /// Looks a code up; `None` for anything that is not an active ISO-4217 code
    /// (lower case included: the wire format is upper case).
    pub fn from_code(code: &str) -> Option<Self> {
        CURRENCIES
            .iter()
            .find(|(known, _)| *known == code)
            .map(|&(code, minor_unit_exponent)| Self {
                code,
                minor_unit_exponent,
            })
    }

    /// The three-letter code.
    pub fn code(self) -> &'static str {
        self.code
    }

    /// Digits after the decimal point in this currency (2 for EUR, 0 for JPY).
    pub fn minor_unit_exponent(self) -> u8 {
        self.minor_unit_exponent
    }
}

/// Why a wire amount is not money.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// No amount, or proto3's zero value.
    #[error("is required")]
    Missing,
    /// Zero or negative.
    #[error("must be positive")]
    NotPositive,
    /// Not an active ISO-4217 code.
    #[error("is not a known ISO-4217 currency code")]
    UnknownCurrency,
}

/// A positive amount in a currency's minor unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Money {
    amount_minor: i64,
    currency: Currency,
}

impl Money {
    /// A positive amount.
    pub fn new(amount_minor: i64, currency: Currency) -> Result<Self, MoneyError> {
        match amount_minor {
            0 => Err(MoneyError::Missing),
            n if n < 0 => Err(MoneyError::NotPositive),
            n => Ok(Self {
                amount_minor: n,
                currency,
            }),
        }
    }

    /// Parses the wire form; which of the two fields is wrong is told apart by the error
    /// (`UnknownCurrency` for the code, the others for the amount).
    pub fn from_wire(money: &crate::orders::v1::Money) -> Result<Self, MoneyError> {
        let currency = Currency::from_code(&money.currency_code).ok_or(if money.currency_code.is_empty() {
            MoneyError::Missing
        } else {
            MoneyError::UnknownCurrency
        })?;
        Self::new(money.amount_minor, currency)
    }

    /// The wire form.
    pub fn to_wire(self) -> crate::orders::v1::Money {
        crate::orders::v1::Money {
            amount_minor: self.amount_minor,
            currency_code: self.currency.code().to_owned(),
        }
    }

    /// The amount in minor units.
    pub fn amount_minor(self) -> i64 {
        self.amount_minor
    }

    /// The currency.
    pub fn currency(self) -> Currency {
        self.currency
    }
}

/// The largest order total accepted, per currency: a bound on what one forged, mistyped or
/// malicious order can move. By default 1,000,000 major units of any currency (EUR
/// 1,000,000.00, JPY 1,000,000); operators lower or raise it per currency
/// (`"JPY=150000000,EUR=50000"`, in major units). Order-svc refuses a larger order
/// (INVALID_ARGUMENT on `total.amount_minor`); payment-svc refuses to authorize one that
/// reaches it anyway (dead-lettered), so a forged event cannot move more either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotalLimits {
    default_major: i64,
    overrides: Vec<(Currency, i64)>,
}

impl Default for TotalLimits {
    fn default() -> Self {
        Self {
            default_major: Self::DEFAULT_MAJOR,
            overrides: Vec::new(),
        }
    }
}

impl TotalLimits {
    /// The default limit, in major units.
    pub const DEFAULT_MAJOR: i64 = 1_000_000;

    /// `default_major` for every currency but those in `overrides` (`"JPY=150000000,EUR=5"`,
    /// major units, empty for none).
    pub fn parse(default_major: i64, overrides: &str) -> Result<Self, String> {
        if default_major <= 0 {
            return Err("the default order total limit must be positive".into());
        }
        let mut parsed = Vec::new();
        for entry in overrides.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (code, major) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?}: expected CODE=MAJOR_UNITS"))?;
            let currency = Currency::from_code(code.trim()).ok_or_else(|| format!("{code:?} is not a currency"))?;
            let major: i64 = major
                .trim()
                .parse()
                .ok()
                .filter(|m| *m > 0)
                .ok_or_else(|| format!("{entry:?}: the limit must be a positive integer"))?;
            parsed.push((currency, major));
        }
        Ok(Self {
            default_major,
            overrides: parsed,
        })
    }

    /// The largest total in `currency`, in minor units (saturating at `i64::MAX`).
    pub fn max_minor(&self, currency: Currency) -> i64 {
        let major = self
            .overrides
            .iter()
            .find(|(c, _)| *c == currency)
            .map_or(self.default_major, |(_, m)| *m);
        major.saturating_mul(10_i64.pow(u32::from(currency.minor_unit_exponent())))
    }

    /// Parses the settings' form: `DEFAULT_MAJOR[,CODE=MAJOR...]`, e.g. `1000000,JPY=150000000`.
    pub fn from_setting(setting: &str) -> Result<Self, String> {
        let (default, overrides) = setting.split_once(',').unwrap_or((setting, ""));
        let default = default
            .trim()
            .parse()
            .map_err(|_| format!("{default:?}: expected the default limit in major units"))?;
        Self::parse(default, overrides)
    }

    /// Whether `money` is within the limit of its currency.
    pub fn allows(&self, money: Money) -> bool {
        money.amount_minor() <= self.max_minor(money.currency())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Currency, Money, MoneyError};
    use crate::orders::v1 as wire;

    #[test]
    fn known_codes_resolve_and_others_do_not() {
        assert_eq!(Currency::from_code("EUR").map(Currency::code), Some("EUR"));
        assert_eq!(Currency::from_code("JPY").map(Currency::minor_unit_exponent), Some(0));
        assert_eq!(Currency::from_code("eur"), None);
        assert_eq!(Currency::from_code("XXX"), None);
        assert_eq!(Currency::from_code(""), None);
    }

    #[test]
    fn wire_money_is_positive_and_in_a_known_currency() {
        let wire = |amount_minor, code: &str| wire::Money {
            amount_minor,
            currency_code: code.into(),
        };
        assert_eq!(Money::from_wire(&wire(5, "EUR")).map(Money::amount_minor), Ok(5));
        assert_eq!(Money::from_wire(&wire(5, "E\0R")), Err(MoneyError::UnknownCurrency));
        assert_eq!(Money::from_wire(&wire(5, "")), Err(MoneyError::Missing));
        assert_eq!(Money::from_wire(&wire(0, "EUR")), Err(MoneyError::Missing));
        assert_eq!(Money::from_wire(&wire(-1, "EUR")), Err(MoneyError::NotPositive));
    }

    #[test]
    fn limits_are_per_currency_in_major_units() {
        use super::TotalLimits;
        let eur = Currency::from_code("EUR").unwrap();
        let jpy = Currency::from_code("JPY").unwrap();
        let limits = TotalLimits::parse(1_000, "JPY=150000").unwrap();
        assert_eq!(limits.max_minor(eur), 100_000);
        assert_eq!(limits.max_minor(jpy), 150_000);
        assert!(limits.allows(Money::new(100_000, eur).unwrap()));
        assert!(!limits.allows(Money::new(100_001, eur).unwrap()));
        assert_eq!(TotalLimits::parse(i64::MAX, "").unwrap().max_minor(eur), i64::MAX);
        assert!(TotalLimits::parse(0, "").is_err());
        assert!(TotalLimits::parse(5, "XYZ=3").is_err());
        assert!(TotalLimits::parse(5, "EUR=-3").is_err());
        assert_eq!(TotalLimits::from_setting("1000,JPY=150000"), Ok(limits));
        assert_eq!(TotalLimits::from_setting("1000000"), Ok(TotalLimits::default()));
        assert!(TotalLimits::from_setting("JPY=5").is_err());
    }
}
