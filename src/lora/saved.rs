//! PEFT's `modules_to_save` in an adapter folder: the whole modules of the
//! base it replaces (`base_model.model.lm_head.weight`, …), each declared by
//! `adapter_config.json`, present, and of the base's shape. tailor replaces
//! the token embedding, the output head and the RMSNorms; a config naming
//! another module (a projection, a whole layer) is refused by name.

use std::sync::Arc;

use safetensors::tensor::TensorView;

use super::adapter::BaseShapes;
use super::config::AdapterConfig;
use super::stored::Stored;
use super::LoraError;
use crate::model::lora::saved::{LayerNorm, SavedMatrix};
use crate::model::lora::SavedModules;

/// A module an adapter may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    EmbedTokens,
    LmHead,
    Norm,
    LayerNorm(usize, LayerNorm),
}

impl Slot {
    /// The Hugging Face module name (what `modules_to_save` matches).
    fn name(self) -> String {
        match self {
            Slot::EmbedTokens => "model.embed_tokens".into(),
            Slot::LmHead => "lm_head".into(),
            Slot::Norm => "model.norm".into(),
            Slot::LayerNorm(layer, which) => format!("model.layers.{layer}.{}", which.path()),
        }
    }

    /// The slot a saved tensor's name is for (PEFT saves the module's
    /// `weight` under the base's own name).
    pub(crate) fn of_tensor(name: &str) -> Option<Slot> {
        let module = name.strip_prefix("base_model.model.")?.strip_suffix(".weight")?;
        match module {
            "model.embed_tokens" => return Some(Slot::EmbedTokens),
            "lm_head" => return Some(Slot::LmHead),
            "model.norm" => return Some(Slot::Norm),
            _ => {}
        }
        let (layer, path) = module.strip_prefix("model.layers.")?.split_once('.')?;
        let which = LayerNorm::ALL.into_iter().find(|w| w.path() == path)?;
        Some(Slot::LayerNorm(layer.parse().ok()?, which))
    }
}

/// Every module of the base, by name, and the slot of those an adapter
/// may replace.
fn base_modules(base: &BaseShapes) -> Vec<(String, Option<Slot>)> {
    let mut modules: Vec<(String, Option<Slot>)> =
        ["model", "model.layers", "model.rotary_emb"].into_iter().map(|m| (m.to_string(), None)).collect();
    for slot in [Slot::EmbedTokens, Slot::Norm, Slot::LmHead] {
        modules.push((slot.name(), Some(slot)));
    }
    let sites = base.sites();
    for layer in 0..base.num_layers {
        let prefix = format!("model.layers.{layer}");
        let mut other = vec![prefix.clone(), format!("{prefix}.self_attn"), format!("{prefix}.mlp")];
        other.extend(sites.iter().map(|s| format!("{prefix}.{}", s.path)));
        other.push(format!("{prefix}.mlp.act_fn"));
        if base.qk_norm {
            other.extend(["q_norm", "k_norm"].map(|n| format!("{prefix}.self_attn.{n}")));
        }
        modules.extend(other.into_iter().map(|m| (m, None)));
        for which in LayerNorm::ALL {
            let slot = Slot::LayerNorm(layer, which);
            modules.push((slot.name(), Some(slot)));
        }
    }
    modules
}

/// The saved tensors of one adapter file, gathered while its tensors are read.
pub(crate) struct Reader<'a> {
    /// The modules `modules_to_save` names, and the tensor found for each.
    expected: Vec<(Slot, Option<Stored<'a>>)>,
    /// The head is the saved embedding (`ensure_weight_tying`): PEFT writes
    /// it under `lm_head` too, and that copy is not read.
    tied_head: bool,
}

impl<'a> Reader<'a> {
    /// The modules `config` says the adapter replaces; Err when it names a
    /// module tailor cannot replace. Names that match nothing are ignored,
    /// as PEFT ignores them.
    pub(crate) fn new(config: &AdapterConfig, base: &BaseShapes) -> Result<Self, LoraError> {
        let mut expected = Vec::new();
        for (name, slot) in base_modules(base) {
            if !config.saves(&name) {
                continue;
            }
            match slot {
                Some(slot) => expected.push((slot, None)),
                None => {
                    return Err(LoraError::Unsupported(format!(
                        "modules_to_save names `{name}`: tailor replaces the token embedding, the output head and \
                         the RMSNorms, not other modules (train a LoRA on a projection instead)"
                    )))
                }
            }
        }
        let tied_head = config.ensure_weight_tying
            && base.tied_embeddings
            && expected.iter().any(|(s, _)| *s == Slot::EmbedTokens)
            && !expected.iter().any(|(s, _)| *s == Slot::LmHead);
        Ok(Self { expected, tied_head })
    }

    /// Takes tensor `name` of `slot`; Err when the config does not declare it.
    pub(crate) fn add(&mut self, name: &str, slot: Slot, view: &TensorView<'a>) -> Result<(), LoraError> {
        if slot == Slot::LmHead && self.tied_head {
            return Ok(());
        }
        let Some(entry) = self.expected.iter_mut().find(|(s, _)| *s == slot) else {
            return Err(LoraError::Mismatch(format!(
                "`{name}` is a whole module (`modules_to_save`), which adapter_config.json does not declare"
            )));
        };
        entry.1 = Some(match slot {
            Slot::EmbedTokens | Slot::LmHead => Stored::of(name, view)?,
            Slot::Norm | Slot::LayerNorm(..) => Stored::vector(name, view)?,
        });
        Ok(())
    }

    /// The modules replaced, each checked against the base's shape.
    pub(crate) fn finish(self, base: &BaseShapes) -> Result<SavedModules, LoraError> {
        let hidden = base.dims[0].1;
        let mut saved = SavedModules::default();
        for (slot, stored) in self.expected {
            let module = slot.name();
            let stored = stored.ok_or_else(|| {
                LoraError::Weights(format!("`{module}` is in modules_to_save, but its weight is missing"))
            })?;
            let (rows, cols) = match slot {
                Slot::EmbedTokens | Slot::LmHead => (base.vocab_size, hidden),
                Slot::Norm | Slot::LayerNorm(..) => (hidden, 1),
            };
            if (stored.rows, stored.cols) != (rows, cols) {
                let shape = |r, c| if c == 1 { format!("[{r}]") } else { format!("[{r}, {c}]") };
                return Err(LoraError::Mismatch(format!(
                    "`{module}` (modules_to_save) must be {}, got {}",
                    shape(rows, cols),
                    shape(stored.rows, stored.cols)
                )));
            }
            let values = stored.part(0, rows * cols);
            let matrix = || {
                SavedMatrix::new(values.clone(), rows, cols, base.precision)
                    .map(Arc::new)
                    .ok_or_else(|| LoraError::Weights(format!("`{module}`: wrong size")))
            };
            match slot {
                Slot::EmbedTokens => saved.embed_tokens = Some(matrix()?),
                Slot::LmHead => saved.lm_head = Some(matrix()?),
                Slot::Norm => saved.norm = Some(Arc::new(values)),
                Slot::LayerNorm(layer, which) => {
                    saved.layer_norms.resize(base.num_layers, Default::default());
                    saved.layer_norms[layer][which as usize] = Some(Arc::new(values));
                }
            }
        }
        // PEFT's `ensure_weight_tying`: a base whose head is its embedding
        // keeps them one module under the adapter too.
        if self.tied_head {
            saved.lm_head = saved.embed_tokens.clone();
        }
        Ok(saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_tensor_names_parse_to_their_modules() {
        let of = Slot::of_tensor;
        assert_eq!(of("base_model.model.lm_head.weight"), Some(Slot::LmHead));
        assert_eq!(of("base_model.model.model.embed_tokens.weight"), Some(Slot::EmbedTokens));
        assert_eq!(of("base_model.model.model.norm.weight"), Some(Slot::Norm));
        assert_eq!(
            of("base_model.model.model.layers.7.post_attention_layernorm.weight"),
            Some(Slot::LayerNorm(7, LayerNorm::PostAttention))
        );
        assert_eq!(of("base_model.model.model.layers.7.self_attn.q_proj.weight"), None);
        assert_eq!(of("base_model.model.model.layers.x.input_layernorm.weight"), None);
        assert_eq!(of("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"), None);
    }

    fn base() -> BaseShapes {
        let mut cfg = crate::model::random::RandomSource::tiny_config(64);
        cfg.num_layers = 2;
        BaseShapes::of(&cfg)
    }

    fn config(modules: &str) -> AdapterConfig {
        AdapterConfig::parse(&format!(
            r#"{{"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"], "modules_to_save": {modules}}}"#
        ))
        .expect("config")
    }

    #[test]
    fn a_config_naming_a_module_tailor_cannot_replace_is_refused_by_name() {
        let expected =
            |m: &str| Reader::new(&config(m), &base()).map(|r| r.expected.into_iter().map(|e| e.0).collect());
        let all: Vec<Slot> = expected(r#"["input_layernorm", "norm", "lm_head", "nothing_here"]"#).expect("supported");
        assert_eq!(
            all,
            [Slot::Norm, Slot::LmHead, Slot::LayerNorm(0, LayerNorm::Input), Slot::LayerNorm(1, LayerNorm::Input)]
        );
        for (modules, named) in
            [(r#"["q_proj"]"#, "model.layers.0.self_attn.q_proj"), (r#"["mlp"]"#, "model.layers.0.mlp")]
        {
            let err = expected(modules).expect_err(named).to_string();
            assert!(err.contains(&format!("`{named}`")), "{err}");
        }
    }
}
