//! Named prompt templates: `templates/<name>.jinja`, each opening with a
//! Jinja comment that holds its metadata in TOML:
//!
//! ```text
//! {#-
//! description = "Summarize a text."
//! system = "You are a precise summarizer."
//! [variables.text]
//! required = true
//! description = "The text to summarize"
//! [variables.sentences]
//! default = 3
//! [parameters]
//! temperature = 0.2
//! max_tokens = 200
//! -#}
//! Summarize in {{ sentences }} sentences:
//! {{ text }}
//! ```
//!
//! Templates render in a sandbox: no loader (no file access at all), bounded
//! fuel, a cap on output size. The store reloads when files change; a broken
//! edit keeps the last good version and logs the error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use minijinja::Environment;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::defaults::Defaults;
use super::jinja::{self, Clock};
use super::stamps::FileStamps;
use super::{FromSerde, PromptError};

/// Longest text a named template may produce.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;
/// Instructions one render may run (an infinite loop ends here, not in a hang).
const TEMPLATE_FUEL: u64 = 2_000_000;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Variable {
    #[serde(default)]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Json>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    #[serde(default)]
    description: String,
    system: Option<String>,
    #[serde(default)]
    variables: BTreeMap<String, Variable>,
    #[serde(default)]
    parameters: Defaults,
    /// The variable that receives the request's own text (the completion
    /// prompt, or the final user message of a chat) when `template_vars`
    /// does not set it: how a stock OpenAI client fills a preset's template.
    input: Option<String>,
}

/// A parsed, compiled template.
pub struct NamedTemplate {
    pub name: String,
    pub description: String,
    pub variables: BTreeMap<String, Variable>,
    /// Sampling defaults and the system prompt.
    pub defaults: Defaults,
    pub input: Option<String>,
    env: Environment<'static>,
}

impl std::fmt::Debug for NamedTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedTemplate").field("name", &self.name).finish()
    }
}

impl NamedTemplate {
    pub fn parse(name: &str, source: &str) -> Result<Self, PromptError> {
        let meta = metadata_block(source)
            .map(|toml_text| {
                toml::from_str::<Metadata>(toml_text)
                    .map_err(|e| PromptError::Invalid(format!("template `{name}` metadata: {e}")))
            })
            .transpose()?
            .unwrap_or_default();
        if meta.parameters.template.is_some() {
            return Err(PromptError::Invalid(format!("template `{name}`: [parameters] cannot name a template")));
        }
        if let Some(input) = meta.input.as_ref().filter(|i| !meta.variables.contains_key(*i)) {
            return Err(PromptError::Invalid(format!("template `{name}`: input `{input}` is not a declared variable")));
        }
        let mut env = jinja::environment(Clock::Local);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template_owned(name.to_string(), source.to_string())
            .map_err(|e| PromptError::Invalid(format!("template `{name}`: {}", jinja::describe(&e))))?;
        let mut defaults = meta.parameters;
        defaults.system = defaults.system.or(meta.system);
        Ok(Self {
            name: name.to_string(),
            description: meta.description,
            variables: meta.variables,
            defaults,
            input: meta.input,
            env,
        })
    }

    /// Renders with `vars` over the declared defaults. A missing required or
    /// an undeclared variable is an error naming it.
    pub fn render(&self, vars: &Map<String, Json>) -> Result<String, PromptError> {
        if let Some(unknown) = vars.keys().find(|k| !self.variables.contains_key(*k)) {
            let known: Vec<&str> = self.variables.keys().map(String::as_str).collect();
            return Err(PromptError::Invalid(format!(
                "template `{}` has no variable `{unknown}` (variables: {})",
                self.name,
                known.join(", ")
            )));
        }
        let mut ctx: BTreeMap<String, minijinja::Value> = BTreeMap::new();
        for (name, var) in &self.variables {
            match vars.get(name).or(var.default.as_ref()) {
                Some(v) => {
                    ctx.insert(name.clone(), minijinja::Value::from_serde(v));
                }
                None if var.required => {
                    return Err(PromptError::Invalid(format!("template `{}` needs the variable `{name}`", self.name)))
                }
                None => {}
            }
        }
        let template = self.env.get_template(&self.name)?;
        super::jinja::render_limited(&template, ctx, MAX_OUTPUT_BYTES, &format!("template `{}`", self.name))
    }
}

/// The TOML inside a leading `{# ... #}` comment, if the file opens with one.
fn metadata_block(source: &str) -> Option<&str> {
    let rest = source.trim_start().strip_prefix("{#")?;
    let end = rest.find("#}")?;
    let inner = &rest[..end];
    let inner = inner.strip_prefix(['-', '+']).unwrap_or(inner);
    Some(inner.strip_suffix(['-', '+']).unwrap_or(inner))
}

/// What `GET /v1/templates` shows.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TemplateCard {
    pub name: String,
    pub description: String,
    pub variables: BTreeMap<String, Variable>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    pub parameters: Defaults,
}

/// Every template of a folder, reloaded when files change.
pub struct TemplateStore {
    dir: PathBuf,
    state: RwLock<StoreState>,
}

#[derive(Default)]
struct StoreState {
    templates: BTreeMap<String, Arc<NamedTemplate>>,
    /// (file, modified time) of what was last read, to notice edits.
    seen: FileStamps,
}

impl TemplateStore {
    /// Reads `dir` (a missing folder is an empty store).
    pub fn open(dir: &Path) -> Self {
        let store = Self { dir: dir.to_path_buf(), state: RwLock::new(StoreState::default()) };
        store.reload();
        store
    }

    pub fn get(&self, name: &str) -> Option<Arc<NamedTemplate>> {
        self.read().templates.get(name).cloned()
    }

    pub fn list(&self) -> Vec<TemplateCard> {
        self.read()
            .templates
            .values()
            .map(|t| TemplateCard {
                name: t.name.clone(),
                description: t.description.clone(),
                variables: t.variables.clone(),
                system: t.defaults.system.clone(),
                input: t.input.clone(),
                parameters: Defaults { system: None, ..t.defaults.clone() },
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, StoreState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the folder if any file changed. Returns the errors of files
    /// that failed (their last good version stays).
    pub fn reload_if_changed(&self) -> Vec<String> {
        if self.scan() == self.read().seen {
            return Vec::new();
        }
        self.reload()
    }

    /// Re-reads every template now.
    pub fn reload(&self) -> Vec<String> {
        let seen = self.scan();
        let mut errors = Vec::new();
        let mut fresh = BTreeMap::new();
        for path in seen.keys() {
            let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(String::from) else {
                continue;
            };
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| PromptError::Invalid(format!("cannot read {}: {e}", path.display())))
                .and_then(|source| NamedTemplate::parse(&name, &source));
            match parsed {
                Ok(t) => {
                    fresh.insert(name, Arc::new(t));
                }
                Err(e) => {
                    tracing::error!(template = %name, error = %e, "template not (re)loaded; keeping the last good version");
                    errors.push(e.to_string());
                    if let Some(old) = self.read().templates.get(&name) {
                        fresh.insert(name, old.clone());
                    }
                }
            }
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        state.templates = fresh;
        state.seen = seen;
        errors
    }

    fn scan(&self) -> FileStamps {
        super::stamps::scan(&self.dir, "jinja")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARIZE: &str = r#"{#-
description = "Summarize."
system = "Be brief."
[variables.text]
required = true
[variables.sentences]
default = 2
[parameters]
temperature = 0.2
-#}
Summarize in {{ sentences }} sentences: {{ text }}"#;

    fn vars(json: &str) -> Map<String, Json> {
        serde_json::from_str(json).unwrap_or_default()
    }

    #[test]
    fn metadata_and_defaults_apply() -> Result<(), PromptError> {
        let t = NamedTemplate::parse("summarize", SUMMARIZE)?;
        assert_eq!(t.description, "Summarize.");
        assert_eq!(t.defaults.system.as_deref(), Some("Be brief."));
        assert_eq!(t.defaults.temperature, Some(0.2));
        assert_eq!(t.render(&vars(r#"{"text": "abc"}"#))?, "Summarize in 2 sentences: abc");
        assert_eq!(t.render(&vars(r#"{"text": "abc", "sentences": 1}"#))?, "Summarize in 1 sentences: abc");
        Ok(())
    }

    #[test]
    fn missing_and_unknown_variables_are_named() -> Result<(), PromptError> {
        let t = NamedTemplate::parse("summarize", SUMMARIZE)?;
        let missing = t.render(&vars("{}")).expect_err("missing").to_string();
        assert!(missing.contains("`text`"), "{missing}");
        let unknown = t.render(&vars(r#"{"text": "a", "tone": "x"}"#)).expect_err("unknown").to_string();
        assert!(unknown.contains("`tone`"), "{unknown}");
        Ok(())
    }

    #[test]
    fn runaway_templates_stop_with_an_error() -> Result<(), PromptError> {
        let looping = NamedTemplate::parse(
            "loop",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        )?;
        assert!(looping.render(&vars("{}")).is_err());
        // One expression, almost no fuel: only the output cap can stop it.
        let huge = NamedTemplate::parse("huge", "{{ 'x' * 2000000 }}")?;
        let err = huge.render(&vars("{}")).expect_err("too large").to_string();
        assert!(err.contains("more than 1048576 bytes"), "{err}");
        let just_under = NamedTemplate::parse("fits", "{{ 'x' * 1048576 }}")?;
        assert_eq!(just_under.render(&vars("{}"))?.len(), 1 << 20);
        let include = NamedTemplate::parse("include", "{% include '/etc/passwd' %}")?;
        assert!(include.render(&vars("{}")).is_err(), "no file access");
        Ok(())
    }
}
