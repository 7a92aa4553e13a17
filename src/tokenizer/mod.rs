//! Text ↔ token ids. Built from a `tokenizer.json`, or from a GGUF file's own
//! `tokenizer.ggml.*` metadata so that a GGUF alone is a complete model:
//! byte-level BPE (`gpt2`, with llama.cpp's pre-tokenizer table) through the
//! `tokenizers` crate, SentencePiece BPE (`llama`) by our own `spm`.

pub mod spm;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Build(String),
    #[error("GGUF tokenizer metadata: {0}")]
    Metadata(String),
}

type Result<T> = std::result::Result<T, TokenizerError>;

fn build_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build(e.to_string())
}

/// GPT-2's pre-tokenizer regex (what ByteLevel applies with `use_regex`).
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Clone)]
enum Backend {
    Hf(Box<tokenizers::Tokenizer>),
    Spm(Box<spm::SpmTokenizer>),
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: Backend,
    /// Prepend the BOS token when encoding a raw prompt.
    add_bos: bool,
    bos_id: Option<u32>,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Build(format!("{}: {e}", path.display())))?;
        Ok(Self { inner: Backend::Hf(Box::new(inner)), add_bos: false, bos_id: None })
    }

    /// Builds a byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`) from
    /// GGUF metadata, with the pre-tokenizer that `tokenizer.ggml.pre` names in
    /// llama.cpp.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let meta = |key: &str| -> Result<&Value> {
            md.get(key).ok_or_else(|| TokenizerError::Metadata(format!("missing `{key}`")))
        };
        let string_array = |key: &str| -> Result<Vec<String>> {
            meta(key)?
                .to_vec()
                .map_err(|e| TokenizerError::Metadata(format!("`{key}`: {e}")))?
                .iter()
                .map(|v| v.to_string().cloned().map_err(|e| TokenizerError::Metadata(format!("`{key}`: {e}"))))
                .collect()
        };
        let model = meta("tokenizer.ggml.model")?.to_string().map_err(|e| TokenizerError::Metadata(e.to_string()))?;
        let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let flag = |key: &str| md.get(key).and_then(|v| v.to_bool().ok());
        let tokens = string_array("tokenizer.ggml.tokens")?;
        let token_types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| TokenizerError::Metadata(e.to_string()))?
                .iter()
                .map(|t| t.to_i32().unwrap_or(spm::token_type::NORMAL))
                .collect(),
            None => vec![spm::token_type::NORMAL; tokens.len()],
        };
        if token_types.len() != tokens.len() {
            return Err(TokenizerError::Metadata("token_type and tokens differ in length".into()));
        }
        match model.as_str() {
            "gpt2" => {}
            "llama" => {
                let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
                    Some(v) => v
                        .to_vec()
                        .map_err(|e| TokenizerError::Metadata(e.to_string()))?
                        .iter()
                        .map(|s| s.to_f32().unwrap_or(0.0))
                        .collect(),
                    None => vec![0.0; tokens.len()],
                };
                if scores.len() != tokens.len() {
                    return Err(TokenizerError::Metadata("scores and tokens differ in length".into()));
                }
                let inner = spm::SpmTokenizer::new(
                    tokens,
                    scores,
                    token_types,
                    id("tokenizer.ggml.unknown_token_id"),
                    flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
                );
                return Ok(Self {
                    inner: Backend::Spm(Box::new(inner)),
                    // SentencePiece models start with BOS unless they say otherwise.
                    add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(true),
                    bos_id: id("tokenizer.ggml.bos_token_id"),
                });
            }
            other => {
                return Err(TokenizerError::Metadata(format!(
                    "tokenizer model `{other}` (supported: gpt2, llama); put the model's tokenizer.json beside the GGUF file"
                )))
            }
        }
        let merges = string_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| TokenizerError::Metadata(format!("malformed merge `{m}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: ahash::AHashMap<String, u32> =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let pre =
            md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok().cloned()).unwrap_or_else(|| "default".into());
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignores_merges(&pre))
            .build()
            .map_err(build_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
        inner.with_decoder(Some(ByteLevel::default()));
        // Control (3) and user-defined (4) tokens are matched whole in text, as
        // transformers does with its added tokens.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, &t)| t == spm::token_type::CONTROL || t == spm::token_type::USER_DEFINED)
            .map(|(content, &t)| AddedToken::from(content.clone(), t == spm::token_type::CONTROL).normalized(false))
            .collect();
        inner.add_special_tokens(special).map_err(build_err)?;
        Ok(Self {
            inner: Backend::Hf(Box::new(inner)),
            add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(false),
            bos_id: id("tokenizer.ggml.bos_token_id"),
        })
    }

    /// A byte-level tokenizer with no merges: one token per byte (ids 0-255)
    /// and `<eos>` (256). For tests with random models.
    pub fn bytes() -> Result<Self> {
        let mut vocab: ahash::AHashMap<String, u32> = ByteLevel::alphabet()
            .into_iter()
            .map(|c| {
                let mut buf = [0u8; 4];
                let byte = byte_of_char(c);
                (c.encode_utf8(&mut buf).to_string(), byte as u32)
            })
            .collect();
        vocab.insert("<eos>".into(), 256);
        let bpe = BPE::builder().vocab_and_merges(vocab, Vec::new()).build().map_err(build_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, false)));
        inner.with_decoder(Some(ByteLevel::default()));
        inner.add_special_tokens([AddedToken::from("<eos>", true)]).map_err(build_err)?;
        Ok(Self { inner: Backend::Hf(Box::new(inner)), add_bos: false, bos_id: None })
    }

    pub fn set_add_bos(&mut self, add_bos: bool, bos_id: Option<u32>) {
        self.add_bos = add_bos;
        self.bos_id = bos_id;
    }

    /// Ids of `text` as the model sees it, special-token text included.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Backend::Hf(t) => Ok(t.encode_fast(text, false).map_err(build_err)?.get_ids().to_vec()),
            Backend::Spm(t) => Ok(t.encode(text)),
        }
    }

    /// Ids of a raw prompt: `encode` plus BOS where the model asks for it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            ids.push(bos);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        match &self.inner {
            Backend::Hf(t) => t.decode(ids, skip_special_tokens).map_err(build_err),
            Backend::Spm(t) => Ok(t.decode(ids, skip_special_tokens)),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Backend::Hf(t) => t.token_to_id(token),
            Backend::Spm(t) => t.token_to_id(token),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Backend::Hf(t) => t.id_to_token(id),
            Backend::Spm(t) => t.id_to_token(id),
        }
    }

    /// Every token's bytes, as constrained decoding needs them (special
    /// tokens start with 0xFF, llguidance's marker).
    pub fn token_bytes(&self) -> Result<Vec<Vec<u8>>> {
        match &self.inner {
            Backend::Hf(t) => {
                let json: serde_json::Value =
                    serde_json::from_str(&t.to_string(false).map_err(build_err)?).map_err(build_err)?;
                // llguidance asserts on vocabularies it does not expect.
                std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
                    .map_err(|_| TokenizerError::Build("cannot read the token bytes of this vocabulary".into()))?
                    .map_err(build_err)
            }
            Backend::Spm(t) => Ok(t.token_bytes()),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Backend::Hf(t) => t.get_vocab_size(true),
            Backend::Spm(t) => t.vocab_size(),
        }
    }
}

/// The cases of a llama.cpp tokenizer test file (`ggml-vocab-*.gguf.inp`):
/// texts separated by lines `__ggml_vocab_test__` (a separator at the very
/// end closes the last case, as llama.cpp reads it).
pub fn vocab_test_cases(text: &str) -> Vec<&str> {
    const SEPARATOR: &str = "\n__ggml_vocab_test__\n";
    let mut cases = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        match rest.split_once(SEPARATOR) {
            Some((case, next)) => {
                cases.push(case);
                rest = next;
            }
            None => {
                cases.push(rest);
                break;
            }
        }
    }
    cases
}

/// Ids as llama.cpp's `.gguf.out` files write them: each preceded by a space.
pub fn ids_line(ids: &[u32]) -> String {
    ids.iter().map(|id| format!(" {id}")).collect()
}

// llama.cpp's regex sequences (llama-vocab.cpp, `llm_tokenizer_bpe`), applied one
// after another, each splitting what the previous left.
const DEEPSEEK_LLM_SPLITS: [&str; 6] = [
    r#"[\r\n]"#,
    r#"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"#,
    r#"\s?[!-/:-~！-／：-～‘-‟　-。]+"#,
    r#"\s+$"#,
    r#"[一-龥ࠀ-一가-퟿]+"#,
    r#"\p{N}+"#,
];
const DEEPSEEK_CODER_SPLITS: [&str; 5] =
    [r#"[\r\n]"#, r#"\s?\p{L}+"#, r#"\s?\p{P}+"#, r#"[一-龥ࠀ-一가-퟿]+"#, r#"\p{N}"#];
const FALCON_SPLITS: [&str; 3] = [r#"[\p{P}\$\+<=>\^~\|`]+"#, GPT2_SPLIT, r#"[0-9][0-9][0-9]"#];
const DEFAULT_SPLITS: [&str; 4] = [r#"[\p{P}\$\+<=>\^~\|]+"#, GPT2_SPLIT, r#"\p{N}+"#, r#"[0-9][0-9][0-9]"#];

/// llama.cpp's pre-tokenizer types (llama-vocab.cpp) as Hugging Face
/// pre-tokenizers: each regex isolates its matches within the pieces the
/// previous one left, then bytes map to GPT-2's alphabet.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let splits = |patterns: &[&str]| -> Result<PreTokenizerWrapper> {
        let mut steps: Vec<PreTokenizerWrapper> = patterns
            .iter()
            .map(|p| {
                Ok(Split::new(SplitPattern::Regex((*p).into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(build_err)?
                    .into())
            })
            .collect::<Result<_>>()?;
        steps.push(ByteLevel::new(false, true, false).into());
        Ok(Sequence::new(steps).into())
    };
    match pre {
        // Every digit on its own, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "command-r" => {
            splits(&[r"\p{N}", GPT2_SPLIT])
        }
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "dbrx" | "falcon3" | "pixtral" => splits(&[LLAMA3_SPLIT]),
        "qwen2" | "deepseek-r1-qwen" => splits(&[QWEN2_SPLIT]),
        "gpt2" | "gpt-2" | "mpt" | "olmo" | "phi-2" => splits(&[GPT2_SPLIT]),
        "deepseek-llm" => splits(&DEEPSEEK_LLM_SPLITS),
        "deepseek-coder" => splits(&DEEPSEEK_CODER_SPLITS),
        "falcon" => splits(&FALCON_SPLITS),
        "default" => splits(&DEFAULT_SPLITS),
        other => Err(TokenizerError::Metadata(format!(
            "pre-tokenizer `{other}` is not known; put the model's tokenizer.json beside the GGUF file"
        ))),
    }
}

/// Pre-tokenizers whose words are looked up whole before any merge
/// (llama.cpp's `ignore_merges`, transformers' `ignore_merges: true`).
fn ignores_merges(pre: &str) -> bool {
    matches!(pre, "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral")
}

/// The byte a ByteLevel alphabet character stands for (GPT-2's mapping:
/// printable bytes map to themselves, the others to U+0100 upwards).
fn byte_of_char(c: char) -> u8 {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if code < 256 && printable(code) {
        return code as u8;
    }
    // The n-th non-printable byte maps to 256 + n.
    let n = code - 256;
    (0u32..256).filter(|b| !printable(*b)).nth(n as usize).unwrap_or(0) as u8
}
