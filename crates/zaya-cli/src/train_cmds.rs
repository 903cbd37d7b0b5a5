//! Training-related parts of the `zaya` command, kept free of clap so `main.rs` decides the
//! flags. `zaya forward` with `"labels": [[..]]` in IN.json adds `loss` (and `aux_loss`, the
//! router balance loss, for information) to its output; with `--grads` also
//! `grad.<HF parameter name>` for every parameter, computed with gradient checkpointing
//! when `--checkpointing` is given. The loss is the reference's (cross-entropy only).
//!
//! Wiring in `main.rs` (in `cmd_forward`, after the logits are written to `tensors`):
//! ```ignore
//! if train_cmds::has_labels(&args.inputs)? {
//!     tensors.extend(train_cmds::forward_with_labels(
//!         &args.model.dir()?, &args.inputs, args.grads, args.checkpointing)?);
//! }
//! ```
//! Gradients are always computed on f32 master weights, whatever `--dtype` says.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::Deserialize;

use zaya::train::{labelled_outputs, Batch, Checkpointing, TrainableModel};

#[derive(Deserialize)]
struct LabelledInputs {
    input_ids: Vec<Vec<i64>>,
    attention_mask: Option<Vec<Vec<i64>>>,
    labels: Option<Vec<Vec<i64>>>,
}

fn read(path: &Path) -> Result<LabelledInputs> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Whether IN.json carries `labels`.
pub fn has_labels(inputs_json: &Path) -> Result<bool> {
    Ok(read(inputs_json)?.labels.is_some())
}

fn to_u32(rows: Vec<Vec<i64>>, what: &str, path: &Path) -> Result<Vec<Vec<u32>>> {
    rows.into_iter()
        .enumerate()
        .map(|(r, row)| {
            row.into_iter()
                .enumerate()
                .map(|(p, x)| {
                    u32::try_from(x).with_context(|| {
                        format!(
                            "{}: {what} value {x} at row {r}, position {p} is negative or too large",
                            path.display()
                        )
                    })
                })
                .collect()
        })
        .collect()
}

/// Reads IN.json (`input_ids`, optional `attention_mask`, `labels`) as a training batch.
pub fn read_batch(inputs_json: &Path) -> Result<Batch> {
    let inp = read(inputs_json)?;
    let Some(labels) = inp.labels else {
        bail!("{}: no `labels` field", inputs_json.display());
    };
    let batch = Batch {
        input_ids: to_u32(inp.input_ids, "input_ids", inputs_json)?,
        labels,
        attention_mask: inp
            .attention_mask
            .map(|m| to_u32(m, "attention_mask", inputs_json))
            .transpose()?,
        document_ids: None,
    };
    batch
        .shape()
        .with_context(|| format!("{}", inputs_json.display()))?;
    Ok(batch)
}

/// `loss`, `aux_loss` and (with `grads`) `grad.<name>` for every parameter.
pub fn forward_with_labels(
    model_dir: &Path,
    inputs_json: &Path,
    grads: bool,
    checkpointing: bool,
) -> Result<BTreeMap<String, Tensor>> {
    let batch = read_batch(inputs_json)?;
    let model = TrainableModel::load(model_dir)
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let cp = if checkpointing {
        Checkpointing::EveryLayer
    } else {
        Checkpointing::Off
    };
    Ok(labelled_outputs(&model, &batch, grads, cp)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name)
    }

    #[test]
    fn labelled_fixture_gives_the_reference_loss_and_gradients() {
        let dir = fixture("gqa_sliding");
        assert!(has_labels(&dir.join("train.json")).unwrap());
        assert!(!has_labels(&dir.join("batch.json")).unwrap());
        let reference = candle_core::safetensors::load(
            dir.join("reference.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for checkpointing in [false, true] {
            let out =
                forward_with_labels(&dir, &dir.join("train.json"), true, checkpointing).unwrap();
            let loss = out["loss"].to_vec1::<f32>().unwrap()[0];
            let want = reference["train.loss"].to_vec1::<f32>().unwrap()[0];
            assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
            let grads: Vec<_> = out.keys().filter(|k| k.starts_with("grad.")).collect();
            let want_grads = reference
                .keys()
                .filter(|k| k.starts_with("train.grad."))
                .count();
            assert_eq!(grads.len(), want_grads);
        }
        assert!(forward_with_labels(&dir, &dir.join("batch.json"), false, false).is_err());
    }
}
