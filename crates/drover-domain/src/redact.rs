//! Keeping secret values out of everything drover writes down. A [`Redactor`] knows the
//! secret values of one run's project and replaces each with `[redacted:NAME]` in text,
//! bytes and JSON; a [`StreamRedactor`] does the same for output that arrives in pieces
//! (a child's stdout, a streamed model answer), holding back an unfinished line so a value
//! split across two reads is still caught. One type used by the log copier, the worker and
//! the agents means one definition of "redacted".

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};

use crate::SecretValues;

/// Values shorter than this are not searched for: they would match ordinary text.
/// (Setting a secret requires [`crate::MIN_SECRET_VALUE_CHARS`]; this guards old data.)
const MIN_NEEDLE_BYTES: usize = 4;
/// The most a [`StreamRedactor`] holds back waiting for the end of a line.
const MAX_PENDING_BYTES: usize = 64 * 1024;
/// What replaces everything when the matcher cannot be built (never expected): nothing
/// is shown rather than something unredacted.
const WITHHELD: &str = "[redacted: output withheld]";

/// Replaces secret values with `[redacted:NAME]`. Cheap to clone; empty (the default)
/// changes nothing.
#[derive(Clone, Default)]
pub struct Redactor {
    inner: Option<Arc<Matcher>>,
}

struct Matcher {
    /// `None` when it could not be built: everything is withheld.
    automaton: Option<AhoCorasick>,
    replacements: Vec<String>,
    /// The longest value searched for, in bytes.
    longest: usize,
}

impl Redactor {
    /// A redactor for `secrets`. A multi-line value is also searched for line by line,
    /// so output read a line at a time cannot carry it either.
    pub fn new(secrets: &SecretValues) -> Self {
        let mut needles: Vec<(String, String)> = Vec::new();
        for (name, value) in secrets.iter() {
            let replacement = format!("[redacted:{name}]");
            if value.len() >= MIN_NEEDLE_BYTES {
                needles.push((value.to_owned(), replacement.clone()));
            }
            if value.contains('\n') {
                for line in value.lines().map(|l| l.trim_end_matches('\r')) {
                    if line.trim().len() >= crate::MIN_SECRET_VALUE_CHARS {
                        needles.push((line.to_owned(), replacement.clone()));
                    }
                }
            }
        }
        if needles.is_empty() {
            return Self::default();
        }
        // Longest first, so of two overlapping values at one place the longer one wins.
        needles.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        needles.dedup_by(|a, b| a.0 == b.0);
        let longest = needles.iter().map(|(needle, _)| needle.len()).max().unwrap_or(0);
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(needles.iter().map(|(needle, _)| needle.as_bytes()))
            .ok();
        let replacements = needles.into_iter().map(|(_, replacement)| replacement).collect();
        Self { inner: Some(Arc::new(Matcher { automaton, replacements, longest })) }
    }

    /// Whether it has nothing to redact.
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    /// `text` with every secret value replaced.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let Some(matcher) = &self.inner else { return Cow::Borrowed(text) };
        let Some(automaton) = &matcher.automaton else { return Cow::Owned(WITHHELD.to_owned()) };
        if !automaton.is_match(text) {
            return Cow::Borrowed(text);
        }
        match automaton.try_replace_all(text, &matcher.replacements) {
            Ok(redacted) => Cow::Owned(redacted),
            Err(_) => Cow::Owned(WITHHELD.to_owned()),
        }
    }

    /// `bytes` with every secret value replaced (any content: text, diffs, binaries).
    pub fn redact_bytes<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        let Some(matcher) = &self.inner else { return Cow::Borrowed(bytes) };
        let Some(automaton) = &matcher.automaton else {
            return Cow::Owned(WITHHELD.as_bytes().to_vec());
        };
        if !automaton.is_match(bytes) {
            return Cow::Borrowed(bytes);
        }
        match automaton.try_replace_all_bytes(bytes, &matcher.replacements) {
            Ok(redacted) => Cow::Owned(redacted),
            Err(_) => Cow::Owned(WITHHELD.as_bytes().to_vec()),
        }
    }

    /// Redacts every string in `value`, object keys included.
    pub fn redact_json(&self, value: &mut serde_json::Value) {
        if self.is_empty() {
            return;
        }
        match value {
            serde_json::Value::String(text) => {
                if let Cow::Owned(redacted) = self.redact(text) {
                    *text = redacted;
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            serde_json::Value::Object(fields) => {
                let taken = std::mem::take(fields);
                for (key, mut field) in taken {
                    self.redact_json(&mut field);
                    fields.insert(self.redact(&key).into_owned(), field);
                }
            }
            serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {
            }
        }
    }

    /// A redactor for output that arrives in pieces.
    pub fn stream(&self) -> StreamRedactor {
        StreamRedactor { redactor: self.clone(), pending: Vec::new(), eager: false }
    }

    /// A redactor for text a person reads as it arrives (a chat reply streamed token by
    /// token): it releases everything except what could still be the start of a value,
    /// instead of waiting for the end of each line.
    pub fn stream_eager(&self) -> StreamRedactor {
        StreamRedactor { redactor: self.clone(), pending: Vec::new(), eager: true }
    }
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values = self.inner.as_ref().map_or(0, |m| m.replacements.len());
        f.debug_struct("Redactor").field("values", &values).finish()
    }
}

/// Redacts output that arrives in pieces: whole lines are released as they complete; an
/// unfinished line is held back (up to 64 KiB, beyond which all but what could still be
/// the start of a value is released). With nothing to redact, pieces pass through at once.
pub struct StreamRedactor {
    redactor: Redactor,
    pending: Vec<u8>,
    /// Release all that cannot be the start of a value, not only whole lines.
    eager: bool,
}

impl StreamRedactor {
    /// Takes the next piece; returns what may be written now.
    pub fn push(&mut self, piece: &[u8]) -> Vec<u8> {
        let Some(matcher) = self.redactor.inner.clone() else { return piece.to_vec() };
        self.pending.extend_from_slice(piece);
        let mut cut = self.pending.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if self.eager || (cut == 0 && self.pending.len() > MAX_PENDING_BYTES) {
            cut = cut.max(safe_cut(&matcher, &self.pending));
            // Never split a character: what is released may be shown as text.
            while cut < self.pending.len() && cut > 0 && (self.pending[cut] & 0xC0) == 0x80 {
                cut -= 1;
            }
        }
        if cut == 0 {
            return Vec::new();
        }
        let released = self.redactor.redact_bytes(&self.pending[..cut]).into_owned();
        self.pending.drain(..cut);
        released
    }

    /// The end of the output: whatever is still held back, redacted.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        self.redactor.redact_bytes(&rest).into_owned()
    }
}

/// Where to split a long unfinished line: after everything that cannot be the start of a
/// value cut short by the end of the buffer, and never inside a value found whole.
fn safe_cut(matcher: &Matcher, buffer: &[u8]) -> usize {
    let mut cut = buffer.len().saturating_sub(matcher.longest.saturating_sub(1));
    if let Some(automaton) = &matcher.automaton {
        for found in automaton.find_iter(buffer) {
            if found.start() < cut && cut < found.end() {
                cut = found.end();
            }
        }
    }
    cut
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn redactor(pairs: &[(&str, &str)]) -> Redactor {
        let mut values = SecretValues::default();
        for (name, value) in pairs {
            values.insert(*name, *value);
        }
        Redactor::new(&values)
    }

    #[test]
    fn an_eager_stream_releases_all_but_a_possible_start_of_a_value() {
        let r = redactor(&[("TOKEN", "tok-12345678")]);
        let mut stream = r.stream_eager();
        let mut shown = Vec::new();
        // No newline anywhere, as in a streamed chat reply.
        for piece in ["Your token is ", "tok-1234", "5678, keep it", " safe. Ünïcödé"] {
            let released = stream.push(piece.as_bytes());
            assert!(std::str::from_utf8(&released).is_ok(), "split a character");
            shown.extend_from_slice(&released);
        }
        // Most of the text is out before the end, without waiting for a line.
        assert!(shown.len() > 20, "{}", String::from_utf8_lossy(&shown));
        shown.extend(stream.finish());
        assert_eq!(
            String::from_utf8(shown).unwrap(),
            "Your token is [redacted:TOKEN], keep it safe. Ünïcödé"
        );
        // With nothing to redact, pieces pass at once.
        assert_eq!(Redactor::default().stream_eager().push(b"tok-"), b"tok-");
    }

    #[test]
    fn values_become_their_names() {
        let r = redactor(&[("TOKEN", "tok-12345678"), ("KEY", "key-abcdefgh")]);
        assert_eq!(
            r.redact("a tok-12345678 b key-abcdefgh"),
            "a [redacted:TOKEN] b [redacted:KEY]"
        );
        assert!(matches!(r.redact("nothing here"), Cow::Borrowed(_)));
        assert_eq!(&*r.redact_bytes(b"x=tok-12345678\n"), b"x=[redacted:TOKEN]\n");
        assert!(Redactor::default().is_empty());
        assert_eq!(Redactor::default().redact("tok-12345678"), "tok-12345678");
    }

    #[test]
    fn the_longer_of_two_overlapping_values_wins() {
        let r = redactor(&[("SHORT", "abcdefgh"), ("LONG", "abcdefgh-and-more")]);
        assert_eq!(r.redact("abcdefgh-and-more abcdefgh"), "[redacted:LONG] [redacted:SHORT]");
    }

    #[test]
    fn json_strings_and_keys_are_redacted() {
        let r = redactor(&[("TOKEN", "tok-12345678")]);
        let mut value = json!({ "seen": "tok-12345678", "list": ["x tok-12345678"], "tok-12345678": 1, "n": 5 });
        r.redact_json(&mut value);
        assert_eq!(
            value,
            json!({ "seen": "[redacted:TOKEN]", "list": ["x [redacted:TOKEN]"], "[redacted:TOKEN]": 1, "n": 5 })
        );
    }

    #[test]
    fn a_value_split_across_pieces_is_still_caught() {
        let r = redactor(&[("TOKEN", "tok-12345678")]);
        let mut stream = r.stream();
        let mut out = Vec::new();
        for piece in [&b"token=tok-12"[..], b"345", b"678\nnext line", b" tok-1234", b"5678"] {
            out.extend(stream.push(piece));
        }
        out.extend(stream.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "token=[redacted:TOKEN]\nnext line [redacted:TOKEN]"
        );
    }

    #[test]
    fn a_long_line_is_released_in_bounded_pieces_without_splitting_a_value() {
        let r = redactor(&[("TOKEN", "tok-12345678")]);
        let mut stream = r.stream();
        let mut out = Vec::new();
        let filler = vec![b'x'; MAX_PENDING_BYTES - 4];
        out.extend(stream.push(&filler));
        // The value straddles the point where the buffer overflows.
        out.extend(stream.push(b"tok-12345678 and more"));
        assert!(stream.pending.len() < 64, "held back: {}", stream.pending.len());
        out.extend(stream.finish());
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("x[redacted:TOKEN] and more"), "{}", &text[text.len() - 40..]);
        assert!(!text.contains("tok-1234"));
    }

    #[test]
    fn multi_line_values_are_caught_line_by_line() {
        let r = redactor(&[("PEM", "-----BEGIN KEY-----\nMIIEabcdefgh\n-----END KEY-----")]);
        let mut stream = r.stream();
        let mut out = stream.push(b"key:\nMIIEabcdefgh\n");
        out.extend(stream.finish());
        assert_eq!(String::from_utf8(out).unwrap(), "key:\n[redacted:PEM]\n");
    }

    #[test]
    fn debug_never_shows_values() {
        let r = redactor(&[("TOKEN", "tok-12345678")]);
        assert!(!format!("{r:?}").contains("tok-"));
    }
}
