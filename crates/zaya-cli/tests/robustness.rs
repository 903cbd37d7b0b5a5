//! What a hostile user does: closed pipes and full disks on stdout, sizes at the limits of
//! the integer types, chat input that cannot be answered, damaged or changed training runs,
//! bad training data, ids of the padded vocabulary rows.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn zaya() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zaya"))
}

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn default_model() -> PathBuf {
    repo("models/default")
}

mod scratch;
use scratch::scratch as temp;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A pipe whose reading end is already closed: every write to it fails with EPIPE.
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: pipe fills two fresh descriptors; we close the reader and own the writer.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    unsafe { Stdio::from_raw_fd(fds[1]) }
}

fn dev_full() -> Stdio {
    Stdio::from(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap(),
    )
}

/// The commands of the issue that write to stdout, with small inputs.
fn stdout_commands(dir: &Path) -> Vec<(&'static str, Command)> {
    let model = default_model();
    let conv = dir.join("conv.json");
    std::fs::write(
        &conv,
        r#"{"messages": [{"role": "user", "content": "Hi"}]}"#,
    )
    .unwrap();
    let inputs = dir.join("in.json");
    std::fs::write(&inputs, r#"{"input_ids": [[2, 5, 9]]}"#).unwrap();
    let mut v = Vec::new();
    let mut c = zaya();
    c.args([
        "generate",
        "--max-new-tokens",
        "300",
        "--ignore-eos",
        "--prompt",
        "And",
    ])
    .arg("--model")
    .arg(&model);
    v.push(("generate stream", c));
    let mut c = zaya();
    c.args([
        "generate",
        "--max-new-tokens",
        "5",
        "--json",
        "--prompt",
        "And",
    ])
    .arg("--model")
    .arg(&model);
    v.push(("generate json", c));
    let mut c = zaya();
    c.args(["generate", "--max-new-tokens", "3", "--inputs"])
        .arg(&inputs)
        .arg("--model")
        .arg(&model);
    v.push(("generate ids", c));
    let mut c = zaya();
    c.arg("inspect").arg(&model);
    v.push(("inspect", c));
    let mut c = zaya();
    c.args(["parse", "--text", "hello"]);
    v.push(("parse", c));
    let mut c = zaya();
    c.args(["tokenize", "--text", "hello", "--model"])
        .arg(&model);
    v.push(("tokenize", c));
    let mut c = zaya();
    c.args(["detokenize", "--ids", "2,5,9", "--model"])
        .arg(&model);
    v.push(("detokenize", c));
    let mut c = zaya();
    c.args(["template", "--conversation"])
        .arg(&conv)
        .arg("--model")
        .arg(&model);
    v.push(("template", c));
    v.push(("kernels", {
        let mut c = zaya();
        c.arg("kernels");
        c
    }));
    v
}

#[test]
fn a_closed_pipe_ends_every_command_quietly() {
    let (_guard, dir) = temp("pipe");
    for (name, mut cmd) in stdout_commands(&dir) {
        let o = cmd
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(o.status.success(), "{name}: {:?}\n{err}", o.status);
        assert!(
            !err.contains("panicked") && !err.contains("error"),
            "{name}: {err}"
        );
    }
    // chat: the answer goes to a reader that left
    let mut child = zaya()
        .args(["chat", "--json", "--max-new-tokens", "8", "--model"])
        .arg(default_model())
        .stdin(Stdio::piped())
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"And God said\nAnd again\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "chat: {:?}\n{}", o.status, stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

#[test]
fn a_full_disk_is_a_clean_error() {
    let (_guard, dir) = temp("full");
    for (name, mut cmd) in stdout_commands(&dir) {
        let o = cmd
            .stdout(dev_full())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains("writing to standard output") && err.contains("No space left"),
            "{name}: {err}"
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}

#[test]
fn a_huge_max_new_tokens_is_refused_before_generating() {
    let o = zaya()
        .args([
            "generate",
            "--prompt",
            "And God said",
            "--ignore-eos",
            "--max-new-tokens",
            "18446744073709551615",
            "--model",
        ])
        .arg(default_model())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("max_position_embeddings 2048"), "{err}");
    assert!(o.stdout.len() < 64, "generated before failing");
}

#[test]
fn bench_sizes_are_checked() {
    for args in [
        &["--repeats", "0"][..],
        &["--new-tokens", "1"],
        &["--prefill-len", "0"],
        &["--train", "--train-batch", "0"],
        &[
            "--train",
            "--train-batch",
            "4294967296",
            "--train-seq-len",
            "4294967296",
        ],
    ] {
        let o = zaya()
            .args(["bench", "--model"])
            .arg(default_model())
            .args(args)
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("--"), "{args:?}: the flag is named: {err}");
    }
}

/// Ids of the embedding rows past the tokenizer's vocabulary (1925..1984 for the default
/// model) decode to nothing, as transformers 5.23 `decode` does (`scripts/check_padded_vocab.py`
/// printed `''` for them); ids the model cannot produce are an error.
#[test]
fn padded_vocabulary_rows_detokenize_to_nothing() {
    let run = |ids: &str| {
        zaya()
            .args(["detokenize", "--ids", ids, "--model"])
            .arg(default_model())
            .output()
            .unwrap()
    };
    for (ids, text) in [
        ("1925", ""),
        ("1983", ""),
        ("2,1925", "<bos>"),
        ("1925,1930", ""),
    ] {
        let o = run(ids);
        assert!(o.status.success(), "{ids}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["text"], text, "{ids}");
    }
    let o = run("1984");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("1984"), "{}", stderr(&o));
}

fn chat(args: &[&str], input: &[u8]) -> Output {
    let mut child = zaya()
        .args(["chat", "--json", "--model"])
        .arg(default_model())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.as_mut().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn answers(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn chat_errors_keep_the_session() {
    let mut input = Vec::new();
    input.extend_from_slice(b"And God said\n");
    input.extend_from_slice(&vec![b'a'; 100_000]);
    input.push(b'\n');
    input.extend_from_slice(b"bad \xff\xfe utf-8\n");
    input.extend_from_slice(b"And God saw\n/quit\n");
    let o = chat(&["--max-new-tokens", "6"], &input);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // two answers (first and last line); the long line and the bad bytes reported
    assert_eq!(answers(&o).len(), 2, "{err}");
    assert!(err.contains("too long"), "{err}");
    assert!(err.contains("not valid UTF-8"), "{err}");
    assert!(err.contains("conversation is kept"), "{err}");
}

/// With the default `--max-new-tokens 512`, every turn leaves room for its answer: old
/// turns are dropped (and the user is told) instead of the session dying on turn 4.
#[test]
fn long_chats_drop_the_oldest_turns() {
    let mut input = Vec::new();
    for i in 0..6 {
        input.extend_from_slice(format!("And God said, let there be light {i}\n").as_bytes());
    }
    let o = chat(&["--temperature", "0"], &input);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let a = answers(&o);
    assert_eq!(a.len(), 6, "{err}");
    assert!(!err.contains("error"), "{err}");
}

// ---------------------------------------------------------------------------------------
// training runs

fn train_data(dir: &Path) -> PathBuf {
    let train: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("tests/fixtures/models/gqa_sliding/train.json")).unwrap(),
    )
    .unwrap();
    let mut data = String::new();
    for k in 0..6 {
        let ids = &train["input_ids"][k % 2];
        data.push_str(&serde_json::json!({ "input_ids": ids }).to_string());
        data.push('\n');
    }
    let p = dir.join("data.jsonl");
    std::fs::write(&p, data).unwrap();
    p
}

/// `zaya train` on the fixture model with small settings; a flag in `extra` replaces the
/// default of the same flag.
fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let defaults = [
        ("--seq-len", "12"),
        ("--batch-size", "2"),
        ("--epochs", "2"),
        ("--save-every", "2"),
        ("--lr", "1e-2"),
    ];
    let mut cmd = zaya();
    cmd.args(["train", "--no-progress", "--model"])
        .arg(repo("tests/fixtures/models/gqa_sliding"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out);
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            cmd.args([flag, value]);
        }
    }
    cmd.args(extra).output().unwrap()
}

fn log_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("loss.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect()
}

/// Copies the run directory as a kill after `step` would leave it: that checkpoint, the
/// log with rows written after it (the steps re-run on resume), stale temporaries.
fn killed_copy(from: &Path, to: &Path, step: u64, latest: bool) {
    let name = format!("step-{step:08}");
    std::fs::create_dir_all(to.join(&name)).unwrap();
    for f in std::fs::read_dir(from.join(&name)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), to.join(&name).join(f.file_name())).unwrap();
    }
    if latest {
        std::fs::write(to.join("latest"), &name).unwrap();
    }
    // rows up to step + 1 were logged before the kill
    let log = std::fs::read_to_string(from.join("loss.csv")).unwrap();
    let rows: Vec<&str> = log.lines().take(step as usize + 2).collect();
    std::fs::write(to.join("loss.csv"), rows.join("\n") + "\n").unwrap();
    // a final export killed half-way, and a checkpoint save killed half-way
    std::fs::create_dir_all(to.join("final")).unwrap();
    std::fs::write(to.join("final/.tmpAbC123"), vec![0u8; 4096]).unwrap();
    std::fs::create_dir_all(to.join(".tmp-step-00000004")).unwrap();
}

#[test]
fn resume_trims_the_log_and_cleans_temporaries() {
    let (_guard, dir) = temp("resume-log");
    let data = train_data(&dir);
    let a = dir.join("a");
    let o = train(&data, &a, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(log_steps(&a), [1, 2, 3, 4, 5, 6]);
    let b = dir.join("b");
    killed_copy(&a, &b, 2, true);
    assert_eq!(log_steps(&b), [1, 2, 3]);
    let o = train(&data, &b, &["--resume"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("removed 1 row(s) after step 2"), "{err}");
    assert_eq!(log_steps(&b), [1, 2, 3, 4, 5, 6], "no duplicate rows");
    let same = |f: &str| {
        let rows = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p.join(f))
                .unwrap()
                .lines()
                .map(|l| l.split(',').take(3).collect::<Vec<_>>().join(","))
                .collect()
        };
        assert_eq!(rows(&a), rows(&b), "{f}");
    };
    same("loss.csv");
    assert!(
        !b.join("final/.tmpAbC123").exists(),
        "stale export temp kept"
    );
    assert!(
        !b.join(".tmp-step-00000004").exists(),
        "stale checkpoint temp kept"
    );
    let svg = std::fs::read_to_string(b.join("loss.svg")).unwrap();
    assert_eq!(svg, std::fs::read_to_string(a.join("loss.svg")).unwrap());
}

#[test]
fn resume_without_latest_uses_the_newest_complete_checkpoint() {
    let (_guard, dir) = temp("resume-latest");
    let data = train_data(&dir);
    let a = dir.join("a");
    assert!(train(&data, &a, &[]).status.success());
    let b = dir.join("b");
    killed_copy(&a, &b, 2, false);
    // an older complete checkpoint and a newer incomplete one must not be chosen
    killed_copy(&a, &b, 4, false);
    std::fs::create_dir_all(b.join("step-00000005")).unwrap();
    std::fs::remove_file(b.join("step-00000004/optimizer.safetensors")).unwrap();
    let o = train(&data, &b, &["--resume"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming at step 2"), "{err}");
    assert!(err.contains("`latest` is missing"), "{err}");
    assert_eq!(log_steps(&b), [1, 2, 3, 4, 5, 6]);
    // `latest` naming a damaged checkpoint is refused, not a restart from step 0
    let c = dir.join("c");
    killed_copy(&a, &c, 4, true);
    std::fs::remove_file(c.join("step-00000004/trainer_state.json")).unwrap();
    let o = train(&data, &c, &["--resume"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not a complete checkpoint"),
        "{}",
        stderr(&o)
    );
    assert_eq!(log_steps(&c).len(), 5, "the log was not wiped");
}

#[test]
fn resume_refuses_other_data_or_shapes_and_applies_new_settings() {
    let (_guard, dir) = temp("resume-change");
    let data = train_data(&dir);
    let a = dir.join("a");
    assert!(train(&data, &a, &["--max-steps", "2"]).status.success());
    for (extra, says) in [
        (&["--seq-len", "10"][..], "--seq-len 10"),
        (&["--batch-size", "3"], "--batch-size 3"),
        (&["--seed", "5"], "--seed 5"),
    ] {
        let mut args = vec!["--resume"];
        args.extend_from_slice(extra);
        let o = train(&data, &a, &args);
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
        assert!(stderr(&o).contains(says), "{extra:?}: {}", stderr(&o));
    }
    let other = dir.join("other.jsonl");
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str(&text.clone());
    std::fs::write(&other, text).unwrap();
    let o = train(&other, &a, &["--resume"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--data"), "{}", stderr(&o));
    // a new learning rate and length are applied, and said
    let o = train(&data, &a, &["--resume", "--lr", "5e-3", "--max-steps", "4"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("--lr: 0.01 -> 0.005"), "{err}");
    assert!(err.contains("total steps (--max-steps): 2 -> 4"), "{err}");
    assert_eq!(log_steps(&a), [1, 2, 3, 4]);
    let lr3: f64 = std::fs::read_to_string(a.join("loss.csv"))
        .unwrap()
        .lines()
        .nth(3)
        .unwrap()
        .split(',')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        lr3 <= 5e-3 && lr3 > 0.0,
        "step 3 used the new peak lr: {lr3}"
    );
}

#[test]
fn bad_training_data_errors_name_the_line_once() {
    let (_guard, dir) = temp("bad-data");
    let data = train_data(&dir);
    let mut bytes = std::fs::read(&data).unwrap();
    bytes.extend_from_slice(b"{\"text\": \"caf\xe9\"}\n");
    std::fs::write(&data, &bytes).unwrap();
    let o = train(&data, &dir.join("run"), &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("data.jsonl:7: not valid UTF-8"), "{err}");
    assert_eq!(err.matches("UTF-8").count(), 1, "printed once: {err}");
}

/// A 10 MB word (the whole text is one BPE word for this tokenizer) is refused before it
/// reaches the tokenizer, naming the line, instead of taking gigabytes.
#[test]
fn an_oversized_example_is_refused_with_its_line() {
    let (_guard, dir) = temp("big-word");
    let data = dir.join("data.jsonl");
    let word = "a".repeat(10 << 20);
    std::fs::write(
        &data,
        format!("{{\"text\": \"And God said\"}}\n{{\"text\": \"{word}\"}}\n"),
    )
    .unwrap();
    let o = zaya()
        .args(["train", "--model"])
        .arg(default_model())
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.join("run"))
        .arg("--no-progress")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("data.jsonl:2") && err.contains("split it"),
        "{err}"
    );
}
