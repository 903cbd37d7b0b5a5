//! Token selection: logits processors with Hugging Face / OpenAI semantics, a greedy or seeded
//! sampler, and a stop checker for stop token ids and stop strings.
//!
//! Processor semantics (transformers 5.23 `generation/logits_process.py`, OpenAI API docs):
//!
//! | processor | effect on logits `l` |
//! |---|---|
//! | [`Temperature`] | `l / t` |
//! | [`TopK`] | keep the `k` largest (and ties with the k-th), others `-inf` |
//! | [`TopP`] | sort ascending, drop tokens whose cumulative probability is `<= 1 - p`; keep ≥ 1 |
//! | [`MinP`] | drop tokens with `p_i < min_p * p_max` |
//! | [`RepetitionPenalty`] | for each distinct token in the context: `l < 0 ? l * r : l / r` |
//! | [`PresenceFrequencyPenalty`] | `l -= count * frequency + (count > 0) * presence`, counting generated tokens only |
//!
//! [`Sampler::new`] chains them in transformers' order: repetition penalty, presence /
//! frequency penalties, temperature, top-k, top-p, min-p.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("sampling parameter `{name}` = {value}: {message}")]
    BadParameter {
        name: &'static str,
        value: String,
        message: &'static str,
    },
    #[error("logit {index} is NaN; the model output is broken")]
    NanLogit { index: usize },
    #[error("all {0} logits are -inf after the logits processors; nothing to sample")]
    NothingToSample(usize),
    #[error("empty logits")]
    EmptyLogits,
    #[error("stop string {index} is empty")]
    EmptyStopString { index: usize },
}

fn bad(name: &'static str, value: impl ToString, message: &'static str) -> SamplingError {
    SamplingError::BadParameter {
        name,
        value: value.to_string(),
        message,
    }
}

/// Changes next-token logits in place given the ids so far (prompt + generated).
pub trait LogitsProcessor: Send {
    fn process(&mut self, logits: &mut [f32], context: &[u32]);

    /// Called by [`Sampler::begin`] at the start of a sequence with its prompt length, for
    /// processors that treat prompt and generated tokens differently.
    fn begin(&mut self, _prompt_len: usize) {}
}

/// Numerically stable softmax in f64 (`-inf` logits get probability 0).
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if max == f64::NEG_INFINITY {
        return vec![0.0; logits.len()];
    }
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[derive(Debug, Clone)]
pub struct Temperature(f32);

impl Temperature {
    /// `t > 0` (use greedy decoding for `t = 0`).
    pub fn new(t: f32) -> Result<Self, SamplingError> {
        if !(t.is_finite() && t > 0.0) {
            return Err(bad("temperature", t, "must be a finite number > 0"));
        }
        Ok(Temperature(t))
    }
}

impl LogitsProcessor for Temperature {
    fn process(&mut self, logits: &mut [f32], _: &[u32]) {
        for l in logits {
            *l /= self.0;
        }
    }
}

#[derive(Debug, Clone)]
pub struct TopK {
    k: usize,
    min_tokens_to_keep: usize,
}

impl TopK {
    pub fn new(k: usize) -> Result<Self, SamplingError> {
        if k == 0 {
            return Err(bad("top_k", k, "must be >= 1 (leave it unset to disable)"));
        }
        Ok(TopK {
            k,
            min_tokens_to_keep: 1,
        })
    }
}

impl LogitsProcessor for TopK {
    fn process(&mut self, logits: &mut [f32], _: &[u32]) {
        let k = self.k.max(self.min_tokens_to_keep).min(logits.len());
        if k == 0 || k == logits.len() {
            return;
        }
        let mut sorted: Vec<f32> = logits.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let threshold = sorted[k - 1];
        for l in logits.iter_mut() {
            if *l < threshold {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct TopP {
    p: f64,
    min_tokens_to_keep: usize,
}

impl TopP {
    /// `0 <= p <= 1`.
    pub fn new(p: f32) -> Result<Self, SamplingError> {
        if !(0.0..=1.0).contains(&p) {
            return Err(bad("top_p", p, "must be in [0, 1]"));
        }
        Ok(TopP {
            p: p as f64,
            min_tokens_to_keep: 1,
        })
    }
}

impl LogitsProcessor for TopP {
    fn process(&mut self, logits: &mut [f32], _: &[u32]) {
        let probs = softmax(logits);
        // Ascending by logit; ties in index order (stable sort).
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
        let keep_from = order.len().saturating_sub(self.min_tokens_to_keep);
        let mut cum = 0.0;
        for (rank, &i) in order.iter().enumerate() {
            cum += probs[i];
            if rank < keep_from && cum <= 1.0 - self.p {
                logits[i] = f32::NEG_INFINITY;
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct MinP {
    min_p: f64,
    min_tokens_to_keep: usize,
}

impl MinP {
    /// `0 <= min_p <= 1`.
    pub fn new(min_p: f32) -> Result<Self, SamplingError> {
        if !(0.0..=1.0).contains(&min_p) {
            return Err(bad("min_p", min_p, "must be in [0, 1]"));
        }
        Ok(MinP {
            min_p: min_p as f64,
            min_tokens_to_keep: 1,
        })
    }
}

impl LogitsProcessor for MinP {
    fn process(&mut self, logits: &mut [f32], _: &[u32]) {
        let probs = softmax(logits);
        let top = probs.iter().copied().fold(0.0, f64::max);
        let threshold = self.min_p * top;
        // The `min_tokens_to_keep` most likely tokens always survive.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        for &i in order.iter().skip(self.min_tokens_to_keep) {
            if probs[i] < threshold {
                logits[i] = f32::NEG_INFINITY;
            }
        }
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each distinct token of the context once.
#[derive(Debug, Clone)]
pub struct RepetitionPenalty(f32);

impl RepetitionPenalty {
    /// `penalty > 0`; 1 is neutral, > 1 discourages repeats.
    pub fn new(penalty: f32) -> Result<Self, SamplingError> {
        if !(penalty.is_finite() && penalty > 0.0) {
            return Err(bad(
                "repetition_penalty",
                penalty,
                "must be a finite number > 0",
            ));
        }
        Ok(RepetitionPenalty(penalty))
    }
}

impl LogitsProcessor for RepetitionPenalty {
    fn process(&mut self, logits: &mut [f32], context: &[u32]) {
        let mut seen = std::collections::HashSet::new();
        for &id in context {
            let i = id as usize;
            if i < logits.len() && seen.insert(id) {
                let l = logits[i];
                logits[i] = if l < 0.0 { l * self.0 } else { l / self.0 };
            }
        }
    }
}

/// OpenAI presence / frequency penalties over the generated tokens (the context after the
/// prompt length given to [`LogitsProcessor::begin`]; the whole context if `begin` was not
/// called).
#[derive(Debug, Clone)]
pub struct PresenceFrequencyPenalty {
    presence: f32,
    frequency: f32,
    prompt_len: usize,
}

impl PresenceFrequencyPenalty {
    pub fn new(presence: f32, frequency: f32) -> Result<Self, SamplingError> {
        if !presence.is_finite() {
            return Err(bad("presence_penalty", presence, "must be finite"));
        }
        if !frequency.is_finite() {
            return Err(bad("frequency_penalty", frequency, "must be finite"));
        }
        Ok(PresenceFrequencyPenalty {
            presence,
            frequency,
            prompt_len: 0,
        })
    }
}

impl LogitsProcessor for PresenceFrequencyPenalty {
    fn process(&mut self, logits: &mut [f32], context: &[u32]) {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &id in context.get(self.prompt_len..).unwrap_or(&[]) {
            *counts.entry(id).or_default() += 1;
        }
        for (id, c) in counts {
            if let Some(l) = logits.get_mut(id as usize) {
                *l -= c as f32 * self.frequency + self.presence;
            }
        }
    }

    fn begin(&mut self, prompt_len: usize) {
        self.prompt_len = prompt_len;
    }
}

/// Sampling settings; the defaults are greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax after the penalties).
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

/// Picks the next token: processors, then argmax (greedy) or a draw from the softmax with a
/// seeded RNG (the same seed and inputs give the same tokens).
pub struct Sampler {
    processors: Vec<Box<dyn LogitsProcessor>>,
    rng: Option<StdRng>,
    scratch: Vec<f32>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("processors", &self.processors.len())
            .field("greedy", &self.rng.is_none())
            .finish()
    }
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Result<Self, SamplingError> {
        let mut procs: Vec<Box<dyn LogitsProcessor>> = Vec::new();
        if p.repetition_penalty != 1.0 {
            procs.push(Box::new(RepetitionPenalty::new(p.repetition_penalty)?));
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            procs.push(Box::new(PresenceFrequencyPenalty::new(
                p.presence_penalty,
                p.frequency_penalty,
            )?));
        }
        if !(p.temperature.is_finite() && p.temperature >= 0.0) {
            return Err(bad(
                "temperature",
                p.temperature,
                "must be a finite number >= 0",
            ));
        }
        if p.temperature == 0.0 {
            return Ok(Sampler {
                processors: procs,
                rng: None,
                scratch: Vec::new(),
            });
        }
        procs.push(Box::new(Temperature::new(p.temperature)?));
        if p.top_k > 0 {
            procs.push(Box::new(TopK::new(p.top_k)?));
        }
        if p.top_p != 1.0 {
            procs.push(Box::new(TopP::new(p.top_p)?));
        }
        if p.min_p != 0.0 {
            procs.push(Box::new(MinP::new(p.min_p)?));
        }
        Ok(Sampler::sampling(procs, p.seed))
    }

    /// Argmax after `processors`.
    pub fn greedy(processors: Vec<Box<dyn LogitsProcessor>>) -> Self {
        Sampler {
            processors,
            rng: None,
            scratch: Vec::new(),
        }
    }

    /// Draws from the softmax after `processors`, with `StdRng::seed_from_u64(seed)`.
    pub fn sampling(processors: Vec<Box<dyn LogitsProcessor>>, seed: u64) -> Self {
        Sampler {
            processors,
            rng: Some(StdRng::seed_from_u64(seed)),
            scratch: Vec::new(),
        }
    }

    /// Start a sequence whose first `prompt_len` context ids are the prompt.
    pub fn begin(&mut self, prompt_len: usize) {
        for p in &mut self.processors {
            p.begin(prompt_len);
        }
    }

    /// The processed logits (what the draw uses).
    pub fn process(&mut self, logits: &[f32], context: &[u32]) -> Vec<f32> {
        let mut l = logits.to_vec();
        for p in &mut self.processors {
            p.process(&mut l, context);
        }
        l
    }

    /// Next token id for `logits` (one row, vocabulary-sized) given the ids so far.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> Result<u32, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        if let Some(index) = logits.iter().position(|l| l.is_nan()) {
            return Err(SamplingError::NanLogit { index });
        }
        let mut l = std::mem::take(&mut self.scratch);
        l.clear();
        l.extend_from_slice(logits);
        for p in &mut self.processors {
            p.process(&mut l, context);
        }
        let result = self.pick(&l);
        self.scratch = l;
        result
    }

    /// Next token id for logits that already went through [`process`](Self::process) (a
    /// caller that also reports log-probabilities of the processed logits processes once).
    pub fn sample_processed(&mut self, processed: &[f32]) -> Result<u32, SamplingError> {
        if processed.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        self.pick(processed)
    }

    fn pick(&mut self, l: &[f32]) -> Result<u32, SamplingError> {
        // First maximum, as torch.argmax.
        let mut best = None::<(usize, f32)>;
        for (i, &x) in l.iter().enumerate() {
            if x.is_nan() {
                return Err(SamplingError::NanLogit { index: i });
            }
            if x > f32::NEG_INFINITY && best.is_none_or(|(_, b)| x > b) {
                best = Some((i, x));
            }
        }
        let Some((argmax, _)) = best else {
            return Err(SamplingError::NothingToSample(l.len()));
        };
        let Some(rng) = self.rng.as_mut() else {
            return Ok(argmax as u32);
        };
        let probs = softmax(l);
        let u: f64 = rng.random::<f64>();
        let mut cum = 0.0;
        let mut last_nonzero = argmax;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                cum += p;
                last_nonzero = i;
                if u < cum {
                    return Ok(i as u32);
                }
            }
        }
        // Rounding left the cumulative sum just under u.
        Ok(last_nonzero as u32)
    }
}

/// A stop condition that fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token id was generated (it is not part of the output).
    Token(u32),
    /// A stop string appeared; the output ends at byte `cut` of [`StopChecker::text`].
    String { index: usize, cut: usize },
}

/// Detects stop token ids and stop strings, the latter on the detokenized text so that a stop
/// string spread over several tokens is found.
#[derive(Debug, Clone, Default)]
pub struct StopChecker {
    stop_ids: Vec<u32>,
    stop_strings: Vec<String>,
    text: String,
}

impl StopChecker {
    pub fn new(stop_ids: Vec<u32>, stop_strings: Vec<String>) -> Result<Self, SamplingError> {
        if let Some(index) = stop_strings.iter().position(String::is_empty) {
            return Err(SamplingError::EmptyStopString { index });
        }
        Ok(StopChecker {
            stop_ids,
            stop_strings,
            text: String::new(),
        })
    }

    pub fn is_stop_token(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// Check a newly generated token id before its text.
    pub fn check_token(&self, id: u32) -> Option<StopReason> {
        self.is_stop_token(id).then_some(StopReason::Token(id))
    }

    /// Append the next chunk of detokenized text; returns the earliest stop string match
    /// (by start position, then by list order). The match is searched only where it can
    /// involve the new chunk.
    pub fn push_text(&mut self, chunk: &str) -> Option<StopReason> {
        let old_len = self.text.len();
        self.text.push_str(chunk);
        let mut best: Option<(usize, usize)> = None;
        for (index, s) in self.stop_strings.iter().enumerate() {
            let mut from = old_len.saturating_sub(s.len() - 1);
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            if let Some(pos) = self.text[from..].find(s.as_str()) {
                let cut = from + pos;
                if best.is_none_or(|(_, c)| cut < c) {
                    best = Some((index, cut));
                }
            }
        }
        best.map(|(index, cut)| StopReason::String { index, cut })
    }

    /// All text pushed so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Length of the prefix of [`text`](Self::text) that no stop string can still claim: a
    /// streaming server may send it; the rest could turn out to be the start of a stop string.
    pub fn releasable(&self) -> usize {
        let t = self.text.as_str();
        let mut held = 0;
        for s in &self.stop_strings {
            // Longest proper prefix of `s` that is a suffix of the text.
            for (i, _) in s.char_indices().skip(1) {
                if i > held && t.ends_with(&s[..i]) {
                    held = i;
                }
            }
        }
        t.len() - held
    }
}
