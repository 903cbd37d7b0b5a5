//! The engine against `zaya::generation` run alone: same tokens whatever else is in the
//! batch, prefix-cache reuse with the same log-probabilities as a cold run, n > 1 seeds,
//! stop conditions, logprobs, constraints, cancellation and typed submit errors.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use zaya::generation::{generate_greedy, GenerateOptions};
use zaya::sampling::SamplingParams;
use zaya::text::ZayaTokenizer;
use zaya::ZayaModel;
use zaya_engine::{
    ConstraintFactory, Engine, EngineConfig, Event, FinishReason, GenerationRequest, SubmitError,
    TokenConstraint, TokenLogprob, Usage,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> Arc<ZayaModel> {
    let dir = root().join("tests/fixtures/models").join(name);
    Arc::new(ZayaModel::load(dir, DType::F32, &Device::Cpu).unwrap())
}

fn default_model() -> (Arc<ZayaModel>, Arc<ZayaTokenizer>) {
    let dir = root().join("models/default");
    let model = ZayaModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tok = ZayaTokenizer::from_dir(&dir).unwrap();
    (Arc::new(model), Arc::new(tok))
}

/// Deterministic pseudo-random prompt of `len` ids in `1..vocab`.
fn prompt(seed: u64, len: usize, vocab: usize) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1 + ((x >> 33) as usize % (vocab - 1)) as u32
        })
        .collect()
}

#[derive(Debug, Default)]
struct Collected {
    tokens: Vec<Vec<u32>>,
    text: Vec<String>,
    logprobs: Vec<Vec<TokenLogprob>>,
    finish: Vec<Option<FinishReason>>,
    usage: Option<Usage>,
    error: Option<String>,
}

fn collect(events: Vec<Event>, n: usize) -> Collected {
    let mut c = Collected {
        tokens: vec![Vec::new(); n],
        text: vec![String::new(); n],
        logprobs: vec![Vec::new(); n],
        finish: vec![None; n],
        ..Default::default()
    };
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Token {
                choice,
                token,
                text,
                logprob,
            } => {
                assert!(c.finish[*choice].is_none(), "token after Finished");
                c.tokens[*choice].push(*token);
                c.text[*choice].push_str(text);
                if let Some(l) = logprob {
                    c.logprobs[*choice].push(l.clone());
                }
            }
            Event::Finished {
                choice,
                reason,
                text,
            } => {
                assert!(c.finish[*choice].is_none(), "finished twice");
                c.finish[*choice] = Some(*reason);
                c.text[*choice].push_str(text);
            }
            Event::Done { usage } => {
                assert_eq!(i + 1, events.len(), "Done is the last event");
                c.usage = Some(*usage);
            }
            Event::Error { message } => {
                assert_eq!(i + 1, events.len(), "Error is the last event");
                c.error = Some(message.clone());
            }
        }
    }
    c
}

fn solo_greedy(model: &ZayaModel, prompt: &[u32], max_new: usize) -> Vec<u32> {
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        ignore_eos: true,
        ..Default::default()
    };
    generate_greedy(model, &[prompt.to_vec()], &opts)
        .unwrap()
        .sequences
        .remove(0)
}

fn small_blocks() -> EngineConfig {
    EngineConfig {
        prefix_block: 4,
        prefill_chunk: 8,
        step_token_budget: 12,
        ..Default::default()
    }
}

#[test]
fn greedy_equals_generate_alone_and_together() {
    for name in ["gqa_sliding", "mha_bias", "conv_k3"] {
        let model = fixture(name);
        let vocab = model.config().vocab_size;
        let engine = Engine::start(model.clone(), None, small_blocks()).unwrap();
        // different lengths (sliding window 5 exceeded), joining at different steps
        let prompts: Vec<Vec<u32>> = [3usize, 9, 1, 14, 6, 21]
            .iter()
            .enumerate()
            .map(|(i, &l)| prompt(i as u64 + 7, l, vocab))
            .collect();
        let max_new = 12;
        let mut handles = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            handles.push(
                engine
                    .submit(GenerationRequest::new(p.clone(), max_new + i))
                    .unwrap(),
            );
            if i % 2 == 1 {
                // let the batch move so later requests join mid-stream
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for (i, (h, p)) in handles.iter().zip(&prompts).enumerate() {
            let c = collect(h.collect(), 1);
            assert!(c.error.is_none(), "{name} request {i}: {:?}", c.error);
            let want = solo_greedy(&model, p, max_new + i);
            assert_eq!(
                c.tokens[0],
                want,
                "{name} request {i} (prompt {} tokens)",
                p.len()
            );
            assert_eq!(c.finish[0], Some(FinishReason::Length));
            let u = c.usage.unwrap();
            assert_eq!(u.prompt_tokens, p.len());
            assert_eq!(u.completion_tokens, max_new + i);
        }
        engine.shutdown(true);
    }
}

#[test]
fn prefix_cache_reuses_blocks_with_identical_logprobs() {
    let model = fixture("gqa_sliding");
    let vocab = model.config().vocab_size;
    let base = prompt(11, 17, vocab);
    let mut longer = base.clone();
    longer.extend(prompt(12, 6, vocab));
    let req = |p: &Vec<u32>| GenerationRequest {
        logprobs: Some(5),
        ..GenerationRequest::new(p.clone(), 8)
    };

    // cold engine, prefix cache off
    let cold = Engine::start(
        model.clone(),
        None,
        EngineConfig {
            prefix_cache_bytes: 0,
            ..small_blocks()
        },
    )
    .unwrap();
    let cold_base = collect(cold.submit(req(&base)).unwrap().collect(), 1);
    let cold_longer = collect(cold.submit(req(&longer)).unwrap().collect(), 1);
    assert_eq!(cold_longer.usage.unwrap().cached_tokens, 0);
    assert_eq!(cold.metrics().prefix_cache_hit_tokens_total, 0);

    let warm = Engine::start(model.clone(), None, small_blocks()).unwrap();
    let first = collect(warm.submit(req(&base)).unwrap().collect(), 1);
    assert_eq!(first.usage.unwrap().cached_tokens, 0);
    let h = warm.submit(req(&longer)).unwrap();
    let second = collect(h.collect(), 1);
    // 17 tokens cached as 4 blocks of 4
    assert_eq!(*h.cached_prompt_tokens.get().unwrap(), 16);
    assert_eq!(second.usage.unwrap().cached_tokens, 16);
    // the same prompt again: all but the last token's block... (22 of 23 usable -> 20)
    let third = collect(warm.submit(req(&longer)).unwrap().collect(), 1);
    assert_eq!(third.usage.unwrap().cached_tokens, 20);
    assert_eq!(warm.metrics().prefix_cache_hit_tokens_total, 36);
    assert!(warm.metrics().prefix_cache_bytes > 0);

    for (got, want) in [
        (&first, &cold_base),
        (&second, &cold_longer),
        (&third, &cold_longer),
    ] {
        assert_eq!(got.tokens, want.tokens);
        for (a, b) in got.logprobs[0].iter().zip(&want.logprobs[0]) {
            assert_eq!(a.token, b.token);
            assert!((a.logprob - b.logprob).abs() <= 1e-5, "{a:?} vs {b:?}");
            for (x, y) in a.top.iter().zip(&b.top) {
                assert_eq!(x.0, y.0);
                assert!((x.1 - y.1).abs() <= 1e-5);
            }
        }
    }
    // and the cold run's logprobs are those of the model's own forward
    let ids = Tensor::new(longer.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let out = model.forward(&ids, None, &Default::default()).unwrap();
    let last: Vec<f32> = out
        .logits
        .unwrap()
        .narrow(1, longer.len() - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = zaya_engine::log_softmax_top(&last, cold_longer.tokens[0][0], 5);
    let got = &cold_longer.logprobs[0][0];
    assert_eq!(got.token, want.token);
    assert!((got.logprob - want.logprob).abs() <= 1e-4);
    assert_eq!(
        got.top.iter().map(|t| t.0).collect::<Vec<_>>(),
        want.top.iter().map(|t| t.0).collect::<Vec<_>>()
    );
}

#[test]
fn n_choices_share_prefill_and_use_seed_plus_index() {
    let model = fixture("mha_bias");
    let vocab = model.config().vocab_size;
    let p = prompt(3, 10, vocab);
    let engine = Engine::start(model, None, small_blocks()).unwrap();
    let sampling = SamplingParams {
        temperature: 0.9,
        top_k: 20,
        seed: 40,
        ..Default::default()
    };
    let together = collect(
        engine
            .submit(GenerationRequest {
                n: 3,
                sampling: sampling.clone(),
                ..GenerationRequest::new(p.clone(), 10)
            })
            .unwrap()
            .collect(),
        3,
    );
    assert_eq!(together.usage.unwrap().completion_tokens, 30);
    for i in 0..3 {
        let alone = collect(
            engine
                .submit(GenerationRequest {
                    sampling: SamplingParams {
                        seed: 40 + i as u64,
                        ..sampling.clone()
                    },
                    ..GenerationRequest::new(p.clone(), 10)
                })
                .unwrap()
                .collect(),
            1,
        );
        assert_eq!(together.tokens[i], alone.tokens[0], "choice {i}");
    }
    assert_ne!(together.tokens[0], together.tokens[1]);
}

#[test]
fn stop_ids_strings_and_text_on_the_default_model() {
    let (model, tok) = default_model();
    let engine = Engine::start(model.clone(), Some(tok.clone()), EngineConfig::default()).unwrap();
    let p = tok.encode("The quick brown fox", true).unwrap();
    let free = collect(
        engine
            .submit(GenerationRequest::new(p.clone(), 24))
            .unwrap()
            .collect(),
        1,
    );
    assert_eq!(free.tokens[0], solo_greedy(&model, &p, 24));
    assert_eq!(free.text[0], tok.decode(&free.tokens[0], true).unwrap());
    assert!(free.text[0].chars().count() > 4, "{:?}", free.text[0]);

    // a stop string from the middle of that text: output ends right before it
    let text = &free.text[0];
    let mid = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[mid..].chars().take(3).collect();
    let cut = text.find(&stop).unwrap();
    let stopped = collect(
        engine
            .submit(GenerationRequest {
                stop_strings: vec![stop.clone()],
                ..GenerationRequest::new(p.clone(), 24)
            })
            .unwrap()
            .collect(),
        1,
    );
    assert_eq!(stopped.finish[0], Some(FinishReason::Stop));
    assert_eq!(stopped.text[0], text[..cut], "stop string {stop:?}");

    // a stop id: the 5th generated token; it is reported but adds no text
    let stop_id = free.tokens[0][4];
    let first = free.tokens[0].iter().position(|&t| t == stop_id).unwrap();
    let by_id = collect(
        engine
            .submit(GenerationRequest {
                stop_token_ids: vec![stop_id],
                ..GenerationRequest::new(p.clone(), 24)
            })
            .unwrap()
            .collect(),
        1,
    );
    assert_eq!(by_id.finish[0], Some(FinishReason::Stop));
    assert_eq!(by_id.tokens[0], free.tokens[0][..=first]);
    assert_eq!(
        by_id.text[0],
        tok.decode(&free.tokens[0][..first], true).unwrap()
    );
}

/// Allows exactly one token sequence, then is finished.
struct Fixed(Vec<u32>);
struct FixedState(Vec<u32>, usize);
impl ConstraintFactory for Fixed {
    fn start(&self) -> Result<Box<dyn TokenConstraint>, String> {
        Ok(Box::new(FixedState(self.0.clone(), 0)))
    }
}
impl TokenConstraint for FixedState {
    fn mask(&mut self, allowed: &mut [bool]) -> Result<(), String> {
        let want = *self.0.get(self.1).ok_or("past the end")? as usize;
        for (i, a) in allowed.iter_mut().enumerate() {
            *a = i == want;
        }
        Ok(())
    }
    fn commit(&mut self, token: u32) -> Result<(), String> {
        if self.0.get(self.1) != Some(&token) {
            return Err(format!("unexpected {token}"));
        }
        self.1 += 1;
        Ok(())
    }
    fn is_finished(&self) -> bool {
        self.1 == self.0.len()
    }
}

#[test]
fn constraint_masks_and_finishes() {
    let model = fixture("conv_k3");
    let engine = Engine::start(model, None, small_blocks()).unwrap();
    let forced = vec![5u32, 9, 9, 2, 40];
    let c = collect(
        engine
            .submit(GenerationRequest {
                constraint: Some(Arc::new(Fixed(forced.clone()))),
                logprobs: Some(2),
                n: 2,
                sampling: SamplingParams {
                    temperature: 1.0,
                    ..Default::default()
                },
                ..GenerationRequest::new(vec![3, 4, 5], 50)
            })
            .unwrap()
            .collect(),
        2,
    );
    for i in 0..2 {
        assert_eq!(c.tokens[i], forced);
        assert_eq!(c.finish[i], Some(FinishReason::Stop));
        // everything else masked: the forced token has all the mass
        for l in &c.logprobs[i] {
            assert_eq!(l.logprob, 0.0);
            assert_eq!(l.top[1].1, f32::NEG_INFINITY);
        }
    }
}

#[test]
fn cancel_and_drop_free_rows_and_engine_keeps_serving() {
    let model = fixture("gqa_sliding");
    let engine = Engine::start(model.clone(), None, small_blocks()).unwrap();
    let long = GenerationRequest::new(vec![1, 2, 3], 400);
    let h = engine.submit(long.clone()).unwrap();
    // wait for the first token, then cancel
    match h.recv().unwrap() {
        Event::Token { .. } => {}
        e => panic!("expected a token, got {e:?}"),
    }
    h.cancel();
    let rest = h.collect();
    let fin = rest
        .iter()
        .find_map(|e| match e {
            Event::Finished { reason, .. } => Some(*reason),
            _ => None,
        })
        .unwrap();
    assert_eq!(fin, FinishReason::Cancelled);
    assert!(matches!(rest.last(), Some(Event::Done { .. })));
    assert!(rest.len() < 50, "cancel took {} events", rest.len());

    // dropping a handle cancels too
    let dropped = engine.submit(long).unwrap();
    let _ = dropped.recv();
    drop(dropped);
    let mut idle = false;
    for _ in 0..2000 {
        let m = engine.metrics();
        if m.running == 0 && m.running_rows == 0 && m.waiting == 0 {
            idle = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(idle, "rows still running: {:?}", engine.metrics());
    let c = collect(
        engine
            .submit(GenerationRequest::new(vec![7, 8], 4))
            .unwrap()
            .collect(),
        1,
    );
    assert_eq!(c.tokens[0], solo_greedy(&model, &[7, 8], 4));
}

#[test]
fn bad_requests_get_typed_errors() {
    let model = fixture("gqa_sliding");
    let max_pos = model.config().max_position_embeddings;
    let engine = Engine::start(model, None, small_blocks()).unwrap();
    let ok = GenerationRequest::new(vec![1, 2], 3);
    let cases: Vec<(GenerationRequest, &str)> = vec![
        (GenerationRequest::new(vec![], 3), "prompt"),
        (GenerationRequest::new(vec![1, 96], 3), "position 1"),
        (GenerationRequest::new(vec![1; max_pos], 3), "context"),
        (GenerationRequest { n: 0, ..ok.clone() }, "n:"),
        (GenerationRequest::new(vec![1, 2], 0), "max_tokens"),
        (
            GenerationRequest {
                logprobs: Some(21),
                ..ok.clone()
            },
            "logprobs",
        ),
        (
            GenerationRequest {
                stop_strings: vec!["x".into()],
                ..ok.clone()
            },
            "tokenizer",
        ),
        (
            GenerationRequest {
                sampling: SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                ..ok.clone()
            },
            "temperature",
        ),
        (
            GenerationRequest {
                sampling: SamplingParams {
                    temperature: 1.0,
                    top_p: 2.0,
                    ..Default::default()
                },
                ..ok.clone()
            },
            "top_p",
        ),
    ];
    for (req, what) in cases {
        match engine.submit(req) {
            Err(SubmitError::InvalidRequest(m)) => assert!(m.contains(what), "{what}: {m}"),
            other => panic!("{what}: expected InvalidRequest, got {other:?}"),
        }
    }
    // still serving
    let c = collect(engine.submit(ok.clone()).unwrap().collect(), 1);
    assert_eq!(c.tokens[0].len(), 3);
    engine.shutdown(true);
    assert!(matches!(engine.submit(ok), Err(SubmitError::ShutDown)));
}

#[test]
fn queue_bound_and_shutdown_without_drain_cancel() {
    let model = fixture("gqa_sliding");
    let engine = Engine::start(
        model,
        None,
        EngineConfig {
            max_running: 1,
            max_waiting: 2,
            ..small_blocks()
        },
    )
    .unwrap();
    let long = GenerationRequest::new(vec![1, 2, 3], 500);
    let running = engine.submit(long.clone()).unwrap();
    let _ = running.recv(); // admitted and decoding
    let q1 = engine.submit(long.clone()).unwrap();
    let q2 = engine.submit(long.clone()).unwrap();
    assert!(matches!(
        engine.submit(long.clone()),
        Err(SubmitError::QueueFull)
    ));
    assert_eq!(engine.metrics().waiting, 2);
    engine.shutdown(false);
    for h in [&running, &q1, &q2] {
        let events = h.collect();
        assert!(events.iter().any(|e| matches!(
            e,
            Event::Finished {
                reason: FinishReason::Cancelled,
                ..
            }
        )));
        assert!(matches!(events.last(), Some(Event::Done { .. })));
    }
}

#[test]
fn engine_config_is_validated() {
    let model = fixture("gqa_sliding");
    for cfg in [
        EngineConfig {
            prefix_block: 0,
            ..Default::default()
        },
        EngineConfig {
            max_running: 0,
            ..Default::default()
        },
    ] {
        assert!(Engine::start(model.clone(), None, cfg).is_err());
    }
}

/// Batch invariance on the default model: 24 requests (different lengths, some joining
/// while others decode, more rows than one decode group) each produce exactly the tokens
/// of the same request run alone on the engine, and match zaya's own generate.
#[test]
fn batch_invariance_on_the_default_model() {
    let (model, _tok) = default_model();
    let vocab = model.config().vocab_size;
    let cfg = EngineConfig {
        prefix_cache_bytes: 0,
        ..Default::default()
    };
    let prompts: Vec<Vec<u32>> = (0..24)
        .map(|i| prompt(100 + i as u64, 1 + (i * 37) % 150, vocab))
        .collect();
    let max_new = |i: usize| 6 + i % 9;

    let solo_engine = Engine::start(model.clone(), None, cfg.clone()).unwrap();
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            collect(
                solo_engine
                    .submit(GenerationRequest::new(p.clone(), max_new(i)))
                    .unwrap()
                    .collect(),
                1,
            )
            .tokens
            .remove(0)
        })
        .collect();
    solo_engine.shutdown(true);

    let engine = Engine::start(model.clone(), None, cfg).unwrap();
    let mut handles = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        handles.push(
            engine
                .submit(GenerationRequest::new(p.clone(), max_new(i)))
                .unwrap(),
        );
        if i % 6 == 5 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for (i, h) in handles.iter().enumerate() {
        let c = collect(h.collect(), 1);
        assert_eq!(
            c.tokens[0], solo[i],
            "request {i}: batched differs from solo"
        );
    }
    // and the engine's solo run is zaya's generate (prefill in one call there)
    for i in [0usize, 5, 17] {
        assert_eq!(
            solo[i],
            solo_greedy(&model, &prompts[i], max_new(i)),
            "request {i}"
        );
    }
}
