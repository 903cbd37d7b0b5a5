//! The stable command-line interface, driven as external checks drive it.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, IndexOp};

fn zaya() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zaya"))
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

mod scratch;
use scratch::scratch as temp;

/// Asserts a `zaya` run succeeded, showing its stderr where it did not.
fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn forward_writes_logits_and_captures() {
    let dir = fixture("gqa_sliding");
    let (_guard, out) = temp("forward");
    let out = out.join("out.safetensors");
    let status = zaya()
        .args(["forward", "--model"])
        .arg(&dir)
        .arg("--inputs")
        .arg(dir.join("batch.json"))
        .arg("--out")
        .arg(&out)
        .args(["--hidden-states", "--attentions", "--router-logits"])
        .status()
        .unwrap();
    assert!(status.success());
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let want =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(got["logits"].dims(), &[3, 12, 96]);
    assert!(max_diff(&got["logits"], &want["batch.logits"]) < 1e-4);
    for i in 0..=6 {
        assert!(
            max_diff(
                &got[&format!("hidden_states.{i}")],
                &want[&format!("batch.hidden_states.{i}")]
            ) < 1e-4
        );
    }
    for l in 0..6 {
        assert!(
            max_diff(
                &got[&format!("attentions.{l}")],
                &want[&format!("batch.attentions.{l}")]
            ) < 1e-4
        );
        assert_eq!(got[&format!("router_logits.{l}")].dims(), &[36, 5]);
        assert!(
            max_diff(
                &got[&format!("router_logits.{l}")],
                &want[&format!("batch.router_logits.{l}")]
            ) < 1e-4
        );
    }
}

#[test]
fn generate_prints_new_tokens_as_json() {
    let dir = fixture("conv_k3");
    let output = zaya()
        .args(["generate", "--model"])
        .arg(&dir)
        .arg("--inputs")
        .arg(dir.join("batch.json"))
        .args(["--max-new-tokens", "10", "--ignore-eos"])
        .output()
        .unwrap();
    assert_ok(&output);
    let v: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let want =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let want = &want["gen_batch_ignore_eos.sequences"];
    for row in 0..3 {
        let w: Vec<i64> = want.i(row).unwrap().to_vec1().unwrap();
        let g: Vec<i64> = v["sequences"][row]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(g, w, "row {row}");
    }
}

#[test]
fn init_inspect_and_convert_round_trip() {
    let (_guard, dir) = temp("init");
    let model = dir.join("model");
    let status = zaya()
        .args(["init", "--config"])
        .arg(fixture("gqa_sliding").join("config.json"))
        .args(["--seed", "3", "--out"])
        .arg(&model)
        .status()
        .unwrap();
    assert!(status.success());
    let out = zaya().arg("inspect").arg(&model).output().unwrap();
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["layout"], "native");
    let total = v["parameters"]["total"].as_u64().unwrap();
    let active = v["parameters"]["active_per_token"].as_u64().unwrap();
    // 4 experts of 3·48·24 weights per layer, 6 layers: active keeps one of them per layer
    assert_eq!(total - active, 6 * 3 * (3 * 48 * 24));

    let legacy = dir.join("legacy");
    let status = zaya()
        .args(["convert", "--from"])
        .arg(&model)
        .arg("--to")
        .arg(&legacy)
        .args(["--layout", "legacy"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = zaya().arg("inspect").arg(&legacy).output().unwrap();
    let w: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(w["layout"], "legacy");
    assert_eq!(w["parameters"], v["parameters"]);
}

#[test]
fn bad_input_fails_with_a_message() {
    let (_guard, dir) = temp("bad");
    std::fs::write(dir.join("in.json"), r#"{"input_ids": [[1, 2, 999]]}"#).unwrap();
    let out = zaya()
        .args(["forward", "--model"])
        .arg(fixture("mha_bias"))
        .arg("--inputs")
        .arg(dir.join("in.json"))
        .arg("--out")
        .arg(dir.join("o.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("999") && err.contains("position 2"), "{err}");
}

fn text_fixture(file: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/text")
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn tokenizer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/text/tokenizer")
}

#[test]
fn tokenize_and_detokenize_match_transformers() {
    let fx = text_fixture("tokenize.json");
    for case in fx["cases"].as_array().unwrap().iter().take(6) {
        let text = case["text"].as_str().unwrap();
        let out = zaya()
            .args(["tokenize", "--model"])
            .arg(tokenizer_dir())
            .args(["--text", text])
            .output()
            .unwrap();
        assert_ok(&out);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ids"], case["ids_with_special"], "{text}");
        let out = zaya()
            .args(["tokenize", "--no-special", "--model"])
            .arg(tokenizer_dir())
            .args(["--text", text])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ids"], case["ids_without_special"], "{text}");
        let ids: Vec<String> = case["ids_with_special"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.to_string())
            .collect();
        let out = zaya()
            .args(["detokenize", "--model"])
            .arg(tokenizer_dir())
            .args(["--ids", &ids.join(",")])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["text"], case["decode"], "{text}");
    }
}

#[test]
fn template_prints_the_rendering_exactly() {
    let fx = text_fixture("templates.json");
    let (_guard, dir) = temp("template");
    let mut ran = 0;
    for case in fx["conversations"].as_array().unwrap() {
        let kwargs = &case["kwargs"];
        let conv = serde_json::json!({"messages": case["messages"], "tools": case.get("tools").cloned().unwrap_or(serde_json::Value::Null)});
        let path = dir.join("conv.json");
        std::fs::write(&path, conv.to_string()).unwrap();
        let mut cmd = zaya();
        cmd.args(["template", "--model"])
            .arg(tokenizer_dir())
            .arg("--conversation")
            .arg(&path);
        if kwargs["add_generation_prompt"] == true {
            cmd.arg("--add-generation-prompt");
        }
        match kwargs.get("enable_thinking") {
            Some(serde_json::Value::Bool(b)) => {
                cmd.args(["--enable-thinking", &b.to_string()]);
            }
            Some(serde_json::Value::Null) | None => {}
            Some(other) => panic!("unexpected enable_thinking {other}"),
        }
        if kwargs
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k != "add_generation_prompt" && k != "enable_thinking")
        {
            continue; // other template kwargs are covered by the library tests
        }
        if kwargs.get("enable_thinking") == Some(&serde_json::Value::Null) {
            continue; // `enable_thinking=None` (defined but null) has no CLI spelling
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            case["name"],
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            case["rendered"].as_str().unwrap(),
            "{}",
            case["name"]
        );
        ran += 1;
    }
    assert!(ran >= 8, "only {ran} conversations checked through the CLI");
}

#[test]
fn parse_splits_reasoning_content_and_tool_calls() {
    let text = "<think>need weather</think>Let me check.<zyphra_tool_call><function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function></zyphra_tool_call>";
    let out = zaya().args(["parse", "--text", text]).output().unwrap();
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["reasoning"], "need weather");
    assert_eq!(v["content"], "Let me check.");
    assert_eq!(v["tool_calls"][0]["name"], "get_weather");
    assert_eq!(v["tool_calls"][0]["arguments"]["city"], "Paris");
    assert_eq!(v["tool_calls"][0]["arguments"]["days"], 3);
}

#[test]
fn forward_with_labels_writes_loss_and_gradients() {
    let dir = fixture("mha_bias");
    let want =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    for checkpointing in [false, true] {
        let (_guard, out) = temp(&format!("grads-{checkpointing}"));
        let out = out.join("out.safetensors");
        let mut cmd = zaya();
        cmd.args(["forward", "--grads", "--model"])
            .arg(&dir)
            .arg("--inputs")
            .arg(dir.join("train.json"))
            .arg("--out")
            .arg(&out);
        if checkpointing {
            cmd.arg("--checkpointing");
        }
        let st = cmd.output().unwrap();
        assert_ok(&st);
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        assert!(max_diff(&got["loss"].flatten_all().unwrap(), &want["train.loss"]) < 1e-5);
        let mut n = 0;
        for (k, w) in &want {
            if let Some(name) = k.strip_prefix("train.grad.") {
                let g = &got[&format!("grad.{name}")];
                let rel = max_diff(g, w)
                    / w.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        .max(1e-6);
                assert!(rel < 1e-4, "{name}: relative diff {rel}");
                n += 1;
            }
        }
        assert!(n > 30, "only {n} gradients compared");
    }
}

/// The README's first command: the embedded default model writes readable text.
#[test]
fn default_model_generates_text_without_a_model_dir() {
    let (_guard, cache) = temp("default-cache");
    let out = zaya()
        .env("ZAYA_CACHE_DIR", &cache)
        .args([
            "generate",
            "--prompt",
            "And God said",
            "--max-new-tokens",
            "12",
            "--json",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = v["texts"][0].as_str().unwrap();
    let words = text.split_whitespace().count();
    assert!(words >= 4, "too little text: {text:?}");
    // mostly letters, spaces and punctuation: the trained model writes English-like words
    let letters = text
        .chars()
        .filter(|c| c.is_ascii_alphabetic() || c.is_whitespace())
        .count();
    assert!(
        letters * 10 >= text.chars().count() * 8,
        "not text-like: {text:?}"
    );
    // the files were installed in the cache once and are reused
    let installed: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(installed.len(), 1);
    let again = zaya()
        .env("ZAYA_CACHE_DIR", &cache)
        .args(["chat", "--json", "--max-new-tokens", "8"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut child = again;
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"Who made the light?\n/quit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_ok(&out);
    let answer: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert!(answer["tokens"].as_u64().unwrap() >= 1);
}

/// `zaya train` end to end: a run interrupted after a checkpoint and resumed ends with the
/// same weights and losses as the uninterrupted run; it writes the log, the curve and a
/// loadable export.
#[test]
fn train_resumes_exactly_and_exports() {
    let (_guard, dir) = temp("train");
    let model = fixture("gqa_sliding");
    let train: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("train.json")).unwrap()).unwrap();
    let mut data = String::new();
    for k in 0..6 {
        let ids = &train["input_ids"][k % 2];
        data.push_str(&serde_json::json!({"input_ids": ids}).to_string());
        data.push('\n');
    }
    std::fs::write(dir.join("data.jsonl"), data).unwrap();
    let run = |out: &str, resume: bool| {
        let mut cmd = zaya();
        cmd.args(["train", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(dir.join("data.jsonl"))
            .arg("--out")
            .arg(dir.join(out))
            .args([
                "--seq-len",
                "12",
                "--batch-size",
                "2",
                "--epochs",
                "2",
                "--save-every",
                "2",
                "--lr",
                "1e-2",
            ])
            .arg("--no-progress");
        if resume {
            cmd.arg("--resume");
        }
        let o = cmd.output().unwrap();
        assert_ok(&o);
    };
    run("a", false);
    let a = dir.join("a");
    for f in [
        "loss.csv",
        "loss.svg",
        "final/config.json",
        "final/model.safetensors",
        "step-00000006/optimizer.safetensors",
    ] {
        assert!(a.join(f).exists(), "{f} missing");
    }
    // "interrupt" a copy of the run after step 2: only that checkpoint and its log survive
    let b = dir.join("b");
    std::fs::create_dir_all(&b).unwrap();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for f in std::fs::read_dir(from).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    };
    copy(&a.join("step-00000002"), &b.join("step-00000002"));
    std::fs::write(b.join("latest"), "step-00000002").unwrap();
    let log = std::fs::read_to_string(a.join("loss.csv")).unwrap();
    let head: Vec<&str> = log.lines().take(3).collect(); // header + steps 1, 2
    std::fs::write(b.join("loss.csv"), head.join("\n") + "\n").unwrap();
    run("b", true);
    let wa =
        candle_core::safetensors::load(a.join("final/model.safetensors"), &Device::Cpu).unwrap();
    let wb =
        candle_core::safetensors::load(b.join("final/model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(wa.len(), wb.len());
    for (k, t) in &wa {
        assert_eq!(max_diff(t, &wb[k]), 0.0, "{k} differs after resume");
    }
    let losses = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').take(3).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(losses(&a.join("loss.csv")), losses(&b.join("loss.csv")));
    // the export is a loadable model
    let out = zaya().arg("inspect").arg(a.join("final")).output().unwrap();
    assert_ok(&out);
}

/// `zaya train --optimizer-in-backward` (each parameter updated as its gradient is final)
/// ends with the weights and losses of the same run with AdamW after the backward pass,
/// and is refused with clipping or accumulation on.
#[test]
fn train_with_the_optimizer_in_backward_matches_the_plain_run() {
    let (_guard, dir) = temp("train-oib");
    let model = fixture("conv_k3");
    let train: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("train.json")).unwrap()).unwrap();
    let data: String = (0..4)
        .map(|k| serde_json::json!({"input_ids": train["input_ids"][k % 2]}).to_string() + "\n")
        .collect();
    std::fs::write(dir.join("data.jsonl"), data).unwrap();
    let run = |out: &str, extra: &[&str]| {
        zaya()
            .args(["train", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(dir.join("data.jsonl"))
            .arg("--out")
            .arg(dir.join(out))
            .args(["--seq-len", "12", "--batch-size", "2", "--lr", "1e-2"])
            .args(["--warmup-steps", "0", "--no-progress"])
            .args(extra)
            .output()
            .unwrap()
    };
    for (extra, says) in [
        (&["--optimizer-in-backward"][..], "--max-grad-norm 0"),
        (
            &[
                "--optimizer-in-backward",
                "--max-grad-norm",
                "0",
                "--grad-accum",
                "2",
            ][..],
            "--grad-accum 1",
        ),
    ] {
        let o = run("refused", extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(says),
            "{extra:?}: {err}"
        );
    }
    // `zaya bench` refuses it where it would be ignored (inference, a rank mesh)
    for extra in [&[][..], &["--train", "--pp", "2"][..]] {
        let o = zaya()
            .args(["bench", "--model"])
            .arg(&model)
            .arg("--optimizer-in-backward")
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("applies to --train on one rank"),
            "{extra:?}: {err}"
        );
    }
    for (out, extra) in [
        ("after", &["--max-grad-norm", "0"][..]),
        (
            "during",
            &["--max-grad-norm", "0", "--optimizer-in-backward"][..],
        ),
    ] {
        let o = run(out, extra);
        assert_ok(&o);
    }
    let load = |run: &str| {
        candle_core::safetensors::load(dir.join(run).join("final/model.safetensors"), &Device::Cpu)
            .unwrap()
    };
    let (wa, wb) = (load("after"), load("during"));
    assert_eq!(wa.len(), wb.len());
    for (k, t) in &wa {
        assert_eq!(max_diff(t, &wb[k]), 0.0, "{k} differs");
    }
    let losses = |run: &str| -> Vec<String> {
        std::fs::read_to_string(dir.join(run).join("loss.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').take(3).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(losses("after").len(), 2);
    assert_eq!(losses("after"), losses("during"));
}

/// The process re-executes itself with glibc's huge-page tunable exactly where the kernel
/// waits for that request (THP `madvise`), keeps its arguments through the re-execution (the
/// JSON lands where `--json` said), and `ZAYA_THP=0` keeps 4 KiB pages; `zaya bench` records
/// which policy ran.
#[test]
fn huge_pages_follow_the_kernel_mode_and_zaya_thp() {
    let dir = fixture("gqa_sliding");
    let (_guard, out) = temp("heap");
    let madvise = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|m| m.split_whitespace().any(|w| w == "[madvise]"));
    for (thp, expect_huge) in [(None, madvise), (Some("0"), false)] {
        let json = out.join(format!("bench-{}.json", thp.unwrap_or("default")));
        let mut cmd = zaya();
        cmd.env_remove("GLIBC_TUNABLES").env_remove("ZAYA_THP");
        if let Some(v) = thp {
            cmd.env("ZAYA_THP", v);
        }
        let extra = [
            "--prefill-len",
            "8",
            "--prompt-len",
            "4",
            "--new-tokens",
            "2",
        ];
        let j = bench_json(cmd, &dir, &extra, &json);
        let heap = j["heap"].as_str().unwrap();
        let want = if expect_huge {
            "requested: yes"
        } else {
            "requested: no"
        };
        assert!(heap.contains(want), "ZAYA_THP={thp:?}: {heap}");
    }
}

/// Runs `cmd bench --threads 1 --repeats 1 --model MODEL EXTRA --json JSON`, asserts it
/// succeeded and returns the JSON it wrote.
fn bench_json(mut cmd: Command, model: &Path, extra: &[&str], json: &Path) -> serde_json::Value {
    let out = cmd
        .args(["bench", "--threads", "1", "--repeats", "1", "--model"])
        .arg(model)
        .args(extra)
        .arg("--json")
        .arg(json)
        .output()
        .unwrap();
    assert_ok(&out);
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

/// `zaya bench` and `zaya bench --train` run end to end on a tiny model and write the JSON
/// keys the reference script reads; training steps on a fixed batch lower its loss.
#[test]
fn bench_inference_and_train_write_their_json() {
    let dir = fixture("gqa_sliding");
    let (_guard, out) = temp("bench");
    let run = |extra: &[&str], json: &PathBuf| bench_json(zaya(), &dir, extra, json);
    let inf = run(
        &[
            "--prefill-len",
            "16",
            "--prompt-len",
            "4",
            "--new-tokens",
            "4",
        ],
        &out.join("inf.json"),
    );
    for k in [
        "prefill_tokens_per_s",
        "decode_b1_tokens_per_s",
        "decode_b8_tokens_per_s",
        "load_s",
        "peak_rss_bytes",
    ] {
        assert!(inf[k].as_f64().unwrap() > 0.0, "{k}");
    }
    // the decode's own read rate is the bytes a token reads times its tokens per second
    let read = inf["decode_b1_weight_read_gb_s"].as_f64().unwrap();
    let want = inf["bytes_per_token"].as_f64().unwrap()
        * inf["decode_b1_tokens_per_s"].as_f64().unwrap()
        / 1e9;
    assert!(
        read > 0.0 && (read - want).abs() <= 1e-9 * want,
        "{read} vs {want}"
    );
    // Where the kernel's peak-RSS mark can be reset (Linux), the batch-1 decode gets its own
    // bandwidth probes, the floor uses them, and no probe's 256 MiB buffer counts in the peak
    // (it did before: a tiny model's run reported ~264 MiB).
    let bw = |k: &str| inf[k].as_f64();
    if let (Some(before), Some(after)) = (
        bw("read_bandwidth_gb_s_b1_before"),
        bw("read_bandwidth_gb_s_b1_after"),
    ) {
        assert_eq!(bw("read_bandwidth_gb_s"), Some(before.max(after)));
        // a probe before each measured repeat and after the last; each repeat's fraction of
        // the floor is its rate over the floor of the higher probe beside it
        let list = |k: &str| -> Vec<f64> {
            inf[k]
                .as_array()
                .unwrap_or_else(|| panic!("{k}: {inf}"))
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (probes, rates) = (
            list("read_bandwidth_gb_s_b1_probes"),
            list("decode_b1_tokens_per_s_per_repeat"),
        );
        let fractions = list("decode_b1_floor_fraction_per_repeat");
        assert_eq!(probes.len(), rates.len() + 1, "{inf}");
        assert_eq!((probes[0], probes[probes.len() - 1]), (before, after));
        assert_eq!(fractions.len(), rates.len());
        let bytes = inf["bytes_per_token"].as_f64().unwrap();
        for (i, f) in fractions.iter().enumerate() {
            let floor = probes[i].max(probes[i + 1]) * 1e9 / bytes;
            assert!(
                (f - rates[i] / floor).abs() <= 1e-12 * f.abs().max(1.0),
                "repeat {i}"
            );
        }
        let peak = inf["peak_rss_bytes"].as_f64().unwrap();
        assert!(
            peak < (200u64 << 20) as f64,
            "peak RSS {peak} counts a probe"
        );
    } else if std::fs::write("/proc/self/clear_refs", "5").is_ok() {
        panic!("the peak RSS mark can be reset here, yet no batch-1 probes ran: {inf}");
    }
    for cp in ["off", "every"] {
        let tr = run(
            &[
                "--train",
                "--train-batch",
                "2",
                "--train-seq-len",
                "12",
                "--checkpointing",
                cp,
            ],
            &out.join(format!("train-{cp}.json")),
        );
        assert!(tr["train_tokens_per_s"].as_f64().unwrap() > 0.0);
        let losses: Vec<f64> = tr["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(losses.len(), 2);
        assert!(losses[1] < losses[0], "{losses:?}");
    }
}
