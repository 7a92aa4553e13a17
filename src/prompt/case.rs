//! One chat-template rendering case in the golden corpus's `cases.json`
//! format, as `tailor chat-template render` reads it.

use chrono::NaiveDateTime;
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use super::jinja::Clock;
use super::{ChatRequest, ChatTemplate, PromptError};

/// transformers' clock in the corpus when a case names none.
pub const DEFAULT_FROZEN_DATE: &str = "2025-03-07T14:05:09";

#[derive(Debug, Clone, Deserialize)]
pub struct RenderCase {
    #[serde(default)]
    pub case_id: Option<String>,
    /// The template's name (`DIR/<template>.jinja` with `--template-dir`).
    #[serde(default)]
    pub template: Option<String>,
    pub messages: Vec<Json>,
    #[serde(default)]
    pub tools: Option<Json>,
    #[serde(default)]
    pub documents: Option<Json>,
    #[serde(default)]
    pub add_generation_prompt: bool,
    #[serde(default)]
    pub continue_final_message: bool,
    #[serde(default)]
    pub kwargs: Map<String, Json>,
    /// null or absent: the variable is not defined for the template.
    #[serde(default)]
    pub bos_token: Option<String>,
    #[serde(default)]
    pub eos_token: Option<String>,
    /// What `strftime_now` sees as "now" (local, naive).
    #[serde(default)]
    pub frozen_date: Option<String>,
}

impl RenderCase {
    pub fn clock(&self) -> Result<Clock, PromptError> {
        let text = self.frozen_date.as_deref().unwrap_or(DEFAULT_FROZEN_DATE);
        NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S")
            .map(Clock::Frozen)
            .map_err(|e| PromptError::Invalid(format!("frozen_date {text:?}: {e}")))
    }

    /// Renders this case with `source` exactly as transformers would.
    pub fn render(&self, source: &str) -> Result<String, PromptError> {
        let template = ChatTemplate::new(source, self.bos_token.clone(), self.eos_token.clone(), self.clock()?)?;
        template.render(&ChatRequest {
            messages: self.messages.clone(),
            tools: self.tools.clone(),
            documents: self.documents.clone(),
            add_generation_prompt: self.add_generation_prompt,
            continue_final_message: self.continue_final_message,
            kwargs: self.kwargs.clone(),
        })
    }
}

/// One entry of `--cases` output: the rendering or the error, by case id.
#[derive(Debug, serde::Serialize)]
pub struct CaseResult {
    pub case_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Renders every case with `template_dir/<case.template>.jinja`, in order.
pub fn render_all(cases: &[RenderCase], template_dir: &std::path::Path) -> Vec<CaseResult> {
    cases
        .iter()
        .map(|case| {
            let result = match &case.template {
                None => Err(PromptError::Invalid("the case names no `template`".into())),
                Some(name) if !is_plain_name(name) => {
                    Err(PromptError::Invalid(format!("template name {name:?} is not a plain file name")))
                }
                Some(name) => std::fs::read_to_string(template_dir.join(format!("{name}.jinja")))
                    .map_err(|e| PromptError::Invalid(format!("cannot read template {name}: {e}")))
                    .and_then(|source| case.render(&source)),
            };
            let (output, error) = match result {
                Ok(text) => (Some(text), None),
                Err(e) => (None, Some(e.to_string())),
            };
            CaseResult { case_id: case.case_id.clone(), output, error }
        })
        .collect()
}

/// No separators or parent references: a case cannot name a file outside the folder.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != ".."
}
