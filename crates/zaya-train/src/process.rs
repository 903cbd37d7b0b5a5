//! A long-lived child process spoken to in JSON lines: one line in, one line out, each answer
//! within a timeout. Used by `--reward-cmd` (rewards in any language) and `--env-cmd` (tool
//! environments). A process that exits, hangs or answers something that is not the expected
//! JSON is an error naming the command, the request and what came back — never a silent
//! default.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{GrpoError, Result};

/// Longest line accepted from a process (a runaway writer cannot exhaust memory).
const MAX_LINE: usize = 16 << 20;
/// Bytes of the process's standard error kept for error messages.
const STDERR_TAIL: usize = 2048;

pub struct JsonLinesProcess {
    role: &'static str,
    command: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    timeout: Duration,
    requests: u64,
}

impl std::fmt::Debug for JsonLinesProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonLinesProcess")
            .field("role", &self.role)
            .field("command", &self.command)
            .finish()
    }
}

impl JsonLinesProcess {
    /// Starts `command` with `sh -c` (so pipelines and arguments work as typed).
    pub fn start(role: &'static str, command: &str, timeout: Duration) -> Result<Self> {
        let err = |message: String| GrpoError::Process {
            role,
            command: command.to_string(),
            message,
        };
        if command.trim().is_empty() {
            return Err(err("the command is empty".into()));
        }
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("cannot start: {e}")))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            loop {
                let mut line = String::new();
                let r = std::io::Read::take(&mut reader, MAX_LINE as u64 + 1).read_line(&mut line);
                match r {
                    Ok(0) => break,
                    Ok(_) if line.len() > MAX_LINE => {
                        let _ = tx.send(Err(std::io::Error::other(format!(
                            "a line longer than {MAX_LINE} bytes"
                        ))));
                        break;
                    }
                    Ok(_) => {
                        if tx.send(Ok(line)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
        });
        let tail = Arc::new(Mutex::new(Vec::new()));
        let keep = tail.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buf = [0u8; 4096];
            loop {
                match std::io::Read::read(&mut reader, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut t = keep.lock().unwrap_or_else(|e| e.into_inner());
                        t.extend_from_slice(&buf[..n]);
                        if t.len() > STDERR_TAIL {
                            let cut = t.len() - STDERR_TAIL;
                            t.drain(..cut);
                        }
                    }
                }
            }
        });
        Ok(JsonLinesProcess {
            role,
            command: command.to_string(),
            stdin: child.stdin.take(),
            child,
            lines: rx,
            stderr: tail,
            timeout,
            requests: 0,
        })
    }

    fn error(&mut self, message: String) -> GrpoError {
        // give a dying process a moment so its exit status and last words are known
        std::thread::sleep(Duration::from_millis(20));
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!("; it exited with {s}"),
            _ => String::new(),
        };
        let tail = self
            .stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let tail = String::from_utf8_lossy(&tail).trim().to_string();
        let stderr = if tail.is_empty() {
            String::new()
        } else {
            format!("; its stderr ends with: {tail}")
        };
        GrpoError::Process {
            role: self.role,
            command: self.command.clone(),
            message: format!("{message}{status}{stderr}"),
        }
    }

    /// Sends one JSON value as a line and returns the answer line parsed as JSON.
    pub fn request(&mut self, value: &serde_json::Value) -> Result<serde_json::Value> {
        self.requests += 1;
        let n = self.requests;
        let line = serde_json::to_string(value).expect("JSON values serialise");
        let sent = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(line.as_bytes())
                .and_then(|_| stdin.write_all(b"\n"))
                .and_then(|_| stdin.flush()),
            None => Err(std::io::Error::other("stdin closed")),
        };
        if let Err(e) = sent {
            return Err(self.error(format!("writing request {n}: {e}")));
        }
        let answer = match self.lines.recv_timeout(self.timeout) {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Err(self.error(format!("reading the answer to request {n}: {e}"))),
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                return Err(self.error(format!(
                    "no answer to request {n} within {:.1} s (killed)",
                    self.timeout.as_secs_f64()
                )));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(self.error(format!("closed its output before answering request {n}")))
            }
        };
        let trimmed = answer.trim();
        serde_json::from_str(trimmed).map_err(|e| {
            let shown: String = trimmed.chars().take(200).collect();
            self.error(format!(
                "answer to request {n} is not JSON ({e}): `{shown}`"
            ))
        })
    }
}

impl Drop for JsonLinesProcess {
    fn drop(&mut self) {
        // closing stdin asks a well-behaved process to finish; a stuck one is killed
        drop(self.stdin.take());
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
