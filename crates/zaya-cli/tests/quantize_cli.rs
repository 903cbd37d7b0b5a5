//! `zaya quantize`, `--quant` and `zaya eval` driven from the command line.

use std::path::PathBuf;
use std::process::Command;

fn zaya() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zaya"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

mod scratch;
use scratch::scratch as temp;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn quantized_file_and_quant_at_load_agree_and_generate_text() {
    let (_guard, dir) = temp("quantize");
    let model = root().join("models/default");
    let gguf = dir.join("default-q8_0.gguf");
    let report = run(zaya()
        .args(["quantize", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&gguf)
        .args(["--format", "q8_0"]));
    let v: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert!(
        v["formats"]["q8_0"]["tensors"].as_u64().unwrap() > 0,
        "{report}"
    );

    // Text generation from the file (tokenizer and config from its metadata) equals the
    // dense directory quantized while loading.
    let gen = |m: &std::path::Path, quant: Option<&str>| {
        let mut c = zaya();
        c.args(["generate", "--model"]).arg(m).args([
            "--prompt",
            "And God said",
            "--max-new-tokens",
            "12",
            "--json",
        ]);
        if let Some(q) = quant {
            c.args(["--quant", q]);
        }
        let out = run(&mut c);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["sequences"].clone()
    };
    let from_file = gen(&gguf, None);
    assert_eq!(from_file, gen(&model, Some("q8_0")));
    assert!(from_file[0].as_array().is_some_and(|s| !s.is_empty()));

    // eval: the file against its f32 source on a slice of the held-out text.
    let out = run(zaya()
        .args(["eval", "--model"])
        .arg(&gguf)
        .arg("--reference")
        .arg(&model)
        .arg("--text")
        .arg(root().join("data/eval/exodus-1-10.txt"))
        .args(["--max-tokens", "300", "--context", "128"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let kl = v["mean_kl"].as_f64().unwrap();
    let top1 = v["top1_agreement"].as_f64().unwrap();
    assert!(kl > 0.0 && kl < 0.05, "{out}");
    assert!(top1 > 0.8 && top1 < 1.0, "{out}");
    assert!(v["tokens"].as_u64().unwrap() >= 300);
    let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("no {k}: {out}"));
    let (median, p99, max) = (f("kl_median"), f("kl_p99"), f("kl_max"));
    assert!(
        0.0 < median && median <= p99 && p99 <= max && max >= kl,
        "{out}"
    );
    // the worst 1 % of positions hold at least their own share of the sum, and at most all
    assert!((0.01..=1.0).contains(&f("kl_top1pct_share")), "{out}");
    assert!((0.0..0.2).contains(&f("rerouted")), "{out}");
    assert!((0.0..=1.0).contains(&f("rerouted_kl_share")), "{out}");

    // The model against itself: nothing diverges, nothing is rerouted; coarse rounding
    // sends some tokens to other experts, and those positions carry part of the KL.
    let eval = |quant: Option<&str>| -> serde_json::Value {
        let mut c = zaya();
        c.args(["eval", "--model"])
            .arg(&model)
            .arg("--text")
            .arg(root().join("data/eval/exodus-1-10.txt"))
            .args(["--max-tokens", "600", "--context", "128"]);
        if let Some(q) = quant {
            c.args(["--quant", q]);
        }
        serde_json::from_str(run(&mut c).trim()).unwrap()
    };
    let same = eval(None);
    for k in ["mean_kl", "kl_max", "rerouted", "rerouted_kl_share"] {
        assert_eq!(same[k].as_f64(), Some(0.0), "{k}: {same}");
    }
    assert_eq!(same["top1_agreement"].as_f64(), Some(1.0), "{same}");
    let coarse = eval(Some("q4_0"));
    let rerouted = coarse["rerouted"].as_f64().unwrap();
    let share = coarse["rerouted_kl_share"].as_f64().unwrap();
    assert!(rerouted > 0.0 && share > rerouted, "{coarse}");

    // A GGUF model needs an explicit reference; a bad format name is a clear error.
    let out = zaya()
        .args(["eval", "--model"])
        .arg(&gguf)
        .arg("--text")
        .arg(root().join("data/eval/exodus-1-10.txt"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reference"));
    let out = zaya()
        .args(["quantize", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(dir.join("x.gguf"))
        .args(["--format", "q9_9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown weight format `q9_9`"));
}

/// Genesis (the default model's training corpus) as plain text in `dir`, for calibration:
/// chapters joined by spaces, the form of the held-out text.
fn genesis_text(dir: &std::path::Path) -> PathBuf {
    let text: String = std::fs::read_to_string(root().join("data/corpus/genesis-kjv.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["text"].as_str().unwrap().to_string()
        })
        .collect::<Vec<_>>()
        .join(" ");
    let path = dir.join("genesis.txt");
    std::fs::write(&path, text).unwrap();
    path
}

fn eval_kl(gguf: &std::path::Path, reference: &std::path::Path) -> f64 {
    let out = run(zaya()
        .args(["eval", "--model"])
        .arg(gguf)
        .arg("--reference")
        .arg(reference)
        .arg("--text")
        .arg(root().join("data/eval/exodus-1-10.txt"))
        .args(["--max-tokens", "2000", "--context", "256"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["mean_kl"].as_f64().unwrap()
}

/// `--imatrix TEXT`: calibrated on Genesis (the training corpus), the q4_k file of the
/// default model is measurably closer to f32 on held-out Exodus than the uncalibrated one
/// (README, "Quantized weights": 0.059 → 0.045 mean KL on these 2000 tokens).
#[test]
fn an_importance_matrix_from_text_brings_q4_k_closer_to_f32() {
    let (_guard, dir) = temp("imatrix");
    let model = root().join("models/default");
    let calib = genesis_text(&dir);
    let quantize = |out: &std::path::Path, imatrix: bool| {
        let mut c = zaya();
        c.args(["quantize", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(out)
            .args(["--format", "q4_k"]);
        if imatrix {
            c.arg("--imatrix")
                .arg(&calib)
                .args(["--imatrix-tokens", "8000"]);
        }
        let v: serde_json::Value = serde_json::from_str(run(&mut c).trim()).unwrap();
        v["imatrix"].clone()
    };
    let (plain, calibrated) = (dir.join("plain.gguf"), dir.join("imatrix.gguf"));
    assert!(quantize(&plain, false).is_null());
    let report = quantize(&calibrated, true);
    assert_eq!(report["tokens"].as_u64(), Some(8000), "{report}");
    // the saved matrix quantizes to the same bytes as the text it came from
    let saved = dir.join("genesis.imatrix.safetensors");
    let again = dir.join("again.gguf");
    run(zaya()
        .args(["quantize", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&again)
        .args(["--format", "q4_k", "--imatrix-tokens", "8000", "--imatrix"])
        .arg(&calib)
        .arg("--imatrix-out")
        .arg(&saved));
    let from_saved = dir.join("from-saved.gguf");
    let out = run(zaya()
        .args(["quantize", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&from_saved)
        .args(["--format", "q4_k", "--imatrix"])
        .arg(&saved));
    assert!(out.contains("\"matrix\""), "{out}");
    assert_eq!(
        std::fs::read(&from_saved).unwrap(),
        std::fs::read(&calibrated).unwrap()
    );
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&calibrated).unwrap()
    );
    // a matrix of another model is refused before anything is written
    let other = dir.join("other.imatrix.safetensors");
    let m = zaya::imatrix::load(&saved).unwrap();
    let mut bad = zaya::imatrix::ImportanceMatrix::new();
    bad.insert(
        "model.layers.9.self_attn.o_proj.weight".into(),
        m.values().next().unwrap().clone(),
    );
    zaya::imatrix::save(&bad, &other).unwrap();
    let refused = dir.join("refused.gguf");
    let out = zaya()
        .args(["quantize", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&refused)
        .args(["--format", "q4_k", "--imatrix"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model.layers.9.self_attn.o_proj.weight"),
        "{err}"
    );
    assert!(!refused.exists());
    // calibration options without a calibration, and a text without tokens, are refused
    // before anything is written
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let saved_path = saved.to_str().unwrap();
    for (args, says) in [
        (
            vec!["--imatrix-tokens", "100"],
            "--imatrix-tokens / --calibration-tokens needs a calibration text",
        ),
        (
            vec!["--calibration-context", "64"],
            "--imatrix-context / --calibration-context needs a calibration text",
        ),
        (vec!["--imatrix", empty.to_str().unwrap()], "no tokens"),
        (
            vec!["--imatrix", saved_path, "--imatrix-tokens", "100"],
            "--imatrix-tokens / --calibration-tokens needs a calibration text (--imatrix TEXT or --gptq TEXT)",
        ),
    ] {
        let out = zaya()
            .args(["quantize", "--format", "q4_k", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&refused)
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!refused.exists());
    }
    let (kl_plain, kl_calibrated) = (eval_kl(&plain, &model), eval_kl(&calibrated, &model));
    assert!(
        kl_calibrated < 0.9 * kl_plain,
        "mean KL with the importance matrix {kl_calibrated}, without {kl_plain}"
    );
}

/// `--format q4_k_m` (llama.cpp's mix): the layers `use_more_bits` picks get q6_k for their
/// experts' `down_proj` (the default model's 4 layers: 2 and 3; its 128-wide value
/// projections and embedding fall back to q8_0), the file is measurably closer to f32
/// than plain q4_k on held-out text (README, "Quantized weights": KL 5.6e-2 → 2.9e-2 on
/// the whole text), and `--quant q4_k_m` at load gives the same model as the file.
#[test]
fn the_q4_k_m_mix_brings_q4_k_closer_to_f32() {
    let (_guard, dir) = temp("q4_k_m");
    let model = root().join("models/default");
    let quantize = |out: &std::path::Path, format: &str| -> serde_json::Value {
        let out = run(zaya()
            .args(["quantize", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(out)
            .args(["--format", format]));
        serde_json::from_str(out.trim()).unwrap()
    };
    let (plain, mixed) = (dir.join("q4_k.gguf"), dir.join("q4_k_m.gguf"));
    quantize(&plain, "q4_k");
    let report = quantize(&mixed, "q4_k_m");
    let formats = &report["formats"];
    assert_eq!(formats["q6_k"]["tensors"].as_u64(), Some(2), "{report}");
    assert_eq!(formats["q4_k"]["tensors"].as_u64(), Some(2), "{report}");
    assert_eq!(formats["q8_0"]["tensors"].as_u64(), Some(5), "{report}");
    let (kl_plain, kl_mixed) = (eval_kl(&plain, &model), eval_kl(&mixed, &model));
    assert!(
        kl_mixed < 0.7 * kl_plain,
        "q4_k_m KL {kl_mixed} vs q4_k {kl_plain}"
    );
    // quantizing at load with the same mix gives the file's logits, bit for bit
    let inputs = dir.join("in.json");
    std::fs::write(&inputs, r#"{"input_ids": [[5, 17, 33, 2, 90, 4]]}"#).unwrap();
    let logits = |m: &std::path::Path, quant: Option<&str>, tag: &str| {
        let out = dir.join(format!("{tag}.safetensors"));
        let mut c = zaya();
        c.args(["forward", "--model"])
            .arg(m)
            .arg("--inputs")
            .arg(&inputs)
            .arg("--out")
            .arg(&out);
        if let Some(q) = quant {
            c.args(["--quant", q]);
        }
        run(&mut c);
        std::fs::read(out).unwrap()
    };
    assert_eq!(
        logits(&mixed, None, "file"),
        logits(&model, Some("q4_k_m"), "at-load")
    );
    assert_ne!(
        logits(&plain, None, "plain"),
        logits(&model, Some("q4_k_m"), "at-load")
    );
}

/// `--gptq TEXT`: calibrated on Genesis, GPTQ's levels bring the default model's q8_0
/// (embedding kept) and q4_k_m files (with the tied embedding's lookup kept and its head
/// stored apart, too) much closer to f32 on held-out Exodus than the plain rounding
/// (README, "Quantized weights": on these 2000 tokens KL 3.0e-4 → 3.2e-5 and 2.8e-2 →
/// 7.2e-3), the token embedding is left to the plain quantizer (a head stored apart is
/// GPTQ's), the result is deterministic, and a calibration text without tokens is refused
/// before anything is written.
#[test]
fn gptq_from_text_brings_q8_0_and_q4_k_m_closer_to_f32() {
    let (_guard, dir) = temp("gptq");
    let model = root().join("models/default");
    let calib = genesis_text(&dir);
    let quantize = |out: &std::path::Path, format: &[&str], gptq: bool, per_layer: bool| {
        let mut c = zaya();
        c.args(["quantize", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(out)
            .args(format);
        if gptq {
            c.arg("--gptq").arg(&calib).args([
                "--calibration-tokens",
                "8000",
                "--calibration-context",
                "512",
            ]);
        }
        if per_layer {
            c.arg("--gptq-per-layer");
        }
        serde_json::from_str::<serde_json::Value>(run(&mut c).trim()).unwrap()
    };
    // (the q4_k_m embedding is quantized: its moments (the LM head's input) get a pass of
    // their own when they come layer by layer; with its lookup kept the head is stored
    // apart, and GPTQ rounds it)
    let q8_kept = [
        "--format",
        "q8_0",
        "--embed-format",
        "keep",
        "--head-format",
        "keep",
    ];
    for (format, factor, passes, head_rounded) in [
        (&q8_kept[..], 0.3, 4, false),
        (&["--format", "q4_k_m"][..], 0.5, 5, false),
        (
            &["--format", "q4_k_m", "--embed-format", "keep"][..],
            0.5,
            5,
            true,
        ),
    ] {
        let (plain, rounded) = (dir.join("plain.gguf"), dir.join("gptq.gguf"));
        assert!(quantize(&plain, format, false, false)["gptq"].is_null());
        let v = quantize(&rounded, format, true, false);
        assert_eq!(v["gptq"]["passes"], 1, "{v}");
        // the moments' diagonals weigh the block scales (no second calibration pass)
        assert_eq!(v["imatrix"]["from"], "--gptq moments", "{v}");
        let report = &v["gptq"];
        assert_eq!(report["tokens"].as_u64(), Some(8000), "{report}");
        let done = report["rounded"].as_object().unwrap();
        // every expert stack has matrices rounded by GPTQ (the experts the calibration
        // reached with at least as many tokens as input features)
        for l in 0..4 {
            for p in ["gate_up_proj", "down_proj"] {
                let n = done[&format!("model.layers.{l}.mlp.experts.{p}")].as_u64();
                assert!(matches!(n, Some(1..=4)), "{l} {p}: {report}");
            }
        }
        assert!(done.contains_key("model.layers.0.self_attn.o_proj.weight"));
        assert!(!done.contains_key("model.embed_tokens.weight"));
        assert_eq!(
            done.contains_key("lm_head.weight"),
            head_rounded,
            "{report}"
        );
        let again = dir.join("again.gguf");
        quantize(&again, format, true, false);
        assert_eq!(
            std::fs::read(&again).unwrap(),
            std::fs::read(&rounded).unwrap()
        );
        // one calibration pass per layer (what a model whose moments do not fit at once
        // gets) sums the same moments: the same file
        let layered = dir.join("layered.gguf");
        let v = quantize(&layered, format, true, true);
        assert_eq!(v["gptq"]["per_layer"], true, "{v}");
        assert_eq!(v["gptq"]["passes"], passes, "{v}");
        assert_eq!(
            std::fs::read(&layered).unwrap(),
            std::fs::read(&rounded).unwrap()
        );
        let (kl_plain, kl_gptq) = (eval_kl(&plain, &model), eval_kl(&rounded, &model));
        assert!(
            kl_gptq < factor * kl_plain,
            "{format:?}: mean KL with GPTQ {kl_gptq}, without {kl_plain}"
        );
    }
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let refused = dir.join("refused.gguf");
    let out = zaya()
        .args(["quantize", "--format", "q8_0", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&refused)
        .arg("--gptq")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tokens"));
    assert!(!refused.exists());
}
