//! Training data: OpenAI's fine-tuning JSONL, one example per line, either
//! `{"messages": [...]}` (an assistant message may carry `"weight": 0` to be
//! skipped) or `{"prompt", "completion"}`. Conversations are rendered with
//! the model's chat template; only assistant tokens are learned, their
//! end-of-turn token included. Every line is checked before training starts.

use std::path::Path;

use serde_json::{Map, Value as Json};

use crate::prompt::chat::{ChatRequest, ChatTemplate};
use crate::tokenizer::Tokenizer;

/// One example: its token ids and, per position, the weight of predicting
/// the next token there.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Example {
    /// Tokens the loss counts.
    pub fn learned(&self) -> usize {
        self.weights.iter().filter(|&&w| w > 0.0).count()
    }
}

#[derive(Debug)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Examples longer than the maximum length, left out.
    pub too_long: usize,
    /// sha256 of the file, for the model card.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} line {line}: {reason}")]
    Line { path: String, line: usize, reason: String },
    #[error("{path} holds no examples{why}")]
    Empty { path: String, why: String },
}

/// How examples are made into tokens.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    /// The end-of-sequence id closing a completion.
    pub eos: Option<u32>,
}

/// Reads a file, checks every line, then tokenizes; `max_len` drops longer examples.
pub fn load(path: &Path, encoder: &Encoder, max_len: usize) -> Result<Dataset, DataError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| DataError::Read { path: shown.clone(), message: e.to_string() })?;
    parse(bytes, &shown, encoder, max_len)
}

/// Checks every line of a JSONL text named `shown` (in errors), then tokenizes.
pub fn parse(bytes: Vec<u8>, shown: &str, encoder: &Encoder, max_len: usize) -> Result<Dataset, DataError> {
    let shown = shown.to_string();
    let sha256 = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(&bytes))
    };
    let text = String::from_utf8(bytes).map_err(|e| DataError::Read { path: shown.clone(), message: e.to_string() })?;
    let mut examples = Vec::new();
    let mut too_long = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let error = |reason: String| DataError::Line { path: shown.clone(), line: i + 1, reason };
        let value: Json = serde_json::from_str(line).map_err(|e| error(format!("not JSON: {e}")))?;
        let example = encode(&value, encoder).map_err(error)?;
        if example.ids.len() > max_len {
            too_long += 1;
        } else {
            examples.push(example);
        }
    }
    if examples.is_empty() {
        let why = if too_long > 0 { format!(" within {max_len} tokens ({too_long} longer)") } else { String::new() };
        return Err(DataError::Empty { path: shown, why });
    }
    Ok(Dataset { examples, too_long, sha256 })
}

/// One line as tokens and weights.
pub fn encode(value: &Json, encoder: &Encoder) -> Result<Example, String> {
    let Json::Object(fields) = value else { return Err("each line must be a JSON object".into()) };
    match (fields.get("messages"), fields.get("prompt"), fields.get("completion")) {
        (Some(messages), None, None) => conversation(messages, encoder),
        (None, Some(Json::String(prompt)), Some(Json::String(completion))) => {
            completion_example(prompt, completion, encoder)
        }
        (None, Some(_), Some(_)) => Err("`prompt` and `completion` must be strings".into()),
        _ => Err("expected {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}".into()),
    }
}

fn completion_example(prompt: &str, completion: &str, encoder: &Encoder) -> Result<Example, String> {
    let tokenize = |t: &str| encoder.tokenizer.encode(t).map_err(|e| format!("cannot tokenize: {e}"));
    let prompt_ids = encoder.tokenizer.encode_prompt(prompt).map_err(|e| format!("cannot tokenize: {e}"))?;
    let mut learned = tokenize(completion)?;
    if learned.is_empty() {
        return Err("`completion` is empty".into());
    }
    learned.extend(encoder.eos);
    Ok(from_segments(vec![(prompt_ids, false), (learned, true)]))
}

/// Tokens of segments (each learned or not) as an example: position p
/// predicts token p + 1, so its weight is that token's.
fn from_segments(segments: Vec<(Vec<u32>, bool)>) -> Example {
    let mut ids = Vec::new();
    let mut learn = Vec::new();
    for (segment, learned) in segments {
        learn.extend(std::iter::repeat_n(learned, segment.len()));
        ids.extend(segment);
    }
    let weights = (0..ids.len()).map(|p| if learn.get(p + 1).copied().unwrap_or(false) { 1.0 } else { 0.0 }).collect();
    Example { ids, weights }
}

fn conversation(messages: &Json, encoder: &Encoder) -> Result<Example, String> {
    let template = encoder.template.ok_or("this model has no chat template to render `messages` with")?;
    let Json::Array(list) = messages else { return Err("`messages` must be a list".into()) };
    let mut clean: Vec<Json> = Vec::with_capacity(list.len());
    let mut learned_turns = Vec::new();
    for (i, message) in list.iter().enumerate() {
        let Json::Object(fields) = message else { return Err(format!("messages[{i}] must be an object")) };
        let role = fields.get("role").and_then(Json::as_str).ok_or(format!("messages[{i}] needs a string `role`"))?;
        if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(format!("messages[{i}] has an unknown role `{role}`"));
        }
        if !fields.get("content").is_some_and(Json::is_string) {
            return Err(format!("messages[{i}] needs a string `content`"));
        }
        let weight = match fields.get("weight") {
            None => 1.0,
            Some(w) => match w.as_f64() {
                Some(w @ (0.0 | 1.0)) if role == "assistant" => w,
                _ => return Err(format!("messages[{i}].weight must be 0 or 1, on an assistant message")),
            },
        };
        let mut kept = Map::new();
        kept.insert("role".into(), Json::String(if role == "developer" { "system".into() } else { role.into() }));
        kept.insert("content".into(), fields["content"].clone());
        clean.push(Json::Object(kept));
        if role == "assistant" {
            learned_turns.push((i, weight > 0.0));
        }
    }
    if !learned_turns.iter().any(|&(_, learn)| learn) {
        return Err("no assistant message to learn (all absent or weight 0)".into());
    }
    let render = |upto: usize, generation: bool| -> Result<String, String> {
        let request = ChatRequest {
            messages: clean[..upto].to_vec(),
            tools: None,
            documents: None,
            add_generation_prompt: generation,
            continue_final_message: false,
            kwargs: Map::new(),
        };
        template.render(&request).map_err(|e| format!("chat template: {e}"))
    };
    let end_of_turn = template.special_tokens().1;
    let tokenize = |t: &str| encoder.tokenizer.encode(t).map_err(|e| format!("cannot tokenize: {e}"));
    let mut segments = Vec::new();
    let mut done = String::new();
    for (i, learn) in learned_turns {
        let before = render(i, true)?;
        let upto = render(i + 1, false)?;
        let (Some(context), Some(turn)) = (before.strip_prefix(&done), upto.strip_prefix(&before)) else {
            return Err("the chat template does not render this conversation as a growing prefix".into());
        };
        // The turn is learned up to and including its end-of-turn token.
        let cut = end_of_turn.as_deref().and_then(|eot| turn.find(eot).map(|at| at + eot.len())).unwrap_or(turn.len());
        segments.push((tokenize(context)?, false));
        segments.push((tokenize(&turn[..cut])?, learn));
        segments.push((tokenize(&turn[cut..])?, false));
        done = upto;
    }
    let whole = render(clean.len(), false)?;
    if let Some(rest) = whole.strip_prefix(&done).filter(|r| !r.is_empty()) {
        segments.push((tokenize(rest)?, false));
    }
    Ok(from_segments(segments))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn encoder_parts() -> (Tokenizer, ChatTemplate) {
        let tokenizer = Tokenizer::bytes().expect("byte tokenizer");
        let template =
            ChatTemplate::new(TEMPLATE, None, Some("<|im_end|>".into()), Default::default()).expect("template");
        (tokenizer, template)
    }

    fn text(tokenizer: &Tokenizer, ids: &[u32]) -> String {
        tokenizer.decode(ids, false).expect("decode")
    }

    #[test]
    fn only_assistant_turns_with_their_end_of_turn_are_learned() {
        let (tokenizer, template) = encoder_parts();
        let encoder = Encoder { tokenizer: &tokenizer, template: Some(&template), eos: None };
        let line = serde_json::json!({"messages": [
            {"role": "system", "content": "Be a pirate."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Arr", "weight": 0},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Ahoy"},
        ]});
        let example = encode(&line, &encoder).expect("encodes");
        let learned: Vec<u32> =
            (0..example.ids.len() - 1).filter(|&p| example.weights[p] > 0.0).map(|p| example.ids[p + 1]).collect();
        assert_eq!(text(&tokenizer, &learned), "Ahoy<|im_end|>");
        assert_eq!(
            text(&tokenizer, &example.ids),
            "<|im_start|>system\nBe a pirate.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nArr<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nAhoy<|im_end|>\n"
        );
    }

    #[test]
    fn prompt_completion_learns_the_completion_and_the_end() {
        let (tokenizer, _) = encoder_parts();
        let encoder = Encoder { tokenizer: &tokenizer, template: None, eos: Some(0) };
        let example =
            encode(&serde_json::json!({"prompt": "Q: 2+2? A:", "completion": " 4"}), &encoder).expect("encodes");
        assert_eq!(example.learned(), 3, "' ', '4' and the end");
        assert_eq!(*example.ids.last().expect("ids"), 0);
    }

    #[test]
    fn a_file_is_checked_whole_and_long_examples_are_counted() {
        let (tokenizer, template) = encoder_parts();
        let encoder = Encoder { tokenizer: &tokenizer, template: Some(&template), eos: Some(0) };
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("data.jsonl");
        let good = r#"{"prompt": "Q", "completion": " A"}"#;
        let long = format!(r#"{{"prompt": "{}", "completion": " A"}}"#, "x".repeat(50));
        std::fs::write(&path, format!("{good}\n\n{long}\n{good}\n")).expect("write");
        let data = load(&path, &encoder, 20).expect("loads");
        assert_eq!((data.examples.len(), data.too_long, data.sha256.len()), (2, 1, 64));
        std::fs::write(&path, format!("{good}\n{{\"prompt\": \"Q\"}}\n")).expect("write");
        let error = load(&path, &encoder, 20).expect_err("refused").to_string();
        assert!(error.contains("line 2") && error.contains("expected"), "{error}");
        std::fs::write(&path, format!("{long}\n")).expect("write");
        let error = load(&path, &encoder, 20).expect_err("refused").to_string();
        assert!(error.contains("no examples within 20 tokens (1 longer)"), "{error}");
    }

    #[test]
    fn bad_lines_say_why() {
        let (tokenizer, template) = encoder_parts();
        let encoder = Encoder { tokenizer: &tokenizer, template: Some(&template), eos: None };
        for (line, why) in [
            (serde_json::json!([1]), "JSON object"),
            (serde_json::json!({"messages": [{"role": "user", "content": "Hi"}]}), "no assistant message"),
            (serde_json::json!({"messages": [{"role": "user"}]}), "string `content`"),
            (serde_json::json!({"messages": [{"role": "pirate", "content": "x"}]}), "unknown role"),
            (serde_json::json!({"messages": [{"role": "user", "content": "x", "weight": 0}]}), "weight"),
            (serde_json::json!({"prompt": 1, "completion": "x"}), "strings"),
            (serde_json::json!({"text": "x"}), "expected"),
        ] {
            let error = encode(&line, &encoder).expect_err("refused");
            assert!(error.contains(why), "{line}: {error}");
        }
    }
}
