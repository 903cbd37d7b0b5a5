//! Generation loop over the hybrid cache: left-padded batched prefill, one-token decode
//! steps, per-row stopping. Token choice is pluggable (greedy by default); positions follow
//! the reference's `generate` (`cumsum(mask) − 1`, padding at 0).

use candle_core::{DType, Tensor};

use crate::attention::AttnImplementation;
use crate::cache::HybridCache;
use crate::error::{Result, ZayaError};
use crate::model::{ForwardOptions, ZayaModel};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Generation stops for a row when it produces one of these (the token is kept).
    pub eos_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub attn: AttnImplementation,
    /// Keep the logits of every step (`[B, V]` f32 per step), for parity checks.
    pub keep_step_logits: bool,
    /// Prefill the prompt in chunks of this many tokens (0 = one pass).
    pub prefill_chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            eos_token_ids: vec![],
            ignore_eos: false,
            attn: AttnImplementation::Eager,
            keep_step_logits: false,
            prefill_chunk: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// New tokens per row, up to and including the stop token.
    pub sequences: Vec<Vec<u32>>,
    /// Why each row stopped.
    pub finish_reasons: Vec<FinishReason>,
    pub step_logits: Vec<Tensor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Length,
    /// Stopped by the token chooser (e.g. a stop string).
    Stop,
}

/// Decides the next token of a row from its logits; returns the token and whether the row
/// must stop after it (beyond EOS, e.g. stop strings).
pub trait TokenChooser {
    fn choose(&mut self, row: usize, logits: &[f32], context: &[u32]) -> (u32, bool);
}

/// Argmax (first maximum on ties, as torch).
pub struct Greedy;

impl TokenChooser for Greedy {
    fn choose(&mut self, _row: usize, logits: &[f32], _context: &[u32]) -> (u32, bool) {
        (argmax(logits), false)
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Left-pads `prompts` into ids `[B, T]` and a mask `[B, T]`.
pub fn left_pad(prompts: &[Vec<u32>], pad_id: u32) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len());
    let mut mask = Vec::with_capacity(prompts.len());
    for p in prompts {
        let pad = t - p.len();
        ids.push(
            std::iter::repeat_n(pad_id, pad)
                .chain(p.iter().copied())
                .collect(),
        );
        mask.push(
            std::iter::repeat_n(0, pad)
                .chain(std::iter::repeat_n(1, p.len()))
                .collect(),
        );
    }
    (ids, mask)
}

fn tensor2(rows: &[Vec<u32>], dev: &candle_core::Device) -> Result<Tensor> {
    let b = rows.len();
    let t = rows.first().map_or(0, Vec::len);
    Ok(Tensor::from_vec(rows.concat(), (b, t), dev)?)
}

/// Generates for a batch of prompts (each stops on its own), calling `on_token(row, token)`
/// as tokens arrive.
pub fn generate(
    model: &ZayaModel,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    chooser: &mut dyn TokenChooser,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<GenerationOutput> {
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ZayaError::Input(
            "every prompt needs at least one token".into(),
        ));
    }
    let cfg = model.config();
    let dev = model.device();
    let pad_id = cfg.pad_token_id.unwrap_or(0);
    let (ids, mut mask) = left_pad(prompts, pad_id);
    let b = ids.len();
    let t = ids[0].len();
    if t + opts.max_new_tokens > cfg.max_position_embeddings {
        return Err(ZayaError::ContextTooLong {
            row: 0,
            length: t + opts.max_new_tokens,
            limit: cfg.max_position_embeddings,
        });
    }
    let mut positions: Vec<Vec<i64>> = mask
        .iter()
        .map(|r| {
            let mut acc = -1i64;
            r.iter()
                .map(|&m| {
                    acc += m as i64;
                    if m == 0 {
                        0
                    } else {
                        acc
                    }
                })
                .collect()
        })
        .collect();
    let mut cache = HybridCache::new(cfg);
    let mut contexts: Vec<Vec<u32>> = prompts.to_vec();
    let mut sequences = vec![Vec::new(); b];
    let mut finish = vec![None; b];
    let mut step_logits = Vec::new();

    // Prefill (optionally in chunks), keeping the last position's logits.
    let chunk = if opts.prefill_chunk == 0 {
        t
    } else {
        opts.prefill_chunk
    };
    let mut start = 0;
    let mut logits = None;
    while start < t {
        let len = chunk.min(t - start);
        let piece: Vec<Vec<u32>> = ids.iter().map(|r| r[start..start + len].to_vec()).collect();
        let pos: Vec<Vec<i64>> = positions
            .iter()
            .map(|r| r[start..start + len].to_vec())
            .collect();
        let m: Vec<Vec<u32>> = mask.iter().map(|r| r[..start + len].to_vec()).collect();
        let fopts = ForwardOptions {
            attention_mask: Some(tensor2(&m, dev)?),
            position_ids: Some(Tensor::new(pos, dev)?),
            logits_to_keep: 1,
            attn: opts.attn,
            ..Default::default()
        };
        let out = model.forward(&tensor2(&piece, dev)?, Some(&mut cache), &fopts)?;
        logits = out.logits;
        start += len;
    }
    let mut logits = logits.expect("prefill ran");
    for _step in 0..opts.max_new_tokens {
        let last = logits.squeeze(1)?.to_dtype(DType::F32)?;
        if opts.keep_step_logits {
            step_logits.push(last.clone());
        }
        let rows: Vec<Vec<f32>> = last.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for (row, l) in rows.iter().enumerate() {
            if finish[row].is_some() {
                next.push(pad_id);
                continue;
            }
            let (tok, stop) = chooser.choose(row, l, &contexts[row]);
            sequences[row].push(tok);
            contexts[row].push(tok);
            on_token(row, tok);
            if !opts.ignore_eos && opts.eos_token_ids.contains(&tok) {
                finish[row] = Some(FinishReason::Eos);
            } else if stop {
                finish[row] = Some(FinishReason::Stop);
            }
            next.push(tok);
        }
        if finish.iter().all(Option::is_some)
            || sequences.iter().all(|s| s.len() >= opts.max_new_tokens)
        {
            break;
        }
        for (r, m) in mask.iter_mut().enumerate() {
            m.push(1);
            let p = positions[r].last().copied().unwrap_or(-1) + 1;
            positions[r] = vec![p];
        }
        let fopts = ForwardOptions {
            attention_mask: Some(tensor2(&mask, dev)?),
            position_ids: Some(Tensor::new(positions.clone(), dev)?),
            attn: opts.attn,
            ..Default::default()
        };
        let step_ids: Vec<Vec<u32>> = next.iter().map(|&x| vec![x]).collect();
        let out = model.forward(&tensor2(&step_ids, dev)?, Some(&mut cache), &fopts)?;
        logits = out.logits.expect("lm head ran");
    }
    let finish_reasons = finish
        .into_iter()
        .map(|f| f.unwrap_or(FinishReason::Length))
        .collect();
    Ok(GenerationOutput {
        sequences,
        finish_reasons,
        step_logits,
    })
}

/// Greedy generation without callbacks.
pub fn generate_greedy(
    model: &ZayaModel,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<GenerationOutput> {
    generate(model, prompts, opts, &mut Greedy, &mut |_, _| {})
}
