//! Value types parsed at the edge. Each constructor refuses what proto3 cannot tell
//! apart from "missing" (`0`, `""`), so a default value never becomes a business value.

pub use orderflow::text::Sku;

use super::{Currency, Money};

/// Why a raw value is not a valid domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Missing: proto3's zero value or an empty string.
    #[error("is required")]
    Missing,
    /// Zero or negative where a positive number is required.
    #[error("must be positive")]
    NotPositive,
    /// Larger than allowed.
    #[error("must be at most {0}")]
    TooLarge(i64),
    /// Longer than allowed.
    #[error("must be at most {0} characters")]
    TooLong(usize),
    /// Contains an invisible, control or unassigned character, or space at either end.
    #[error("must contain only visible characters, with no space at either end")]
    NotPrintable,
    /// Not an active ISO-4217 code.
    #[error("is not a known ISO-4217 currency code")]
    UnknownCurrency,
    /// Not a UUID.
    #[error("must be a UUID")]
    NotUuid,
}

impl From<orderflow::money::MoneyError> for ValueError {
    fn from(error: orderflow::money::MoneyError) -> Self {
        use orderflow::money::MoneyError;
        match error {
            MoneyError::Missing => Self::Missing,
            MoneyError::NotPositive => Self::NotPositive,
            MoneyError::UnknownCurrency => Self::UnknownCurrency,
        }
    }
}

impl From<orderflow::text::TextError> for ValueError {
    fn from(error: orderflow::text::TextError) -> Self {
        use orderflow::text::TextError;
        match error {
            TextError::Missing => Self::Missing,
            TextError::TooLong(max) => Self::TooLong(max),
            TextError::NotVisible => Self::NotPrintable,
        }
    }
}

/// An order's identity: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrderId(uuid::Uuid);

impl OrderId {
    /// A new, time-ordered id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    /// Parses the wire form; the nil UUID is refused like an empty string.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        if raw.is_empty() {
            return Err(ValueError::Missing);
        }
        match uuid::Uuid::parse_str(raw) {
            Ok(id) if !id.is_nil() => Ok(Self(id)),
            Ok(_) => Err(ValueError::Missing),
            Err(_) => Err(ValueError::NotUuid),
        }
    }

    /// The UUID.
    pub fn as_uuid(self) -> uuid::Uuid {
        self.0
    }
}

impl From<uuid::Uuid> for OrderId {
    fn from(id: uuid::Uuid) -> Self {
        Self(id)
    }
}

impl std::fmt::Display for OrderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A customer's id: positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CustomerId(i64);

impl CustomerId {
    /// Parses the wire value; `0` means missing.
    pub fn parse(raw: i64) -> Result<Self, ValueError> {
        match raw {
            0 => Err(ValueError::Missing),
            n if n < 0 => Err(ValueError::NotPositive),
            n => Ok(Self(n)),
        }
    }

    /// The number.
    pub fn get(self) -> i64 {
        self.0
    }
}

/// How many units of an item: 1 to [`Quantity::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(i32);

impl Quantity {
    /// The most units of one line.
    pub const MAX: i32 = 1_000_000;

    /// Parses the wire value; `0` means missing.
    pub fn parse(raw: i32) -> Result<Self, ValueError> {
        match raw {
            0 => Err(ValueError::Missing),
            n if n < 0 => Err(ValueError::NotPositive),
            n if n > Self::MAX => Err(ValueError::TooLarge(i64::from(Self::MAX))),
            n => Ok(Self(n)),
        }
    }

    /// The count.
    pub fn get(self) -> i32 {
        self.0
    }
}

/// Checks a bounded string of visible characters (the rule every service applies:
/// [`orderflow::text::visible`]).
fn printable(raw: &str, max_chars: usize) -> Result<String, ValueError> {
    orderflow::text::visible(raw, max_chars)?;
    Ok(raw.to_owned())
}

/// The gateway's token for the card: 1 to 128 printable characters. Not a card number.
#[derive(Clone, PartialEq, Eq)]
pub struct PaymentToken(String);

impl PaymentToken {
    /// The longest token.
    pub const MAX_CHARS: usize = 128;

    /// Parses the wire value.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        printable(raw, Self::MAX_CHARS).map(Self)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PaymentToken {
    // Tokens are not card numbers, but they still let someone charge the card: keep them
    // out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PaymentToken([redacted])")
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineItem {
    /// What.
    pub sku: Sku,
    /// How many.
    pub quantity: Quantity,
    /// Price of one.
    pub unit_price: Money,
}

/// Parses a currency code.
pub fn parse_currency(raw: &str) -> Result<Currency, ValueError> {
    if raw.is_empty() {
        return Err(ValueError::Missing);
    }
    Currency::from_code(raw).ok_or(ValueError::UnknownCurrency)
}
