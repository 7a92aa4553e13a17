//! Training data: OpenAI's fine-tuning JSONL, one example per line, either
//! `{"messages": [...]}` (an assistant message may carry `"weight": 0` to be
//! skipped) or `{"prompt", "completion"}`. Conversations are rendered with
//! the model's chat template; only assistant tokens are learned, their
//! end-of-turn token included. Every line is checked before training starts.
//!
//! A conversation is rendered once, with markers around each assistant
//! message, so checking a file costs time linear in its size whatever its
//! number of turns; templates that change a message's text (so markers
//! cannot be trusted) fall back to rendering growing prefixes, for a bounded
//! number of turns.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

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
    #[error("checking {path} was cancelled")]
    Cancelled { path: String },
}

/// The longest line a data file may hold.
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// Assistant turns a conversation may have when its template changes the
/// messages' text (each turn then costs a rendering of the conversation).
pub const MAX_PREFIX_TURNS: usize = 64;

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
    parse(bytes, &shown, encoder, max_len, &AtomicBool::new(false))
}

/// Checks every line of a JSONL text named `shown` (in errors), then
/// tokenizes; stops between lines once `stop` is set.
pub fn parse(
    bytes: Vec<u8>,
    shown: &str,
    encoder: &Encoder,
    max_len: usize,
    stop: &AtomicBool,
) -> Result<Dataset, DataError> {
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
        if stop.load(Ordering::Relaxed) {
            return Err(DataError::Cancelled { path: shown });
        }
        let error = |reason: String| DataError::Line { path: shown.clone(), line: i + 1, reason };
        if line.len() > MAX_LINE_BYTES {
            return Err(error(format!("{} bytes, more than the {MAX_LINE_BYTES} a line may hold", line.len())));
        }
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
    let render = renderer(template);
    let end_of_turn = template.special_tokens().1;
    let spans = match marked_turns(&clean, &learned_turns, &render)? {
        Some(spans) => spans,
        None => prefix_turns(&clean, &learned_turns, &render)?,
    };
    let tokenize = |t: &str| encoder.tokenizer.encode(t).map_err(|e| format!("cannot tokenize: {e}"));
    let mut segments = Vec::new();
    let mut done = 0;
    for span in &spans.turns {
        // The turn is learned up to and including its end-of-turn token.
        let turn = &spans.text[span.start..span.limit];
        let after = span.content_end - span.start;
        let cut = end_of_turn
            .as_deref()
            .and_then(|eot| turn[after..].find(eot).map(|at| after + at + eot.len()))
            .unwrap_or(turn.len());
        segments.push((tokenize(&spans.text[done..span.start])?, false));
        segments.push((tokenize(&turn[..cut])?, span.learn));
        done = span.start + cut;
    }
    if done < spans.text.len() {
        segments.push((tokenize(&spans.text[done..])?, false));
    }
    Ok(from_segments(segments))
}

/// Renders messages (with a generation prompt or not) as a conversation.
type Render<'a> = dyn Fn(&[Json], bool) -> Result<String, String> + 'a;

fn renderer(template: &ChatTemplate) -> impl Fn(&[Json], bool) -> Result<String, String> + '_ {
    |messages, generation| {
        let request = ChatRequest {
            messages: messages.to_vec(),
            tools: None,
            documents: None,
            add_generation_prompt: generation,
            continue_final_message: false,
            kwargs: Map::new(),
        };
        template.render(&request).map_err(|e| format!("chat template: {e}"))
    }
}

/// A conversation's rendering and where its assistant turns sit in it.
struct TurnSpans {
    text: String,
    turns: Vec<TurnSpan>,
}

/// An assistant turn: it starts at `start` (its content), its end-of-turn
/// is looked for from `content_end` on (where its content is known to end,
/// else `start`), and it may extend to `limit` (where the next turn's
/// context begins); `learn` as its weight says.
struct TurnSpan {
    start: usize,
    content_end: usize,
    limit: usize,
    learn: bool,
}

/// Marks each assistant message's content, renders once with and once
/// without the marks, and reads the turns' places off the marked text. None
/// when the template does not keep the marks where the contents are (it
/// trims or rewrites them), or a message holds a mark itself.
fn marked_turns(clean: &[Json], learned_turns: &[(usize, bool)], render: &Render) -> Result<Option<TurnSpans>, String> {
    const OPEN: char = '\u{E000}';
    const CLOSE: char = '\u{E001}';
    let mut marked = clean.to_vec();
    for &(i, _) in learned_turns {
        let content = marked[i]["content"].as_str().unwrap_or_default();
        if content.contains([OPEN, CLOSE]) {
            return Ok(None);
        }
        marked[i]["content"] = Json::String(format!("{OPEN}{content}{CLOSE}"));
    }
    let plain = render(clean, false)?;
    let with_marks = render(&marked, false)?;
    let mut text = String::with_capacity(plain.len());
    let (mut opens, mut closes) = (Vec::new(), Vec::new());
    for c in with_marks.chars() {
        match c {
            OPEN => opens.push(text.len()),
            CLOSE => closes.push(text.len()),
            c => text.push(c),
        }
    }
    let ordered = opens.len() == learned_turns.len()
        && closes.len() == opens.len()
        && opens.iter().zip(&closes).all(|(o, c)| o <= c)
        && closes.iter().zip(opens.iter().skip(1)).all(|(c, next)| c <= next);
    if text != plain || !ordered {
        return Ok(None);
    }
    let turns = learned_turns
        .iter()
        .enumerate()
        .map(|(k, &(_, learn))| TurnSpan {
            start: opens[k],
            content_end: closes[k],
            limit: opens.get(k + 1).copied().unwrap_or(text.len()),
            learn,
        })
        .collect();
    Ok(Some(TurnSpans { text, turns }))
}

/// The turns' places from renderings of growing prefixes of the
/// conversation (two per assistant turn, so bounded in turns): each turn
/// starts after its context rendered with a generation prompt.
fn prefix_turns(clean: &[Json], learned_turns: &[(usize, bool)], render: &Render) -> Result<TurnSpans, String> {
    if learned_turns.len() > MAX_PREFIX_TURNS {
        return Err(format!(
            "{} assistant turns: this chat template changes the messages' text, so each turn costs a rendering \
             and a line may hold at most {MAX_PREFIX_TURNS}",
            learned_turns.len()
        ));
    }
    let mut turns = Vec::new();
    let mut done = String::new();
    for &(i, learn) in learned_turns {
        let before = render(&clean[..i], true)?;
        let upto = render(&clean[..i + 1], false)?;
        if !before.starts_with(&done) || !upto.starts_with(&before) {
            return Err("the chat template does not render this conversation as a growing prefix".into());
        }
        turns.push(TurnSpan { start: before.len(), content_end: before.len(), limit: upto.len(), learn });
        done = upto;
    }
    let text = render(clean, false)?;
    if !text.starts_with(&done) {
        return Err("the chat template does not render this conversation as a growing prefix".into());
    }
    Ok(TurnSpans { text, turns })
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

    fn learned_text(tokenizer: &Tokenizer, example: &Example) -> String {
        let learned: Vec<u32> =
            (0..example.ids.len() - 1).filter(|&p| example.weights[p] > 0.0).map(|p| example.ids[p + 1]).collect();
        text(tokenizer, &learned)
    }

    fn turns(n: usize) -> Json {
        let messages: Vec<Json> = (0..n)
            .flat_map(|i| {
                [
                    serde_json::json!({"role": "user", "content": format!("q{i}")}),
                    serde_json::json!({"role": "assistant", "content": format!(" a{i} ")}),
                ]
            })
            .collect();
        serde_json::json!({ "messages": messages })
    }

    #[test]
    fn a_long_conversation_is_rendered_twice_whatever_its_turns() {
        let (tokenizer, template) = encoder_parts();
        let line = turns(20_000);
        let clean = line["messages"].as_array().expect("messages").clone();
        let assistants: Vec<(usize, bool)> = (0..20_000).map(|i| (2 * i + 1, true)).collect();
        let renders = std::cell::Cell::new(0);
        let plain = renderer(&template);
        let render = |messages: &[Json], generation: bool| {
            renders.set(renders.get() + 1);
            plain(messages, generation)
        };
        let spans = marked_turns(&clean, &assistants, &render).expect("renders").expect("marks kept");
        assert_eq!((renders.get(), spans.turns.len()), (2, 20_000));
        let encoder = Encoder { tokenizer: &tokenizer, template: Some(&template), eos: None };
        let example = encode(&line, &encoder).expect("encodes");
        assert!(learned_text(&tokenizer, &example).starts_with(" a0 <|im_end|> a1 <|im_end|>"));
    }

    #[test]
    fn marks_and_growing_prefixes_find_the_same_turns() {
        let (tokenizer, template) = encoder_parts();
        let encoder = Encoder { tokenizer: &tokenizer, template: Some(&template), eos: None };
        let mut line = turns(3);
        line["messages"][3]["weight"] = serde_json::json!(0);
        let clean = turns(3)["messages"].as_array().expect("messages").clone();
        let assistants = [(1, true), (3, false), (5, true)];
        let render = renderer(&template);
        let marked = marked_turns(&clean, &assistants, &render).expect("renders").expect("marks kept");
        let prefixes = prefix_turns(&clean, &assistants, &render).expect("renders");
        assert_eq!(marked.text, prefixes.text);
        let starts = |s: &TurnSpans| s.turns.iter().map(|t| (t.start, t.learn)).collect::<Vec<_>>();
        assert_eq!(starts(&marked), starts(&prefixes));
        assert_eq!(
            learned_text(&tokenizer, &encode(&line, &encoder).expect("encodes")),
            " a0 <|im_end|> a2 <|im_end|>"
        );
    }

    #[test]
    fn a_template_that_rewrites_messages_falls_back_to_prefixes_within_a_bound() {
        let tokenizer = Tokenizer::bytes().expect("byte tokenizer");
        let trimming = TEMPLATE.replace("{{ m.content }}", "{{ m.content | trim }}");
        let template =
            ChatTemplate::new(&trimming, None, Some("<|im_end|>".into()), Default::default()).expect("template");
        let encoder = Encoder { tokenizer: &tokenizer, template: Some(&template), eos: None };
        let example = encode(&turns(2), &encoder).expect("encodes");
        assert_eq!(learned_text(&tokenizer, &example), "a0<|im_end|>a1<|im_end|>");
        let error = encode(&turns(MAX_PREFIX_TURNS + 1), &encoder).expect_err("too many turns");
        assert!(error.contains(&format!("at most {MAX_PREFIX_TURNS}")), "{error}");
    }

    #[test]
    fn checking_stops_when_asked_and_long_lines_are_refused() {
        let (tokenizer, template) = encoder_parts();
        let encoder = Encoder { tokenizer: &tokenizer, template: Some(&template), eos: Some(0) };
        let good = r#"{"prompt": "Q", "completion": " A"}"#;
        let stop = AtomicBool::new(true);
        let error = parse(format!("{good}\n").into_bytes(), "f", &encoder, 64, &stop).expect_err("stopped");
        assert!(matches!(error, DataError::Cancelled { .. }), "{error}");
        let long = format!(r#"{{"prompt": "{}", "completion": " A"}}"#, "x".repeat(MAX_LINE_BYTES));
        let error = parse(long.into_bytes(), "f", &encoder, 64, &AtomicBool::new(false)).expect_err("too long");
        assert!(error.to_string().contains("line 1") && error.to_string().contains("a line may hold"), "{error}");
    }
}
