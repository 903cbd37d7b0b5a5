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

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zaya-grpo-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

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
    let mut c = zaya();
    c.args(["grpo", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--reward", "regex", "--regex", r"^\s*Abraham"])
        .args(["--num-generations", "8", "--max-completion-length", "16"])
        .args(["--lr", "3e-4", "--max-steps", &steps.to_string()])
        .args(extra);
    c
}

#[test]
fn grpo_loss_cli_matches_trl() {
    let dir = temp("loss");
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
    let dir = temp("learn");
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
    let dir = temp("resume");
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
    let dir = temp("procs");
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
