//! The GRPO loop, one code path for full fine-tuning and LoRA (generic over
//! [`Trainable`]): sample a generation batch on the engine (over the trained weights — for
//! LoRA the base with the live adapters attached — no copy, no merge), score it, turn
//! rewards into group-normalised advantages, and take `num_iterations` optimizer steps on it
//! with TRL's loss; log, checkpoint, resume.
//!
//! Batch bookkeeping follows TRL's defaults: a micro-batch holds `batch_size` completions
//! (`per_device_train_batch_size`), an optimizer step accumulates `grad_accum` of them, and
//! one generation batch (`batch_size · grad_accum` completions, `/ num_generations`
//! prompts) feeds one optimizer step per iteration (`steps_per_generation =
//! grad_accum`). Checkpoints are written at generation boundaries, so a resume restarts
//! with the next generation batch; the prompts and sampling seeds of generation `g` depend
//! only on `(seed, g)`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use zaya::text::ZayaTokenizer;
use zaya::train::trainer::Trainer;
use zaya::train::{Gradients, TrainOptions, Trainable, TrainableModel};
use zaya::ZayaModel;
use zaya_engine::{Engine, EngineConfig};

use crate::batch::{completion_logps, grpo_backward, reference_logps, GrpoInputs};
use crate::error::{GrpoError, Result};
use crate::loss::{Accumulation, LossConfig};
use crate::process::JsonLinesProcess;
use crate::rewards::{Reward, Scored};
use crate::rollout::{rollout, Completion, Prompt, RolloutConfig};

/// `scale_rewards` of `GRPOConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    Group,
    Batch,
    None,
}

impl std::str::FromStr for ScaleRewards {
    type Err = GrpoError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "group" => Ok(ScaleRewards::Group),
            "batch" => Ok(ScaleRewards::Batch),
            "none" => Ok(ScaleRewards::None),
            _ => Err(GrpoError::Input(format!(
                "unknown --scale-rewards `{s}` (group, batch or none)"
            ))),
        }
    }
}

fn nanmean(x: &[f64]) -> f64 {
    let v: Vec<f64> = x.iter().copied().filter(|v| !v.is_nan()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// torch's unbiased `nanstd` (TRL's helper).
fn nanstd(x: &[f64]) -> f64 {
    let m = nanmean(x);
    let v: Vec<f64> = x.iter().copied().filter(|v| !v.is_nan()).collect();
    let n = v.len() as f64;
    let var = v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / n;
    (var * n / (n - 1.0)).sqrt()
}

/// TRL's advantages (`multi_objective_aggregation = sum_then_normalize`): the weighted
/// `nansum` of the rewards per completion (NaN when no reward applies), minus the group
/// mean, divided by `std + 1e-4` unless `scale` is `None`; NaN advantages become 0.
/// `rewards[k][f]` is completion `k`'s reward from function `f` (NaN = `None`); groups are
/// consecutive runs of `group` completions.
pub fn advantages(
    rewards: &[Vec<f64>],
    weights: &[f64],
    group: usize,
    scale: ScaleRewards,
) -> (Vec<f64>, Vec<f64>) {
    let total: Vec<f64> = rewards
        .iter()
        .map(|r| {
            if r.iter().all(|x| x.is_nan()) {
                f64::NAN
            } else {
                r.iter()
                    .zip(weights)
                    .filter(|(x, _)| !x.is_nan())
                    .map(|(x, w)| x * w)
                    .sum()
            }
        })
        .collect();
    let batch_std = nanstd(&total);
    let mut adv = Vec::with_capacity(total.len());
    for g in total.chunks(group) {
        let mean = nanmean(g);
        let std = match scale {
            ScaleRewards::Batch => batch_std,
            _ if group > 1 => nanstd(g),
            _ => 0.0,
        };
        for &r in g {
            let mut a = r - mean;
            if scale != ScaleRewards::None {
                a /= std + 1e-4;
            }
            adv.push(if a.is_nan() { 0.0 } else { a });
        }
    }
    (total, adv)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrpoConfig {
    pub loss: LossConfig,
    pub num_generations: usize,
    /// Completions per micro-batch.
    pub batch_size: usize,
    pub grad_accum: usize,
    pub num_iterations: usize,
    pub scale_rewards: ScaleRewards,
    pub mask_truncated_completions: bool,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub max_tool_turns: usize,
    pub seed: u64,
    /// Weight of the router balance loss (0 = off).
    pub aux_loss_coef: f64,
    pub attn: String,
}

impl GrpoConfig {
    pub fn validate(&self) -> Result<()> {
        self.loss.validate()?;
        if self.num_generations < 2 {
            return Err(GrpoError::Input(
                "--num-generations must be at least 2 (the advantages compare completions of a group)".into(),
            ));
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.num_iterations == 0 {
            return Err(GrpoError::Input(
                "--batch-size, --grad-accum and --num-iterations must be at least 1".into(),
            ));
        }
        if !(self.batch_size * self.grad_accum).is_multiple_of(self.num_generations) {
            return Err(GrpoError::Input(format!(
                "the generation batch (--batch-size {} × --grad-accum {}) must be a multiple of --num-generations {}",
                self.batch_size, self.grad_accum, self.num_generations
            )));
        }
        Ok(())
    }

    pub fn prompts_per_generation(&self) -> usize {
        self.batch_size * self.grad_accum / self.num_generations
    }

    /// Whether the sampler's distribution is `softmax(logits / T)` (no top-k/p, min-p or
    /// penalties), so its log-probabilities are the old policy's.
    fn sampler_is_plain(&self) -> bool {
        self.top_k == 0 && self.top_p >= 1.0 && self.min_p == 0.0 && self.repetition_penalty == 1.0
    }
}

/// What the loop needs besides the trainer. `M`: what is trained (every weight, or a LoRA
/// adapter over a frozen base).
pub struct GrpoRun<M: Trainable = TrainableModel> {
    pub cfg: GrpoConfig,
    pub trainer: Trainer<M>,
    /// The policy of the KL term (`beta > 0`), frozen. `None`: the model's own
    /// [`Trainable::frozen_reference`] (LoRA: the base with the adapters disabled, no second
    /// copy of the base).
    pub reference: Option<ZayaModel>,
    pub tokenizer: Arc<ZayaTokenizer>,
    pub prompts: Vec<Prompt>,
    pub rewards: Vec<(Box<dyn Reward>, f64)>,
    pub env: Option<JsonLinesProcess>,
    pub stop_token_ids: Vec<u32>,
    /// Run directory (checkpoints, grpo.csv).
    pub out: PathBuf,
    pub save_every: u64,
}

/// One generation batch's log line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerationReport {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub grad_norm: f64,
    pub reward: f64,
    pub reward_std: f64,
    /// Mean reward of each function (NaN-aware), in `--reward` order.
    pub reward_per_func: Vec<f64>,
    pub reward_std_per_func: Vec<f64>,
    pub advantage_std: f64,
    pub kl: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
    pub entropy: f64,
    pub completion_len_mean: f64,
    pub completion_len_max: usize,
    pub truncated: f64,
    pub tool_turns: f64,
    /// max / mean |sampler log-prob − training-forward log-prob| over sampled tokens.
    pub logp_mismatch_max: f64,
    pub logp_mismatch_mean: f64,
    pub gen_seconds: f64,
    pub score_seconds: f64,
    pub train_seconds: f64,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Prompt indices of generation `g`: epochs of a seeded permutation of the data set.
pub fn generation_prompts(n: usize, per_gen: usize, seed: u64, g: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(per_gen);
    let start = g as usize * per_gen;
    let mut cache: Option<(usize, Vec<usize>)> = None;
    for k in start..start + per_gen {
        let epoch = k / n;
        if cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<usize> = (0..n).collect();
            let mut s = splitmix(seed ^ (epoch as u64).wrapping_mul(0x1234_5678_9ABC_DEF1));
            for i in (1..n).rev() {
                s = splitmix(s);
                perm.swap(i, (s % (i as u64 + 1)) as usize);
            }
            cache = Some((epoch, perm));
        }
        out.push(cache.as_ref().expect("set above").1[k % n]);
    }
    out
}

pub const CSV_HEADER: &str = "step,lr,loss,grad_norm,reward,reward_std,advantage_std,kl,clip_low,clip_high,clip_region,entropy,completion_len_mean,completion_len_max,truncated,tool_turns,logp_mismatch_max,logp_mismatch_mean,gen_seconds,score_seconds,train_seconds,rewards_per_func";

impl GenerationReport {
    pub fn csv_row(&self) -> String {
        let per: Vec<String> = self
            .reward_per_func
            .iter()
            .zip(&self.reward_std_per_func)
            .map(|(m, s)| format!("{m:.6}/{s:.6}"))
            .collect();
        format!(
            "{},{:e},{:.8},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.2},{},{:.4},{:.3},{:.3e},{:.3e},{:.3},{:.3},{:.3},{}",
            self.step,
            self.lr,
            self.loss,
            self.grad_norm,
            self.reward,
            self.reward_std,
            self.advantage_std,
            self.kl,
            self.clip_low,
            self.clip_high,
            self.clip_region,
            self.entropy,
            self.completion_len_mean,
            self.completion_len_max,
            self.truncated,
            self.tool_turns,
            self.logp_mismatch_max,
            self.logp_mismatch_mean,
            self.gen_seconds,
            self.score_seconds,
            self.train_seconds,
            per.join(" ")
        )
    }
}

impl<M: Trainable> GrpoRun<M> {
    fn engine(&self) -> Result<Engine> {
        let view = self.trainer.model().inference_view()?;
        let cfg = EngineConfig {
            // the weights change every step: cached prefixes would be stale
            prefix_cache_bytes: 0,
            max_running: (self.cfg.batch_size * self.cfg.grad_accum).max(1),
            attn: zaya::attention::AttnImplementation::parse(&self.cfg.attn).ok_or_else(|| {
                GrpoError::Input(format!(
                    "unknown attention backend `{}` (eager, sdpa or flex)",
                    self.cfg.attn
                ))
            })?,
            ..Default::default()
        };
        Ok(Engine::start(
            Arc::new(view),
            Some(self.tokenizer.clone()),
            cfg,
        )?)
    }

    fn score(&mut self, groups: &[Vec<Completion>], picked: &[usize]) -> Result<Vec<Vec<f64>>> {
        let mut items = Vec::new();
        for (g, &p) in groups.iter().zip(picked) {
            for c in g {
                items.push(Scored {
                    prompt: &self.prompts[p].text,
                    completion: &c.text,
                    tool_calls: &c.tool_calls,
                    columns: &self.prompts[p].columns,
                });
            }
        }
        let mut per = vec![vec![f64::NAN; self.rewards.len()]; items.len()];
        for (f, (r, _)) in self.rewards.iter_mut().enumerate() {
            let s = r.score(&items)?;
            if s.len() != items.len() {
                return Err(GrpoError::Reward {
                    name: r.name().to_string(),
                    message: format!("{} scores for {} completions", s.len(), items.len()),
                });
            }
            for (k, v) in s.into_iter().enumerate() {
                per[k][f] = v.unwrap_or(f64::NAN);
            }
        }
        Ok(per)
    }

    /// Runs generation batches until the trainer has taken `max_steps` optimizer steps.
    /// `on_step` sees every report (for progress output).
    pub fn run(
        &mut self,
        max_steps: u64,
        mut on_step: impl FnMut(&GenerationReport),
    ) -> Result<Vec<GenerationReport>> {
        self.cfg.validate()?;
        if self.prompts.is_empty() {
            return Err(GrpoError::Input("the data set has no prompt".into()));
        }
        if self.rewards.is_empty() {
            return Err(GrpoError::Input(
                "no reward function (--reward NAME or --reward-cmd CMD)".into(),
            ));
        }
        let log = self.out.join("grpo.csv");
        if !log.exists() {
            zaya::weights::write_atomic(&log, format!("{CSV_HEADER}\n").as_bytes())?;
        }
        let engine = self.engine()?;
        let mut reports = Vec::new();
        let iters = self.cfg.num_iterations as u64;
        let result = (|| -> Result<()> {
            while self.trainer.steps() < max_steps {
                let g = self.trainer.steps() / iters;
                let r = self.generation(&engine, g)?;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .map_err(|e| GrpoError::io(&log, e))?;
                writeln!(f, "{}", r.csv_row()).map_err(|e| GrpoError::io(&log, e))?;
                on_step(&r);
                reports.push(r);
                let gens = self.trainer.steps() / iters;
                if self.save_every > 0
                    && gens.is_multiple_of(self.save_every)
                    && self.trainer.steps() < max_steps
                {
                    self.trainer.save(&self.out)?;
                }
            }
            Ok(())
        })();
        engine.shutdown(false);
        result?;
        Ok(reports)
    }

    fn generation(&mut self, engine: &Engine, g: u64) -> Result<GenerationReport> {
        let cfg = self.cfg.clone();
        let n = cfg.num_generations;
        let t0 = Instant::now();
        let picked = generation_prompts(
            self.prompts.len(),
            cfg.prompts_per_generation(),
            cfg.seed,
            g,
        );
        let batch_prompts: Vec<Prompt> = picked.iter().map(|&i| self.prompts[i].clone()).collect();
        let rcfg = RolloutConfig {
            num_generations: n,
            max_completion_length: cfg.loss.max_completion_length,
            sampling: zaya::sampling::SamplingParams {
                temperature: cfg.loss.temperature as f32,
                top_k: cfg.top_k,
                top_p: cfg.top_p,
                min_p: cfg.min_p,
                repetition_penalty: cfg.repetition_penalty,
                ..Default::default()
            },
            stop_token_ids: self.stop_token_ids.clone(),
            max_tool_turns: cfg.max_tool_turns,
            first_turn_constraint: None,
        };
        let tok = self.tokenizer.clone();
        let gen_seed = splitmix(cfg.seed ^ g.wrapping_mul(0x5851_F42D_4C95_7F2D));
        let groups = rollout(
            engine,
            &tok,
            &batch_prompts,
            &rcfg,
            gen_seed,
            self.env.as_mut(),
        )?;
        let gen_seconds = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let per = self.score(&groups, &picked)?;
        let weights: Vec<f64> = self.rewards.iter().map(|(_, w)| *w).collect();
        let (total, adv) = advantages(&per, &weights, n, cfg.scale_rewards);
        let score_seconds = t1.elapsed().as_secs_f64();

        let t2 = Instant::now();
        let completions: Vec<&Completion> = groups.iter().flatten().collect();
        let width = completions
            .iter()
            .map(|c| c.ids.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let pad = self.trainer.model().config().pad_token_id.unwrap_or(0);
        let mut inputs = GrpoInputs {
            advantages: adv.iter().map(|&a| a as f32).collect(),
            tool_mask: Some(Vec::new()),
            ..Default::default()
        };
        for (k, c) in completions.iter().enumerate() {
            inputs.prompt_ids.push(batch_prompts[k / n].ids.clone());
            let mut ids = c.ids.clone();
            ids.resize(width, pad);
            inputs.completion_ids.push(ids);
            let keep = !(cfg.mask_truncated_completions && c.truncated);
            let mut m = vec![u32::from(keep); c.ids.len()];
            m.resize(width, 0);
            inputs.completion_mask.push(m);
            let mut tm = c.tool_mask.clone();
            tm.resize(width, 1);
            if let Some(t) = inputs.tool_mask.as_mut() {
                t.push(tm);
            }
        }
        let total_items = inputs.num_loss_tokens() as f64;
        let opts = TrainOptions {
            aux_loss_coef: cfg.aux_loss_coef,
            attn: self.trainer.config().attn,
            ..TrainOptions::for_config(self.trainer.model().config())
        };
        let sampler_grid: Vec<Vec<f32>> = completions
            .iter()
            .map(|c| {
                let mut v = c.sampler_logps.clone();
                v.resize(width, 0.0);
                v
            })
            .collect();
        if cfg.num_iterations > 1 {
            inputs.old_logps = Some(if cfg.sampler_is_plain() {
                // exact up to the measured mismatch; tool-result tokens are masked anyway
                sampler_grid
                    .iter()
                    .map(|r| {
                        r.iter()
                            .map(|x| if x.is_finite() { *x } else { 0.0 })
                            .collect()
                    })
                    .collect()
            } else {
                completion_logps(self.trainer.model(), &inputs, &opts, cfg.loss.temperature)?.0
            });
        }
        if cfg.loss.beta > 0.0 {
            let own;
            let reference = match &self.reference {
                Some(r) => r,
                None => {
                    own = self.trainer.model().frozen_reference().ok_or_else(|| {
                        GrpoError::Input("beta > 0 needs a reference model".into())
                    })?;
                    &own
                }
            };
            inputs.ref_logps =
                Some(reference_logps(reference, &inputs, &opts, cfg.loss.temperature)?.0);
        }
        let rows = inputs.rows();
        let acc = Accumulation {
            grad_accum: cfg.grad_accum,
            steps_per_generation: cfg.grad_accum,
            num_items_in_batch: total_items,
        };
        let mut report = GenerationReport::default();
        let (mut mm_max, mut mm_sum, mut mm_n) = (0f64, 0f64, 0usize);
        let (mut kl, mut clip_l, mut clip_h, mut clip_r, mut ent) = (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut parts = 0usize;
        for it in 0..cfg.num_iterations {
            let mut grads = Gradients::default();
            let mut loss = 0.0;
            for (micro, start) in (0..rows).step_by(cfg.batch_size).enumerate() {
                let end = (start + cfg.batch_size).min(rows);
                self.trainer.before_micro_batch(micro as u64)?;
                let mb = slice_inputs(&inputs, start, end);
                let out = grpo_backward(
                    self.trainer.model(),
                    &mb,
                    &cfg.loss,
                    &acc,
                    &opts,
                    1.0 / cfg.grad_accum as f64,
                )?;
                if it == 0 {
                    for (r, row) in out.per_token_logps.iter().enumerate() {
                        let k = start + r;
                        for (t, &lp) in row.iter().enumerate() {
                            if inputs.completion_mask[k][t] == 1
                                && completions[k].tool_mask.get(t) == Some(&1)
                            {
                                let d = f64::from((lp - sampler_grid[k][t]).abs());
                                if d.is_finite() {
                                    mm_max = mm_max.max(d);
                                    mm_sum += d;
                                    mm_n += 1;
                                }
                            }
                        }
                    }
                }
                loss += out.loss.loss;
                kl += out.loss.kl.unwrap_or(0.0);
                clip_l += out.loss.clip_low;
                clip_h += out.loss.clip_high;
                clip_r += out.loss.clip_region;
                ent += out.entropy;
                parts += 1;
                grads.accumulate(&out.grads)?;
            }
            let (lr, gn) = self.trainer.update(grads, loss)?;
            report.lr = lr;
            report.grad_norm = gn;
            report.loss = loss;
        }
        let parts = parts.max(1) as f64;
        report.step = self.trainer.steps();
        report.reward = nanmean(&total);
        report.reward_std = nanstd(&total);
        report.reward_per_func = (0..self.rewards.len())
            .map(|f| nanmean(&per.iter().map(|r| r[f]).collect::<Vec<_>>()))
            .collect();
        report.reward_std_per_func = (0..self.rewards.len())
            .map(|f| nanstd(&per.iter().map(|r| r[f]).collect::<Vec<_>>()))
            .collect();
        report.advantage_std = nanstd(&adv);
        report.kl = kl / parts;
        report.clip_low = clip_l / parts;
        report.clip_high = clip_h / parts;
        report.clip_region = clip_r / parts;
        report.entropy = ent / parts;
        let lens: Vec<usize> = completions.iter().map(|c| c.ids.len()).collect();
        report.completion_len_mean = lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64;
        report.completion_len_max = lens.iter().copied().max().unwrap_or(0);
        report.truncated = completions.iter().filter(|c| c.truncated).count() as f64
            / completions.len().max(1) as f64;
        report.tool_turns = completions.iter().map(|c| c.tool_turns as f64).sum::<f64>()
            / completions.len().max(1) as f64;
        report.logp_mismatch_max = mm_max;
        report.logp_mismatch_mean = mm_sum / mm_n.max(1) as f64;
        report.gen_seconds = gen_seconds;
        report.score_seconds = score_seconds;
        report.train_seconds = t2.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// Rows `start..end` of a batch (the completions keep the batch's width).
pub fn slice_inputs(x: &GrpoInputs, start: usize, end: usize) -> GrpoInputs {
    let s = |v: &Vec<Vec<u32>>| v[start..end].to_vec();
    let f = |v: &Vec<Vec<f32>>| v[start..end].to_vec();
    GrpoInputs {
        prompt_ids: s(&x.prompt_ids),
        completion_ids: s(&x.completion_ids),
        completion_mask: s(&x.completion_mask),
        tool_mask: x.tool_mask.as_ref().map(s),
        advantages: x.advantages[start..end].to_vec(),
        old_logps: x.old_logps.as_ref().map(f),
        ref_logps: x.ref_logps.as_ref().map(f),
    }
}

/// Reads the prompts of a JSON-lines data file: `prompt` (text, encoded as a prompt to
/// continue) or `messages` (+ `tools`; rendered with the chat template and a generation
/// prompt); every other column goes to the rewards (and `tools` too).
pub fn read_prompts(path: &Path, text: &str, tok: &ZayaTokenizer) -> Result<Vec<Prompt>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| GrpoError::Data {
            path: path.display().to_string(),
            line: line_no,
            message,
        };
        let prompt = parse_prompt_row(line, tok).map_err(err)?;
        out.push(prompt);
    }
    if out.is_empty() {
        return Err(GrpoError::Data {
            path: path.display().to_string(),
            line: 0,
            message: "no prompt in the file".into(),
        });
    }
    Ok(out)
}

/// One data row (see [`read_prompts`]); the error says what is wrong with it.
pub fn parse_prompt_row(line: &str, tok: &ZayaTokenizer) -> std::result::Result<Prompt, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut obj) = v else {
        return Err("a row must be a JSON object".into());
    };
    let (ids, text) = if let Some(p) = obj.remove("prompt") {
        let Value::String(p) = p else {
            return Err("`prompt` must be text (use `messages` for a conversation)".into());
        };
        if p.len() > 1 << 20 {
            return Err("`prompt` is longer than 1 MiB".into());
        }
        let ids = tok.encode_prompt(&p).map_err(|e| e.to_string())?;
        (ids, p)
    } else if let Some(m) = obj.remove("messages") {
        let Value::Array(msgs) = m else {
            return Err("`messages` must be a list".into());
        };
        if msgs.is_empty() {
            return Err("`messages` is empty".into());
        }
        let tools = match obj.get("tools") {
            None | Some(Value::Null) => None,
            Some(Value::Array(t)) => Some(t.clone()),
            Some(_) => return Err("`tools` must be a list".into()),
        };
        let mut req = zaya::text::ChatRequest::new(msgs);
        req.tools = tools;
        req.add_generation_prompt = true;
        let text = tok.apply_chat_template(&req).map_err(|e| e.to_string())?;
        let ids = tok.encode_chat(&req).map_err(|e| e.to_string())?;
        (ids, text)
    } else {
        return Err("a row needs `prompt` (text) or `messages`".into());
    };
    if ids.is_empty() {
        return Err("the prompt encodes to no token".into());
    }
    Ok(Prompt {
        ids,
        text,
        columns: obj.into_iter().collect::<Map<String, Value>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_follow_trl() {
        // two groups of two; the second group has one unscorable completion
        let r = vec![
            vec![1.0, 0.0],
            vec![0.0, 0.0],
            vec![f64::NAN, f64::NAN],
            vec![0.5, f64::NAN],
        ];
        let (total, adv) = advantages(&r, &[1.0, 2.0], 2, ScaleRewards::Group);
        assert_eq!(total[0], 1.0);
        assert!(total[2].is_nan());
        // group 1: mean 0.5, unbiased std 0.7071
        let s = (0.5f64).sqrt();
        assert!((adv[0] - 0.5 / (s + 1e-4)).abs() < 1e-12);
        assert!((adv[1] + 0.5 / (s + 1e-4)).abs() < 1e-12);
        // group 2: NaN std (one value) -> NaN -> 0
        assert_eq!(adv[2], 0.0);
        assert_eq!(adv[3], 0.0);
        let (_, adv) = advantages(&r, &[1.0, 2.0], 2, ScaleRewards::None);
        assert_eq!(adv[0], 0.5);
    }

    #[test]
    fn prompts_cover_each_epoch_once() {
        let mut seen: Vec<usize> = (0..5)
            .flat_map(|g| generation_prompts(10, 2, 7, g))
            .collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(
            generation_prompts(10, 2, 7, 3),
            generation_prompts(10, 2, 7, 3)
        );
    }
}
