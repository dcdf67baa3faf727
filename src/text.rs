//! The one check of the free-text identifiers the contracts carry (SKUs, payment tokens):
//! visible text only. Every service applies it at its edge.
//!
//! Allowed: letters, marks, numbers, punctuation, symbols and spaces between them, so
//! "Café crème 250 g", "商品-42" and emoji sequences ("👩‍💻", "❤️", "🇫🇷", "👍🏽")
//! are SKUs. Refused: control and format characters (bidirectional overrides such as
//! U+2067, the soft hyphen U+00AD, tag characters, zero-width spaces) that make two
//! different strings look the same in a log, a terminal or a spreadsheet; private-use,
//! surrogate and unassigned code points; line and paragraph separators; leading or
//! trailing white space (and so a text that is only white space). The one format
//! character allowed is the zero-width joiner between two visible characters, which is
//! how emoji sequences are written.

use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory as _};

/// Why a text is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// Empty (proto3's zero value).
    #[error("is required")]
    Missing,
    /// More characters than allowed.
    #[error("must be at most {0} characters")]
    TooLong(usize),
    /// Holds an invisible, control or unassigned character, or starts or ends with space.
    #[error("must contain only visible characters, with no space at either end")]
    NotVisible,
}

const ZERO_WIDTH_JOINER: char = '\u{200D}';

/// Checks that `raw` is 1 to `max_chars` characters of visible text (see the module).
pub fn visible(raw: &str, max_chars: usize) -> Result<(), TextError> {
    if raw.is_empty() {
        return Err(TextError::Missing);
    }
    let chars: Vec<char> = raw.chars().collect();
    if chars.len() > max_chars {
        return Err(TextError::TooLong(max_chars));
    }
    let is_space = |c: char| c.general_category_group() == GeneralCategoryGroup::Separator;
    if chars.first().copied().is_some_and(is_space) || chars.last().copied().is_some_and(is_space) {
        return Err(TextError::NotVisible);
    }
    for (index, &c) in chars.iter().enumerate() {
        let allowed = match c.general_category_group() {
            GeneralCategoryGroup::Letter
            | GeneralCategoryGroup::Mark
            | GeneralCategoryGroup::Number
            | GeneralCategoryGroup::Punctuation
            | GeneralCategoryGroup::Symbol => true,
            // Only the plain space separators (not the line or paragraph separators).
            GeneralCategoryGroup::Separator => !matches!(c, '\u{2028}' | '\u{2029}'),
            GeneralCategoryGroup::Other => {
                c == ZERO_WIDTH_JOINER
                    && index > 0
                    && index + 1 < chars.len()
                    && ![chars[index - 1], chars[index + 1]]
                        .iter()
                        .any(|&n| is_space(n) || n == ZERO_WIDTH_JOINER)
            }
        };
        if !allowed {
            return Err(TextError::NotVisible);
        }
    }
    Ok(())
}

/// A stock-keeping unit, as every service parses it at its edge: 1 to 64 characters of
/// visible text. One type, so that order-svc and inventory-svc apply one rule. SKUs are
/// compared as written, byte for byte: no Unicode normalisation, so a catalogue must spell
/// each SKU one way (a composed and a decomposed "é" are two SKUs).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sku(String);

impl Sku {
    /// The longest SKU.
    pub const MAX_CHARS: usize = 64;

    /// Parses the wire value.
    pub fn parse(raw: &str) -> Result<Self, TextError> {
        visible(raw, Self::MAX_CHARS)?;
        Ok(Self(raw.to_owned()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sku {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::{TextError, visible};

    #[test]
    fn real_names_and_emoji_sequences_are_visible_text() {
        for ok in [
            "SKU-1",
            "Café crème 250 g",
            "商品-42",
            "👩\u{200D}💻",
            "❤\u{FE0F}",
            "🇫🇷",
            "👍🏽",
            "1\u{FE0F}\u{20E3}",
            "a b",
        ] {
            assert_eq!(visible(ok, 64), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn invisible_and_control_characters_and_blank_text_are_refused() {
        for bad in [
            "a\u{2067}b",
            "soft\u{00AD}hyphen",
            "tag\u{E0041}",
            "zero\u{200B}width",
            "nul\0",
            "line\u{2028}break",
            "private\u{E000}",
            "unassigned\u{0378}",
            "   ",
            " leading",
            "trailing\u{00A0}",
            "\u{200D}joiner first",
            "a\u{200D}\u{200D}b",
            "a \u{200D}b",
            "bom\u{FEFF}",
        ] {
            assert_eq!(visible(bad, 64), Err(TextError::NotVisible), "{bad:?}");
        }
        assert_eq!(visible("", 64), Err(TextError::Missing));
        assert_eq!(visible("abc", 2), Err(TextError::TooLong(2)));
    }
}
