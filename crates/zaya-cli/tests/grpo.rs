//! `zaya grpo-loss` and `zaya grpo` end to end: TRL parity through the CLI, learning on the
//! embedded default model, resume, reward and environment processes, process failures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn zaya() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zaya"))
}

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

mod scratch;
use scratch::scratch as temp;

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `(step, reward)` rows of a run's grpo.csv.
fn rewards(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("grpo.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].parse().unwrap(), f[4].parse().unwrap())
        })
        .collect()
}

/// The learning task of the README: prompts ending in "said unto"; the reward is 1 when the
/// completion's first word is "Abraham" (a name the Genesis model picks rarely there).
fn task(dir: &Path) -> PathBuf {
    let data = dir.join("prompts.jsonl");
    std::fs::write(
        &data,
        [
            r#"{"prompt": "And God said unto"}"#,
            r#"{"prompt": "And the LORD said unto"}"#,
            r#"{"prompt": "And he said unto"}"#,
            r#"{"prompt": "And she said unto"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    data
}

fn grpo(data: &Path, out: &Path, steps: u64, extra: &[&str]) -> Command {
    grpo_lr(data, out, steps, "3e-4", extra)
}

fn grpo_lr(data: &Path, out: &Path, steps: u64, lr: &str, extra: &[&str]) -> Command {
    let mut c = zaya();
    c.args(["grpo", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--reward", "regex", "--regex", r"^\s*Abraham"])
        .args(["--num-generations", "8", "--max-completion-length", "16"])
        .args(["--lr", lr, "--max-steps", &steps.to_string()])
        .args(extra);
    c
}

#[test]
fn grpo_loss_cli_matches_trl() {
    let (_guard, dir) = temp("loss");
    let out = dir.join("out.safetensors");
    ok(zaya()
        .args(["grpo-loss", "--model"])
        .arg(repo("tests/fixtures/models/mha_bias"))
        .arg("--inputs")
        .arg(repo("tests/fixtures/grpo/dr_grpo.json"))
        .args([
            "--loss-type",
            "dr_grpo",
            "--max-completion-length",
            "16",
            "--grads",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap());
    let dev = candle_core::Device::Cpu;
    let got = candle_core::safetensors::load(&out, &dev).unwrap();
    let want =
        candle_core::safetensors::load(repo("tests/fixtures/grpo/dr_grpo.safetensors"), &dev)
            .unwrap();
    let v = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!((v(&got["loss"])[0] - v(&want["loss"])[0]).abs() <= 1e-5);
    assert_eq!(
        got.keys().filter(|k| k.starts_with("grad.")).count(),
        want.keys().filter(|k| k.starts_with("grad.")).count()
    );
    // a bad document is a clear error naming the field
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"prompt_ids": [[1]], "completion_ids": [[2, 3]], "completion_mask": [[1]], "advantages": [1.0]}"#).unwrap();
    let o = zaya()
        .args(["grpo-loss", "--model"])
        .arg(repo("tests/fixtures/models/mha_bias"))
        .arg("--inputs")
        .arg(&bad)
        .arg("--out")
        .arg(dir.join("x.safetensors"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("completion_mask row 0 has 1 positions"), "{e}");
}

/// Learning, not just running: the reward of the last steps is well above the first ones.
#[test]
fn grpo_raises_the_reward_on_the_default_model() {
    let (_guard, dir) = temp("learn");
    let data = task(&dir);
    let run = dir.join("run");
    ok(grpo(&data, &run, 30, &[]).output().unwrap());
    let r = rewards(&run);
    assert_eq!(r.len(), 30);
    let mean = |s: &[(u64, f64)]| s.iter().map(|x| x.1).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&r[..10]), mean(&r[20..]));
    eprintln!("reward: first 10 steps {first:.3}, last 10 steps {last:.3}");
    assert!(first < 0.35, "the task is not already solved: {first}");
    assert!(
        last > first + 0.3,
        "reward did not rise: {first:.3} -> {last:.3}"
    );
    assert!(run.join("reward.svg").exists());
    assert!(run.join("final/model.safetensors").exists());
    assert!(run.join("final/tokenizer.json").exists());
}

#[test]
fn grpo_resumes_from_its_checkpoint() {
    let (_guard, dir) = temp("resume");
    let data = task(&dir);
    let run = dir.join("run");
    ok(grpo(
        &data,
        &run,
        3,
        &["--save-every", "2", "--num-iterations", "1"],
    )
    .output()
    .unwrap());
    assert!(run.join("step-00000002").exists() && run.join("step-00000003").exists());
    // the last checkpoint is step 3; pretend the run died after step 2
    std::fs::remove_dir_all(run.join("step-00000003")).unwrap();
    std::fs::write(run.join("latest"), "step-00000002").unwrap();
    let o = ok(grpo(&data, &run, 4, &["--save-every", "2", "--resume"])
        .output()
        .unwrap());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("resuming at step 2"), "{e}");
    let steps: Vec<u64> = rewards(&run).iter().map(|r| r.0).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    // a different seed changes which prompts and samples the steps see: refused
    let o = grpo(&data, &run, 5, &["--resume", "--seed", "7"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot resume"));
}

#[test]
fn grpo_with_process_reward_and_tool_environment() {
    let (_guard, dir) = temp("procs");
    let data = dir.join("tools.jsonl");
    std::fs::write(
        &data,
        r#"{"messages": [{"role": "user", "content": "What is 2 + 2?"}], "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}], "word": "the", "expected_tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 2}}]}"#,
    )
    .unwrap();
    let scripts = repo("crates/zaya-train/tests/scripts");
    let run = dir.join("run");
    let o = ok(zaya()
        .args(["grpo", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .args(["--reward", "tool_call:0.5", "--reward", "format:0.1"])
        .arg("--reward-cmd")
        .arg(format!(
            "python3 {}",
            scripts.join("length_reward.py").display()
        ))
        .arg("--env-cmd")
        .arg(format!("sh {}", scripts.join("echo_env.sh").display()))
        .args([
            "--max-tool-turns",
            "2",
            "--num-generations",
            "4",
            "--batch-size",
            "4",
        ])
        .args([
            "--max-completion-length",
            "12",
            "--max-steps",
            "2",
            "--beta",
            "0.04",
        ])
        .output()
        .unwrap());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("tool_call") && e.contains("reward_cmd"), "{e}");
    assert_eq!(rewards(&run).len(), 2);

    // a reward process that crashes, hangs or prints garbage stops the run with its reason
    for (cmd, want) in [
        ("exit 5", "exit status: 5"),
        ("while read l; do echo garbage; done", "not JSON"),
        ("sleep 20", "no answer to request 1 within 0.5 s"),
    ] {
        let o = zaya()
            .args(["grpo", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(dir.join("bad"))
            .args(["--reward-cmd", cmd, "--process-timeout", "0.5"])
            .args([
                "--num-generations",
                "2",
                "--batch-size",
                "2",
                "--max-completion-length",
                "4",
                "--max-steps",
                "1",
            ])
            .output()
            .unwrap();
        assert!(!o.status.success(), "{cmd}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("reward process") && e.contains(want),
            "{cmd}: {e}"
        );
    }
}

/// The adapter of the `--lora` tests: attention, the router's first layer and the experts.
const LORA: &str = "r=8,alpha=16,targets=q_proj,k_proj,o_proj,fc1,experts";

/// A column of a run's grpo.csv, by header name.
fn column(run: &Path, name: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("grpo.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let i = header.iter().position(|h| *h == name).unwrap();
    lines
        .map(|l| l.split(',').nth(i).unwrap().parse().unwrap())
        .collect()
}

/// `grpo --lora`: the adapter alone learns the task (the base stays frozen); the rollouts
/// sample from the base with the live adapter attached (their log-probabilities agree with
/// the training forward's at every step, as the adapter moves); `final/` is a PEFT adapter
/// that the inference commands load.
#[test]
fn grpo_lora_raises_the_reward_on_the_default_model() {
    let (_guard, dir) = temp("lora-learn");
    let data = task(&dir);
    let run = dir.join("run");
    let o = ok(grpo_lr(&data, &run, 30, "1e-2", &["--lora", LORA])
        .output()
        .unwrap());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("memory (GRPO, LoRA r=8 over a f32 base"), "{e}");
    let r = rewards(&run);
    assert_eq!(r.len(), 30);
    let mean = |s: &[(u64, f64)]| s.iter().map(|x| x.1).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&r[..10]), mean(&r[20..]));
    eprintln!("LoRA reward: first 10 steps {first:.3}, last 10 steps {last:.3}");
    assert!(first < 0.35, "the task is not already solved: {first}");
    assert!(
        last > first + 0.3,
        "reward did not rise: {first:.3} -> {last:.3}"
    );
    let mismatch = column(&run, "logp_mismatch_max");
    assert!(
        mismatch.iter().all(|&m| m < 1e-3),
        "rollouts do not sample the trained adapter: {mismatch:?}"
    );
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(run.join("final").join(f).exists(), "final/{f}");
    }
    assert!(!run.join("final/model.safetensors").exists());
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("final/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    // the trained adapter loads and answers the task
    let o = ok(zaya()
        .args([
            "generate",
            "--prompt",
            "And God said unto",
            "--max-new-tokens",
            "3",
        ])
        .arg("--adapter")
        .arg(run.join("final"))
        .output()
        .unwrap());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Abraham"), "{text}");
}

/// `grpo --lora` resumes from its PEFT-format checkpoint exactly (the adapter after
/// 2 + 2 steps is the one of 4 uninterrupted steps, bit for bit); another `--lora` is
/// refused on resume; QLoRA (a q8_0 base) with the KL term to the base and gradient
/// checkpointing runs.
#[test]
fn grpo_lora_resumes_exactly_and_runs_qlora() {
    let (_guard, dir) = temp("lora-resume");
    let data = task(&dir);
    let args = |extra: &[&str]| -> Vec<String> {
        ["--save-every", "2", "--beta", "0.04", "--lora", LORA]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let whole = dir.join("whole");
    let a = args(&[]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    ok(grpo_lr(&data, &whole, 4, "1e-2", &a).output().unwrap());
    let run = dir.join("run");
    ok(grpo_lr(&data, &run, 3, "1e-2", &a).output().unwrap());
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(run.join("step-00000002").join(f).exists(), "{f}");
    }
    // the last checkpoint is step 3; pretend the run died after step 2
    std::fs::remove_dir_all(run.join("step-00000003")).unwrap();
    std::fs::write(run.join("latest"), "step-00000002").unwrap();
    let r = args(&["--resume"]);
    let r: Vec<&str> = r.iter().map(String::as_str).collect();
    let o = ok(grpo_lr(&data, &run, 4, "1e-2", &r).output().unwrap());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("resuming at step 2"), "{e}");
    let steps: Vec<u64> = rewards(&run).iter().map(|r| r.0).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert!(
        column(&whole, "grad_norm").iter().any(|&g| g > 0.0),
        "the adapter never moved: the comparison would be empty"
    );
    let read = |d: &Path| std::fs::read(d.join("final/adapter_model.safetensors")).unwrap();
    assert!(
        read(&whole) == read(&run),
        "the resumed adapter differs from the uninterrupted run's"
    );
    // another adapter shape is another run
    let o = grpo_lr(
        &data,
        &run,
        5,
        "1e-2",
        &["--beta", "0.04", "--resume", "--lora", "r=4,alpha=8"],
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot resume"));
    // --quant / --dtype belong to --lora
    let o = grpo(&data, &dir.join("x"), 1, &["--quant", "q8_0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--lora"));
    // QLoRA: a q8_0 base, KL to the base (adapters disabled), every layer recomputed
    let q = dir.join("qlora");
    let o = ok(grpo(
        &data,
        &q,
        2,
        &[
            "--quant",
            "q8_0",
            "--beta",
            "0.04",
            "--checkpointing",
            "every",
            "--lora",
            "r=4,alpha=8,dropout=0.05,rslora,targets=q_proj,o_proj,fc1",
        ],
    )
    .output()
    .unwrap());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("over a q8_0 base"), "{e}");
    assert_eq!(rewards(&q).len(), 2);
    assert!(q.join("final/adapter_model.safetensors").exists());
}
