//! Names that clients hand the agent (snapshot ids and handles, volume
//! names): which ones a snapshot handle may be, and how much of one any
//! message repeats.
//!
//! Whatever a client sends comes back in status messages and logs. Echoed
//! whole, a 1 MiB id made a ~786 KB status message that gRPC clients refuse
//! (RESOURCE_EXHAUSTED instead of the NOT_FOUND the server meant), so every
//! echo goes through [`Echo`] and every status message through
//! [`bound_message`].

use std::fmt;

use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

/// Longest snapshot handle (bytes): commit refuses longer ones, so a query
/// for a longer id is invalid, not merely unknown.
pub const MAX_HANDLE_BYTES: usize = 1024;

/// How many characters of a name a message repeats.
const ECHO_CHARS: usize = 64;

/// Longest status message (bytes) the agent sends.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// A client-supplied name as a message shows it: quoted and escaped like
/// `{:?}` (control and format characters become `\u{..}`, so a bidi
/// override cannot reorder the message around it), and cut to its first 64
/// characters plus its length when longer.
pub struct Echo<'a>(pub &'a str);

impl fmt::Display for Echo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(ECHO_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}… ({} bytes)", &self.0[..cut], self.0.len()),
        }
    }
}

impl fmt::Debug for Echo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `message` cut to at most about [`MAX_MESSAGE_BYTES`]: its head and its
/// tail (which often says what to do, e.g. "take a full backup") around a
/// note of how much was cut. Names inside should already be [`Echo`]ed; this
/// is the backstop for messages built elsewhere.
pub fn bound_message(message: String) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let head = floor_char_boundary(&message, MAX_MESSAGE_BYTES * 3 / 4);
    let tail = ceil_char_boundary(&message, message.len() - MAX_MESSAGE_BYTES / 5);
    format!("{} … [{} of {} bytes cut] … {}", &message[..head], tail - head, message.len(), &message[tail..])
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// Why a string cannot be a snapshot handle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("snapshot handle is empty")]
    Empty,
    #[error("snapshot handle is {0} bytes; at most {MAX_HANDLE_BYTES}")]
    TooLong(usize),
    #[error(
        "snapshot handle {} has the invisible or control character U+{:04X} at byte {at}: it would look like another handle in listings",
        Echo(handle), *ch as u32
    )]
    Invisible { handle: String, ch: char, at: usize },
}

/// A snapshot handle: 1 to [`MAX_HANDLE_BYTES`] bytes with no character
/// that [`is_invisible`]: two handles that look the same in `cbtctl
/// snapshot list` or a log must be the same handle.
pub fn check_handle(handle: &str) -> Result<(), NameError> {
    if handle.is_empty() {
        return Err(NameError::Empty);
    }
    if handle.len() > MAX_HANDLE_BYTES {
        return Err(NameError::TooLong(handle.len()));
    }
    match handle.char_indices().find(|&(_, c)| is_invisible(c)) {
        Some((at, ch)) => Err(NameError::Invisible { handle: handle.to_string(), ch, at }),
        None => Ok(()),
    }
}

/// Characters that show nothing, or change how their neighbours show, in
/// a listing: controls, format characters (zero-width spaces and joiners,
/// bidi overrides and isolates, the BOM, tags: category Cf), private-use
/// and unassigned code points, separators other than the ASCII space
/// (no-break and other look-alike spaces, line and paragraph separators),
/// and the default-ignorable characters outside those categories
/// (variation selectors, fillers, the combining grapheme joiner).
pub fn is_invisible(c: char) -> bool {
    if c == ' ' {
        return false;
    }
    matches!(c.general_category_group(), GeneralCategoryGroup::Other | GeneralCategoryGroup::Separator)
        || DEFAULT_IGNORABLE.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

/// Unicode's Default_Ignorable_Code_Point ranges that are not already
/// Other (Cc, Cf, Cn, Co) or Separator (DerivedCoreProperties.txt).
const DEFAULT_IGNORABLE: &[(char, char)] = &[
    ('\u{034F}', '\u{034F}'),   // combining grapheme joiner
    ('\u{115F}', '\u{1160}'),   // Hangul choseong and jungseong fillers
    ('\u{17B4}', '\u{17B5}'),   // Khmer inherent vowels
    ('\u{180B}', '\u{180F}'),   // Mongolian free variation selectors
    ('\u{3164}', '\u{3164}'),   // Hangul filler
    ('\u{FE00}', '\u{FE0F}'),   // variation selectors
    ('\u{FFA0}', '\u{FFA0}'),   // halfwidth Hangul filler
    ('\u{E0000}', '\u{E0FFF}'), // tags and variation selectors supplement
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_quotes_escapes_and_cuts() {
        assert_eq!(Echo("snap-1").to_string(), "\"snap-1\"");
        // A right-to-left override must not reach a terminal raw.
        assert_eq!(Echo("a\u{202E}b\u{200B}c").to_string(), "\"a\\u{202e}b\\u{200b}c\"");
        let long = "é".repeat(1 << 19); // 1 MiB
        let shown = Echo(&long).to_string();
        assert_eq!(shown, format!("{:?}… (1048576 bytes)", "é".repeat(64)));
        assert!(shown.len() < 200);
    }

    #[test]
    fn long_messages_keep_head_and_tail() {
        let short = "x".repeat(MAX_MESSAGE_BYTES);
        assert_eq!(bound_message(short.clone()), short);
        let long = format!("start {} end; take a full backup", "ü".repeat(1 << 20));
        let bounded = bound_message(long.clone());
        assert!(bounded.len() <= MAX_MESSAGE_BYTES + 64, "{}", bounded.len());
        assert!(bounded.starts_with("start ü") && bounded.ends_with("end; take a full backup"), "{bounded}");
        assert!(bounded.contains(&format!("of {} bytes cut", long.len())), "{bounded}");
    }

    #[test]
    fn handles_that_would_look_alike_are_refused() {
        for ok in ["snap-1", "pvc-3f2a/snapshot 7", "снимок-1", "スナップ", "שלום-1", "a_b.c:d"] {
            assert_eq!(check_handle(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(check_handle(""), Err(NameError::Empty));
        assert_eq!(check_handle(&"x".repeat(MAX_HANDLE_BYTES)), Ok(()));
        assert_eq!(check_handle(&"x".repeat(MAX_HANDLE_BYTES + 1)), Err(NameError::TooLong(MAX_HANDLE_BYTES + 1)));
        for (bad, ch) in [
            ("snap-\u{202E}1-pans", '\u{202E}'), // right-to-left override
            ("snap\u{200B}-1", '\u{200B}'),      // zero-width space
            ("snap-\u{2066}1", '\u{2066}'),      // left-to-right isolate
            ("snap-1\u{200D}", '\u{200D}'),      // zero-width joiner
            ("\u{FEFF}snap-1", '\u{FEFF}'),      // byte order mark
            ("snap-1\u{E0041}", '\u{E0041}'),    // tag character
            ("snap\u{00A0}1", '\u{00A0}'),       // no-break space
            ("snap\u{2028}1", '\u{2028}'),       // line separator
            ("snap-1\u{FE0F}", '\u{FE0F}'),      // variation selector
            ("snap\u{3164}1", '\u{3164}'),       // Hangul filler
            ("snap\u{034F}1", '\u{034F}'),       // combining grapheme joiner
            ("snap\n1", '\n'),
            ("snap\u{7F}1", '\u{7F}'),
            ("snap\u{E000}1", '\u{E000}'), // private use
        ] {
            match check_handle(bad) {
                Err(NameError::Invisible { ch: found, .. }) => assert_eq!(found, ch, "{bad:?}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        // The refusal itself shows the handle escaped.
        let message = check_handle("a\u{202E}b").unwrap_err().to_string();
        assert!(message.contains("\\u{202e}") && message.contains("U+202E"), "{message}");
    }
}
