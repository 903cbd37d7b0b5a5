//! Rewards and environments as processes: a Python and a shell reward, a Python and a
//! shell environment, and the failures (crash, hang, garbage, wrong count) as clear errors.

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use zaya::text::ToolCall;
use zaya_train::process::JsonLinesProcess;
use zaya_train::rewards::{ProcessReward, Reward, Scored};
use zaya_train::rollout::parse_env_answer;

fn script(name: &str) -> String {
    format!("{}/tests/scripts/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn columns(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn score(
    cmd: &str,
    completions: &[&str],
    cols: &Map<String, Value>,
) -> zaya_train::Result<Vec<Option<f64>>> {
    let mut r = ProcessReward::start(cmd, Duration::from_secs(5))?;
    let items: Vec<Scored> = completions
        .iter()
        .map(|c| Scored {
            prompt: "p",
            completion: c,
            tool_calls: &[],
            columns: cols,
        })
        .collect();
    r.score(&items)
}

#[test]
fn python_reward_process_scores_each_completion() {
    let cmd = format!("python3 {}", script("length_reward.py"));
    let cols = columns(json!({"word": "light"}));
    let s = score(&cmd, &["let there be light", "darkness", "light"], &cols).unwrap();
    assert_eq!(s, vec![Some(1.0), Some(0.0), Some(1.0)]);
    // null: the reward does not apply
    let s = score(&cmd, &["x"], &Map::new()).unwrap();
    assert_eq!(s, vec![None]);
}

#[test]
fn shell_reward_process_scores_each_completion() {
    let cmd = format!("sh {}", script("count_reward.sh"));
    let cols = Map::new();
    let s = score(
        &cmd,
        &["a", "a much longer completion than the first"],
        &cols,
    )
    .unwrap();
    let (a, b) = (s[0].unwrap(), s[1].unwrap());
    assert!(a > 0.0 && b > a, "{s:?}");
}

fn err_of(cmd: &str) -> String {
    let cols = Map::new();
    score(cmd, &["x"], &cols).unwrap_err().to_string()
}

#[test]
fn crashing_reward_process_is_a_clear_error() {
    let e = err_of("echo dying >&2; exit 3");
    assert!(e.contains("reward process"), "{e}");
    assert!(e.contains("request 1"), "{e}");
    assert!(e.contains("exit status: 3") && e.contains("dying"), "{e}");
}

#[test]
fn garbage_from_reward_process_is_a_clear_error() {
    let e = err_of("while read l; do echo hello; done");
    assert!(e.contains("not JSON") && e.contains("hello"), "{e}");
    let e = err_of("while read l; do echo '\"1.5\"'; done");
    assert!(e.contains("expected a number or null"), "{e}");
}

#[test]
fn hanging_reward_process_times_out() {
    let start = Instant::now();
    let cols = Map::new();
    let mut r = ProcessReward::start("sleep 30", Duration::from_millis(300)).unwrap();
    let items = [Scored {
        prompt: "p",
        completion: "c",
        tool_calls: &[],
        columns: &cols,
    }];
    let e = r.score(&items).unwrap_err().to_string();
    assert!(e.contains("no answer to request 1 within 0.3 s"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn environments_answer_tool_calls() {
    let calls = vec![ToolCall {
        name: "add".into(),
        arguments: columns(json!({"a": 1, "b": 2})),
    }];
    for cmd in [
        format!("python3 {}", script("calculator_env.py")),
        format!("sh {}", script("echo_env.sh")),
    ] {
        let mut env = JsonLinesProcess::start("environment", &cmd, Duration::from_secs(5)).unwrap();
        let ans = env
            .request(&json!({"tool_calls": calls, "columns": {}, "turn": 0}))
            .unwrap();
        let results = parse_env_answer(&ans, 1).unwrap();
        assert_eq!(results.len(), 1);
        assert!(!results[0].is_empty());
    }
    assert!(parse_env_answer(&json!({"tool_results": []}), 1)
        .unwrap_err()
        .contains("0 tool results for 1 tool calls"));
    assert!(parse_env_answer(&json!([1]), 1).is_err());
}
