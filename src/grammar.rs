//! Constrained decoding with llguidance: a request's `response_format` (a
//! JSON schema, any JSON object, a regex, a Lark grammar) becomes a matcher
//! per sequence that masks each step's logits to the tokens the grammar
//! allows; the end of the sequence is allowed only where the grammar accepts.
//!
//! The token trie is built from tailor's own tokenizer (token bytes of
//! tokenizer.json, GGUF byte-level and SentencePiece vocabularies alike), once
//! per model, on the first constrained request.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value as Json};

use crate::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("{0}")]
    Format(String),
    #[error("cannot build constrained decoding for this model: {0}")]
    Vocabulary(String),
    #[error("{0}")]
    Grammar(String),
}

/// Makes matchers for one model's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// `vocab_rows`: the model's logits width (may exceed the tokenizer's).
    pub fn new(tokenizer: &Tokenizer, vocab_rows: usize, eos: u32) -> Result<Self, GrammarError> {
        let mut words = tokenizer.token_bytes().map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        words.resize(vocab_rows.max(words.len()), Vec::new());
        let trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, eos), &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A fresh matcher, or the grammar's error (an invalid schema, regex...).
    pub fn matcher(&self, grammar: &TopLevelGrammar) -> Result<Matcher, GrammarError> {
        let parser = self.factory.create_parser(grammar.clone()).map_err(|e| GrammarError::Grammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(GrammarError::Grammar(e)),
            None => Ok(matcher),
        }
    }
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    pub fn new(matcher: Matcher) -> Self {
        Self { matcher }
    }

    /// Sets the logits of every token the grammar forbids now to -inf. The
    /// trie knows one end-of-sequence id; where it is allowed, so are the
    /// model's other end-of-turn ids.
    pub fn mask(&mut self, logits: &mut [f32], eos: &[u32]) -> Result<(), GrammarError> {
        let mask = self.matcher.compute_mask().map_err(|e| GrammarError::Grammar(e.to_string()))?;
        let end_allowed = eos.first().is_some_and(|&e| mask.is_allowed(e));
        for (id, logit) in logits.iter_mut().enumerate() {
            let id = id as u32;
            let allowed = mask.is_allowed(id) || (end_allowed && eos.contains(&id));
            if !allowed {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Feeds the sampled (non-end) token; true when the grammar is complete
    /// and nothing more may follow.
    pub fn advance(&mut self, token: u32) -> Result<bool, GrammarError> {
        self.matcher.consume_token(token).map_err(|e| GrammarError::Grammar(e.to_string()))?;
        Ok(self.matcher.is_stopped())
    }
}

/// OpenAI's `response_format` (plus tailor's `regex` and `lark`) as a
/// grammar; `None` for plain text.
pub fn from_response_format(format: &Json) -> Result<Option<TopLevelGrammar>, GrammarError> {
    let bad = |m: &str| Err(GrammarError::Format(m.to_string()));
    if format.is_null() {
        return Ok(None);
    }
    let Some(kind) = format.get("type").and_then(Json::as_str) else {
        return bad("`response_format` needs a `type`: text, json_object, json_schema, regex or lark");
    };
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(TopLevelGrammar::from_json_schema(compact(json!({"type": "object"}))))),
        "json_schema" => {
            let Some(schema) = format.get("json_schema").and_then(|s| s.get("schema")) else {
                return bad("`response_format.json_schema.schema` is required");
            };
            if !schema.is_object() && !schema.is_boolean() {
                return bad("`response_format.json_schema.schema` must be a JSON Schema object");
            }
            Ok(Some(TopLevelGrammar::from_json_schema(compact(schema.clone()))))
        }
        "regex" => match format.get("regex").and_then(Json::as_str) {
            Some(rx) => Ok(Some(TopLevelGrammar::from_regex(rx))),
            None => bad("`response_format.regex` must be a string"),
        },
        "lark" => match format.get("lark").and_then(Json::as_str) {
            Some(lark) => Ok(Some(TopLevelGrammar::from_lark(lark.to_string()))),
            None => bad("`response_format.lark` must be a string"),
        },
        other => Err(GrammarError::Format(format!(
            "unknown `response_format.type` {other:?}: use text, json_object, json_schema, regex or lark"
        ))),
    }
}

/// JSON as `json.dumps` writes it (", " and ": ", no other whitespace), so a
/// small model cannot spend its tokens on blank lines; a schema's own
/// `x-guidance` options win.
fn compact(mut schema: Json) -> Json {
    if let Some(object) = schema.as_object_mut() {
        object
            .entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    fn byte_model() -> Grammars {
        let tokenizer = Tokenizer::bytes().expect("byte tokenizer");
        Grammars::new(&tokenizer, 257, 256).expect("grammars")
    }

    /// Greedy over a fixed preference, masked by the grammar: what comes out.
    fn generate(grammars: &Grammars, format: Json, prefer: &[u8]) -> String {
        let grammar = from_response_format(&format).expect("valid").expect("constrained");
        let mut matcher = grammars.matcher(&grammar).expect("matcher");
        let mut out = Vec::new();
        for step in 0..200 {
            if matcher.is_stopped() {
                break;
            }
            let mask = matcher.compute_mask().expect("mask");
            if mask.is_allowed(256) && !(0..256).any(|b| mask.is_allowed(b)) {
                break;
            }
            let wanted = prefer.get(step).map(|&b| b as u32);
            let token = match wanted.filter(|&t| mask.is_allowed(t)) {
                Some(t) => t,
                None => (0..256u32).find(|&t| mask.is_allowed(t)).expect("something allowed"),
            };
            matcher.consume_token(token).expect("consume");
            out.push(token as u8);
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn a_schema_forces_its_shape_whatever_the_model_prefers() {
        let g = byte_model();
        let schema = json!({"type": "json_schema", "json_schema": {"name": "p", "schema": {
            "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": false}}});
        let text = generate(&g, schema, b"hello world");
        let value: Json = serde_json::from_str(&text).expect(&text);
        assert!(value["ok"].is_boolean(), "{text}");
        let digits = generate(&g, json!({"type": "regex", "regex": "[0-9]{3}"}), b"abc");
        assert_eq!(digits.len(), 3);
        assert!(digits.chars().all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn bad_formats_are_named() {
        for bad in
            [json!({"type": "xml"}), json!({"type": "json_schema"}), json!({"type": "regex", "regex": 3}), json!({})]
        {
            assert!(matches!(from_response_format(&bad), Err(GrammarError::Format(_))), "{bad}");
        }
        assert!(from_response_format(&json!({"type": "text"})).expect("text").is_none());
        let g = byte_model();
        let broken =
            from_response_format(&json!({"type": "regex", "regex": "(unclosed"})).expect("parsed").expect("some");
        assert!(g.matcher(&broken).is_err());
    }
}
