//! The engine's model on a mesh of local ranks (`zaya_dist::serve::MeshModel`) against one
//! `ZayaModel`: logits of prompt pieces and of decode rows at different positions, forks
//! (prefix-cache snapshots, `n > 1`), freed rows; and the whole engine on TP 2 / PP 2 / EP 2
//! giving the single-rank engine's greedy tokens, with the prefix cache reused.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use zaya::attention::AttnImplementation;
use zaya::ZayaModel;
use zaya_dist::{MeshModel, MeshServeError, MeshShape};
use zaya_engine::{Engine, EngineConfig, EngineModel, EngineRow, Event, GenerationRequest};

const TIMEOUT: Duration = Duration::from_secs(120);

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn prompt(seed: u64, len: usize, vocab: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1 + ((x >> 33) as usize % (vocab - 1)) as u32
        })
        .collect()
}

/// TP sums partial products across ranks (reassociated float additions): 1e-5, or 1e-6 of
/// the largest logit when larger, as the TP forward tests allow. PP and EP alone must be
/// within the same bound (they are bit-identical to one rank in the forward tests).
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: vocabulary");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let tol = 1e-5f32.max(1e-6 * scale);
    assert!(d <= tol, "{what}: max |Δ| = {d} > {tol} (largest {scale})");
}

const ATTN: AttnImplementation = AttnImplementation::Sdpa;

/// Rows at different positions, pieces of different lengths, a fork decoded apart from its
/// source, a row freed mid-way (its id never reused), decodes past the sliding window.
fn check_rows(shape: MeshShape) {
    let name = "gqa_sliding";
    let single = ZayaModel::load(dir(name), DType::F32, &Device::Cpu).unwrap();
    let mesh = MeshModel::local(&dir(name), shape, DType::F32, TIMEOUT).unwrap();
    let vocab = single.config().vocab_size;
    let label = shape.label();
    let (pa, pb) = (prompt(1, 7, vocab), prompt(2, 3, vocab));

    let (mut sa, mut sb) = (single.new_row(), single.new_row());
    let (mut ma, mut mb) = (mesh.new_row(), mesh.new_row());
    for (p, s, m, what) in [(&pa, &mut sa, &mut ma, "a"), (&pb, &mut sb, &mut mb, "b")] {
        let want = single.prefill(s, p, ATTN).unwrap();
        let got = mesh.prefill(m, p, ATTN).unwrap();
        assert_close(&format!("{label} prefill {what}"), &got, &want);
        assert_eq!(m.len(), s.len());
    }
    // a fork of `a` (a prefix-cache snapshot / a second choice) goes its own way
    let (mut sc, mut mc) = (sa.fork().unwrap(), ma.fork().unwrap());
    for step in 0..8u32 {
        let toks = [1 + step % 5, 7 + step, 20 + 2 * step];
        let want = single
            .decode(&mut [&mut sa, &mut sb, &mut sc], &toks, ATTN)
            .unwrap();
        let got = mesh
            .decode(&mut [&mut ma, &mut mb, &mut mc], &toks, ATTN)
            .unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_close(&format!("{label} decode step {step} row {i}"), g, w);
        }
    }
    assert_eq!((ma.len(), mb.len(), mc.len()), (15, 11, 15));
    // `b` leaves (freed on every rank); `c` takes another piece, then `a` and `c` decode
    drop(mb);
    drop(sb);
    let piece = prompt(3, 5, vocab);
    let want = single.prefill(&mut sc, &piece, ATTN).unwrap();
    let got = mesh.prefill(&mut mc, &piece, ATTN).unwrap();
    assert_close(&format!("{label} second piece of c"), &got, &want);
    let want = single
        .decode(&mut [&mut sc, &mut sa], &[3, 4], ATTN)
        .unwrap();
    let got = mesh.decode(&mut [&mut mc, &mut ma], &[3, 4], ATTN).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("{label} after the free, row {i}"), g, w);
    }
    // a fresh row after frees starts from nothing
    let (mut sd, mut md) = (single.new_row(), mesh.new_row());
    let want = single.prefill(&mut sd, &pb, ATTN).unwrap();
    let got = mesh.prefill(&mut md, &pb, ATTN).unwrap();
    assert_close(&format!("{label} new row"), &got, &want);
}

#[test]
fn mesh_rows_give_the_single_rank_logits() {
    for (tp, pp, ep) in [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 3, 1)] {
        check_rows(MeshShape::new(tp, pp, ep, 1).unwrap());
    }
}

fn tokens_of(events: Vec<Event>, n: usize) -> (Vec<Vec<u32>>, usize) {
    let mut out = vec![Vec::new(); n];
    let mut cached = None;
    for e in events {
        match e {
            Event::Token { choice, token, .. } => out[choice].push(token),
            Event::Done { usage } => cached = Some(usage.cached_tokens),
            Event::Error { message } => panic!("request failed: {message}"),
            Event::Finished { .. } => {}
        }
    }
    (out, cached.expect("a Done event"))
}

fn small_blocks() -> EngineConfig {
    EngineConfig {
        prefix_block: 4,
        prefill_chunk: 8,
        step_token_budget: 12,
        attn: ATTN,
        ..Default::default()
    }
}

/// Several concurrent requests (one with `n = 2`), then a prompt extending an earlier one
/// (prefix-cache hit): the mesh engine's greedy tokens and cached counts are the single-rank
/// engine's.
fn check_engine(shape: MeshShape) {
    let name = "gqa_sliding";
    let single = Arc::new(ZayaModel::load(dir(name), DType::F32, &Device::Cpu).unwrap());
    let vocab = single.config().vocab_size;
    let mesh = Arc::new(MeshModel::local(&dir(name), shape, DType::F32, TIMEOUT).unwrap());
    let one = Engine::start(single, None, small_blocks()).unwrap();
    let many = Engine::start(mesh, None, small_blocks()).unwrap();
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|i| prompt(10 + i, 5 + 4 * i as usize, vocab))
        .collect();
    let run = |engine: &Engine| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let n = if i == 1 { 2 } else { 1 };
                let req = GenerationRequest {
                    n,
                    ..GenerationRequest::new(p.clone(), 12)
                };
                (engine.submit(req).unwrap(), n)
            })
            .collect();
        let mut out: Vec<(Vec<Vec<u32>>, usize)> = handles
            .into_iter()
            .map(|(h, n)| tokens_of(h.collect(), n))
            .collect();
        let mut longer = prompts[3].clone();
        longer.extend(prompt(99, 6, vocab));
        out.push(tokens_of(
            engine
                .submit(GenerationRequest::new(longer, 12))
                .unwrap()
                .collect(),
            1,
        ));
        out
    };
    let want = run(&one);
    let got = run(&many);
    assert_eq!(got, want, "{}", shape.label());
    // the last request reused the blocks of the fourth prompt (17 tokens: 4 blocks)
    assert_eq!(got.last().unwrap().1, 16);
    many.shutdown(true);
}

#[test]
fn the_engine_on_tp_pp_ep_meshes_gives_the_single_rank_tokens() {
    for (tp, pp, ep) in [(2, 1, 1), (1, 2, 1), (1, 1, 2)] {
        check_engine(MeshShape::new(tp, pp, ep, 1).unwrap());
    }
}

#[test]
fn bad_meshes_fail_before_serving() {
    let e = MeshModel::local(
        &dir("gqa_sliding"),
        MeshShape::new(3, 1, 1, 1).unwrap(),
        DType::F32,
        TIMEOUT,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not divisible by --tp 3"), "{e}");
    let e = MeshModel::local(
        &dir("gqa_sliding"),
        MeshShape::new(1, 1, 1, 2).unwrap(),
        DType::F32,
        TIMEOUT,
    )
    .unwrap_err();
    assert!(matches!(e, MeshServeError::Unsupported(_)), "{e}");
}

#[test]
fn a_stopped_rank_fails_requests_naming_it_and_never_hangs() {
    let name = "gqa_sliding";
    let shape = MeshShape::new(2, 1, 1, 1).unwrap();
    let mesh = Arc::new(MeshModel::local(&dir(name), shape, DType::F32, TIMEOUT).unwrap());
    let engine = Engine::start(mesh.clone(), None, small_blocks()).unwrap();
    let p = prompt(5, 9, 96);
    let ok = tokens_of(
        engine
            .submit(GenerationRequest::new(p.clone(), 4))
            .unwrap()
            .collect(),
        1,
    );
    assert_eq!(ok.0[0].len(), 4);
    assert_eq!(engine.unavailable(), None, "a working mesh is available");
    mesh.stop_rank(1).unwrap();
    assert!(mesh.stop_rank(0).is_err());
    for _ in 0..2 {
        let events = engine
            .submit(GenerationRequest::new(prompt(6, 9, 96), 4))
            .unwrap()
            .collect();
        let msg = events
            .iter()
            .find_map(|e| match e {
                Event::Error { message } => Some(message.clone()),
                _ => None,
            })
            .expect("an error event");
        assert!(msg.contains("rank 1") && msg.contains("stop_rank"), "{msg}");
    }
    // what /health reports from then on (503 with this message)
    let why = engine.unavailable().expect("a failed mesh is unavailable");
    assert!(why.contains("down") && why.contains("rank 1"), "{why}");
    drop(mesh);
    // shutdown joins the engine thread, which drops the mesh and joins the followers
    engine.shutdown(false);
}

/// Rows the engine drops (finished choices, evicted prefix-cache snapshots) are freed on the
/// followers too, with the engine's next command.
#[test]
fn dropped_rows_are_freed_on_every_rank() {
    let name = "gqa_sliding";
    let shape = MeshShape::new(1, 2, 1, 1).unwrap();
    let mesh = Arc::new(MeshModel::local(&dir(name), shape, DType::F32, TIMEOUT).unwrap());
    let engine = Engine::start(
        mesh.clone(),
        None,
        EngineConfig {
            prefix_cache_bytes: 0,
            ..small_blocks()
        },
    )
    .unwrap();
    let run = |seed, n| {
        let req = GenerationRequest {
            n,
            ..GenerationRequest::new(prompt(seed, 9, 96), 3)
        };
        tokens_of(engine.submit(req).unwrap().collect(), n)
    };
    run(1, 3);
    // the three choices of the first request held three rows on every rank
    assert_eq!(mesh.follower_rows(), Some(vec![3]));
    run(2, 1);
    // its frees reached the follower with the second request's first command: only the
    // second request's row (freed at the next command) is left
    assert_eq!(mesh.follower_rows(), Some(vec![1]));

    // with a prefix cache bounded to about one snapshot, evicted snapshots are freed too
    let engine = Engine::start(
        mesh.clone(),
        None,
        EngineConfig {
            prefix_cache_bytes: 1,
            ..small_blocks()
        },
    )
    .unwrap();
    for seed in 0..4 {
        tokens_of(
            engine
                .submit(GenerationRequest::new(prompt(seed, 9, 96), 2))
                .unwrap()
                .collect(),
            1,
        );
    }
    // a 1-byte cache keeps nothing: every snapshot fork is dropped at once (as an evicted
    // one is) and freed on the follower
    assert_eq!(mesh.follower_rows(), Some(vec![1]));
}

/// bf16 serving ranks: prefill and cached decode logits of a row stay within a few bf16
/// units in the last place (of the largest logit) of one bf16 rank's. The row-parallel sums
/// and stage boundaries round at other points than one rank, so they are close, not equal.
#[test]
fn bf16_mesh_rows_stay_close_to_one_bf16_rank() {
    let name = "gqa_sliding";
    let single = ZayaModel::load(dir(name), DType::BF16, &Device::Cpu).unwrap();
    let vocab = single.config().vocab_size;
    for (tp, pp, ep) in [(2, 1, 1), (1, 2, 1), (1, 1, 2)] {
        let shape = MeshShape::new(tp, pp, ep, 1).unwrap();
        let mesh = MeshModel::local(&dir(name), shape, DType::BF16, TIMEOUT).unwrap();
        let label = shape.label();
        let p = prompt(3, 9, vocab);
        let (mut s, mut m) = (single.new_row(), mesh.new_row());
        let mut pairs = vec![(
            mesh.prefill(&mut m, &p, ATTN).unwrap(),
            single.prefill(&mut s, &p, ATTN).unwrap(),
        )];
        for step in 0..4u32 {
            let tok = [5 + 3 * step];
            pairs.push((
                mesh.decode(&mut [&mut m], &tok, ATTN).unwrap().remove(0),
                single.decode(&mut [&mut s], &tok, ATTN).unwrap().remove(0),
            ));
        }
        for (i, (got, want)) in pairs.iter().enumerate() {
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = got
                .iter()
                .zip(want)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            eprintln!("{label} step {i}: max |Δ| {d} (largest {scale})");
            // bf16 keeps 8 significant bits: one unit in the last place is scale / 128
            assert!(d <= 4.0 * scale / 128.0, "{label} step {i}: {d} vs {scale}");
        }
    }
}
