//! The per-row cache seam: rows at different positions decoded together equal each row run
//! alone; forks (snapshots) continue exactly like the uninterrupted run and never see the
//! original's later tokens; buffers grow and sliding windows compact without changing
//! results; a cache of another config is an error.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, max_abs_diff, FIXTURES};
use zaya::attention::AttnImplementation;
use zaya::{ForwardOptions, HybridCache, ZayaModel};

fn load(name: &str) -> ZayaModel {
    ZayaModel::load(fixture_dir(name), DType::F32, &Device::Cpu).unwrap()
}

fn ids(tokens: &[u32]) -> Tensor {
    Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Last-position logits `[V]` of feeding `tokens` after `cache`.
fn step(model: &ZayaModel, cache: &mut HybridCache, tokens: &[u32]) -> Tensor {
    step_with(model, cache, tokens, AttnImplementation::default())
}

fn step_with(
    model: &ZayaModel,
    cache: &mut HybridCache,
    tokens: &[u32],
    attn: AttnImplementation,
) -> Tensor {
    let out = model
        .forward(
            &ids(tokens),
            Some(cache),
            &ForwardOptions {
                logits_to_keep: 1,
                attn,
                ..Default::default()
            },
        )
        .unwrap();
    out.logits.unwrap().flatten_all().unwrap()
}

fn prompt(seed: u32, len: usize, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 1 + (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 7) % (vocab as u32 - 1))
        .collect()
}

#[test]
fn rows_at_different_positions_equal_each_row_alone() {
    for (name, attn) in FIXTURES.iter().flat_map(|n| {
        [
            (n, AttnImplementation::Eager),
            (n, AttnImplementation::Sdpa),
        ]
    }) {
        let model = load(name);
        let vocab = model.config().vocab_size;
        // 11 rows: more than one GEMV group, lengths past the sliding window, one empty row
        let lens = [0usize, 1, 3, 5, 6, 9, 13, 2, 17, 4, 8];
        let prompts: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| prompt(i as u32, l, vocab))
            .collect();
        let mut solo: Vec<HybridCache> = Vec::new();
        let mut rows: Vec<HybridCache> = Vec::new();
        for p in &prompts {
            let mut c = HybridCache::new(model.config());
            if !p.is_empty() {
                step_with(&model, &mut c, p, attn);
            }
            rows.push(c.fork().unwrap());
            solo.push(c);
        }
        for round in 0..6u32 {
            let tokens: Vec<u32> = (0..lens.len() as u32)
                .map(|i| 1 + (i * 7 + round * 3) % (vocab as u32 - 1))
                .collect();
            let want: Vec<Tensor> = solo
                .iter_mut()
                .zip(&tokens)
                .map(|(c, &t)| step_with(&model, c, &[t], attn))
                .collect();
            // even rounds: every row in one call; odd rounds: 4 rows, then the other 7 (a
            // row's result must not depend on the call it is in)
            assert!(lens.len() <= ZayaModel::INVARIANT_DECODE_ROWS);
            let split = if round % 2 == 0 { lens.len() } else { 4 };
            let (a, b) = rows.split_at_mut(split);
            for (part, offset) in [(a, 0usize), (b, split)] {
                if part.is_empty() {
                    continue;
                }
                let mut refs: Vec<&mut HybridCache> = part.iter_mut().collect();
                let n = refs.len();
                let got = model
                    .decode_rows(&tokens[offset..offset + n], &mut refs, attn)
                    .unwrap();
                for r in 0..n {
                    let g = got.get(r).unwrap();
                    let d = max_abs_diff(&g, &want[offset + r]);
                    assert!(
                        d <= 1e-5,
                        "{name} {attn:?} round {round} row {}: max diff {d}",
                        offset + r
                    );
                    assert_eq!(
                        d,
                        0.0,
                        "{name} {attn:?} round {round} row {}: not bit-identical to the solo decode",
                        offset + r
                    );
                }
            }
            for (s, r) in solo.iter().zip(&rows) {
                assert_eq!(s.seq_len(), r.seq_len());
                for (ls, lr) in s.layers().iter().zip(r.layers()) {
                    assert_eq!(ls.kv_len(), lr.kv_len());
                }
            }
        }
    }
}

#[test]
fn fork_continues_like_the_uninterrupted_run_and_is_independent() {
    for name in FIXTURES {
        let model = load(name);
        let vocab = model.config().vocab_size;
        let p = prompt(5, 12, vocab);
        let x = prompt(6, 7, vocab);
        let y = prompt(7, 9, vocab);

        let mut full = HybridCache::new(model.config());
        step(&model, &mut full, &p);
        let want = step(&model, &mut full, &x);

        let mut original = HybridCache::new(model.config());
        step(&model, &mut original, &p);
        let mut snapshot = original.fork().unwrap();
        // the original moves on (writing into its buffers in place)...
        step(&model, &mut original, &y);
        step(&model, &mut original, &[3]);
        // ...and the snapshot continues as if nothing happened
        let got = step(&model, &mut snapshot, &x);
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{name}");
        assert_eq!(snapshot.seq_len(), p.len() + x.len());
        assert_eq!(original.seq_len(), p.len() + y.len() + 1);
    }
}

#[test]
fn long_decode_through_buffer_growth_and_window_compaction_matches_no_cache() {
    let model = load("gqa_sliding"); // window 5
    let vocab = model.config().vocab_size;
    let seq = prompt(9, 70, vocab);
    let mut cache = HybridCache::new(model.config());
    step(&model, &mut cache, &seq[..3]);
    let mut last = None;
    for (i, &t) in seq[3..].iter().enumerate() {
        if i % 2 == 0 {
            last = Some(step(&model, &mut cache, &[t]));
        } else {
            let mut rows = [&mut cache];
            let l = model
                .decode_rows(&[t], &mut rows, AttnImplementation::Sdpa)
                .unwrap();
            last = Some(l.flatten_all().unwrap());
        }
    }
    let w = model.config().sliding_window.unwrap();
    for (i, l) in cache.layers().iter().enumerate() {
        let want = match model.config().layer_types[i] {
            zaya::LayerType::Hybrid => seq.len(),
            zaya::LayerType::HybridSliding => w - 1,
        };
        assert_eq!(l.kv_len(), want, "layer {i}");
        assert!(l.bytes() > 0);
    }
    let out = model
        .forward(&ids(&seq), None, &ForwardOptions::default())
        .unwrap()
        .logits
        .unwrap();
    let want = out
        .narrow(1, seq.len() - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap();
    let d = max_abs_diff(&last.unwrap(), &want);
    assert!(d <= 1e-4, "max diff {d}");
}

#[test]
fn cache_of_another_config_is_an_error() {
    let a = load("gqa_sliding");
    let b = load("conv_k3");
    let mut foreign = HybridCache::new(b.config());
    assert_ne!(a.config().num_hidden_layers, b.config().num_hidden_layers);
    let e = a
        .forward(
            &ids(&[1, 2]),
            Some(&mut foreign),
            &ForwardOptions::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("another config"), "{e}");
    let mut rows = [&mut foreign];
    let e = a
        .decode_rows(&[1], &mut rows, AttnImplementation::Eager)
        .unwrap_err();
    assert!(e.to_string().contains("another config"), "{e}");
    // bad token and mismatched lengths are errors too
    let mut own = HybridCache::new(a.config());
    let mut rows = [&mut own];
    assert!(a
        .decode_rows(&[10_000], &mut rows, AttnImplementation::Eager)
        .is_err());
    assert!(a
        .decode_rows(&[1, 2], &mut rows, AttnImplementation::Eager)
        .is_err());
}
