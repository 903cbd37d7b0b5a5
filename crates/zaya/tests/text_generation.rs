//! Generation from text: sampling through the generation loop (reproducible, per-row
//! seeds in a batch), streaming callbacks, stop strings across token boundaries.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use zaya::generation::{generate, GenerateOptions, Greedy, TextChooser};
use zaya::sampling::SamplingParams;
use zaya::text::ZayaTokenizer;
use zaya::weights::{save_checkpoint, Layout};
use zaya::{ZayaConfig, ZayaModel};

fn tokenizer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/text/tokenizer")
}

/// A random model with the fixture tokenizer's vocabulary.
fn text_model(tag: &str) -> (ZayaModel, ZayaTokenizer) {
    let tok = ZayaTokenizer::from_dir(tokenizer_dir()).unwrap();
    let cfg = ZayaConfig::from_json(&serde_json::json!({
        "vocab_size": tok.vocab_size(), "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "moe_intermediate_size": 16, "num_experts": 2, "router_hidden_size": 8,
        "initializer_range": 0.5, "eos_token_id": 106, "max_position_embeddings": 256
    }))
    .unwrap();
    // the directory goes when this returns: the model has been read (or mapped) from it by then
    let (_guard, dir) = common::temp_dir(tag);
    let weights = zaya::init::random_weights(&cfg, 11).unwrap();
    save_checkpoint(&dir, &cfg, &weights, Layout::Native).unwrap();
    (
        ZayaModel::load(&dir, DType::F32, &Device::Cpu).unwrap(),
        tok,
    )
}

fn params(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: 50,
        seed,
        ..Default::default()
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_rows_match_their_solo_runs() {
    let (model, tok) = text_model("sampling");
    let prompts = vec![
        tok.encode("In the beginning", true).unwrap(),
        tok.encode("Hello there, how are you doing today?", true)
            .unwrap(),
    ];
    let opts = GenerateOptions {
        max_new_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    let run = |prompts: &[Vec<u32>], seed: u64| {
        let mut chooser =
            TextChooser::new(prompts.len(), &params(seed), None, &[], Box::new(|_, _| {})).unwrap();
        generate(&model, prompts, &opts, &mut chooser, &mut |_, _| {})
            .unwrap()
            .sequences
    };
    let a = run(&prompts, 7);
    assert_eq!(a, run(&prompts, 7), "same seed, same tokens");
    assert_ne!(a, run(&prompts, 8), "another seed draws differently");
    // row r of a batch samples with seed + r: equal to running it alone with that seed
    assert_eq!(a[0], run(&prompts[..1], 7)[0]);
    assert_eq!(a[1], run(&prompts[1..], 8)[0]);
    // greedy through the sampler equals plain argmax
    let mut chooser = TextChooser::new(
        2,
        &SamplingParams::default(),
        None,
        &[],
        Box::new(|_, _| {}),
    )
    .unwrap();
    let g = generate(&model, &prompts, &opts, &mut chooser, &mut |_, _| {}).unwrap();
    let h = generate(&model, &prompts, &opts, &mut Greedy, &mut |_, _| {}).unwrap();
    assert_eq!(g.sequences, h.sequences);
}

#[test]
fn streamed_text_equals_the_decoded_tokens_and_stop_strings_cut_it() {
    let (model, tok) = text_model("stream");
    let prompts = vec![tok.encode("The light", true).unwrap()];
    let opts = GenerateOptions {
        max_new_tokens: 16,
        ignore_eos: true,
        ..Default::default()
    };
    let mut streamed = String::new();
    let mut chooser = TextChooser::new(
        1,
        &params(3),
        Some(&tok),
        &[],
        Box::new(|_, t| streamed.push_str(t)),
    )
    .unwrap();
    let out = generate(&model, &prompts, &opts, &mut chooser, &mut |_, _| {}).unwrap();
    chooser.finish().unwrap();
    let full = chooser.text(0).to_string();
    drop(chooser);
    assert_eq!(streamed, full);
    assert_eq!(full, tok.decode(&out.sequences[0], true).unwrap());
    assert!(full.chars().count() >= 4, "need some text to cut: {full:?}");

    // A stop string taken from the middle of that text, crossing a token boundary when
    // possible: generation stops on the token that completes it and the text ends before it.
    let chars: Vec<char> = full.chars().collect();
    let start = chars.len() / 2 - 1;
    let stop: String = chars[start..start + 2].iter().collect();
    let mut streamed = String::new();
    let mut chooser = TextChooser::new(
        1,
        &params(3),
        Some(&tok),
        std::slice::from_ref(&stop),
        Box::new(|_, t| streamed.push_str(t)),
    )
    .unwrap();
    let out2 = generate(&model, &prompts, &opts, &mut chooser, &mut |_, _| {}).unwrap();
    chooser.finish().unwrap();
    let cut = chooser.text(0).to_string();
    drop(chooser);
    let expected_end = full.find(&stop).unwrap();
    assert_eq!(cut, full[..expected_end]);
    assert_eq!(streamed, cut, "nothing of the stop string was streamed");
    assert!(
        out2.sequences[0].len() < out.sequences[0].len() || expected_end + stop.len() >= full.len()
    );
    assert_eq!(out2.finish_reasons[0], zaya::generation::FinishReason::Stop);
    assert_eq!(
        out2.sequences[0][..],
        out.sequences[0][..out2.sequences[0].len()]
    );
}

#[test]
fn batched_generation_stops_each_row_on_its_own() {
    let (model, tok) = text_model("batch");
    let prompts = vec![
        tok.encode("a", true).unwrap(),
        tok.encode("a much longer prompt than the first one", true)
            .unwrap(),
        tok.encode("middle sized prompt", true).unwrap(),
    ];
    // Greedy solo runs give each row's tokens; use the second token of row 1 as an EOS so
    // row 1 stops early while the others go on.
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let o = GenerateOptions {
                max_new_tokens: 8,
                ignore_eos: true,
                ..Default::default()
            };
            generate(
                &model,
                std::slice::from_ref(p),
                &o,
                &mut Greedy,
                &mut |_, _| {},
            )
            .unwrap()
            .sequences[0]
                .clone()
        })
        .collect();
    let eos = solo[1][1];
    let opts = GenerateOptions {
        max_new_tokens: 8,
        eos_token_ids: vec![eos],
        ..Default::default()
    };
    let mut seen = vec![Vec::new(); 3];
    let out = generate(&model, &prompts, &opts, &mut Greedy, &mut |r, t| {
        seen[r].push(t)
    })
    .unwrap();
    for (r, s) in solo.iter().enumerate() {
        let stop_at = s.iter().position(|&t| t == eos).map_or(s.len(), |p| p + 1);
        assert_eq!(out.sequences[r], s[..stop_at], "row {r}");
        assert_eq!(seen[r], out.sequences[r], "row {r} streamed tokens");
    }
    assert!(out.sequences[1].len() <= 2);
}
