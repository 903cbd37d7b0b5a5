//! Multi-turn rollouts on the engine with a tool environment: the first turn is forced (by
//! an engine grammar) to call a tool, the environment's result is appended as a `tool`
//! message rendered by the chat template, masked out of the loss, and the model continues.
//! Also: the inference view shares the trained weights (an update is seen by the engine).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map};
use zaya::sampling::SamplingParams;
use zaya::text::ZayaTokenizer;
use zaya::train::TrainableModel;
use zaya_engine::{ConstraintFactory, Engine, EngineConfig, TokenConstraint};
use zaya_train::process::JsonLinesProcess;
use zaya_train::rollout::{rollout, tool_suffix_ids, Prompt, RolloutConfig};

fn default_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default")
}

/// Forces a fixed token sequence, then ends the turn.
struct Forced(Vec<u32>);

struct ForcedState {
    ids: Vec<u32>,
    at: usize,
}

impl ConstraintFactory for Forced {
    fn start(&self) -> Result<Box<dyn TokenConstraint>, String> {
        Ok(Box::new(ForcedState {
            ids: self.0.clone(),
            at: 0,
        }))
    }
}

impl TokenConstraint for ForcedState {
    fn mask(&mut self, allowed: &mut [bool]) -> Result<(), String> {
        let next = self.ids[self.at] as usize;
        for (i, a) in allowed.iter_mut().enumerate() {
            *a = i == next;
        }
        Ok(())
    }
    fn commit(&mut self, token: u32) -> Result<(), String> {
        if token != self.ids[self.at] {
            return Err(format!("expected {}, got {token}", self.ids[self.at]));
        }
        self.at += 1;
        Ok(())
    }
    fn is_finished(&self) -> bool {
        self.at >= self.ids.len()
    }
}

#[test]
fn tool_results_are_appended_masked_and_the_model_continues() {
    let dir = default_model();
    let tok = Arc::new(ZayaTokenizer::from_dir(&dir).unwrap());
    let model = TrainableModel::load(&dir).unwrap();
    let engine = Engine::start(
        Arc::new(model.inference_view().unwrap()),
        Some(tok.clone()),
        EngineConfig {
            prefix_cache_bytes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let call = "<zyphra_tool_call><function=add><parameter=a>2</parameter><parameter=b>2</parameter></function></zyphra_tool_call>";
    let mut forced = tok.encode(call, false).unwrap();
    let eos = tok.stop_token_ids(&model.config().eos_token_id);
    forced.push(eos[0]);
    let prompt_ids = tok.encode_prompt("And God said").unwrap();
    let prompts = vec![Prompt {
        ids: prompt_ids,
        text: "And God said".into(),
        columns: Map::new(),
    }];
    let cfg = RolloutConfig {
        num_generations: 2,
        max_completion_length: forced.len() + 60,
        sampling: SamplingParams {
            temperature: 1.0,
            ..Default::default()
        },
        stop_token_ids: eos.clone(),
        max_tool_turns: 1,
        first_turn_constraint: Some(Arc::new(Forced(forced.clone()))),
    };
    let script = format!(
        "python3 {}/tests/scripts/calculator_env.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut env = JsonLinesProcess::start("environment", &script, Duration::from_secs(10)).unwrap();
    let groups = rollout(&engine, &tok, &prompts, &cfg, 3, Some(&mut env)).unwrap();
    let suffix = tool_suffix_ids(
        &tok,
        &[json!({"role": "tool", "name": "add", "content": "{\"function\": \"add\", \"echo\": {\"a\": \"2\", \"b\": \"2\"}}"})],
    )
    .unwrap();
    assert!(!suffix.is_empty());
    for c in &groups[0] {
        assert_eq!(c.tool_turns, 1);
        assert_eq!(&c.ids[..forced.len()], forced.as_slice());
        // the forced turn, then the tool result (mask 0), then the model again (mask 1)
        let n = forced.len();
        assert!(c.tool_mask[..n].iter().all(|&m| m == 1));
        let tool_len = c.tool_mask[n..].iter().take_while(|&&m| m == 0).count();
        assert!(tool_len > 0, "no tool-result tokens");
        assert!(c.sampler_logps[n..n + tool_len].iter().all(|&l| l == 0.0));
        assert!(c.ids.len() > n + tool_len, "the model did not continue");
        assert!(c.tool_mask[n + tool_len..].iter().all(|&m| m == 1));
        // the environment's answer is in the tool-result tokens, not in the model's text
        let tool_text = tok.decode(&c.ids[n..n + tool_len], false).unwrap();
        assert!(tool_text.contains("echo"), "{tool_text}");
        assert!(!c.text.contains("echo"), "{}", c.text);
        assert_eq!(c.tool_calls.len(), 1);
        assert_eq!(c.tool_calls[0].name, "add");
        // forced tokens have log-probability 0 under the masked distribution
        assert!(c.sampler_logps[..n].iter().all(|&l| l == 0.0));
    }
    engine.shutdown(false);
}

#[test]
fn inference_view_shares_storage_and_sees_updates() {
    let dir = default_model();
    let model = TrainableModel::load(&dir).unwrap();
    let view = model.inference_view().unwrap();
    let ids = candle_core::Tensor::new(&[[5u32, 9, 11, 3]], &candle_core::Device::Cpu).unwrap();
    let logits = |m: &zaya::ZayaModel| {
        m.forward(&ids, None, &zaya::ForwardOptions::default())
            .unwrap()
            .logits
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-4);
    let before = logits(&view);
    // the view runs the fast inference kernels, the trainable model the reference ones
    assert!(close(&before, &logits(model.model())));
    // an in-place update of one trained parameter (what AdamW does) reaches the view
    let p = &model.params()[model.param_index("model.final_norm.weight").unwrap_or(0)];
    let t = p.var.as_tensor();
    p.var.set(&(t.detach() * 1.5).unwrap()).unwrap();
    let after = logits(&view);
    assert!(!close(&before, &after), "the view did not see the update");
    assert!(close(&after, &logits(model.model())));
}
