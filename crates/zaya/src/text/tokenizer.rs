//! The ZAYA1 tokenizer: `tokenizer.json` read by the `tokenizers` library, plus what
//! transformers takes from `tokenizer_config.json`, `special_tokens_map.json`,
//! `generation_config.json`, `chat_template.jinja` and `additional_chat_templates/`.
//!
//! BOS / EOS insertion is decided only by the post-processor in `tokenizer.json` (transformers
//! ignores `add_bos_token` / `add_eos_token` when `tokenizer.json` exists); ZAYA1's prepends
//! `<bos>` (2) and appends `<end_of_turn>` (106) when special tokens are requested.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json};
use tokenizers::models::ModelWrapper;

use super::chat_template::{ChatRequest, ChatTemplate, ChatTemplates};
use super::{Result, TextError};

/// A named special token (`bos_token`, `eos_token`, ...) and its id in the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub content: String,
    /// `None` when the token's text is not in the vocabulary.
    pub id: Option<u32>,
}

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`, in its order.
const NAMED_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// `GemmaTokenizer`'s constructor defaults (the class transformers uses for ZAYA1).
const GEMMA_DEFAULTS: [(&str, &str); 5] = [
    ("unk_token", "<unk>"),
    ("bos_token", "<bos>"),
    ("eos_token", "<eos>"),
    ("pad_token", "<pad>"),
    ("mask_token", "<mask>"),
];

pub struct ZayaTokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    named: Vec<(String, SpecialToken)>,
    generation_eos: Vec<u32>,
    clean_up_spaces: bool,
    templates: Option<ChatTemplates>,
    compiled: Vec<(String, std::result::Result<ChatTemplate, String>)>,
}

impl std::fmt::Debug for ZayaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZayaTokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size())
            .field("named", &self.named)
            .field("generation_eos", &self.generation_eos)
            .field(
                "chat_templates",
                &self.templates.as_ref().map(|t| t.names()),
            )
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| TextError::Json {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TextError::io(path, e)),
    }
}

fn read_text(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TextError::io(path, e)),
    }
}

fn as_object<'a>(v: &'a Json, path: &Path) -> Result<&'a Map<String, Json>> {
    v.as_object()
        .ok_or_else(|| TextError::config(path, "<root>", "expected a JSON object"))
}

/// A special-token entry: a string, an AddedToken dict with `content`, or `null`.
fn token_text(v: &Json, path: &Path, field: &str) -> Result<Option<String>> {
    match v {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Object(o) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(TextError::config(
                path,
                field,
                "an AddedToken object needs a string `content`",
            )),
        },
        other => Err(TextError::config(
            path,
            field,
            format!("expected a string, an AddedToken object or null, got {other}"),
        )),
    }
}

/// `eos_token_id` of generation_config.json: an int, a list of ints or null.
fn token_ids(v: Option<&Json>, path: &Path, field: &str) -> Result<Vec<u32>> {
    let one = |x: &Json| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                TextError::config(path, field, format!("expected a token id (u32), got {x}"))
            })
    };
    match v {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

/// Reads tokenizer.json. The JSON syntax is checked first, and a panic of the `tokenizers`
/// crate on a malformed file (fuzzing found one: a nested deserializer unwraps a syntax
/// error) becomes a typed error instead of ending the program.
fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let load_error = |message: String| TextError::TokenizerLoad {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| TextError::io(path, e))?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
        .map_err(|e| load_error(format!("invalid JSON: {e}")))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| load_error(e.to_string()))?;
    // The post-processor's template is only looked at when encoding: a template naming a
    // special token missing from its map panics there (fuzzing found it), so probe once.
    let parse_and_probe = || {
        let t = text.parse::<tokenizers::Tokenizer>()?;
        t.encode("a", true)?;
        Ok::<_, tokenizers::Error>(t)
    };
    match std::panic::catch_unwind(parse_and_probe) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(load_error(e.to_string())),
        Err(panic) => {
            let why = crate::error::panic_message(panic.as_ref());
            Err(load_error(format!(
                "the tokenizers library failed on it: {why}"
            )))
        }
    }
}

impl ZayaTokenizer {
    /// Load a tokenizer directory (a model directory works: only the tokenizer files are read).
    /// A GGUF model file works too: its embedded tokenizer files are read.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let mut dir = dir.as_ref().to_path_buf();
        if crate::gguf::is_gguf(&dir) {
            dir = crate::gguf::unpack_text_files(&dir).map_err(|e| TextError::TokenizerLoad {
                path: dir.clone(),
                message: e.to_string(),
            })?;
        }
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(TextError::MissingFile {
                dir,
                file: "tokenizer.json".into(),
            });
        }
        let inner = load_tokenizer_json(&tok_path)?;

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg_json = read_json(&cfg_path)?;
        let empty = Map::new();
        let cfg = match &cfg_json {
            Some(v) => as_object(v, &cfg_path)?,
            None => &empty,
        };

        // Named special tokens: tokenizer_config.json; special_tokens_map.json overrides them only
        // on transformers' legacy path (no `added_tokens_decoder` in the config); GemmaTokenizer's
        // defaults fill the gaps.
        let mut texts: Vec<(String, Option<String>)> = Vec::new();
        let set =
            |texts: &mut Vec<(String, Option<String>)>, k: &str, v: Option<String>| match texts
                .iter_mut()
                .find(|(name, _)| name == k)
            {
                Some(slot) => slot.1 = v,
                None => texts.push((k.to_string(), v)),
            };
        for k in NAMED_TOKENS {
            if let Some(v) = cfg.get(k) {
                set(&mut texts, k, token_text(v, &cfg_path, k)?);
            }
        }
        if let Some(Json::Object(extra)) = cfg.get("extra_special_tokens") {
            for (k, v) in extra {
                set(&mut texts, k, token_text(v, &cfg_path, k)?);
            }
        }
        if !cfg.contains_key("added_tokens_decoder") {
            let map_path = dir.join("special_tokens_map.json");
            if let Some(v) = read_json(&map_path)? {
                for (k, v) in as_object(&v, &map_path)? {
                    if NAMED_TOKENS.contains(&k.as_str()) {
                        set(&mut texts, k, token_text(v, &map_path, k)?);
                    }
                }
            }
        }
        let class = cfg.get("tokenizer_class").and_then(Json::as_str);
        if matches!(
            class,
            None | Some("GemmaTokenizer") | Some("GemmaTokenizerFast")
        ) {
            for (k, default) in GEMMA_DEFAULTS {
                let absent = !texts.iter().any(|(name, _)| name == k);
                if absent && inner.token_to_id(default).is_some() {
                    set(&mut texts, k, Some(default.to_string()));
                }
            }
        }
        let mut named = Vec::new();
        for (k, text) in texts {
            let Some(content) = text else { continue };
            let id = inner.token_to_id(&content);
            if id.is_none() {
                tracing::warn!(
                    "{}: {k} {content:?} is not in the vocabulary of tokenizer.json",
                    cfg_path.display()
                );
            }
            named.push((k, SpecialToken { content, id }));
        }
        // Keep transformers' attribute order for the standard names.
        named.sort_by_key(|(k, _)| {
            NAMED_TOKENS
                .iter()
                .position(|n| n == k)
                .unwrap_or(NAMED_TOKENS.len())
        });

        let clean_up_spaces = match cfg.get("clean_up_tokenization_spaces") {
            None | Some(Json::Null) => false,
            Some(Json::Bool(b)) => *b,
            Some(other) => {
                return Err(TextError::config(
                    &cfg_path,
                    "clean_up_tokenization_spaces",
                    format!("expected a boolean, got {other}"),
                ))
            }
        };

        let gen_path = dir.join("generation_config.json");
        let generation_eos = match read_json(&gen_path)? {
            Some(v) => token_ids(
                as_object(&v, &gen_path)?.get("eos_token_id"),
                &gen_path,
                "eos_token_id",
            )?,
            None => Vec::new(),
        };

        let templates = Self::load_templates(&dir, cfg, &cfg_path)?;
        let special_map: Vec<(String, String)> = named
            .iter()
            .map(|(k, t)| (k.clone(), t.content.clone()))
            .collect();
        let compiled = match &templates {
            None => Vec::new(),
            Some(t) => t
                .names()
                .into_iter()
                .map(|name| {
                    let (_, src) = t.select(Some(&name), false).expect("listed name");
                    let c = ChatTemplate::new(&name, src)
                        .map(|c| c.with_special_tokens(special_map.clone()))
                        .map_err(|e| e.to_string());
                    (name, c)
                })
                .collect(),
        };

        Ok(ZayaTokenizer {
            inner,
            dir,
            named,
            generation_eos,
            clean_up_spaces,
            templates,
            compiled,
        })
    }

    /// transformers 5: `chat_template.jinja` and `additional_chat_templates/*.jinja` take
    /// priority over `chat_template` in tokenizer_config.json (a string or a list of
    /// `{name, template}`).
    fn load_templates(
        dir: &Path,
        cfg: &Map<String, Json>,
        cfg_path: &Path,
    ) -> Result<Option<ChatTemplates>> {
        let mut files: Vec<(String, String)> = Vec::new();
        if let Some(src) = read_text(&dir.join("chat_template.jinja"))? {
            files.push(("default".into(), src));
        }
        let extra_dir = dir.join("additional_chat_templates");
        if extra_dir.is_dir() {
            let entries =
                std::fs::read_dir(&extra_dir).map_err(|e| TextError::io(&extra_dir, e))?;
            let mut extra = Vec::new();
            for entry in entries {
                let path = entry.map_err(|e| TextError::io(&extra_dir, e))?.path();
                let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".jinja"))
                else {
                    continue;
                };
                let src = std::fs::read_to_string(&path).map_err(|e| TextError::io(&path, e))?;
                extra.push((name.to_string(), src));
            }
            extra.sort();
            files.extend(extra);
        }
        if !files.is_empty() {
            return Ok(Some(if files.len() == 1 && files[0].0 == "default" {
                ChatTemplates::Single(files.remove(0).1)
            } else {
                ChatTemplates::Named(files)
            }));
        }
        match cfg.get("chat_template") {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(ChatTemplates::Single(s.clone()))),
            Some(Json::Array(items)) => {
                let mut list = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let name = item.get("name").and_then(Json::as_str);
                    let tmpl = item.get("template").and_then(Json::as_str);
                    match (name, tmpl) {
                        (Some(n), Some(t)) => list.push((n.to_string(), t.to_string())),
                        _ => {
                            return Err(TextError::config(
                                cfg_path,
                                format!("chat_template[{i}]"),
                                "each entry needs string `name` and `template`",
                            ))
                        }
                    }
                }
                Ok(Some(ChatTemplates::Named(list)))
            }
            Some(other) => Err(TextError::config(
                cfg_path,
                "chat_template",
                format!("expected a string or a list of {{name, template}}, got {other}"),
            )),
        }
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Token ids of `text`; `add_special_tokens` runs the post-processor (BOS ... `<end_of_turn>`
    /// for ZAYA1).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TextError::Tokenizer {
                action: "encode".into(),
                message: e.to_string(),
            })
    }

    /// Ids of a plain prompt to continue. The ZAYA1 post-processor appends `<end_of_turn>`
    /// after BOS + text (as the reference's integration test shows); a prompt to continue must
    /// not end with an end-of-turn, so trailing EOS ids added by the post-processor are removed.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text, true)?;
        let plain = self.encode(text, false)?;
        let eos = self.eos_token_ids();
        while ids.len() > plain.len()
            && ids.last().is_some_and(|l| eos.contains(l))
            && !plain.ends_with(&ids[ids.len() - 1..])
        {
            ids.pop();
        }
        Ok(ids)
    }

    /// Text of `ids`, as transformers' `tokenizer.decode`. Like transformers, ids that are not
    /// in the vocabulary are skipped; call [`check_ids`](Self::check_ids) first to reject them.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text =
            self.inner
                .decode(ids, skip_special_tokens)
                .map_err(|e| TextError::Tokenizer {
                    action: "decode".into(),
                    message: e.to_string(),
                })?;
        // transformers skips the clean-up for BPE models (it corrupts their output).
        if self.clean_up_spaces && !matches!(self.inner.get_model(), ModelWrapper::BPE(_)) {
            return Ok(clean_up_tokenization(&text));
        }
        Ok(text)
    }

    /// Error on the first id that has no token.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids
            .iter()
            .position(|id| self.inner.id_to_token(*id).is_none())
        {
            Some(position) => Err(TextError::UnknownTokenId {
                id: ids[position],
                position,
                vocab_size: self.vocab_size(),
            }),
            None => Ok(()),
        }
    }

    /// Error on the first id that a model with `model_vocab_size` logits cannot produce.
    /// Ids below it without a token (the padded rows of an embedding larger than the
    /// tokenizer's vocabulary) are accepted and decode to nothing, as transformers'
    /// `decode` does.
    pub fn check_ids_for_model(&self, ids: &[u32], model_vocab_size: usize) -> Result<()> {
        match ids.iter().position(|&id| {
            (id as usize) >= model_vocab_size && self.inner.id_to_token(id).is_none()
        }) {
            Some(position) => Err(TextError::UnknownTokenId {
                id: ids[position],
                position,
                vocab_size: model_vocab_size.max(self.vocab_size()),
            }),
            None => Ok(()),
        }
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is an added token marked special (what `skip_special_tokens` drops).
    pub fn is_special_id(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// A named special token: `"bos_token"`, `"eos_token"`, `"pad_token"`, ...
    pub fn special_token(&self, name: &str) -> Option<&SpecialToken> {
        self.named.iter().find(|(k, _)| k == name).map(|(_, t)| t)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.special_token("bos_token").and_then(|t| t.id)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.special_token("eos_token").and_then(|t| t.id)
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.special_token("pad_token").and_then(|t| t.id)
    }

    /// transformers' `special_tokens_map`: attribute name -> token text (template variables).
    pub fn special_tokens_map(&self) -> Vec<(String, String)> {
        self.named
            .iter()
            .map(|(k, t)| (k.clone(), t.content.clone()))
            .collect()
    }

    /// End-of-sequence ids: generation_config.json's `eos_token_id` (int or list), then the
    /// tokenizer's `eos_token`, without duplicates.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = self.generation_eos.clone();
        if let Some(id) = self.eos_token_id() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// [`eos_token_ids`](Self::eos_token_ids) merged with the model config's `eos_token_id`.
    pub fn stop_token_ids(&self, model_eos: &[u32]) -> Vec<u32> {
        let mut ids = self.eos_token_ids();
        for id in model_eos {
            if !ids.contains(id) {
                ids.push(*id);
            }
        }
        ids
    }

    pub fn chat_templates(&self) -> Option<&ChatTemplates> {
        self.templates.as_ref()
    }

    /// The compiled chat template transformers would pick (see [`ChatTemplates::select`]).
    pub fn chat_template(&self, name: Option<&str>, with_tools: bool) -> Result<&ChatTemplate> {
        let templates = self
            .templates
            .as_ref()
            .ok_or_else(|| TextError::NoChatTemplate {
                dir: self.dir.clone(),
            })?;
        let (chosen, _) = templates.select(name, with_tools)?;
        let (_, compiled) = self
            .compiled
            .iter()
            .find(|(n, _)| n == chosen)
            .expect("every template is compiled at load");
        compiled
            .as_ref()
            .map_err(|message| TextError::TemplateSyntax {
                name: chosen.to_string(),
                message: message.clone(),
            })
    }

    /// `apply_chat_template(..., tokenize=False)`.
    pub fn apply_chat_template(&self, req: &ChatRequest) -> Result<String> {
        self.chat_template(None, req.tools.is_some())?.render(req)
    }

    /// `apply_chat_template(..., tokenize=True)`: the rendered prompt encoded without adding
    /// special tokens (the template writes them).
    pub fn encode_chat(&self, req: &ChatRequest) -> Result<Vec<u32>> {
        self.encode(&self.apply_chat_template(req)?, false)
    }
}

/// transformers' `clean_up_tokenization` (for WordPiece-style vocabularies).
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
