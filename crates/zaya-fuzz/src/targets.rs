//! The fuzz targets of the `zaya` crate's parsers of outside input, and their registry.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use zaya::text::{ChatRequest, ChatTemplate, ZayaTokenizer};
use zaya::weights::{self, Checkpoint, Layout};
use zaya::ZayaConfig;

use crate::{json_of, repo_file, Input, Mutator, ParseError, Scratch, Target};

/// Every target of this crate (the registry the tests run). Other crates add theirs by
/// implementing [`Target`] and calling [`crate::run`] in their own tests.
pub fn all() -> Vec<Box<dyn Target>> {
    vec![
        Box::new(ConfigJson),
        Box::new(SafetensorsFile::new()),
        Box::new(ShardIndex::new()),
        Box::new(TokenizerFiles::new()),
        Box::new(ChatTemplateRender),
        Box::new(TrainingData::new()),
        Box::new(GgufFile::new()),
        Box::new(LoraSpec),
        Box::new(LoraAdapterDir::new()),
        Box::new(GrpoInputs),
        Box::new(GrpoProcessAnswers),
        Box::new(GrpoData::new()),
        Box::new(ParallelPlanTarget),
    ]
}

/// A target by name.
pub fn by_name(name: &str) -> Option<Box<dyn Target>> {
    all().into_iter().find(|t| t.name() == name)
}

/// A config of a tiny model: its weights are small enough to write for every input.
fn tiny_config() -> Value {
    json!({
        "model_type": "zaya", "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "moe_intermediate_size": 8, "num_experts": 2, "router_hidden_size": 4,
        "max_position_embeddings": 64, "layer_types": ["hybrid", "hybrid_sliding"],
        "sliding_window": 4
    })
}

/// The tiny model's files in `layout`: (config.json, model.safetensors) bytes.
fn tiny_checkpoint(layout: Layout) -> (Vec<u8>, Vec<u8>) {
    let cfg = ZayaConfig::from_json(&tiny_config()).expect("tiny config is valid");
    let tensors = zaya::init::random_weights(&cfg, 0).expect("random weights");
    let scratch = Scratch::new("seed");
    weights::save_checkpoint(scratch.path(), &cfg, &tensors, layout).expect("save tiny model");
    (
        std::fs::read(scratch.path().join("config.json")).expect("config written"),
        std::fs::read(scratch.path().join("model.safetensors")).expect("weights written"),
    )
}

/// Opens, validates and loads every tensor of the checkpoint in `dir`.
fn load_checkpoint(dir: &std::path::Path) -> Result<(), ParseError> {
    let ckpt = Checkpoint::open(dir)?;
    let cfg = ckpt.config()?;
    ckpt.validate(&cfg)?;
    let dev = Device::Cpu;
    for spec in weights::native_specs(&cfg) {
        ckpt.load(&cfg, &spec.name, DType::F32, &dev)?;
    }
    let _ = (ckpt.dtypes(), ckpt.num_tensors(), ckpt.layout());
    Ok(())
}

// ---------------------------------------------------------------------------------------

/// `config.json`, native and legacy schemas.
pub struct ConfigJson;

impl Target for ConfigJson {
    fn name(&self) -> &'static str {
        "config_json"
    }

    fn seeds(&self) -> Vec<Input> {
        let mut seeds: Vec<Input> = [
            "models/default/config.json",
            "bench/configs/small.json",
            "bench/configs/medium.json",
            "tests/fixtures/models/gqa_sliding/config.json",
            "tests/fixtures/models/mha_bias/config.json",
            "tests/fixtures/models/conv_k3/config.json",
        ]
        .iter()
        .map(|f| vec![repo_file(f)])
        .collect();
        seeds.push(vec![tiny_checkpoint(Layout::Legacy).0]);
        seeds
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        let value: Value = serde_json::from_slice(&input[0])?;
        // both schemas, whichever the input is (the loader picks by the tensor names)
        if let Ok(cfg) = ZayaConfig::from_legacy_json(&value) {
            ZayaConfig::from_legacy_json(&cfg.to_legacy_json())?;
        }
        let cfg = ZayaConfig::from_json(&value)?;
        // a parsed config must survive its own writer and reader
        ZayaConfig::from_json(&cfg.to_json())?;
        let _ = weights::native_specs(&cfg);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------

/// A single-file checkpoint: `config.json` + `model.safetensors` (header, offsets, dtypes,
/// shapes against the config).
pub struct SafetensorsFile {
    scratch: Scratch,
}

impl SafetensorsFile {
    pub fn new() -> Self {
        SafetensorsFile {
            scratch: Scratch::new("safetensors"),
        }
    }
}

impl Default for SafetensorsFile {
    fn default() -> Self {
        Self::new()
    }
}

/// Splits a safetensors file into (header JSON, data) for structure-aware edits.
fn split_safetensors(bytes: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    Some((header.to_vec(), bytes[8 + n..].to_vec()))
}

fn join_safetensors(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

/// Mutates a safetensors part: usually its header as JSON (dtypes, shapes, offsets), keeping
/// the length prefix right; sometimes the raw bytes (prefix, truncation).
fn mutate_safetensors(part: &mut Vec<u8>, m: &mut Mutator) {
    use rand::Rng;
    if m.rng().random_bool(0.7) {
        if let Some((header, data)) = split_safetensors(part) {
            let mut h = vec![header];
            m.mutate_part(&mut h, 0);
            *part = join_safetensors(&h[0], &data);
            return;
        }
    }
    let donor = Vec::new();
    // byte edits near the front (the header) are the interesting ones
    let cut = part.len().min(512);
    let mut head = part[..cut].to_vec();
    m.mutate_bytes(&mut head, &donor);
    part.splice(..cut, head);
    if m.rng().random_bool(0.1) {
        let keep = m.rng().random_range(0..=part.len());
        part.truncate(keep);
    }
}

impl Target for SafetensorsFile {
    fn name(&self) -> &'static str {
        "safetensors_file"
    }

    fn seeds(&self) -> Vec<Input> {
        let (c, w) = tiny_checkpoint(Layout::Native);
        let (lc, lw) = tiny_checkpoint(Layout::Legacy);
        vec![vec![c, w], vec![lc, lw]]
    }

    fn mutate(&self, input: &mut Input, m: &mut Mutator) {
        use rand::Rng;
        if m.rng().random_bool(0.8) {
            mutate_safetensors(&mut input[1], m);
        } else {
            m.mutate_part(input, 0);
        }
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        self.scratch
            .reset(&[("config.json", &input[0]), ("model.safetensors", &input[1])]);
        load_checkpoint(self.scratch.path())
    }
}

// ---------------------------------------------------------------------------------------

/// A sharded checkpoint: `model.safetensors.index.json` naming two shard files.
pub struct ShardIndex {
    scratch: Scratch,
}

const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

impl ShardIndex {
    pub fn new() -> Self {
        ShardIndex {
            scratch: Scratch::new("shards"),
        }
    }
}

impl Default for ShardIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for ShardIndex {
    fn name(&self) -> &'static str {
        "shard_index"
    }

    fn seeds(&self) -> Vec<Input> {
        let cfg = ZayaConfig::from_json(&tiny_config()).expect("tiny config is valid");
        let tensors = zaya::init::random_weights(&cfg, 1).expect("random weights");
        let (config, _) = tiny_checkpoint(Layout::Native);
        let scratch = Scratch::new("shard-seed");
        let mut parts: [HashMap<String, Tensor>; 2] = Default::default();
        let mut map = serde_json::Map::new();
        for (i, (name, t)) in tensors.iter().enumerate() {
            parts[i % 2].insert(name.clone(), t.clone());
            map.insert(name.clone(), json!(SHARDS[i % 2]));
        }
        let mut shard_bytes = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let path = scratch.path().join(SHARDS[i]);
            candle_core::safetensors::save(p, &path).expect("shard written");
            shard_bytes.push(std::fs::read(&path).expect("shard read"));
        }
        let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
        vec![vec![
            config,
            serde_json::to_vec_pretty(&index).expect("index serialises"),
            shard_bytes[0].clone(),
            shard_bytes[1].clone(),
        ]]
    }

    fn mutate(&self, input: &mut Input, m: &mut Mutator) {
        use rand::Rng;
        match m.rng().random_range(0..10) {
            0..=5 => m.mutate_part(input, 1),
            6 | 7 => {
                let i = 2 + m.rng().random_range(0..2);
                mutate_safetensors(&mut input[i], m);
            }
            8 => {
                // a shard missing
                let i = 2 + m.rng().random_range(0..2);
                input[i].clear();
            }
            _ => m.mutate_part(input, 0),
        }
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        // an empty shard part stands for a missing file
        let mut files: Vec<(&str, &[u8])> = vec![
            ("config.json", &input[0]),
            ("model.safetensors.index.json", &input[1]),
        ];
        for (name, bytes) in SHARDS.iter().zip(&input[2..]) {
            if !bytes.is_empty() {
                files.push((name, bytes));
            }
        }
        self.scratch.reset(&files);
        load_checkpoint(self.scratch.path())
    }
}

// ---------------------------------------------------------------------------------------

/// The tokenizer files: tokenizer.json, tokenizer_config.json, special_tokens_map.json,
/// generation_config.json, chat_template.jinja (an empty part = the file is absent), then
/// encode, decode, stream and render a conversation with what was loaded.
pub struct TokenizerFiles {
    scratch: Scratch,
}

const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

impl TokenizerFiles {
    pub fn new() -> Self {
        TokenizerFiles {
            scratch: Scratch::new("tokenizer"),
        }
    }
}

impl Default for TokenizerFiles {
    fn default() -> Self {
        Self::new()
    }
}

/// The fixture tokenizer with its vocabulary cut to ids < 400 (and the merges among them):
/// a valid, much smaller tokenizer.json, so each input parses fast and mutations of the
/// model section are not drowned in a large vocabulary.
fn small_tokenizer_json(full: &[u8]) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(full).expect("tokenizer.json parses");
    let keep = |id: &Value| id.as_u64().is_some_and(|i| i < 400);
    let vocab = v["model"]["vocab"].as_object().expect("BPE vocab").clone();
    let vocab: serde_json::Map<String, Value> =
        vocab.into_iter().filter(|(_, id)| keep(id)).collect();
    let merges: Vec<Value> = v["model"]["merges"]
        .as_array()
        .expect("BPE merges")
        .iter()
        .filter(|m| {
            let pair: Vec<String> = match m {
                Value::String(s) => s.split(' ').map(str::to_string).collect(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect(),
                _ => vec![],
            };
            pair.len() == 2
                && pair.iter().all(|p| vocab.contains_key(p))
                && vocab.contains_key(&pair.concat())
        })
        .cloned()
        .collect();
    v["model"]["vocab"] = Value::Object(vocab);
    v["model"]["merges"] = Value::Array(merges);
    serde_json::to_vec(&v).expect("serialises")
}

impl Target for TokenizerFiles {
    fn name(&self) -> &'static str {
        "tokenizer_files"
    }

    fn seeds(&self) -> Vec<Input> {
        let dir = |d: &str| -> Input {
            TOKENIZER_FILES
                .iter()
                .map(|f| std::fs::read(crate::repo_root().join(d).join(f)).unwrap_or_default())
                .collect()
        };
        let fixture = dir("tests/fixtures/text/tokenizer");
        let mut small = fixture.clone();
        small[0] = small_tokenizer_json(&fixture[0]);
        let mut default_small = dir("models/default");
        default_small[0] = small_tokenizer_json(&default_small[0]);
        vec![small, default_small]
    }

    fn mutate(&self, input: &mut Input, m: &mut Mutator) {
        use rand::Rng;
        // the small files are ours to parse; tokenizer.json is mostly the tokenizers crate's
        let i = match m.rng().random_range(0..10) {
            0..=2 => 0,
            3..=4 => 1,
            5 => 2,
            6..=7 => 3,
            _ => 4,
        };
        if m.rng().random_bool(0.05) {
            input[i].clear();
        } else {
            m.mutate_part(input, i);
        }
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        let files: Vec<(&str, &[u8])> = TOKENIZER_FILES
            .iter()
            .zip(input)
            .filter(|(_, b)| !b.is_empty())
            .map(|(n, b)| (*n, b.as_slice()))
            .collect();
        self.scratch.reset(&files);
        let tok = ZayaTokenizer::from_dir(self.scratch.path())?;
        let ids = tok.encode("Hello <bos> world<end_of_turn> ünï", true)?;
        tok.decode(&ids, false)?;
        tok.decode(&ids, true)?;
        let mut stream = zaya::text::StreamDecoder::new(false);
        for &id in &ids {
            stream.step(&tok, id)?;
        }
        stream.finish(&tok)?;
        let _ = (
            tok.stop_token_ids(&[1]),
            tok.special_tokens_map(),
            tok.vocab_size(),
        );
        if tok.chat_templates().is_some() {
            let mut req = ChatRequest::new(vec![
                json!({"role": "system", "content": "Be brief."}),
                json!({"role": "user", "content": "Hi"}),
                json!({"role": "assistant", "content": "Hello."}),
                json!({"role": "user", "content": "And?"}),
            ]);
            req.add_generation_prompt = true;
            tok.encode_chat(&req)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------

/// A chat template (source) rendered with a context (`{"messages", "tools", ...}`).
pub struct ChatTemplateRender;

/// Work limit of one fuzzed render (minijinja fuel): far above what the seeds need, low
/// enough that `range(100000)` loops end quickly.
const FUZZ_TEMPLATE_FUEL: u64 = 200_000;

impl Target for ChatTemplateRender {
    fn name(&self) -> &'static str {
        "chat_template"
    }

    fn seeds(&self) -> Vec<Input> {
        let templates = [
            repo_file("models/default/chat_template.jinja"),
            repo_file("tests/fixtures/text/tokenizer/chat_template.jinja"),
        ];
        let fixture: Value =
            serde_json::from_slice(&repo_file("tests/fixtures/text/templates.json"))
                .expect("templates.json parses");
        let mut contexts = Vec::new();
        for group in ["conversations", "errors"] {
            for c in fixture[group].as_array().into_iter().flatten() {
                let mut ctx = c["kwargs"].as_object().cloned().unwrap_or_default();
                ctx.insert("messages".into(), c["messages"].clone());
                if let Some(tools) = c.get("tools") {
                    ctx.insert("tools".into(), tools.clone());
                }
                contexts.push(serde_json::to_vec(&Value::Object(ctx)).expect("serialises"));
            }
        }
        let mut seeds = Vec::new();
        for t in &templates {
            for c in &contexts {
                seeds.push(vec![t.clone(), c.clone()]);
            }
        }
        seeds
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        let source = std::str::from_utf8(&input[0])?;
        let req: ChatRequest = serde_json::from_slice(&input[1])?;
        let template = ChatTemplate::new("fuzz", source)?
            .with_special_tokens(vec![("bos_token".into(), "<bos>".into())])
            .with_fuel(FUZZ_TEMPLATE_FUEL);
        template.render(&req)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------

/// Training data (JSONL: text, messages + tools, pre-tokenized), tokenized with the
/// fixture tokenizer and its template, then packed.
pub struct TrainingData {
    tok: ZayaTokenizer,
}

impl TrainingData {
    pub fn new() -> Self {
        TrainingData {
            tok: ZayaTokenizer::from_dir(crate::repo_root().join("tests/fixtures/text/tokenizer"))
                .expect("fixture tokenizer loads"),
        }
    }
}

impl Default for TrainingData {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for TrainingData {
    fn name(&self) -> &'static str {
        "training_data"
    }

    fn seeds(&self) -> Vec<Input> {
        let fixture: Value =
            serde_json::from_slice(&repo_file("tests/fixtures/text/templates.json"))
                .expect("templates.json parses");
        let mut lines = vec![
            json!({"text": "In the beginning God created the heaven and the earth."}),
            json!({"input_ids": [2, 5, 7, 9, 11], "labels": [-100, 5, 7, 9, 11]}),
            json!({"input_ids": [2, 5, 7]}),
        ];
        for c in fixture["conversations"].as_array().into_iter().flatten() {
            let mut ex = json!({"messages": c["messages"]});
            if let Some(tools) = c.get("tools") {
                ex["tools"] = tools.clone();
            }
            lines.push(ex);
        }
        let jsonl = |ls: &[Value]| -> Vec<u8> {
            ls.iter()
                .map(|l| l.to_string() + "\n")
                .collect::<String>()
                .into_bytes()
        };
        let mut seeds: Vec<Input> = lines
            .iter()
            .map(|l| vec![jsonl(std::slice::from_ref(l))])
            .collect();
        seeds.push(vec![jsonl(&lines)]);
        seeds
    }

    fn mutate(&self, input: &mut Input, m: &mut Mutator) {
        use rand::Rng;
        // JSON edits line by line (a JSONL file is not one document); byte edits sometimes
        let mut lines: Vec<Vec<u8>> = input[0]
            .split(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect();
        if m.rng().random_bool(0.8) && !lines.is_empty() {
            let i = m.rng().random_range(0..lines.len());
            if json_of(&lines[i]).is_some() {
                let mut one = vec![std::mem::take(&mut lines[i])];
                m.mutate_part(&mut one, 0);
                lines[i] = one.pop().expect("one part");
                input[0] = lines.join(&b'\n');
                return;
            }
        }
        m.mutate_part(input, 0);
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        let path = std::path::Path::new("fuzz.jsonl");
        let examples = zaya::data::parse_jsonl(path, &input[0], &self.tok, 2000)?;
        zaya::data::pack(&examples, 16, 0)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------

/// A GGUF file as `zaya quantize` writes it (q8_0): the header, the metadata (ZAYA config,
/// text files), the tensor infos checked against the config, the data ranges; then the
/// whole model is built from it, as `--model FILE.gguf` does.
pub struct GgufFile {
    scratch: Scratch,
}

impl GgufFile {
    pub fn new() -> Self {
        GgufFile {
            scratch: Scratch::new("gguf"),
        }
    }
}

impl Default for GgufFile {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for GgufFile {
    fn name(&self) -> &'static str {
        "gguf_file"
    }

    fn seeds(&self) -> Vec<Input> {
        use candle_core::quantized::GgmlDType;
        use zaya::quant::{QuantPlan, WeightFormat};
        // Rows 32 wide, so that q8_0 blocks apply (the tiny config's 8-wide rows stay dense).
        let mut cfg = tiny_config();
        cfg["hidden_size"] = json!(32);
        cfg["head_dim"] = json!(16);
        cfg["moe_intermediate_size"] = json!(32);
        cfg["vocab_size"] = json!(32);
        let cfg = ZayaConfig::from_json(&cfg).expect("gguf seed config is valid");
        let tensors = zaya::init::random_weights(&cfg, 0).expect("random weights");
        let scratch = Scratch::new("gguf-seed");
        weights::save_checkpoint(scratch.path(), &cfg, &tensors, Layout::Native)
            .expect("save the seed model");
        let out = scratch.path().join("model.gguf");
        let plan = QuantPlan::uniform(WeightFormat::Quant(GgmlDType::Q8_0));
        zaya::gguf::quantize_to_gguf(scratch.path(), &out, &plan, None, None)
            .expect("quantize seed");
        vec![vec![std::fs::read(&out).expect("gguf written")]]
    }

    fn mutate(&self, input: &mut Input, m: &mut Mutator) {
        use rand::Rng;
        // The header, metadata and tensor infos come first; edits there reach the parser.
        let part = &mut input[0];
        let cut = part.len().min(4096);
        let mut head = part[..cut].to_vec();
        m.mutate_bytes(&mut head, &[]);
        part.splice(..cut, head);
        if m.rng().random_bool(0.1) {
            let keep = m.rng().random_range(0..=part.len());
            part.truncate(keep);
        }
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        self.scratch.reset(&[("model.gguf", &input[0])]);
        let path = self.scratch.path().join("model.gguf");
        let g = zaya::gguf::GgufCheckpoint::open(&path)?;
        g.validate()?;
        g.text_files()?;
        zaya::ZayaModel::load(&path, DType::F32, &Device::Cpu)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------

/// The `--lora` command-line spec (`r=16,alpha=32,targets=q_proj,experts,rslora`), then the
/// adapter plan it gives on the tiny model (target matching, PEFT key names, shapes).
pub struct LoraSpec;

impl Target for LoraSpec {
    fn name(&self) -> &'static str {
        "lora_spec"
    }

    fn seeds(&self) -> Vec<Input> {
        [
            "r=16,alpha=32,dropout=0.05,targets=q_proj,k_proj,rslora",
            "r=4,targets=all-linear,experts",
            "r=2,alpha=4,targets=o_proj,experts.gate_up_proj,gaussian",
            "targets=fc1,fc2,out_proj,down_proj,mlp.experts.down_proj",
        ]
        .iter()
        .map(|s| vec![s.as_bytes().to_vec()])
        .collect()
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        let text = std::str::from_utf8(&input[0])?;
        let lora = zaya::lora::LoraConfig::parse_spec(text)?;
        let cfg = ZayaConfig::from_json(&tiny_config()).expect("tiny config is valid");
        let sites = zaya::lora::plan(&cfg, &lora)?;
        // the PEFT JSON of a parsed spec reads back to the same config
        let back = zaya::lora::LoraConfig::from_peft_json(&lora.to_peft_json().to_string(), "x")?;
        if back != lora {
            return Err(format!("round trip changed the config: {lora:?} -> {back:?}").into());
        }
        let _ = sites;
        Ok(())
    }
}

/// A PEFT adapter directory for the tiny model: `adapter_config.json` (fields, targets,
/// refusals) + `adapter_model.safetensors` (keys, shapes, dtypes against the plan).
pub struct LoraAdapterDir {
    scratch: Scratch,
}

impl LoraAdapterDir {
    pub fn new() -> Self {
        LoraAdapterDir {
            scratch: Scratch::new("lora-adapter"),
        }
    }
}

impl Default for LoraAdapterDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for LoraAdapterDir {
    fn name(&self) -> &'static str {
        "lora_adapter"
    }

    fn seeds(&self) -> Vec<Input> {
        let (config, weights) = tiny_checkpoint(Layout::Native);
        let dir = Scratch::new("lora-base");
        dir.reset(&[("config.json", &config), ("model.safetensors", &weights)]);
        let model =
            zaya::ZayaModel::load(dir.path(), DType::F32, &Device::Cpu).expect("tiny model");
        let mut seeds = Vec::new();
        for spec in [
            "r=2,alpha=4,targets=all-linear,experts",
            "r=1,targets=q_proj,experts.down_proj,rslora",
        ] {
            let lora = zaya::lora::LoraConfig::parse_spec(spec).expect("valid spec");
            let lm = zaya::lora::attach_lora(&model, &lora, 0).expect("adapter");
            let scratch = Scratch::new("lora-seed");
            lm.save(scratch.path()).expect("adapter saved");
            seeds.push(vec![
                std::fs::read(scratch.path().join("adapter_config.json")).expect("written"),
                std::fs::read(scratch.path().join("adapter_model.safetensors")).expect("written"),
            ]);
        }
        seeds
    }

    fn mutate(&self, input: &mut Input, m: &mut Mutator) {
        use rand::Rng;
        if m.rng().random_bool(0.5) {
            mutate_safetensors(&mut input[1], m);
        } else {
            m.mutate_part(input, 0);
        }
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        self.scratch.reset(&[
            ("adapter_config.json", &input[0]),
            ("adapter_model.safetensors", &input[1]),
        ]);
        let cfg = ZayaConfig::from_json(&tiny_config()).expect("tiny config is valid");
        let adapter = zaya::lora::LoraAdapter::load(self.scratch.path(), &cfg)?;
        let _ = adapter.deltas()?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------

/// `zaya grpo-loss --inputs` documents (`prompt_ids`, `completion_ids`, masks, advantages,
/// old / reference log-probabilities), parsed and validated against a vocabulary of 80.
pub struct GrpoInputs;

impl Target for GrpoInputs {
    fn name(&self) -> &'static str {
        "grpo_inputs"
    }

    fn seeds(&self) -> Vec<Input> {
        [
            "dapo",
            "bnpo_tool_mask",
            "grpo_sequence_beta",
            "dapo_beta_on_policy",
        ]
        .iter()
        .map(|c| vec![repo_file(&format!("tests/fixtures/grpo/{c}.json"))])
        .collect()
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        let text = std::str::from_utf8(&input[0])?;
        let doc = zaya_train::GrpoInputs::from_json(text, 80)?;
        // what the loss does with an accepted document must not panic either
        let _ = doc.to_batch(0);
        let _ = doc.loss_mask();
        Ok(())
    }
}

/// The JSON lines of `zaya grpo` processes: a reward process's answer (a number or null)
/// and an environment's answer (`{"tool_results": [...]}` for two calls).
pub struct GrpoProcessAnswers;

impl Target for GrpoProcessAnswers {
    fn name(&self) -> &'static str {
        "grpo_process_answers"
    }

    fn seeds(&self) -> Vec<Input> {
        [
            "0.5",
            "null",
            "-3",
            r#"{"tool_results": ["ok", {"temperature": 21}]}"#,
        ]
        .iter()
        .map(|s| vec![s.as_bytes().to_vec()])
        .collect()
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        let v: Value = serde_json::from_slice(&input[0])?;
        let reward = zaya_train::rewards::parse_reward_answer(&v);
        let env = zaya_train::rollout::parse_env_answer(&v, 2);
        match (reward, env) {
            (Err(a), Err(b)) => Err(format!("{a}; {b}").into()),
            _ => Ok(()),
        }
    }
}

/// `zaya grpo --data` rows (`prompt` or `messages` + `tools`, extra columns), tokenized
/// and rendered with the fixture tokenizer and template.
pub struct GrpoData {
    tok: ZayaTokenizer,
}

impl GrpoData {
    pub fn new() -> Self {
        GrpoData {
            tok: ZayaTokenizer::from_dir(crate::repo_root().join("tests/fixtures/text/tokenizer"))
                .expect("fixture tokenizer loads"),
        }
    }
}

impl Default for GrpoData {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for GrpoData {
    fn name(&self) -> &'static str {
        "grpo_data"
    }

    fn seeds(&self) -> Vec<Input> {
        let fixture: Value =
            serde_json::from_slice(&repo_file("tests/fixtures/text/templates.json"))
                .expect("templates.json parses");
        let mut rows = vec![
            json!({"prompt": "In the beginning", "answer": "God"}),
            json!({"prompt": "x", "regex": "^a", "expected_tool_calls": [{"name": "f", "arguments": {"a": 1}}]}),
        ];
        for c in fixture["conversations"].as_array().into_iter().flatten() {
            let mut ex = json!({"messages": c["messages"], "answer": 4});
            if let Some(tools) = c.get("tools") {
                ex["tools"] = tools.clone();
            }
            rows.push(ex);
        }
        rows.iter()
            .map(|r| vec![r.to_string().into_bytes()])
            .collect()
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        let text = std::str::from_utf8(&input[0])?;
        let path = std::path::Path::new("fuzz.jsonl");
        zaya_train::grpo::read_prompts(path, text, &self.tok)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------

/// A parallel plan from a config and `--tp --pp --ep --dp` (the mesh as text, `"2 1 1 1"`):
/// the plan's checks and what every rank holds must end in a plan or a typed error.
pub struct ParallelPlanTarget;

impl Target for ParallelPlanTarget {
    fn name(&self) -> &'static str {
        "parallel_plan"
    }

    fn seeds(&self) -> Vec<Input> {
        let configs = [
            "bench/configs/small.json",
            "bench/configs/zaya1-8b.json",
            "tests/fixtures/models/gqa_sliding/config.json",
            "tests/fixtures/models/mha_bias/config.json",
            "tests/fixtures/models/conv_k3/config.json",
        ];
        let meshes = [
            "2 1 1 1", "8 1 1 1", "2 2 1 1", "1 2 2 1", "4 1 2 2", "3 1 1 1",
        ];
        configs
            .iter()
            .flat_map(|c| {
                meshes
                    .iter()
                    .map(move |m| vec![repo_file(c), m.as_bytes().to_vec()])
            })
            .collect()
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        let value: Value = serde_json::from_slice(&input[0])?;
        let cfg = ZayaConfig::from_json(&value)?;
        let text = std::str::from_utf8(input.get(1).map_or(&[][..], |v| v.as_slice()))?;
        let dims = text
            .split_whitespace()
            .map(|s| s.parse::<usize>())
            .collect::<Result<Vec<_>, _>>()?;
        let [tp, pp, ep, dp] = dims[..] else {
            return Err(format!("mesh `{text}` is not four numbers").into());
        };
        let shape = zaya_dist::MeshShape::new(tp, pp, ep, dp)?;
        // bounded work: a mesh is at most a few thousand ranks in practice
        if shape.world() > 4096 || tp > 1024 || pp > 1024 || ep > 1024 || dp > 1024 {
            return Err(format!(
                "mesh of {} ranks is larger than the fuzz bound",
                shape.world()
            )
            .into());
        }
        let plan = zaya_dist::ParallelPlan::new(&cfg, shape)?;
        for rank in [0, shape.world() / 2, shape.world() - 1] {
            let _ = plan.rank_params(rank);
        }
        Ok(())
    }
}
