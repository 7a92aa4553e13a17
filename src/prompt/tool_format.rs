//! The tool-call formats models write, named where a chat template's
//! configuration needs them (`--tool-call-parser`, detection from a
//! template); reading replies in them is the API's (`api::tools::format`).

/// How a model writes its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolFormat {
    /// `<tool_call>{"name": …, "arguments": …}</tool_call>`, any number (Hermes, Qwen 2.5 / 3).
    Hermes,
    /// A reply that is one JSON object `{"name": …, "parameters": …}` (or several separated
    /// by `;`), maybe after `<|python_tag|>` (Llama 3.1+).
    #[value(name = "llama3_json")]
    Llama3Json,
    /// `[TOOL_CALLS][{"name": …, "arguments": …}, …]` or `[TOOL_CALLS]name[ARGS]{…}` (Mistral).
    Mistral,
    /// tailor's JSON for templates that ignore tools: `{"tool_call": {"name": …, "arguments": …}}`
    /// or `{"response": "…"}`, the reply constrained to it.
    Generic,
}

impl ToolFormat {
    /// The format a chat template that renders tools teaches its model.
    pub fn detect(template_source: &str) -> Self {
        if template_source.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if template_source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else {
            // Llama 3.x and the templates that show tools without a marker
            // ask for a bare JSON object.
            ToolFormat::Llama3Json
        }
    }

    /// `[TOOL_CALLS]` is a control token: the text must keep it to be read.
    pub fn needs_special_tokens(self) -> bool {
        self == ToolFormat::Mistral
    }
}
