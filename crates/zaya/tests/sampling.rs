//! Logits processors, sampler and stop checker. Expected distributions are computed by hand
//! from the definitions (transformers' logits processors, OpenAI penalties).

use zaya::sampling::{
    softmax, LogitsProcessor, MinP, PresenceFrequencyPenalty, RepetitionPenalty, Sampler,
    SamplingError, SamplingParams, StopChecker, StopReason, Temperature, TopK, TopP,
};

fn assert_probs(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() < 1e-6,
            "p[{i}] = {g}, want {w} (all: {got:?})"
        );
    }
}

/// Distribution after one processor.
fn dist(p: &mut dyn LogitsProcessor, logits: &[f32], context: &[u32]) -> Vec<f64> {
    let mut l = logits.to_vec();
    p.process(&mut l, context);
    softmax(&l)
}

/// Logits whose softmax is exactly `probs`.
fn log_probs(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

const P4: [f64; 4] = [0.5, 0.3, 0.15, 0.05];

#[test]
fn temperature_divides_logits() {
    let logits = [1.0f32, 2.0, 3.0, 0.5];
    let e: Vec<f64> = [0.5f64, 1.0, 1.5, 0.25].iter().map(|x| x.exp()).collect();
    let z: f64 = e.iter().sum();
    let want: Vec<f64> = e.iter().map(|x| x / z).collect();
    assert_probs(
        &dist(&mut Temperature::new(2.0).unwrap(), &logits, &[]),
        &want,
    );
    assert!(Temperature::new(0.0).is_err());
    assert!(Temperature::new(f32::NAN).is_err());
}

#[test]
fn top_k_keeps_k_largest_and_ties() {
    let logits = [1.0f32, 3.0, 2.0, 3.0, 0.0];
    // k = 2: the two 3s.
    assert_probs(
        &dist(&mut TopK::new(2).unwrap(), &logits, &[]),
        &[0.0, 0.5, 0.0, 0.5, 0.0],
    );
    // k = 3: 3, 2, 3.
    let (e3, e2) = (3f64.exp(), 2f64.exp());
    let z = 2.0 * e3 + e2;
    assert_probs(
        &dist(&mut TopK::new(3).unwrap(), &logits, &[]),
        &[0.0, e3 / z, e2 / z, e3 / z, 0.0],
    );
    // k = 1 with a tie at the top keeps both (HF compares with the k-th value).
    assert_probs(
        &dist(&mut TopK::new(1).unwrap(), &logits, &[]),
        &[0.0, 0.5, 0.0, 0.5, 0.0],
    );
    // k larger than the vocabulary: unchanged.
    let l = log_probs(&P4);
    assert_probs(&dist(&mut TopK::new(10).unwrap(), &l, &[]), &P4);
    assert!(TopK::new(0).is_err());
}

#[test]
fn top_p_keeps_the_smallest_nucleus() {
    let l = log_probs(&P4);
    // Ascending cumulative: 0.05, 0.20, 0.50, 1.00. p = 0.7 drops cum <= 0.3: 0.05 and 0.15.
    assert_probs(
        &dist(&mut TopP::new(0.7).unwrap(), &l, &[]),
        &[0.625, 0.375, 0.0, 0.0],
    );
    // p = 0.9 drops cum <= 0.1: only 0.05.
    assert_probs(
        &dist(&mut TopP::new(0.9).unwrap(), &l, &[]),
        &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0],
    );
    // p = 0 keeps only the most likely token, p = 1 keeps everything.
    assert_probs(
        &dist(&mut TopP::new(0.0).unwrap(), &l, &[]),
        &[1.0, 0.0, 0.0, 0.0],
    );
    assert_probs(&dist(&mut TopP::new(1.0).unwrap(), &l, &[]), &P4);
    assert!(TopP::new(1.5).is_err());
}

#[test]
fn min_p_scales_with_the_top_probability() {
    let l = log_probs(&P4);
    // Threshold 0.4 * 0.5 = 0.2: keeps 0.5 and 0.3.
    assert_probs(
        &dist(&mut MinP::new(0.4).unwrap(), &l, &[]),
        &[0.625, 0.375, 0.0, 0.0],
    );
    // Threshold 0.125: keeps 0.5, 0.3, 0.15.
    assert_probs(
        &dist(&mut MinP::new(0.25).unwrap(), &l, &[]),
        &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0],
    );
    // min_p = 1 keeps only the top token.
    assert_probs(
        &dist(&mut MinP::new(1.0).unwrap(), &l, &[]),
        &[1.0, 0.0, 0.0, 0.0],
    );
    assert!(MinP::new(-0.1).is_err());
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative() {
    let mut l = vec![2.0f32, -1.0, 0.5, 3.0];
    // Token 1 appears twice but is penalised once; id 9 is outside the vocabulary.
    RepetitionPenalty::new(2.0)
        .unwrap()
        .process(&mut l, &[0, 1, 1, 3, 9]);
    assert_eq!(l, vec![1.0, -2.0, 0.5, 1.5]);
    let e: Vec<f64> = [1.0f64, -2.0, 0.5, 1.5].iter().map(|x| x.exp()).collect();
    let z: f64 = e.iter().sum();
    let want: Vec<f64> = e.iter().map(|x| x / z).collect();
    assert_probs(&softmax(&l), &want);
    assert!(RepetitionPenalty::new(0.0).is_err());
}

#[test]
fn presence_and_frequency_penalties_count_generated_tokens() {
    let mut p = PresenceFrequencyPenalty::new(0.5, 0.25).unwrap();
    p.begin(1);
    let mut l = vec![1.0f32; 6];
    // Context: prompt [5], generated [0, 1, 1].
    p.process(&mut l, &[5, 0, 1, 1]);
    // token 0: 1 - (1*0.25 + 0.5); token 1: 1 - (2*0.25 + 0.5); token 5 (prompt) untouched.
    assert_eq!(l, vec![0.25, 0.0, 1.0, 1.0, 1.0, 1.0]);
    // Negative penalties encourage repeats.
    let mut q = PresenceFrequencyPenalty::new(-1.0, 0.0).unwrap();
    let mut l = vec![0.0f32; 3];
    q.process(&mut l, &[2, 2]);
    assert_eq!(l, vec![0.0, 0.0, 1.0]);
    assert!(PresenceFrequencyPenalty::new(f32::INFINITY, 0.0).is_err());
}

#[test]
fn sampler_chains_processors_in_transformers_order() {
    // Repetition penalty, then temperature 0.5, then top-k 2.
    let params = SamplingParams {
        temperature: 0.5,
        top_k: 2,
        repetition_penalty: 2.0,
        seed: 1,
        ..Default::default()
    };
    let mut s = Sampler::new(&params).unwrap();
    let l = s.process(&[4.0, 3.0, 1.0, -1.0], &[0]);
    // 4 -> 2 (penalty) -> 4 (temperature); 3 -> 6; top-2 keeps 6 and 4.
    let (a, b) = (4f64.exp(), 6f64.exp());
    assert_probs(&softmax(&l), &[a / (a + b), b / (a + b), 0.0, 0.0]);
}

#[test]
fn greedy_is_argmax_after_penalties() {
    let mut s = Sampler::new(&SamplingParams::default()).unwrap();
    assert_eq!(s.sample(&[0.1, 2.0, 2.0, -5.0], &[]).unwrap(), 1);
    let mut s = Sampler::new(&SamplingParams {
        repetition_penalty: 4.0,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.sample(&[0.1, 2.0, 1.0, -5.0], &[1]).unwrap(), 2);
}

#[test]
fn bad_logits_are_errors() {
    let mut s = Sampler::new(&SamplingParams::default()).unwrap();
    assert_eq!(
        s.sample(&[0.0, f32::NAN], &[]),
        Err(SamplingError::NanLogit { index: 1 })
    );
    assert_eq!(
        s.sample(&[f32::NEG_INFINITY; 3], &[]),
        Err(SamplingError::NothingToSample(3))
    );
    assert_eq!(s.sample(&[], &[]), Err(SamplingError::EmptyLogits));
    let bad = SamplingParams {
        temperature: -1.0,
        ..Default::default()
    };
    assert!(matches!(
        Sampler::new(&bad),
        Err(SamplingError::BadParameter {
            name: "temperature",
            ..
        })
    ));
}

fn draws(seed: u64, params: &SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
    let mut s = Sampler::new(&SamplingParams {
        seed,
        ..params.clone()
    })
    .unwrap();
    (0..n).map(|_| s.sample(logits, &[]).unwrap()).collect()
}

#[test]
fn seeded_sampling_is_reproducible() {
    let params = SamplingParams {
        temperature: 1.0,
        ..Default::default()
    };
    let l = log_probs(&P4);
    let a = draws(42, &params, &l, 500);
    assert_eq!(a, draws(42, &params, &l, 500));
    assert_ne!(a, draws(43, &params, &l, 500));
}

/// Pearson chi-square of `n` draws against `probs` (cells with p = 0 must be empty).
fn chi_square(samples: &[u32], probs: &[f64]) -> f64 {
    let n = samples.len() as f64;
    let mut counts = vec![0usize; probs.len()];
    for &s in samples {
        counts[s as usize] += 1;
    }
    let mut chi = 0.0;
    for (c, p) in counts.iter().zip(probs) {
        if *p == 0.0 {
            assert_eq!(*c, 0, "a token with probability 0 was drawn");
            continue;
        }
        let e = n * p;
        chi += (*c as f64 - e).powi(2) / e;
    }
    chi
}

#[test]
fn sampling_follows_the_distribution() {
    let l = log_probs(&P4);
    let n = 20_000;
    // 3 degrees of freedom: P(chi2 > 16.27) = 0.001.
    let plain = SamplingParams {
        temperature: 1.0,
        ..Default::default()
    };
    let chi = chi_square(&draws(7, &plain, &l, n), &P4);
    assert!(chi < 16.27, "chi2 = {chi}");
    // A wrong distribution is rejected by the same statistic.
    assert!(chi_square(&draws(7, &plain, &l, n), &[0.25; 4]) > 100.0);

    // Temperature 2: p ∝ sqrt(P4). 3 degrees of freedom.
    let hot = SamplingParams {
        temperature: 2.0,
        ..Default::default()
    };
    let r: Vec<f64> = P4.iter().map(|p| p.sqrt()).collect();
    let z: f64 = r.iter().sum();
    let want: Vec<f64> = r.iter().map(|x| x / z).collect();
    let chi = chi_square(&draws(8, &hot, &l, n), &want);
    assert!(chi < 16.27, "chi2 = {chi}");

    // top_p 0.7 → {0.625, 0.375}: 1 degree of freedom, P(chi2 > 10.83) = 0.001.
    let nucleus = SamplingParams {
        temperature: 1.0,
        top_p: 0.7,
        ..Default::default()
    };
    let chi = chi_square(&draws(9, &nucleus, &l, n), &[0.625, 0.375, 0.0, 0.0]);
    assert!(chi < 10.83, "chi2 = {chi}");
}

#[test]
fn stop_token_ids() {
    let s = StopChecker::new(vec![1, 106], vec![]).unwrap();
    assert_eq!(s.check_token(106), Some(StopReason::Token(106)));
    assert_eq!(s.check_token(5), None);
    assert!(StopChecker::new(vec![], vec!["".into()]).is_err());
}

#[test]
fn stop_strings_across_token_boundaries() {
    let mut s = StopChecker::new(vec![], vec!["<end_of_turn>".into(), "\n\nUser:".into()]).unwrap();
    assert_eq!(s.push_text("Hello "), None);
    assert_eq!(s.releasable(), 6);
    assert_eq!(s.push_text("<en"), None);
    // "<en" may begin a stop string: hold it back.
    assert_eq!(s.releasable(), 6);
    assert_eq!(s.push_text("d_of"), None);
    assert_eq!(
        s.push_text("_turn> tail"),
        Some(StopReason::String { index: 0, cut: 6 })
    );
    assert_eq!(&s.text()[..6], "Hello ");

    // The earliest match wins, whatever the list order.
    let mut s = StopChecker::new(vec![], vec!["b".into(), "a".into()]).unwrap();
    assert_eq!(
        s.push_text("xab"),
        Some(StopReason::String { index: 1, cut: 1 })
    );

    // Multi-byte text and a stop string split inside it.
    let mut s = StopChecker::new(vec![], vec!["é!".into()]).unwrap();
    assert_eq!(s.push_text("café"), None);
    assert_eq!(s.releasable(), "caf".len());
    assert_eq!(
        s.push_text("!"),
        Some(StopReason::String { index: 0, cut: 3 })
    );
    let mut s = StopChecker::new(vec![], vec!["é!".into()]).unwrap();
    assert_eq!(s.push_text("éa"), None);
    assert_eq!(s.releasable(), "éa".len());
}
