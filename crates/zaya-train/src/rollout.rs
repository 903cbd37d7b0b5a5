//! Rollouts on the engine: a group of `n` sampled completions per prompt, all prompts of a
//! generation batch submitted together (the engine batches their decode steps), each sampled
//! token's log-probability recorded. With a tool environment (`--env-cmd`), a completion that
//! calls tools gets the environment's results appended as `tool` messages (rendered with the
//! chat template, tokens masked out of the loss) and continues, up to `max_tool_turns`.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use zaya::sampling::SamplingParams;
use zaya::text::tool_calls::{parse_output, ToolCall};
use zaya::text::{ChatRequest, ZayaTokenizer};
use zaya_engine::{ConstraintFactory, Engine, Event, FinishReason, GenerationRequest};

use crate::error::{GrpoError, Result};
use crate::process::JsonLinesProcess;

/// One prompt of the data set, tokenized.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// The prompt as text (what rewards see).
    pub text: String,
    pub columns: Map<String, Value>,
}

#[derive(Clone)]
pub struct RolloutConfig {
    pub num_generations: usize,
    pub max_completion_length: usize,
    pub sampling: SamplingParams,
    pub stop_token_ids: Vec<u32>,
    pub max_tool_turns: usize,
    /// A grammar for the first turn of every completion (the engine masks the tokens it
    /// forbids; the recorded log-probabilities are those of the masked distribution).
    pub first_turn_constraint: Option<Arc<dyn ConstraintFactory>>,
}

/// A sampled completion (every turn, tool results included).
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub ids: Vec<u32>,
    /// The sampler's log-probability of each token (0 for tool-result tokens).
    pub sampler_logps: Vec<f32>,
    /// 1 for tokens the model sampled, 0 for tool-result tokens (masked out of the loss).
    pub tool_mask: Vec<u32>,
    /// Text of the model's turns (tool results left out), special tokens skipped.
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    /// Ended by the length budget, not by a stop token.
    pub truncated: bool,
    pub tool_turns: usize,
}

fn engine_err(e: impl std::fmt::Display) -> GrpoError {
    GrpoError::Input(format!("engine: {e}"))
}

struct Turn {
    ids: Vec<u32>,
    logps: Vec<f32>,
    finish: FinishReason,
}

/// Submits every request, then collects each (the engine runs them as one batch).
fn run_requests(engine: &Engine, reqs: Vec<GenerationRequest>) -> Result<Vec<Vec<Turn>>> {
    let handles = reqs
        .into_iter()
        .map(|r| engine.submit(r).map_err(engine_err))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        let mut turns: Vec<Turn> = Vec::new();
        while let Some(ev) = h.recv() {
            match ev {
                Event::Token {
                    choice,
                    token,
                    logprob,
                    ..
                } => {
                    while turns.len() <= choice {
                        turns.push(Turn {
                            ids: Vec::new(),
                            logps: Vec::new(),
                            finish: FinishReason::Length,
                        });
                    }
                    turns[choice].ids.push(token);
                    turns[choice]
                        .logps
                        .push(logprob.map_or(f32::NAN, |l| l.logprob));
                }
                Event::Finished { choice, reason, .. } => {
                    if let Some(t) = turns.get_mut(choice) {
                        t.finish = reason;
                    }
                }
                Event::Done { .. } => break,
                Event::Error { message } => return Err(engine_err(message)),
            }
        }
        out.push(turns);
    }
    Ok(out)
}

/// The tokens a chat template puts between an assistant turn that called tools and the next
/// assistant turn, for `tool_messages` (TRL's `_get_tool_suffix_ids`: a dummy conversation
/// rendered with and without the tool messages, cut after the last EOS of the shorter one).
pub fn tool_suffix_ids(tok: &ZayaTokenizer, tool_messages: &[Value]) -> Result<Vec<u32>> {
    let name = tool_messages
        .first()
        .and_then(|m| m.get("name"))
        .cloned()
        .unwrap_or(json!("tool"));
    let dummy = vec![
        json!({"role": "user", "content": "dummy"}),
        json!({"role": "assistant", "content": "",
               "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}]}),
    ];
    let mut prefix_req = ChatRequest::new(dummy.clone());
    prefix_req.add_generation_prompt = false;
    let mut prefix = tok.encode_chat(&prefix_req)?;
    let mut full_msgs = dummy;
    full_msgs.extend(tool_messages.iter().cloned());
    let mut full_req = ChatRequest::new(full_msgs);
    full_req.add_generation_prompt = true;
    let full = tok.encode_chat(&full_req)?;
    let eos = tok.eos_token_ids();
    if let Some(last) = prefix.iter().rposition(|t| eos.contains(t)) {
        prefix.truncate(last + 1);
    }
    if !full.starts_with(&prefix) {
        return Err(GrpoError::Input(
            "chat template: the conversation without tool results is not a prefix of the one with them".into(),
        ));
    }
    Ok(full[prefix.len()..].to_vec())
}

/// Parses an environment's answer: `{"tool_results": [..]}` with one entry per call (a
/// string, or any JSON value, which is sent to the template as its JSON text).
pub fn parse_env_answer(v: &Value, calls: usize) -> std::result::Result<Vec<String>, String> {
    let results = v
        .get("tool_results")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            let shown: String = v.to_string().chars().take(200).collect();
            format!("expected {{\"tool_results\": [...]}}, got `{shown}`")
        })?;
    if results.len() != calls {
        return Err(format!(
            "{} tool results for {calls} tool calls",
            results.len()
        ));
    }
    Ok(results
        .iter()
        .map(|r| match r {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect())
}

/// Samples `num_generations` completions for every prompt; `seed` makes the draw
/// reproducible (prompt `p` uses `seed + p · num_generations`, choice `i` adds `i`).
pub fn rollout(
    engine: &Engine,
    tok: &Arc<ZayaTokenizer>,
    prompts: &[Prompt],
    cfg: &RolloutConfig,
    seed: u64,
    mut env: Option<&mut JsonLinesProcess>,
) -> Result<Vec<Vec<Completion>>> {
    let n = cfg.num_generations;
    let request = |prompt: Vec<u32>, max_tokens: usize, n: usize, seed: u64| {
        let mut r = GenerationRequest::new(prompt, max_tokens);
        r.sampling = SamplingParams {
            seed,
            ..cfg.sampling.clone()
        };
        r.stop_token_ids = cfg.stop_token_ids.clone();
        r.logprobs = Some(0);
        r.n = n;
        r.skip_special_tokens = true;
        r
    };
    let reqs = prompts
        .iter()
        .enumerate()
        .map(|(p, pr)| {
            let mut r = request(
                pr.ids.clone(),
                cfg.max_completion_length,
                n,
                seed.wrapping_add((p * n) as u64),
            );
            r.constraint = cfg.first_turn_constraint.clone();
            r
        })
        .collect();
    let first = run_requests(engine, reqs)?;
    let mut groups: Vec<Vec<Completion>> = first
        .into_iter()
        .map(|turns| {
            turns
                .into_iter()
                .map(|t| Completion {
                    tool_mask: vec![1; t.ids.len()],
                    truncated: t.finish == FinishReason::Length,
                    ids: t.ids,
                    sampler_logps: t.logps,
                    ..Default::default()
                })
                .collect()
        })
        .collect();
    // Special tokens are kept (ZAYA1's tool-call and thinking markers are special tokens);
    // stop tokens are left out.
    let decode = |ids: &[u32]| -> Result<String> {
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|t| !cfg.stop_token_ids.contains(t))
            .collect();
        Ok(tok.decode(&kept, false)?)
    };
    let text_of = |ids: &[u32], mask: &[u32]| -> Result<String> {
        // the model's tokens only; tool results are not the model's text
        let mut text = String::new();
        let mut run = Vec::new();
        for (&id, &m) in ids.iter().zip(mask) {
            if m == 1 {
                run.push(id);
            } else if !run.is_empty() {
                text.push_str(&decode(&run)?);
                run.clear();
            }
        }
        text.push_str(&decode(&run)?);
        Ok(text)
    };
    for turn in 0..cfg.max_tool_turns {
        let Some(env) = env.as_deref_mut() else {
            break;
        };
        // completions whose last turn ended with tool calls and budget left
        let mut pending = Vec::new();
        for (p, group) in groups.iter_mut().enumerate() {
            for (i, c) in group.iter_mut().enumerate() {
                if c.truncated || c.tool_turns != turn {
                    continue;
                }
                let last_start = c
                    .tool_mask
                    .iter()
                    .rposition(|&m| m == 0)
                    .map_or(0, |x| x + 1);
                let last_text = decode(&c.ids[last_start..])?;
                let calls = parse_output(&last_text).tool_calls;
                if calls.is_empty() {
                    continue;
                }
                let answer = env.request(&json!({
                    "tool_calls": calls,
                    "columns": prompts[p].columns,
                    "turn": turn,
                }))?;
                let results =
                    parse_env_answer(&answer, calls.len()).map_err(|m| GrpoError::Process {
                        role: "environment",
                        command: String::new(),
                        message: m,
                    })?;
                let msgs: Vec<Value> = calls
                    .iter()
                    .zip(&results)
                    .map(|(c, r)| json!({"role": "tool", "name": c.name, "content": r}))
                    .collect();
                let suffix = tool_suffix_ids(tok, &msgs)?;
                let used = c.ids.len() + suffix.len();
                c.tool_turns += 1;
                if used >= cfg.max_completion_length {
                    // no room for another turn: the completion ends here, truncated
                    let room = cfg.max_completion_length.saturating_sub(c.ids.len());
                    c.ids.extend(&suffix[..room]);
                    c.sampler_logps.extend(std::iter::repeat_n(0.0, room));
                    c.tool_mask.extend(std::iter::repeat_n(0, room));
                    c.truncated = true;
                    continue;
                }
                c.ids.extend(&suffix);
                c.sampler_logps
                    .extend(std::iter::repeat_n(0.0, suffix.len()));
                c.tool_mask.extend(std::iter::repeat_n(0, suffix.len()));
                pending.push((p, i));
            }
        }
        if pending.is_empty() {
            break;
        }
        let reqs = pending
            .iter()
            .map(|&(p, i)| {
                let c = &groups[p][i];
                let mut ids = prompts[p].ids.clone();
                ids.extend(&c.ids);
                let seed = seed
                    .wrapping_add((p * n + i) as u64)
                    .wrapping_add(((turn + 1) as u64) << 32);
                request(ids, cfg.max_completion_length - c.ids.len(), 1, seed)
            })
            .collect();
        let more = run_requests(engine, reqs)?;
        for (&(p, i), turns) in pending.iter().zip(more) {
            let c = &mut groups[p][i];
            for t in turns {
                c.tool_mask.extend(std::iter::repeat_n(1, t.ids.len()));
                c.ids.extend(&t.ids);
                c.sampler_logps.extend(&t.logps);
                c.truncated = t.finish == FinishReason::Length;
            }
        }
    }
    for group in &mut groups {
        for c in group.iter_mut() {
            c.text = text_of(&c.ids, &c.tool_mask)?;
            c.tool_calls = parse_output(&c.text).tool_calls;
        }
    }
    Ok(groups)
}
