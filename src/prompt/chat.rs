//! Chat templates: a conversation in OpenAI shape → the exact prompt text,
//! following the steps of transformers' `apply_chat_template(tokenize=False)`.

use crate::prompt::FromSerde;
use std::collections::BTreeMap;

use minijinja::value::Value;
use minijinja::Environment;
use serde_json::{Map, Value as Json};

use super::jinja::{self, Clock};
use super::PromptError;

const TEMPLATE_NAME: &str = "chat";
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// Largest rendered conversation: twice the default body limit, far past
/// any context window, small enough that a runaway template cannot fill memory.
pub const MAX_CHAT_OUTPUT_BYTES: usize = 16 << 20;

/// What a chat template is rendered with.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub messages: Vec<Json>,
    pub tools: Option<Json>,
    pub documents: Option<Json>,
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    /// Extra template variables (`chat_template_kwargs`); they override special tokens.
    pub kwargs: Map<String, Json>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).finish()
    }
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
        clock: Clock,
    ) -> Result<Self, PromptError> {
        let mut env = jinja::environment(clock);
        env.add_template_owned(TEMPLATE_NAME, jinja::rewrite_generation_tags(source))?;
        Ok(Self { env, source: source.to_string(), bos_token, eos_token })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `bos_token` and `eos_token` the template is rendered with.
    pub fn special_tokens(&self) -> (Option<String>, Option<String>) {
        (self.bos_token.clone(), self.eos_token.clone())
    }

    pub fn render(&self, request: &ChatRequest) -> Result<String, PromptError> {
        let mut messages: Vec<Json> = request.messages.iter().map(normalize_message).collect();
        if !request.continue_final_message {
            return self.render_messages(&messages, request);
        }
        if request.add_generation_prompt {
            return Err(PromptError::Invalid(
                "continue_final_message and add_generation_prompt cannot both be true".into(),
            ));
        }
        let field = "content";
        if !self.source.contains(field) {
            return Err(PromptError::Invalid(format!(
                "continue_final_message needs the template to use the message field `{field}`"
            )));
        }
        let Some(last) = messages.last_mut() else {
            return Err(PromptError::Invalid("continue_final_message needs at least one message".into()));
        };
        let final_text = append_continue_tag(last, field)?;
        let rendered = self.render_messages(&messages, request)?;
        if !rendered.contains(final_text.trim()) || !rendered.contains(CONTINUE_TAG.trim()) {
            return Err(PromptError::Invalid(
                "continue_final_message: the final message does not appear in the rendered chat".into(),
            ));
        }
        let tag = CONTINUE_TAG.trim_end();
        let cut = rendered.rfind(tag).unwrap_or(rendered.len());
        let kept = &rendered[..cut];
        let followed_by_space = rendered[cut + tag.len()..].starts_with(' ');
        Ok(if followed_by_space { kept.to_string() } else { kept.trim_end().to_string() })
    }

    fn render_messages(&self, messages: &[Json], request: &ChatRequest) -> Result<String, PromptError> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        ctx.insert("messages".into(), Value::from_serde(messages));
        ctx.insert("tools".into(), json_or_none(request.tools.as_ref()));
        ctx.insert("documents".into(), json_or_none(request.documents.as_ref()));
        ctx.insert("add_generation_prompt".into(), Value::from(request.add_generation_prompt));
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token".into(), Value::from(bos.clone()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token".into(), Value::from(eos.clone()));
        }
        for (key, value) in &request.kwargs {
            // As in transformers, where these are apply_chat_template's own
            // arguments: kwargs may add variables and override special
            // tokens, not replace the conversation.
            if RESERVED.contains(&key.as_str()) {
                return Err(PromptError::Invalid(format!(
                    "`chat_template_kwargs` cannot set `{key}`: it comes from the request itself"
                )));
            }
            ctx.insert(key.clone(), Value::from_serde(value));
        }
        let template = self.env.get_template(TEMPLATE_NAME)?;
        super::jinja::render_limited(&template, ctx, MAX_CHAT_OUTPUT_BYTES, "the chat template")
    }
}

/// Template variables that come from the request, never from kwargs.
const RESERVED: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

fn json_or_none(value: Option<&Json>) -> Value {
    match value {
        Some(v) if !v.is_null() => Value::from_serde(v),
        _ => jinja::py_none(),
    }
}

/// transformers drops a message's top-level null keys, then mirrors a
/// reasoning field into both `thinking` and `reasoning_content`.
fn normalize_message(message: &Json) -> Json {
    let Json::Object(fields) = message else {
        return message.clone();
    };
    let fields: Map<String, Json> =
        fields.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
    let reasoning = ["reasoning_content", "thinking", "reasoning"].iter().find_map(|k| fields.get(*k).cloned());
    let Some(reasoning) = reasoning else {
        return Json::Object(fields);
    };
    let mut out = Map::new();
    if !fields.contains_key("thinking") {
        out.insert("thinking".into(), reasoning.clone());
    }
    for (k, v) in &fields {
        let v = if k == "thinking" || k == "reasoning_content" { reasoning.clone() } else { v.clone() };
        out.insert(k.clone(), v);
    }
    if !fields.contains_key("reasoning_content") {
        out.insert("reasoning_content".into(), reasoning);
    }
    Json::Object(out)
}

/// Appends the continue tag to the final message's `field` and returns the
/// message text as it was.
fn append_continue_tag(message: &mut Json, field: &str) -> Result<String, PromptError> {
    let missing = || PromptError::Invalid(format!("continue_final_message: the final message has no `{field}`"));
    let value = message.get_mut(field).ok_or_else(missing)?;
    match value {
        Json::String(s) => {
            let original = s.clone();
            s.push_str(CONTINUE_TAG);
            Ok(original)
        }
        Json::Array(parts) => {
            let part =
                parts.iter_mut().rev().find_map(|p| p.get_mut("text").filter(|t| t.is_string())).ok_or_else(missing)?;
            let original = part.as_str().unwrap_or_default().to_string();
            *part = Json::String(format!("{original}{CONTINUE_TAG}"));
            Ok(original)
        }
        _ => Err(missing()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn kwargs_cannot_replace_the_conversation() -> Result<(), PromptError> {
        let t = ChatTemplate::new(SMOL, None, None, Clock::Local)?;
        let messages = vec![json!({"role": "user", "content": "hi"})];
        for key in RESERVED {
            let mut kwargs = Map::new();
            kwargs.insert(key.into(), json!([]));
            let req = ChatRequest { messages: messages.clone(), kwargs, ..Default::default() };
            let err = t.render(&req).expect_err("a reserved kwarg is refused");
            assert!(matches!(&err, PromptError::Invalid(m) if m.contains(key)), "{err}");
        }
        let mut kwargs = Map::new();
        kwargs.insert("enable_thinking".into(), json!(false));
        assert!(t.render(&ChatRequest { messages, kwargs, ..Default::default() }).is_ok());
        Ok(())
    }

    #[test]
    fn continue_final_message_cuts_after_the_partial_reply() -> Result<(), PromptError> {
        let t = ChatTemplate::new(SMOL, None, None, Clock::Local)?;
        let req = ChatRequest {
            messages: vec![
                json!({"role": "system", "content": "S"}),
                json!({"role": "assistant", "content": "Arr", "tool_calls": null}),
            ],
            continue_final_message: true,
            ..Default::default()
        };
        assert_eq!(t.render(&req)?, "<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\nArr");
        Ok(())
    }

    #[test]
    fn reasoning_fields_are_mirrored_and_nulls_dropped() {
        let m = normalize_message(&json!({"role": "assistant", "content": null, "reasoning": "r"}));
        assert_eq!(m, json!({"thinking": "r", "role": "assistant", "reasoning": "r", "reasoning_content": "r"}));
        let keys: Vec<&String> = m.as_object().map(|o| o.keys().collect()).unwrap_or_default();
        assert_eq!(keys, ["thinking", "role", "reasoning", "reasoning_content"]);
    }
}
