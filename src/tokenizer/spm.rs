//! SentencePiece BPE as llama.cpp runs it from GGUF metadata
//! (`tokenizer.ggml.model = llama`: Llama 2, Mistral, TinyLlama, Phi-3):
//! spaces become `▁`, adjacent symbols merge while their concatenation is a
//! token, highest score first (leftmost on ties), and text no token covers
//! falls back to byte tokens `<0xNN>`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// GGUF `tokenizer.ggml.token_type` values.
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const BYTE: i32 = 6;
}

const SPACE: &str = "\u{2581}";

#[derive(Debug, Clone)]
pub struct SpmTokenizer {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
    /// Byte value → its `<0xNN>` token.
    byte_tokens: [Option<u32>; 256],
    /// Texts matched whole before SentencePiece runs (control, user-defined
    /// and unknown tokens), longest first.
    specials: Vec<(String, u32)>,
    unk_id: Option<u32>,
    /// Prepend a space to text that follows the start or a special token.
    add_space_prefix: bool,
}

/// A candidate merge of two adjacent symbols.
#[derive(Debug, PartialEq)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    /// Highest score first; on equal scores the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A run of text bytes in the chain of symbols being merged.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SpmTokenizer {
    pub fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: Vec<i32>,
        unk_id: Option<u32>,
        add_space_prefix: bool,
    ) -> Self {
        let ids: HashMap<String, u32> = tokens.iter().enumerate().rev().map(|(i, t)| (t.clone(), i as u32)).collect();
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied();
        }
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, &ty))| {
                !t.is_empty() && matches!(ty, token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN)
            })
            .map(|(i, (t, _))| (t.clone(), i as u32))
            .collect();
        // Longest first, as llama.cpp partitions text.
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Self { tokens, scores, types, ids, byte_tokens, specials, unk_id, add_space_prefix }
    }

    /// Each token's bytes as it decodes (`▁` as a space, `<0xNN>` as the
    /// byte); control, unknown and user-defined tokens carry llguidance's
    /// special marker 0xFF before their text; unused tokens are empty.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        const SPECIAL: u8 = 0xFF;
        self.tokens
            .iter()
            .zip(&self.types)
            .map(|(piece, &kind)| match kind {
                6 => piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .map(|b| vec![b])
                    .unwrap_or_default(),
                2..=4 => std::iter::once(SPECIAL).chain(piece.bytes()).collect(),
                5 => Vec::new(),
                _ => piece.replace('\u{2581}', " ").into_bytes(),
            })
            .collect()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokens.get(id as usize).cloned()
    }

    /// Ids of `text`, special-token text matched whole.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for fragment in self.partition(text) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                // llama.cpp drops empty text: "" is no tokens, not "▁".
                Fragment::Text("") => {}
                Fragment::Text(raw) => {
                    let mut piece = String::with_capacity(raw.len() + 3);
                    if self.add_space_prefix && prev_special {
                        piece.push(' ');
                    }
                    piece.push_str(raw);
                    self.encode_piece(&piece.replace(' ', SPACE), &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    /// Splits `text` at special tokens, longest token first, each occurrence
    /// left to right (llama.cpp's `tokenizer_st_partition`).
    fn partition<'t>(&self, text: &'t str) -> Vec<Fragment<'t>> {
        let mut fragments = vec![Fragment::Text(text)];
        for (special, id) in &self.specials {
            if !text.contains(special.as_str()) {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    next.push(fragment);
                    continue;
                };
                while let Some(at) = rest.find(special.as_str()) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Token(*id));
                    rest = &rest[at + special.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// SentencePiece merges over one escaped text fragment.
    fn encode_piece(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8();
            symbols.push(Symbol {
                start,
                len,
                prev: i.checked_sub(1),
                next: (start + len < text.len()).then_some(i + 1),
            });
        }
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| -> Option<Bigram> {
            let (left, right) = (left?, right?);
            let start = symbols[left].start;
            let size = symbols[left].len + symbols[right].len;
            let id = *self.ids.get(&text[start..start + size])?;
            Some(Bigram { left, right, score: self.scores[id as usize], size })
        };
        for i in 1..symbols.len() {
            queue.extend(bigram(&symbols, Some(i - 1), Some(i)));
        }
        while let Some(top) = queue.pop() {
            let (l, r) = (symbols[top.left], symbols[top.right]);
            // Stale: one side has merged since this pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != top.size {
                continue;
            }
            symbols[top.left].len += r.len;
            symbols[top.right].len = 0;
            symbols[top.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(top.left);
            }
            queue.extend(bigram(&symbols, symbols[top.left].prev, Some(top.left)));
            queue.extend(bigram(&symbols, Some(top.left), symbols[top.left].next));
        }
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                // A merged symbol is always a token: only a single character
                // the vocabulary lacks gets here, spelled as its bytes.
                None => {
                    out.extend(piece.bytes().filter_map(|b| self.byte_tokens[b as usize].or(self.unk_id)));
                }
            }
            at = s.next;
        }
    }

    /// Text of `ids`: `▁` as spaces, byte tokens joined into UTF-8, control
    /// tokens (and unknown) shown only when `skip_special` is false, one
    /// leading space dropped where encoding added it.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(token) = self.tokens.get(id as usize) else { continue };
            match self.types[id as usize] {
                token_type::BYTE => {
                    let hex = token.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
                    match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        Some(b) => bytes.push(b),
                        None => bytes.extend_from_slice(token.as_bytes()),
                    }
                }
                token_type::CONTROL | token_type::UNKNOWN if skip_special => {}
                token_type::CONTROL | token_type::UNKNOWN | token_type::USER_DEFINED => {
                    bytes.extend_from_slice(token.as_bytes())
                }
                _ => bytes.extend_from_slice(token.replace(SPACE, " ").as_bytes()),
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        match text.strip_prefix(' ') {
            Some(rest) if self.add_space_prefix => rest.to_string(),
            _ => text,
        }
    }
}

enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary where the highest-scoring merge decides the split.
    fn tokenizer() -> SpmTokenizer {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![token_type::UNKNOWN, token_type::CONTROL, token_type::CONTROL];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(token_type::BYTE);
        }
        let normal = [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -2.0),
            ("c", -2.0),
            ("ab", -5.0),
            ("bc", -3.0),
            ("▁a", -4.0),
            ("▁abc", -6.0),
        ];
        let mut scores = vec![0.0; tokens.len()];
        for (t, s) in normal {
            tokens.push(t.into());
            types.push(token_type::NORMAL);
            scores.push(s);
        }
        SpmTokenizer::new(tokens, scores, types, Some(0), true)
    }

    fn id(t: &SpmTokenizer, s: &str) -> u32 {
        t.token_to_id(s).expect("token")
    }

    #[test]
    fn merges_highest_score_first_then_bytes() {
        let t = tokenizer();
        // "▁abc": bc (-3) merges first, then ▁a (-4); ab (-5) is stale by
        // then, and ▁a + bc (-6) completes the word.
        assert_eq!(t.encode("abc"), vec![id(&t, "▁abc")]);
        // "é" is not a token: its two UTF-8 bytes.
        assert_eq!(t.encode("é"), vec![id(&t, "▁"), id(&t, "<0xC3>"), id(&t, "<0xA9>")]);
        assert_eq!(t.decode(&t.encode("é"), true), "é");
    }

    #[test]
    fn special_tokens_are_matched_whole_and_restart_the_space_prefix() {
        let t = tokenizer();
        assert_eq!(t.encode("a</s>a"), vec![id(&t, "▁a"), 2, id(&t, "▁a")]);
        assert_eq!(t.decode(&[1, id(&t, "▁a"), 2], false), "<s> a</s>");
        assert_eq!(t.decode(&[1, id(&t, "▁a"), 2], true), "a");
    }
}
