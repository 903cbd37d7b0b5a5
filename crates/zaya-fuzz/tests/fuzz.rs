//! Fuzzing of every parser of outside input.
//!
//! * `cargo test -p zaya-fuzz --release`: the short runs (10 000 mutated inputs per
//!   target, what CI runs) and the saved regression inputs.
//! * `cargo test -p zaya-fuzz --release -- --ignored --test-threads 1`: the long runs
//!   (1 000 000 inputs per target; `ZAYA_FUZZ_INPUTS=N` changes the count,
//!   `ZAYA_FUZZ_SEED=S` the seed). Each prints its counts.
//!
//! A crash writes its input to `target/fuzz-crashes/<target>/`; after the fix, copy the
//! file to `crates/zaya-fuzz/regressions/<target>/` so it stays a test.

use zaya_fuzz::{check, replay_dir, targets, Target};

const SHORT: u64 = 10_000;
const LONG: u64 = 1_000_000;

fn short(name: &str) {
    let t = targets::by_name(name).expect("registered target");
    check(t.as_ref(), SHORT, 1);
}

fn long(name: &str) {
    let t = targets::by_name(name).expect("registered target");
    check(t.as_ref(), LONG, 2);
}

macro_rules! fuzz_tests {
    ($($short:ident, $long:ident => $name:literal;)*) => {
        $(
            #[test]
            fn $short() {
                short($name);
            }

            #[test]
            #[ignore = "long fuzz run (1M inputs): cargo test -p zaya-fuzz --release -- --ignored"]
            fn $long() {
                long($name);
            }
        )*
    };
}

fuzz_tests! {
    fuzz_config_json, fuzz_long_config_json => "config_json";
    fuzz_safetensors_file, fuzz_long_safetensors_file => "safetensors_file";
    fuzz_shard_index, fuzz_long_shard_index => "shard_index";
    fuzz_tokenizer_files, fuzz_long_tokenizer_files => "tokenizer_files";
    fuzz_chat_template, fuzz_long_chat_template => "chat_template";
    fuzz_training_data, fuzz_long_training_data => "training_data";
    fuzz_gguf_file, fuzz_long_gguf_file => "gguf_file";
    fuzz_lora_spec, fuzz_long_lora_spec => "lora_spec";
    fuzz_lora_adapter, fuzz_long_lora_adapter => "lora_adapter";
    fuzz_grpo_inputs, fuzz_long_grpo_inputs => "grpo_inputs";
    fuzz_grpo_process_answers, fuzz_long_grpo_process_answers => "grpo_process_answers";
    fuzz_grpo_data, fuzz_long_grpo_data => "grpo_data";
    fuzz_parallel_plan, fuzz_long_parallel_plan => "parallel_plan";
}

/// Every registered target has a test above (a new target must be added to the list).
#[test]
fn every_target_is_fuzzed() {
    let names: Vec<&str> = targets::all().iter().map(|t| t.name()).collect();
    assert_eq!(
        names,
        [
            "config_json",
            "safetensors_file",
            "shard_index",
            "tokenizer_files",
            "chat_template",
            "training_data",
            "gguf_file",
            "lora_spec",
            "lora_adapter",
            "grpo_inputs",
            "grpo_process_answers",
            "grpo_data",
            "parallel_plan"
        ]
    );
}

/// Inputs that crashed a parser once (kept after the fix) still end in Ok or an error.
#[test]
fn regressions_do_not_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut replayed = 0;
    for t in targets::all() {
        let dir = root.join(t.name());
        replayed += std::fs::read_dir(&dir).map_or(0, |d| d.count());
        let failures = replay_dir(t.as_ref(), &dir);
        assert!(failures.is_empty(), "{}: {failures:?}", t.name());
    }
    eprintln!("{replayed} regression inputs replayed");
}

/// The driver finds a planted panic and saves its input (a fuzzer that cannot fail is no
/// test).
#[test]
fn driver_catches_panics() {
    struct Planted;
    impl Target for Planted {
        fn name(&self) -> &'static str {
            "planted"
        }
        fn seeds(&self) -> Vec<zaya_fuzz::Input> {
            vec![vec![br#"{"n": 1}"#.to_vec()]]
        }
        fn run(&self, input: &zaya_fuzz::Input) -> Result<(), zaya_fuzz::ParseError> {
            let v: serde_json::Value = serde_json::from_slice(&input[0])?;
            if v["n"].as_i64() == Some(-1) {
                panic!("planted");
            }
            Ok(())
        }
    }
    let dir = std::env::temp_dir().join(format!("zaya-fuzz-planted-{}", std::process::id()));
    let report = zaya_fuzz::run_saving_to(&Planted, 2000, 3, &dir);
    assert!(!report.crashes.is_empty(), "{report}");
    let (msg, path) = &report.crashes[0];
    assert!(msg.starts_with("planted at "), "{msg}");
    let saved = zaya_fuzz::decode_input(&std::fs::read(path).unwrap()).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&saved[0]).unwrap();
    assert_eq!(v["n"], -1);
    let _ = std::fs::remove_dir_all(&dir);
}
