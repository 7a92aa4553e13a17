//! Presets: fine-tuning and prompting under one model id. A TOML file (or
//! every `*.toml` of a folder) declares one table per preset:
//!
//! ```toml
//! [support-bot]
//! adapter = "support"        # optional LoRA adapter, or a weighted composition:
//! # adapters = [{ name = "support", weight = 0.8 }, { name = "formal", weight = 0.4 }]
//! # adapter_merge = { combination_type = "ties", density = 0.5 }   # default "cat"
//! template = "ticket"        # optional named template
//! system = "You are ..."     # plus any request default:
//! temperature = 0.2          # top_p, top_k, max_tokens, stop, seed, penalties,
//! chat_template_kwargs = {}  # template_vars
//! ```
//!
//! A preset naming an adapter or template that does not exist is reported at
//! load and answered with a clear error when selected, never a crash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use super::defaults::Defaults;
use super::stamps::FileStamps;
use super::PromptError;

#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub name: String,
    pub adapter: Option<String>,
    /// A weighted composition applied instead of one adapter.
    pub adapters: Option<Vec<crate::lora::AdapterChoice>>,
    /// How `adapters` combine.
    pub adapter_merge: Option<crate::lora::MergeOptions>,
    pub defaults: Defaults,
}

impl Preset {
    /// The adapters it applies, by name, in order.
    pub fn adapter_names(&self) -> Vec<String> {
        match (&self.adapter, &self.adapters) {
            (Some(name), _) => vec![name.clone()],
            (None, Some(list)) => list.iter().map(|c| c.name.clone()).collect(),
            (None, None) => Vec::new(),
        }
    }
}

/// Parses one presets file.
pub fn parse(text: &str, origin: &str) -> Result<Vec<Preset>, PromptError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| PromptError::Invalid(format!("{origin}: {e}")))?;
    table
        .into_iter()
        .map(|(name, value)| {
            let toml::Value::Table(mut fields) = value else {
                return Err(PromptError::Invalid(format!("{origin}: `{name}` must be a table ([{name}])")));
            };
            if !crate::ids::is_model_name(&name) {
                return Err(PromptError::Invalid(format!("{origin}: `{name}` is not a valid model id")));
            }
            let adapter = match fields.remove("adapter") {
                None => None,
                Some(toml::Value::String(s)) => Some(s),
                Some(_) => return Err(PromptError::Invalid(format!("{origin}: [{name}] adapter must be a string"))),
            };
            let adapters: Option<Vec<crate::lora::AdapterChoice>> = match fields.remove("adapters") {
                None => None,
                Some(_) if adapter.is_some() => {
                    return Err(PromptError::Invalid(format!(
                        "{origin}: [{name}] declares both `adapter` and `adapters`; list the one adapter in `adapters`"
                    )))
                }
                Some(list) => Some(
                    list.try_into().map_err(|e| PromptError::Invalid(format!("{origin}: [{name}] adapters: {e}")))?,
                ),
            };
            let adapter_merge: Option<crate::lora::MergeOptions> = match fields.remove("adapter_merge") {
                None => None,
                Some(_) if adapters.is_none() => {
                    return Err(PromptError::Invalid(format!("{origin}: [{name}] adapter_merge needs `adapters`")))
                }
                Some(merge) => {
                    let invalid = |e: String| PromptError::Invalid(format!("{origin}: [{name}] adapter_merge: {e}"));
                    let merge: crate::lora::MergeOptions = merge.try_into().map_err(|e| invalid(format!("{e}")))?;
                    merge.check().map_err(|(_, message)| invalid(message))?;
                    Some(merge)
                }
            };
            let defaults: Defaults = toml::Value::Table(fields)
                .try_into()
                .map_err(|e| PromptError::Invalid(format!("{origin}: [{name}]: {e}")))?;
            if let Some(format) = &defaults.response_format {
                crate::grammar::from_response_format(format)
                    .map_err(|e| PromptError::Invalid(format!("{origin}: [{name}] response_format: {e}")))?;
            }
            Ok(Preset { name, adapter, adapters, adapter_merge, defaults })
        })
        .collect()
}

type PresetsByFile = BTreeMap<PathBuf, Vec<Preset>>;

/// Every preset of a file or folder, reloaded when files change.
pub struct PresetStore {
    location: PathBuf,
    /// (presets by name, the files' stamps, each file's last good presets).
    state: RwLock<(BTreeMap<String, Preset>, FileStamps, PresetsByFile)>,
}

impl PresetStore {
    pub fn open(location: &Path) -> Self {
        let store = Self { location: location.to_path_buf(), state: RwLock::new(Default::default()) };
        store.reload();
        store
    }

    pub fn get(&self, name: &str) -> Option<Preset> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).0.get(name).cloned()
    }

    pub fn list(&self) -> Vec<Preset> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).0.values().cloned().collect()
    }

    pub fn reload_if_changed(&self) -> Vec<String> {
        if self.scan() == self.state.read().unwrap_or_else(|p| p.into_inner()).1 {
            return Vec::new();
        }
        self.reload()
    }

    /// Re-reads every file; a file that fails keeps its own last good
    /// presets (and only those), and its error is logged and returned.
    /// Presets of deleted files go with them.
    pub fn reload(&self) -> Vec<String> {
        let seen = self.scan();
        let last_good = self.state.read().unwrap_or_else(|p| p.into_inner()).2.clone();
        let mut by_file = BTreeMap::new();
        let mut errors = Vec::new();
        for path in seen.keys() {
            let origin = path.display().to_string();
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| PromptError::Invalid(format!("{origin}: {e}")))
                .and_then(|text| parse(&text, &origin));
            let list = match parsed {
                Ok(list) => list,
                Err(e) => {
                    tracing::error!(file = %origin, error = %e, "presets not (re)loaded; keeping this file's last good ones");
                    errors.push(e.to_string());
                    last_good.get(path).cloned().unwrap_or_default()
                }
            };
            by_file.insert(path.clone(), list);
        }
        let mut presets = BTreeMap::new();
        for (path, list) in &by_file {
            for preset in list {
                if presets.contains_key(&preset.name) {
                    errors.push(format!("{}: preset `{}` is defined twice", path.display(), preset.name));
                    continue;
                }
                presets.insert(preset.name.clone(), preset.clone());
            }
        }
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = (presets, seen, by_file);
        errors
    }

    fn scan(&self) -> FileStamps {
        super::stamps::scan(&self.location, "toml")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_file_keeps_only_its_own_last_good_presets() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (a, b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
        std::fs::write(&a, "[a1]\ntemperature = 0.1\n[a2]\ntemperature = 0.2\n")?;
        std::fs::write(&b, "[b1]\ntemperature = 0.3\n")?;
        let store = PresetStore::open(dir.path());
        let names = |store: &PresetStore| store.list().into_iter().map(|p| p.name).collect::<Vec<_>>();
        assert_eq!(names(&store), ["a1", "a2", "b1"]);
        std::fs::write(&a, "[a1]\ntemperature = 0.1\n")?;
        assert!(store.reload().is_empty());
        assert_eq!(names(&store), ["a1", "b1"]);
        // b breaks while a gains a preset: b keeps b1, a2 stays deleted, a3 arrives.
        std::fs::write(&b, "[b1\n")?;
        std::fs::write(&a, "[a1]\ntemperature = 0.1\n[a3]\ntemperature = 0.4\n")?;
        let errors = store.reload();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(names(&store), ["a1", "a3", "b1"]);
        std::fs::remove_file(&b)?;
        store.reload();
        assert_eq!(names(&store), ["a1", "a3"]);
        Ok(())
    }

    #[test]
    fn presets_parse_with_defaults() -> Result<(), PromptError> {
        let presets = parse(
            r#"
[support-bot]
adapter = "pirate"
template = "summarize"
temperature = 0.2
stop = ["END"]
chat_template_kwargs = { enable_thinking = false }

[plain]
system = "Be terse."
"#,
            "test",
        )?;
        assert_eq!(presets.len(), 2);
        let bot = presets.iter().find(|p| p.name == "support-bot").expect("bot");
        assert_eq!(bot.adapter.as_deref(), Some("pirate"));
        assert_eq!(bot.defaults.template.as_deref(), Some("summarize"));
        assert_eq!(bot.defaults.temperature, Some(0.2));
        assert_eq!(bot.defaults.stop, Some(vec!["END".to_string()]));
        Ok(())
    }

    #[test]
    fn a_preset_may_carry_a_response_format_checked_at_load() {
        let ok = parse("[p]\nresponse_format = { type = \"json_object\" }\n", "t").expect("valid");
        assert_eq!(ok[0].defaults.response_format, Some(serde_json::json!({"type": "json_object"})));
        let bad = parse("[p]\nresponse_format = { type = \"xml\" }\n", "t").expect_err("unknown type");
        assert!(bad.to_string().contains("response_format"), "{bad}");
    }

    #[test]
    fn a_preset_may_compose_adapters_but_not_also_name_one() {
        let mix = parse("[mix]\nadapters = [{ name = \"pirate\", weight = 0.7 }, { name = \"shout\" }]\n", "t")
            .expect("valid");
        assert_eq!(mix[0].adapter_names(), ["pirate", "shout"]);
        assert_eq!(mix[0].adapters.as_ref().map(|a| a[0].weight), Some(Some(0.7)));
        let both = parse("[mix]\nadapter = \"pirate\"\nadapters = [{ name = \"shout\" }]\n", "t");
        assert!(both.is_err_and(|e| e.to_string().contains("both")));
        let typo = parse("[mix]\nadapters = [{ name = \"shout\", wieght = 2 }]\n", "t");
        assert!(typo.is_err_and(|e| e.to_string().contains("wieght")));
        let ties = "[mix]\nadapters = [{ name = \"a\" }]\nadapter_merge = { combination_type = \"ties\", density = ";
        let merge = parse(&format!("{ties}0.5 }}\n"), "t").expect("valid").remove(0).adapter_merge;
        assert_eq!(merge.and_then(|m| m.density), Some(0.5));
        let dense = parse(&format!("{ties}1.5 }}\n"), "t");
        assert!(dense.is_err_and(|e| e.to_string().contains("density")));
    }

    #[test]
    fn unknown_keys_and_bad_names_are_refused() {
        assert!(parse("[x]\ntemprature = 0.2\n", "t").is_err());
        assert!(parse("[\"../x\"]\ntemperature = 0.2\n", "t").is_err());
        assert!(parse("x = 1\n", "t").is_err());
    }
}
