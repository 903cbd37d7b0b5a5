//! The fused attention backends (`sdpa`, `flex`) against the eager reference, forward and
//! gradients, over the mask situations the model produces (causal prefill, sliding window
//! shorter than the sequence, left padding with fully masked rows, chunked prefill, trimmed
//! sliding caches, decode, GQA and MHA, head dims that are not multiples of 8), plus the
//! flex built-ins against dense masks and packed documents against separate runs.

use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use zaya::attention::{
    self, attend, AttnImplementation, BlockMask, MaskMod, MaskSpec, ScoreMod, TileKind, TILE,
};

fn rand_tensor(rng: &mut StdRng, dims: &[usize], scale: f32) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    assert!(a.iter().all(|v| v.is_finite()), "non-finite output");
    Ok(a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs())))
}

struct Case {
    b: usize,
    nq: usize,
    nkv: usize,
    d: usize,
    spec: MaskSpec,
}

impl Case {
    fn new(
        b: usize,
        nq: usize,
        nkv: usize,
        d: usize,
        q_start: usize,
        q_len: usize,
        held: usize,
    ) -> Case {
        Case {
            b,
            nq,
            nkv,
            d,
            spec: MaskSpec {
                batch: b,
                q_start,
                q_len,
                kv_start: q_start - held,
                kv_len: held + q_len,
                window: None,
                key_padding: None,
                documents: None,
            },
        }
    }
    fn window(mut self, w: usize) -> Case {
        self.spec.window = Some(w);
        self
    }
    /// Left padding: row `i` starts with `pads[i]` padding tokens.
    fn left_pad(mut self, pads: &[usize]) -> Case {
        let len = self.spec.q_start + self.spec.q_len;
        self.spec.key_padding = Some(
            pads.iter()
                .map(|&p| (0..len).map(|i| i >= p).collect())
                .collect(),
        );
        self
    }
}

/// Forward (and, with `grads`, input gradients) of sdpa and flex against eager.
fn compare(case: &Case, rng: &mut StdRng, dtype: DType, grads: bool, label: &str) -> Result<()> {
    let (t, n) = (case.spec.q_len, case.spec.kv_len);
    let scale = 1.0 / (case.d as f64).sqrt();
    let q =
        Var::from_tensor(&rand_tensor(rng, &[case.b, case.nq, t, case.d], 1.5)?.to_dtype(dtype)?)?;
    let k =
        Var::from_tensor(&rand_tensor(rng, &[case.b, case.nkv, n, case.d], 1.5)?.to_dtype(dtype)?)?;
    let v =
        Var::from_tensor(&rand_tensor(rng, &[case.b, case.nkv, n, case.d], 1.0)?.to_dtype(dtype)?)?;
    let probe = rand_tensor(rng, &[case.b, case.nq, t, case.d], 1.0)?;
    let run = |backend: AttnImplementation| -> Result<(Tensor, Vec<Tensor>)> {
        let (o, probs) = attend(
            backend,
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &case.spec,
            scale,
            false,
        )?;
        assert!(probs.is_none());
        let mut gs = Vec::new();
        if grads {
            let g = o.to_dtype(DType::F32)?.mul(&probe)?.sum_all()?.backward()?;
            for x in [&q, &k, &v] {
                gs.push(
                    g.get(x.as_tensor())
                        .cloned()
                        .unwrap_or(x.as_tensor().zeros_like()?),
                );
            }
        }
        Ok((o.detach(), gs))
    };
    let (tol_f, tol_g) = match dtype {
        DType::F32 => (1e-5, 5e-5),
        _ => (3e-2, 6e-2),
    };
    let (oe, ge) = run(AttnImplementation::Eager)?;
    for backend in [AttnImplementation::Sdpa, AttnImplementation::Flex] {
        let (o, g) = run(backend)?;
        let d = max_abs_diff(&o, &oe)?;
        assert!(
            d <= tol_f,
            "{label} {backend:?} {dtype:?}: output differs by {d}"
        );
        for (i, (a, b)) in g.iter().zip(&ge).enumerate() {
            let d = max_abs_diff(a, b)?;
            assert!(
                d <= tol_g,
                "{label} {backend:?} {dtype:?}: gradient {i} differs by {d}"
            );
        }
    }
    Ok(())
}

#[test]
fn causal_prefill_mha_and_gqa() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    compare(
        &Case::new(2, 3, 3, 12, 0, 70, 0),
        &mut rng,
        DType::F32,
        true,
        "MHA causal",
    )?;
    compare(
        &Case::new(1, 8, 2, 20, 0, 130, 0),
        &mut rng,
        DType::F32,
        true,
        "GQA 4:1 causal",
    )?;
    compare(
        &Case::new(1, 8, 2, 20, 0, 70, 0),
        &mut rng,
        DType::BF16,
        true,
        "GQA 4:1 causal",
    )
}

#[test]
fn sliding_window_shorter_than_the_sequence() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    compare(
        &Case::new(1, 4, 2, 13, 0, 150, 0).window(17),
        &mut rng,
        DType::F32,
        true,
        "window 17",
    )?;
    compare(
        &Case::new(2, 2, 1, 8, 0, 100, 0).window(64),
        &mut rng,
        DType::F32,
        false,
        "window 64",
    )
}

#[test]
fn left_padding_with_fully_masked_rows() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    // Row 2's first 70 queries see only padding (fully masked, across a tile edge).
    let case = Case::new(3, 4, 1, 10, 0, 90, 0).left_pad(&[0, 5, 70]);
    compare(&case, &mut rng, DType::F32, true, "left padding")?;
    let case = Case::new(3, 4, 1, 10, 0, 90, 0)
        .left_pad(&[0, 5, 70])
        .window(30);
    compare(&case, &mut rng, DType::F32, true, "left padding + window")?;
    compare(
        &Case::new(2, 2, 2, 16, 0, 40, 0).left_pad(&[3, 20]),
        &mut rng,
        DType::BF16,
        true,
        "left padding",
    )
}

#[test]
fn chunked_prefill_and_trimmed_sliding_cache() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    // 40 cached tokens, 30 new ones.
    compare(
        &Case::new(2, 4, 2, 12, 40, 30, 40),
        &mut rng,
        DType::F32,
        true,
        "chunked prefill",
    )?;
    // Sliding layer whose cache kept W − 1 = 19 keys: kv_start = 81.
    compare(
        &Case::new(1, 4, 2, 12, 100, 5, 19).window(20),
        &mut rng,
        DType::F32,
        true,
        "trimmed sliding cache",
    )?;
    // Padding + continuation.
    compare(
        &Case::new(2, 2, 1, 9, 50, 20, 50).left_pad(&[0, 60]),
        &mut rng,
        DType::F32,
        true,
        "padded continuation",
    )
}

#[test]
fn decode_single_token() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    compare(
        &Case::new(2, 8, 2, 24, 99, 1, 99),
        &mut rng,
        DType::F32,
        true,
        "decode GQA",
    )?;
    compare(
        &Case::new(2, 3, 3, 7, 130, 1, 130).left_pad(&[0, 40]),
        &mut rng,
        DType::F32,
        true,
        "decode MHA padded",
    )?;
    compare(
        &Case::new(1, 4, 2, 12, 300, 1, 19).window(20),
        &mut rng,
        DType::F32,
        false,
        "decode sliding",
    )?;
    compare(
        &Case::new(1, 8, 2, 16, 77, 1, 77),
        &mut rng,
        DType::BF16,
        false,
        "decode bf16",
    )
}

#[test]
fn random_cases() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    for i in 0..10 {
        let nkv = rng.random_range(1..3);
        let g = [1, 2, 4][rng.random_range(0..3)];
        let d = [3, 8, 13][rng.random_range(0..3)];
        let b = rng.random_range(1..3);
        let t = rng.random_range(1..90);
        let held = if rng.random_bool(0.5) {
            0
        } else {
            rng.random_range(0..80)
        };
        let q_start = held
            + if rng.random_bool(0.3) {
                rng.random_range(0..30)
            } else {
                0
            };
        let mut case = Case::new(b, nkv * g, nkv, d, q_start, t, held);
        if rng.random_bool(0.4) {
            case = case.window(rng.random_range(1..70));
        }
        if rng.random_bool(0.4) {
            let pads: Vec<usize> = (0..b).map(|_| rng.random_range(0..q_start + t)).collect();
            case = case.left_pad(&pads);
        }
        let label = format!("random case {i}: {:?} d {d} g {g}", case.spec);
        compare(&case, &mut rng, DType::F32, i % 2 == 0, &label)?;
    }
    Ok(())
}

#[test]
fn fused_backends_fall_back_to_eager_for_probabilities() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let case = Case::new(1, 2, 1, 4, 0, 5, 0);
    let q = rand_tensor(&mut rng, &[1, 2, 5, 4], 1.0)?;
    let k = rand_tensor(&mut rng, &[1, 1, 5, 4], 1.0)?;
    let (_, probs) = attend(AttnImplementation::Sdpa, &q, &k, &k, &case.spec, 0.5, true)?;
    assert_eq!(probs.map(|p| p.dims().to_vec()), Some(vec![1, 2, 5, 5]));
    // A mask for a different shape is an error, not a panic.
    let wrong = Case::new(1, 2, 1, 4, 0, 6, 0);
    assert!(attention::sdpa(&q, &k, &k, &wrong.spec, 0.5).is_err());
    let mut bad_pad = Case::new(2, 2, 1, 4, 0, 5, 0).spec;
    bad_pad.key_padding = Some(vec![vec![true; 5]]);
    let q2 = rand_tensor(&mut rng, &[2, 2, 5, 4], 1.0)?;
    let k2 = rand_tensor(&mut rng, &[2, 1, 5, 4], 1.0)?;
    assert!(attention::sdpa(&q2, &k2, &k2, &bad_pad, 0.5).is_err());
    assert!(attend(
        AttnImplementation::Flex,
        &q2,
        &k2,
        &k2,
        &bad_pad,
        0.5,
        false
    )
    .is_err());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// flex

/// flex_attention vs the dense reference, forward and gradients, f32.
fn compare_flex(
    mask: &MaskMod,
    score: Option<&ScoreMod>,
    dims: (usize, usize, usize, usize, usize, usize),
    offsets: (usize, usize),
    rng: &mut StdRng,
    label: &str,
) -> Result<()> {
    let (b, nq, nkv, t, n, d) = dims;
    let scale = 1.0 / (d as f64).sqrt();
    let q = Var::from_tensor(&rand_tensor(rng, &[b, nq, t, d], 2.0)?)?;
    let k = Var::from_tensor(&rand_tensor(rng, &[b, nkv, n, d], 2.0)?)?;
    let v = Var::from_tensor(&rand_tensor(rng, &[b, nkv, n, d], 1.0)?)?;
    let probe = rand_tensor(rng, &[b, nq, t, d], 1.0)?;
    let grads = |o: &Tensor| -> Result<Vec<Tensor>> {
        let g = o.mul(&probe)?.sum_all()?.backward()?;
        [&q, &k, &v]
            .iter()
            .map(|x| {
                Ok(g.get(x.as_tensor())
                    .cloned()
                    .unwrap_or(x.as_tensor().zeros_like()?))
            })
            .collect()
    };
    let (qo, ko) = offsets;
    let want = attention::dense_reference(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        mask,
        score,
        scale,
        qo,
        ko,
    )?;
    let got = attention::flex_attention_with(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        mask,
        score,
        scale,
        qo,
        ko,
    )?;
    let d_out = max_abs_diff(&got, &want)?;
    assert!(d_out <= 1e-5, "{label}: output differs by {d_out}");
    for (i, (a, w)) in grads(&got)?.iter().zip(&grads(&want)?).enumerate() {
        let dg = max_abs_diff(a, w)?;
        assert!(dg <= 5e-5, "{label}: gradient {i} differs by {dg}");
    }
    Ok(())
}

fn doc_ids(b: usize, len: usize, rng: &mut StdRng) -> Vec<Vec<u32>> {
    (0..b)
        .map(|_| {
            let mut doc = 0u32;
            (0..len)
                .map(|_| {
                    if rng.random_bool(0.03) {
                        doc += 1;
                    }
                    doc
                })
                .collect()
        })
        .collect()
}

#[test]
fn flex_builtin_masks_match_dense_masks() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    let (b, t) = (2, 100);
    let pads: Vec<Vec<bool>> = vec![
        (0..t).map(|i| i >= 10).collect(),
        (0..t).map(|i| i >= 75).collect(),
    ];
    let docs = doc_ids(b, t, &mut rng);
    let masks = [
        ("causal", MaskMod::causal()),
        ("sliding", MaskMod::sliding_window(23)),
        (
            "padding",
            MaskMod::causal().and(MaskMod::key_padding(pads.clone())),
        ),
        ("bidirectional padding", MaskMod::key_padding(pads)),
        ("document", MaskMod::document(docs.clone())),
        (
            "causal document",
            MaskMod::causal().and(MaskMod::document(docs)),
        ),
        ("prefix-lm", MaskMod::prefix_lm(vec![17, 70])),
        (
            "not causal or diagonal",
            MaskMod::causal()
                .not()
                .or(MaskMod::custom(|_, _, q, k| q == k)),
        ),
        (
            "per head",
            MaskMod::custom_per_head(|_, h, q, k| k <= q && (q - k) % (h + 1) == 0),
        ),
    ];
    for (name, mask) in &masks {
        compare_flex(mask, None, (b, 4, 2, t, t, 12), (0, 0), &mut rng, name)?;
    }
    // Chunked: 30 queries at 60.. over keys 10..90.
    compare_flex(
        &MaskMod::sliding_window(40),
        None,
        (b, 4, 2, 30, 80, 12),
        (60, 10),
        &mut rng,
        "sliding chunk",
    )?;
    Ok(())
}

#[test]
fn flex_score_mods_match_dense_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    let slopes = ScoreMod::alibi_slopes(4);
    let mods = [
        ("softcap", ScoreMod::soft_cap(1.5)),
        ("alibi", ScoreMod::alibi(slopes.clone())),
        (
            "alibi then softcap",
            ScoreMod::alibi(slopes).then(ScoreMod::soft_cap(2.0)),
        ),
        (
            "custom square",
            ScoreMod::custom(
                |s, _, _, _, _| 0.5 * s * s,
                Some(Arc::new(|s, _, _, _, _| s)),
            ),
        ),
    ];
    let pads: Vec<Vec<bool>> = vec![(0..90).map(|i| i >= 66).collect()];
    for (name, m) in &mods {
        compare_flex(
            &MaskMod::causal(),
            Some(m),
            (1, 4, 1, 90, 90, 8),
            (0, 0),
            &mut rng,
            name,
        )?;
        // With fully masked rows (left padding past the first tile).
        let mask = MaskMod::causal().and(MaskMod::key_padding(pads.clone()));
        compare_flex(&mask, Some(m), (1, 4, 1, 90, 90, 8), (0, 0), &mut rng, name)?;
    }
    Ok(())
}

#[test]
fn flex_score_mod_without_derivative_refuses_backward() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(10);
    let q = Var::from_tensor(&rand_tensor(&mut rng, &[1, 1, 4, 4], 1.0)?)?;
    let k = rand_tensor(&mut rng, &[1, 1, 4, 4], 1.0)?;
    let m = ScoreMod::custom(|s, _, _, _, _| s.abs(), None);
    let o = attention::flex_attention_with(
        q.as_tensor(),
        &k,
        &k,
        &MaskMod::causal(),
        Some(&m),
        0.5,
        0,
        0,
    )?;
    assert!(o.sum_all()?.backward().is_err());
    Ok(())
}

#[test]
fn block_mask_tiles_agree_with_elements_and_skip_work() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    let t = 300;
    let docs = doc_ids(1, t, &mut rng);
    for mask in [
        MaskMod::causal(),
        MaskMod::sliding_window(70),
        MaskMod::causal().and(MaskMod::document(docs)),
        MaskMod::prefix_lm(vec![100]),
    ] {
        let bm = BlockMask::new(&mask, Some(1), None, t, t, 0, 0)?;
        let (empty, _, partial) = bm.counts();
        assert!(empty > 0 && partial > 0, "{mask:?}: {bm:?}");
        for qt in 0..t.div_ceil(TILE) {
            for kt in 0..t.div_ceil(TILE) {
                let vals: Vec<bool> = (qt * TILE..((qt + 1) * TILE).min(t))
                    .flat_map(|q| (kt * TILE..((kt + 1) * TILE).min(t)).map(move |k| (q, k)))
                    .map(|(q, k)| mask.eval(0, 0, q, k))
                    .collect();
                let want = if vals.iter().all(|v| !v) {
                    TileKind::Empty
                } else if vals.iter().all(|v| *v) {
                    TileKind::Full
                } else {
                    TileKind::Partial
                };
                assert_eq!(bm.tile_kind(0, 0, qt, kt), want, "{mask:?} tile {qt},{kt}");
            }
        }
    }
    // Causal at 300 tokens: 5×5 tiles, 10 strictly above the diagonal are skipped.
    let bm = BlockMask::new(&MaskMod::causal(), None, None, t, t, 0, 0)?;
    assert_eq!(bm.counts(), (10, 10, 5));
    Ok(())
}

#[test]
fn packed_documents_equal_separate_runs() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(12);
    let lens = [37usize, 50, 41];
    let t: usize = lens.iter().sum();
    let ids: Vec<u32> = lens
        .iter()
        .enumerate()
        .flat_map(|(i, &l)| std::iter::repeat_n(i as u32, l))
        .collect();
    let (nq, nkv, d) = (4, 2, 10);
    let scale = 1.0 / (d as f64).sqrt();
    let q = rand_tensor(&mut rng, &[1, nq, t, d], 2.0)?;
    let k = rand_tensor(&mut rng, &[1, nkv, t, d], 2.0)?;
    let v = rand_tensor(&mut rng, &[1, nkv, t, d], 1.0)?;
    let mask = MaskMod::causal().and(MaskMod::document(vec![ids]));
    let packed = attention::flex_attention_with(&q, &k, &v, &mask, None, scale, 0, 0)?;
    let mut start = 0;
    for &len in &lens {
        let part = |x: &Tensor| x.narrow(2, start, len);
        let alone = attention::flex_attention_with(
            &part(&q)?,
            &part(&k)?,
            &part(&v)?,
            &MaskMod::causal(),
            None,
            scale,
            0,
            0,
        )?;
        let spec = Case::new(1, nq, nkv, d, 0, len, 0).spec;
        let (eager, _) = attention::eager(&part(&q)?, &part(&k)?, &part(&v)?, &spec, scale, false)?;
        let got = packed.narrow(2, start, len)?;
        assert!(max_abs_diff(&got, &alone)? <= 1e-5, "document at {start}");
        assert!(
            max_abs_diff(&got, &eager)? <= 1e-5,
            "document at {start} vs eager"
        );
        start += len;
    }
    Ok(())
}
