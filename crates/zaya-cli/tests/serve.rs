//! `zaya serve` driven over HTTP on 127.0.0.1: raw HTTP for the error cases, SSE framing,
//! queue limits and shutdown; the official `openai` Python client for the API surface
//! (tests/serve/openai_checks.py, run with the interpreter named by ZAYA_TEST_PYTHON, which
//! .ci/run sets up).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const KEY: &str = "test-key";

struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_zaya"));
        cmd.args(["serve", "--port", "0", "--api-key", KEY])
            .args(extra);
        Server::spawn(cmd)
    }

    /// Runs `cmd` (a `zaya serve` command line, possibly behind a launcher) and waits for the
    /// server's "listening on" line.
    fn spawn(mut cmd: Command) -> Server {
        let mut child = cmd
            .env("ZAYA_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn zaya serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(
                        rest.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string(),
                    );
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start:\n{}", log.lock().unwrap());
            }
        };
        Server { child, addr, log }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the server wrote on stderr, without terminal colour codes.
    fn log(&self) -> String {
        let raw = self.log.lock().unwrap().clone();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close`; the body is read to the end (chunked
/// transfer decoded).
fn http(addr: &str, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(k) = key {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let headers = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut payload = raw[split + 4..].to_vec();
    if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &payload[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16)
                .unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
            rest = &rest[nl + 2 + n + 2..];
        }
        payload = out;
    }
    let status = headers.split_whitespace().nth(1).unwrap().parse().unwrap();
    // Every byte the server sends is UTF-8: a split character would fail here.
    let body = String::from_utf8(payload).expect("UTF-8 body");
    Reply {
        status,
        headers,
        body,
    }
}

fn post(addr: &str, path: &str, body: Value) -> Reply {
    http(addr, "POST", path, Some(KEY), Some(&body.to_string()))
}

/// The `data:` payloads of an SSE body.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_string()
        })
        .collect()
}

fn error_of(r: &Reply) -> Value {
    let v = r.json();
    let e = v["error"].clone();
    assert!(
        e["message"].is_string()
            && e.get("type").is_some()
            && e.get("param").is_some()
            && e.get("code").is_some(),
        "{v}"
    );
    e
}

#[test]
fn serve_routes_errors_and_streaming_over_raw_http() {
    let srv = Server::start(&[]);
    let a = &srv.addr;
    assert_eq!(http(a, "GET", "/health", None, None).status, 200);
    let models = http(a, "GET", "/v1/models", Some(KEY), None).json();
    assert_eq!(models["data"][0]["id"], "zaya-default");

    // Authentication.
    let r = http(a, "GET", "/v1/models", None, None);
    assert_eq!(r.status, 401);
    assert_eq!(error_of(&r)["type"], "authentication_error");
    assert_eq!(
        http(a, "POST", "/v1/chat/completions", Some("nope"), Some("{}")).status,
        401
    );

    // Bad requests: each a 400 (or 404) with OpenAI's error object, naming the field.
    let user = json!([{"role": "user", "content": "And God said"}]);
    let cases: Vec<(Value, u16, Option<&str>)> = vec![
        (json!({"model": "zaya-default"}), 400, None),
        (
            json!({"model": "other", "messages": user}),
            404,
            Some("model"),
        ),
        (json!({"messages": user, "temperature": "hot"}), 400, None),
        (
            json!({"messages": user, "temperature": 9}),
            400,
            Some("temperature"),
        ),
        (json!({"messages": user, "top_p": 0}), 400, Some("top_p")),
        (json!({"messages": user, "n": 0}), 400, Some("n")),
        (
            json!({"messages": user, "logprobs": true, "top_logprobs": 50}),
            400,
            Some("top_logprobs"),
        ),
        (
            json!({"messages": [{"role": "user"}]}),
            400,
            Some("messages[0].content"),
        ),
        (
            json!({"messages": user, "max_tokens": 100000}),
            400,
            Some("messages"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x ".repeat(4000)}]}),
            400,
            Some("messages"),
        ),
        (
            json!({"messages": user, "tool_choice": "required"}),
            400,
            Some("tool_choice"),
        ),
        (
            json!({"messages": user, "response_format": {"type": "xml"}}),
            400,
            Some("response_format.type"),
        ),
    ];
    for (body, status, param) in cases {
        let r = post(a, "/v1/chat/completions", body.clone());
        assert_eq!(r.status, status, "{body} -> {}", r.body);
        let e = error_of(&r);
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{body} -> {}", r.body);
        }
    }
    let r = http(
        a,
        "POST",
        "/v1/chat/completions",
        Some(KEY),
        Some("{not json"),
    );
    assert_eq!(r.status, 400);
    assert!(error_of(&r)["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let r = post(a, "/v1/completions", json!({"prompt": [5000000]}));
    assert_eq!(
        (r.status, error_of(&r)["param"].clone()),
        (400, json!("prompt"))
    );
    assert_eq!(http(a, "GET", "/v2/nothing", Some(KEY), None).status, 404);

    // Tokenizer routes.
    let t = post(a, "/tokenize", json!({"prompt": "And God said"})).json();
    let ids = t["tokens"].clone();
    assert_eq!(t["count"], ids.as_array().unwrap().len());
    assert_eq!(ids[0], 2, "BOS first");
    let d = post(a, "/detokenize", json!({"tokens": ids})).json();
    assert_eq!(d["prompt"], "<bos>And God said");
    let chat_ids = post(a, "/tokenize", json!({"messages": user})).json();
    assert!(chat_ids["count"].as_u64().unwrap() > t["count"].as_u64().unwrap());

    // A non-streamed and a streamed answer: the SSE chunks concatenate to the same text.
    let body = json!({"messages": user, "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let whole = post(a, "/v1/chat/completions", body.clone()).json();
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(whole["usage"]["completion_tokens"], 24);
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let r = post(a, "/v1/chat/completions", sbody);
    assert!(
        r.headers
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{}",
        r.headers
    );
    let events = sse_events(&r.body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    assert_eq!(usage["completion_tokens"], 24);
    assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());
    let finishes: Vec<_> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finishes, ["length"]);

    // tool_choice `none`: the tools are in the prompt (as with `auto`, as /tokenize renders
    // them), and no call comes back.
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let prompt_tokens = |extra: Value| {
        let mut b = json!({"messages": user, "max_tokens": 16, "temperature": 0});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = post(a, "/v1/chat/completions", b).json();
        assert!(
            r["choices"][0]["message"].get("tool_calls").is_none(),
            "{r}"
        );
        assert_ne!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");
        r["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let without = prompt_tokens(json!({}));
    let none = prompt_tokens(json!({"tools": tools, "tool_choice": "none"}));
    let rendered = post(a, "/tokenize", json!({"messages": user, "tools": tools})).json();
    assert_eq!(Some(none), rendered["count"].as_u64(), "{rendered}");
    assert!(none > without + 10, "{none} vs {without} without tools");
    let sbody = json!({"messages": user, "tools": tools, "tool_choice": "none", "max_tokens": 16, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let events = sse_events(&post(a, "/v1/chat/completions", sbody).body);
    assert!(
        !events.iter().any(|e| e.contains("tool_calls")),
        "{events:?}"
    );
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"].as_u64(), Some(none));

    // Metrics name what the issue asks for, and count the work done.
    let m = http(a, "GET", "/metrics", None, None).body;
    for name in [
        "zaya_requests_running ",
        "zaya_requests_waiting ",
        "zaya_prompt_tokens_total ",
        "zaya_generation_tokens_total ",
        "zaya_prefix_cache_hit_tokens_total ",
        "zaya_time_to_first_token_seconds_bucket",
        "zaya_inter_token_latency_seconds_bucket",
        "zaya_request_duration_seconds_count ",
    ] {
        assert!(m.contains(name), "{name} missing:\n{m}");
    }
    let gen: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("zaya_generation_tokens_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(gen >= 48.0, "{gen}");
    // One log line per request, with its numbers.
    let log = srv.log();
    assert!(
        log.lines().any(|l| l.contains("request")
            && l.contains("ttft_ms")
            && l.contains("finish=length")
            && l.contains("completion_tokens=24")),
        "{log}"
    );
    // Still serving after all of that.
    assert_eq!(
        post(
            a,
            "/v1/completions",
            json!({"prompt": "And", "max_tokens": 2})
        )
        .status,
        200
    );
}

/// A value of the server's `/metrics`.
fn metric(addr: &str, name: &str) -> f64 {
    let m = http(addr, "GET", "/metrics", None, None).body;
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing:\n{m}"))
        .parse()
        .unwrap()
}

/// Polls `cond` every 20 ms for at most `limit`; whether it became true.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

#[test]
fn serve_cancels_non_streaming_requests_of_disconnected_clients() {
    let srv = Server::start(&[]);
    let a = &srv.addr;
    let user = json!([{"role": "user", "content": "And God said"}]);
    let max_tokens = 1500;
    let cases = [
        (
            "/v1/chat/completions",
            json!({"messages": user, "max_tokens": max_tokens, "ignore_eos": true, "temperature": 0}),
            "keep-alive",
        ),
        (
            "/v1/completions",
            json!({"prompt": ["And God said", "In the beginning"], "n": 2, "max_tokens": max_tokens, "ignore_eos": true, "temperature": 0}),
            "close",
        ),
    ];
    for (i, (path, body, connection)) in cases.into_iter().enumerate() {
        assert_eq!(metric(a, "zaya_requests_running"), 0.0);
        let body = body.to_string();
        let mut s = TcpStream::connect(a).unwrap();
        s.write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {a}\r\nConnection: {connection}\r\n\
                 Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        // Running and generating: then the client goes away without reading an answer.
        let gen0 = metric(a, "zaya_generation_tokens_total");
        assert!(
            wait_until(Duration::from_secs(60), || metric(
                a,
                "zaya_requests_running"
            ) > 0.0
                && metric(a, "zaya_generation_tokens_total") >= gen0 + 8.0),
            "{path}: the request did not start\n{}",
            srv.log()
        );
        drop(s);
        let closed = Instant::now();
        let gen_at_close = metric(a, "zaya_generation_tokens_total");
        assert!(
            wait_until(Duration::from_secs(10), || metric(
                a,
                "zaya_requests_running"
            ) == 0.0),
            "{path}: the disconnected client's request still runs after 10 s\n{}",
            srv.log()
        );
        let gone_after = closed.elapsed();
        let gen1 = metric(a, "zaya_generation_tokens_total");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            metric(a, "zaya_generation_tokens_total"),
            gen1,
            "{path}: tokens still generated after the cancel"
        );
        eprintln!(
            "{path}: {} tokens when the client closed, {} when its rows had left ({gone_after:?} later)",
            gen_at_close - gen0,
            gen1 - gen0
        );
        let rows = if i == 0 { 1.0 } else { 4.0 };
        assert!(
            gen1 - gen0 < rows * max_tokens as f64 / 2.0,
            "{path}: {} tokens generated before the rows left (closed after {}, gone after {gone_after:?})",
            gen1 - gen0,
            gen_at_close - gen0
        );
        // Its log line says so, each choice finished `abort`.
        let finish = if i == 0 {
            "finish=abort"
        } else {
            "finish=abort,abort,abort,abort"
        };
        assert!(
            wait_until(Duration::from_secs(5), || srv
                .log()
                .lines()
                .any(|l| l.contains("client disconnected")
                    && l.contains(finish)
                    && l.contains(if i == 0 { "chatcmpl-" } else { "cmpl-" }))),
            "{path}: no cancelled request line\n{}",
            srv.log()
        );
    }
    // Still serving.
    let r = post(
        a,
        "/v1/chat/completions",
        json!({"messages": user, "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn serve_queue_full_then_sigterm_drains_and_exits_zero() {
    let mut srv = Server::start(&["--max-running", "1", "--max-waiting", "1"]);
    let addr = srv.addr.clone();
    let long = json!({"prompt": "And God said", "max_tokens": 400, "ignore_eos": true, "temperature": 0, "stream": true});
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let addr = addr.clone();
                let long = long.clone();
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(30 * i));
                    post(&addr, "/v1/completions", long).status
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    let r = post(
        &addr,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 1}),
    );
    assert_eq!(
        r.status, 200,
        "serving again once the queue drained: {}",
        r.body
    );

    // SIGTERM while a stream runs: it finishes ([DONE]) and the process exits 0.
    let streaming = {
        let addr = addr.clone();
        let body =
            json!({"prompt": "And God said", "max_tokens": 60, "ignore_eos": true, "stream": true});
        std::thread::spawn(move || post(&addr, "/v1/completions", body))
    };
    let t0 = Instant::now();
    while !srv.log().contains("zaya_server") && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    unsafe {
        libc::kill(srv.child.id() as i32, libc::SIGTERM);
    }
    let r = streaming.join().unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.trim_end().ends_with("data: [DONE]"), "{}", r.body);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = srv.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}\n{}", srv.log());
    assert!(TcpStream::connect(&addr).is_err(), "no longer accepting");
}

#[test]
fn serve_through_the_openai_python_client() {
    let Some(python) = std::env::var_os("ZAYA_TEST_PYTHON") else {
        eprintln!(
            "SKIPPED serve_through_the_openai_python_client: set ZAYA_TEST_PYTHON to a python with the `openai` package (.ci/run does)"
        );
        return;
    };
    let srv = Server::start(&[]);
    let cold = Server::start(&["--prefix-cache-mib", "0"]);
    let prompt = "And God said";
    let max_tokens = 12;
    let out = Command::new(env!("CARGO_BIN_EXE_zaya"))
        .args([
            "generate",
            "--prompt",
            prompt,
            "--max-new-tokens",
            &max_tokens.to_string(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gen: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cfg = json!({
        "base": srv.url(),
        "cold": cold.url(),
        "key": KEY,
        "model": "zaya-default",
        "generate": {"prompt": prompt, "max_tokens": max_tokens, "text": gen["texts"][0]},
    });
    // removed when the test ends, pass or fail
    let cfg_file = tempfile::Builder::new()
        .prefix("zaya-serve-checks-")
        .suffix(".json")
        .tempfile()
        .unwrap();
    let cfg_path = cfg_file.path();
    std::fs::write(cfg_path, cfg.to_string()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/serve/openai_checks.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script).arg(cfg_path);
    if let Ok(only) = std::env::var("ZAYA_SERVE_CHECKS") {
        cmd.args(only.split(','));
    }
    let status = cmd.status().unwrap();
    assert!(
        status.success(),
        "openai client checks failed; server log:\n{}",
        srv.log()
    );
}

/// What a request answered, whole or streamed: per choice the text (chat: the reasoning and
/// the content apart) and the finish reason; and the usage (prompt, completion, cached tokens).
fn answer_of(r: &Reply, chat: bool, stream: bool) -> Value {
    assert_eq!(r.status, 200, "{}", r.body);
    // per choice: [reasoning, content or text], finish reason
    let mut texts: Vec<[String; 2]> = Vec::new();
    let mut finish: Vec<Value> = Vec::new();
    let mut usage = Value::Null;
    let mut take = |v: &Value| {
        for c in v["choices"].as_array().into_iter().flatten() {
            let i = c["index"].as_u64().unwrap() as usize;
            if texts.len() <= i {
                texts.resize(i + 1, Default::default());
                finish.resize(i + 1, Value::Null);
            }
            let part = if chat && stream {
                &c["delta"]
            } else {
                &c["message"]
            };
            let (reasoning, text) = if chat {
                (&part["reasoning_content"], &part["content"])
            } else {
                (&Value::Null, &c["text"])
            };
            texts[i][0].push_str(reasoning.as_str().unwrap_or(""));
            texts[i][1].push_str(text.as_str().unwrap_or(""));
            if !c["finish_reason"].is_null() {
                finish[i] = c["finish_reason"].clone();
            }
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    };
    if stream {
        for e in sse_events(&r.body) {
            if e != "[DONE]" {
                take(&serde_json::from_str(&e).unwrap());
            }
        }
    } else {
        take(&r.json());
    }
    json!({"texts": texts, "finish": finish, "usage": usage})
}

/// Greedy requests sent at once (chat and completions, streamed and not, `n = 2`, a long
/// prompt), then a second turn extending the long prompt (a prefix-cache hit); the answers.
fn mesh_answers(srv: &Server) -> Vec<Value> {
    let long: String = (0..40)
        .map(|i| format!("In the beginning {i} God created the heaven and the earth. "))
        .collect();
    let requests: Vec<(&str, bool, Value)> = vec![
        (
            "/v1/chat/completions",
            false,
            json!({"messages": [{"role": "user", "content": "And God said"}], "max_tokens": 24, "temperature": 0}),
        ),
        (
            "/v1/chat/completions",
            true,
            json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who was Abraham?"}], "max_tokens": 24, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/completions",
            false,
            json!({"prompt": "And God said", "max_tokens": 24, "temperature": 0, "n": 2, "ignore_eos": true}),
        ),
        (
            "/v1/completions",
            true,
            json!({"prompt": "The LORD is my shepherd", "max_tokens": 24, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/completions",
            false,
            json!({"prompt": long.clone(), "max_tokens": 12, "temperature": 0}),
        ),
    ];
    let addr = srv.addr.clone();
    // all at once: the engine batches them
    let mut answers: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = requests
            .iter()
            .map(|(path, stream, body)| {
                let addr = addr.clone();
                s.spawn(move || {
                    let chat = path.contains("chat");
                    answer_of(&post(&addr, path, body.clone()), chat, *stream)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let second_turn = json!({"prompt": format!("{long} And"), "max_tokens": 12, "temperature": 0});
    let again = answer_of(&post(&addr, "/v1/completions", second_turn), false, false);
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 64, "the second turn reused {cached} tokens");
    answers.push(again);
    answers
}

/// `zaya serve --tp 2` / `--pp 2` / `--ep 2` (local ranks in the server process) answer
/// greedy chat and completion requests — concurrent, streamed and not, `n = 2`, a prompt
/// resumed from the prefix cache — exactly as the single-rank server does.
#[test]
fn serve_on_tp_pp_ep_meshes_answers_as_one_rank() {
    let want = mesh_answers(&Server::start(&[]));
    assert_eq!(want[2]["texts"][0], want[2]["texts"][1]);
    for mesh in [["--tp", "2"], ["--pp", "2"], ["--ep", "2"]] {
        let srv = Server::start(&mesh);
        let got = mesh_answers(&srv);
        assert!(
            srv.log().contains("2 local ranks"),
            "{mesh:?}: {}",
            srv.log()
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{mesh:?}: request {i}");
        }
    }
}

/// `mpirun -n 2 zaya serve --tp 2`: rank 0 serves HTTP, rank 1 follows its commands over
/// MPI; the answers are the single-rank server's, and SIGTERM drains and stops both.
#[cfg(feature = "mpi")]
#[test]
fn serve_on_mpi_processes_answers_as_one_rank() {
    let want = mesh_answers(&Server::start(&[]));
    let mut cmd = Command::new("mpirun");
    cmd.args(["-n", "2", "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(env!("CARGO_BIN_EXE_zaya"))
        .args(["serve", "--port", "0", "--api-key", KEY, "--tp", "2"]);
    let mut srv = Server::spawn(cmd);
    let got = mesh_answers(&srv);
    assert!(srv.log().contains("2 MPI ranks"), "{}", srv.log());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "mpi tp 2: request {i}");
    }
    // SIGTERM to mpirun reaches both processes: rank 0 drains and stops rank 1 (which
    // ignores the signal until then); the job ends
    unsafe {
        libc::kill(srv.child.id() as i32, libc::SIGTERM);
    }
    let ended = wait_until(Duration::from_secs(60), || {
        matches!(srv.child.try_wait(), Ok(Some(_)))
    });
    assert!(ended, "mpirun did not end: {}", srv.log());
    assert!(srv.log().contains("zaya serve: stopped"), "{}", srv.log());
}

#[test]
fn serve_refuses_meshes_it_cannot_run() {
    for (args, says) in [
        (&["--tp", "3"][..], "not divisible by --tp 3"),
        (
            &["--dp", "2"][..],
            "data-parallel replicas are for training",
        ),
        (&["--tp", "2", "--dtype", "f16"][..], "runs in f32 or bf16"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_zaya"))
            .args(["serve", "--port", "0"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
