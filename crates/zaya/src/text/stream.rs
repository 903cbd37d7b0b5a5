//! Incremental detokenization for streaming generation.
//!
//! Decoding token by token is wrong for tokenizers whose decoders look at neighbours (a
//! leading-space strip, byte-fallback tokens that only form a character together). The
//! decoder keeps a window of ids: it decodes `prefix` (ids already emitted, kept for context)
//! and `prefix + new`, and emits the difference, as text-generation-inference and
//! `tokenizers`' `DecodeStream` do. While the window's text ends in U+FFFD (an incomplete UTF-8
//! sequence from byte-fallback tokens) nothing is emitted; the bytes come out once the
//! character is complete. The chunks concatenate to the full decode of all ids.

use super::tokenizer::ZayaTokenizer;
use super::Result;

#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    skip_special_tokens: bool,
    /// Window of ids: `ids[..read]` were emitted already, `ids[read..]` are pending.
    ids: Vec<u32>,
    read: usize,
}

impl StreamDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        StreamDecoder {
            skip_special_tokens,
            ids: Vec::new(),
            read: 0,
        }
    }

    /// Feed one generated id; returns the text it completes, if any.
    pub fn step(&mut self, tok: &ZayaTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[..self.read], self.skip_special_tokens)?;
        let full = tok.decode(&self.ids, self.skip_special_tokens)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let chunk = new_suffix(&prefix, &full);
        // The pending ids become the next window's context.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(Some(chunk))
    }

    /// Text still held back (an incomplete character at the end of generation), with its
    /// replacement characters as the full decode has them. Resets the decoder.
    pub fn finish(&mut self, tok: &ZayaTokenizer) -> Result<Option<String>> {
        let out = if self.read < self.ids.len() {
            let prefix = tok.decode(&self.ids[..self.read], self.skip_special_tokens)?;
            let full = tok.decode(&self.ids, self.skip_special_tokens)?;
            Some(new_suffix(&prefix, &full)).filter(|s| !s.is_empty())
        } else {
            None
        };
        self.ids.clear();
        self.read = 0;
        Ok(out)
    }

    /// Number of ids fed but not yet turned into text.
    pub fn pending(&self) -> usize {
        self.ids.len() - self.read
    }
}

/// `full` minus the already-emitted `prefix`. Decoders used by ZAYA1 (Replace, ByteFallback,
/// Fuse) always extend the prefix; for a decoder that rewrites earlier text, the text after the
/// longest common prefix is emitted (what was emitted before cannot be taken back).
fn new_suffix(prefix: &str, full: &str) -> String {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest.to_string();
    }
    let common = prefix
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(prefix.len().min(full.len()));
    full[common..].to_string()
}

#[cfg(test)]
mod tests {
    use super::new_suffix;

    #[test]
    fn suffix_of_extended_and_rewritten_text() {
        assert_eq!(new_suffix("Hello", "Hello world"), " world");
        assert_eq!(new_suffix("", "é"), "é");
        assert_eq!(new_suffix("ab\u{FFFD}", "abé!"), "é!");
    }
}
