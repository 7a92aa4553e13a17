//! Prompt building: the Jinja environment configured as transformers
//! configures it, and chat templates rendered through it.

pub mod case;
pub mod chat;
pub mod defaults;
pub mod jinja;
pub mod presets;
pub mod pyjson;
pub mod stamps;
pub mod templates;
pub mod tool_format;

pub use chat::{ChatRequest, ChatTemplate};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The template called `raise_exception(message)`.
    #[error("{0}")]
    Raised(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<minijinja::Error> for PromptError {
    fn from(e: minijinja::Error) -> Self {
        match jinja::raised_message(&e) {
            Some(message) => PromptError::Raised(message),
            None => PromptError::Template(jinja::describe(&e)),
        }
    }
}

/// Extension: build a template value from anything serializable.
pub trait FromSerde {
    fn from_serde<T: serde::Serialize>(value: T) -> Self;
}

impl FromSerde for minijinja::Value {
    fn from_serde<T: serde::Serialize>(value: T) -> Self {
        minijinja::Value::from(minijinja::value::Serde(value))
    }
}
