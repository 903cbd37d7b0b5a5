//! One choice of a request: turns each step's logits into a token, its log-probabilities and
//! the text released to the caller (UTF-8 complete, stop strings held back), and decides when
//! the choice ends.

use zaya::sampling::{Sampler, StopChecker, StopReason};
use zaya::text::{StreamDecoder, ZayaTokenizer};

use crate::request::{Event, FinishReason, TokenConstraint, TokenLogprob};

pub struct Choice {
    pub index: usize,
    sampler: Sampler,
    stop: StopChecker,
    decoder: Option<StreamDecoder>,
    constraint: Option<Box<dyn TokenConstraint>>,
    /// Prompt and generated ids (what the penalties see).
    context: Vec<u32>,
    pub generated: usize,
    max_tokens: usize,
    max_context: usize,
    logprobs: Option<usize>,
    /// Bytes of the stop checker's text already sent.
    released: usize,
}

/// What a step did to a choice.
pub enum Outcome {
    /// Feed this token next step.
    Continue(u32),
    Finished,
}

/// `(token, logprob)` of the `k` largest log-probabilities (most likely first, ties by id),
/// and the log-probability of `chosen`, from the log-softmax of `logits`.
pub fn logprobs(logits: &[f32], chosen: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = if max == f64::NEG_INFINITY {
        0.0
    } else {
        max + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln()
    };
    let lp = |l: f32| (l as f64 - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k);
    if k > 0 {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let by = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let k = k.min(order.len());
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, by);
            order.truncate(k);
        }
        order.sort_by(by);
        top.extend(order.iter().map(|&i| (i, lp(logits[i as usize]))));
    }
    TokenLogprob {
        token: chosen,
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top,
    }
}

impl Choice {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        mut sampler: Sampler,
        stop: StopChecker,
        tokenized: bool,
        skip_special_tokens: bool,
        constraint: Option<Box<dyn TokenConstraint>>,
        prompt: &[u32],
        max_tokens: usize,
        max_context: usize,
        logprobs: Option<usize>,
    ) -> Self {
        sampler.begin(prompt.len());
        Choice {
            index,
            sampler,
            stop,
            decoder: tokenized.then(|| StreamDecoder::new(skip_special_tokens)),
            constraint,
            context: prompt.to_vec(),
            generated: 0,
            max_tokens,
            max_context,
            logprobs,
            released: 0,
        }
    }

    /// Samples the next token from this step's logits and reports it into `events`.
    /// An `Err` fails the whole request (broken grammar, NaN logits, tokenizer failure).
    pub fn step(
        &mut self,
        mut logits: Vec<f32>,
        tokenizer: Option<&ZayaTokenizer>,
        events: &mut Vec<Event>,
    ) -> Result<Outcome, String> {
        if let Some(c) = self.constraint.as_mut() {
            let mut allowed = vec![true; logits.len()];
            c.mask(&mut allowed)
                .map_err(|e| format!("choice {}: grammar mask failed: {e}", self.index))?;
            for (l, ok) in logits.iter_mut().zip(&allowed) {
                if !ok {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(index) = logits.iter().position(|l| l.is_nan()) {
            return Err(format!(
                "choice {}: logit {index} is NaN at generated token {}",
                self.index, self.generated
            ));
        }
        let processed = self.sampler.process(&logits, &self.context);
        let token = self
            .sampler
            .sample_processed(&processed)
            .map_err(|e| format!("choice {}: {e}", self.index))?;
        let logprob = self.logprobs.map(|k| logprobs(&processed, token, k));
        self.context.push(token);
        self.generated += 1;
        if let Some(c) = self.constraint.as_mut() {
            c.commit(token).map_err(|e| {
                format!("choice {}: grammar rejected token {token}: {e}", self.index)
            })?;
        }

        if self.stop.is_stop_token(token) {
            events.push(Event::Token {
                choice: self.index,
                token,
                text: String::new(),
                logprob,
            });
            self.finish(FinishReason::Stop, tokenizer, events)?;
            return Ok(Outcome::Finished);
        }
        let mut stopped_by_string = false;
        let mut text = String::new();
        if let (Some(dec), Some(tok)) = (self.decoder.as_mut(), tokenizer) {
            let chunk = dec
                .step(tok, token)
                .map_err(|e| format!("choice {}: detokenizing {token}: {e}", self.index))?;
            if let Some(chunk) = chunk {
                let end = match self.stop.push_text(&chunk) {
                    Some(StopReason::String { cut, .. }) => {
                        stopped_by_string = true;
                        cut
                    }
                    _ => self.stop.releasable(),
                };
                if end > self.released {
                    text = self.stop.text()[self.released..end].to_string();
                    self.released = end;
                }
            }
        }
        events.push(Event::Token {
            choice: self.index,
            token,
            text,
            logprob,
        });
        if stopped_by_string {
            events.push(Event::Finished {
                choice: self.index,
                reason: FinishReason::Stop,
                text: String::new(),
            });
            return Ok(Outcome::Finished);
        }
        let reason = if self.constraint.as_ref().is_some_and(|c| c.is_finished()) {
            Some(FinishReason::Stop)
        } else if self.generated >= self.max_tokens || self.context.len() >= self.max_context {
            Some(FinishReason::Length)
        } else {
            None
        };
        match reason {
            Some(r) => {
                self.finish(r, tokenizer, events)?;
                Ok(Outcome::Finished)
            }
            None => Ok(Outcome::Continue(token)),
        }
    }

    /// Ends the choice: releases what was held back (an incomplete character, a stop-string
    /// prefix that never completed) unless a stop string turns up in it.
    pub fn finish(
        &mut self,
        reason: FinishReason,
        tokenizer: Option<&ZayaTokenizer>,
        events: &mut Vec<Event>,
    ) -> Result<(), String> {
        let mut text = String::new();
        let mut reason = reason;
        if reason != FinishReason::Cancelled {
            let mut end = self.stop.text().len();
            if let (Some(dec), Some(tok)) = (self.decoder.as_mut(), tokenizer) {
                let rest = dec
                    .finish(tok)
                    .map_err(|e| format!("choice {}: detokenizing: {e}", self.index))?;
                if let Some(rest) = rest {
                    end = match self.stop.push_text(&rest) {
                        Some(StopReason::String { cut, .. }) => {
                            reason = FinishReason::Stop;
                            cut
                        }
                        _ => self.stop.text().len(),
                    };
                }
            }
            if end > self.released {
                text = self.stop.text()[self.released..end].to_string();
                self.released = end;
            }
        }
        events.push(Event::Finished {
            choice: self.index,
            reason,
            text,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::logprobs;

    #[test]
    fn logprobs_are_log_softmax_with_sorted_top() {
        let l = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let lp = logprobs(&l, 2, 3);
        let lse = (1f64.exp() + 3f64.exp() + 2f64.exp()).ln();
        assert!((lp.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 2, 0]
        );
        assert!((lp.top[0].1 as f64 - (3.0 - lse)).abs() < 1e-6);
        let lp = logprobs(&l, 3, 0);
        assert_eq!(lp.logprob, f32::NEG_INFINITY);
        assert!(lp.top.is_empty());
    }
}
