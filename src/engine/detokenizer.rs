//! Incremental detokenization: text is released only once it is stable, so a
//! multi-byte character split over several tokens is never emitted in halves
//! and tokenizers that treat a leading space specially decode correctly.

use crate::tokenizer::Tokenizer;

#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the tokens decoded as context for the next piece.
    prefix_offset: usize,
    /// End of the tokens whose text has already been released.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self { skip_special_tokens, ..Self::default() }
    }

    /// Adds a generated token; returns the newly stable text (maybe empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = self.decode(tokenizer, self.prefix_offset, self.read_offset);
        let full = self.decode(tokenizer, self.prefix_offset, self.ids.len());
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(new) = full.get(prefix.len()..).filter(|_| full.starts_with(&prefix)) {
                let new = new.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return new;
            }
        }
        String::new()
    }

    /// The text still held back when generation ends (an incomplete character
    /// is emitted as U+FFFD, as a full decode would show it).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        let prefix = self.decode(tokenizer, self.prefix_offset, self.read_offset);
        let full = self.decode(tokenizer, self.prefix_offset, self.ids.len());
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        match full.get(prefix.len()..) {
            Some(rest) if full.starts_with(&prefix) => rest.to_string(),
            _ => String::new(),
        }
    }

    fn decode(&self, tokenizer: &Tokenizer, from: usize, to: usize) -> String {
        tokenizer.decode(&self.ids[from..to], self.skip_special_tokens).unwrap_or_default()
    }
}
