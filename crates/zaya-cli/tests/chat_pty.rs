//! `zaya chat` in a real pseudo-terminal: prompt, streamed answer, tokens/s line,
//! /system, /reset and /quit.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

/// A random model with the text fixture's tokenizer and chat template.
fn chat_model() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zaya-chat-pty-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tok_dir = fixture("text/tokenizer");
    for f in std::fs::read_dir(&tok_dir).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tok_dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap().len()
        + tok["added_tokens"].as_array().unwrap().len();
    let cfg = serde_json::json!({
        "model_type": "zaya", "vocab_size": vocab.max(1300), "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "moe_intermediate_size": 16,
        "num_experts": 2, "router_hidden_size": 8, "eos_token_id": 106, "max_position_embeddings": 1024
    });
    let cfg_path = dir.join("model-config.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let st = Command::new(env!("CARGO_BIN_EXE_zaya"))
        .args(["init", "--config"])
        .arg(&cfg_path)
        .arg("--out")
        .arg(&dir)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    dir
}

struct Pty {
    master: std::fs::File,
    slave: i32,
}

fn open_pty() -> Pty {
    let mut master = 0;
    let mut slave = 0;
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: openpty returned a fresh descriptor we own.
    Pty {
        master: unsafe { std::fs::File::from_raw_fd(master) },
        slave,
    }
}

fn stdio_from(fd: i32) -> Stdio {
    // SAFETY: dup gives a new descriptor owned by the Stdio.
    unsafe { Stdio::from_raw_fd(libc::dup(fd)) }
}

/// Reads from the master until `needle` has appeared `count` times (or panics on timeout).
fn read_until(master: &mut std::fs::File, seen: &mut String, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    while seen.matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needle:?}; screen so far:\n{seen}"
        );
        match master.read(&mut buf) {
            Ok(0) => panic!("terminal closed; screen:\n{seen}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}; screen:\n{seen}"),
        }
    }
}

#[test]
fn chat_runs_in_a_terminal() {
    let model = chat_model();
    let mut pty = open_pty();
    let mut child = Command::new(env!("CARGO_BIN_EXE_zaya"))
        .args(["chat", "--max-new-tokens", "6", "--model"])
        .arg(&model)
        .stdin(stdio_from(pty.slave))
        .stdout(stdio_from(pty.slave))
        .stderr(stdio_from(pty.slave))
        .spawn()
        .unwrap();
    unsafe { libc::close(pty.slave) };
    let mut screen = String::new();
    read_until(&mut pty.master, &mut screen, "> ", 1);
    pty.master.write_all(b"Hello there\r").unwrap();
    read_until(&mut pty.master, &mut screen, "tokens/s", 1);
    read_until(&mut pty.master, &mut screen, "> ", 2);
    pty.master.write_all(b"/system You are terse.\r").unwrap();
    read_until(&mut pty.master, &mut screen, "system prompt set", 1);
    pty.master.write_all(b"And again?\r").unwrap();
    read_until(&mut pty.master, &mut screen, "tokens/s", 2);
    pty.master.write_all(b"/reset\r").unwrap();
    read_until(&mut pty.master, &mut screen, "conversation cleared", 2);
    pty.master.write_all(b"/quit\r").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "chat exited with {status}; screen:\n{screen}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "chat did not exit; screen:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(screen.contains("zaya chat"), "banner missing:\n{screen}");
    // the tokens/s line is dimmed on a terminal
    assert!(
        screen.contains("\x1b[2m["),
        "no dimmed status line:\n{screen}"
    );
    let _ = std::fs::remove_dir_all(&model);
}
