//! Fine-tuning data: JSONL in the formats trainers use, turned into token ids and labels,
//! and packed into fixed-length rows whose documents never attend to each other.
//!
//! Formats, one JSON object per line:
//! - `{"text": "..."}`: plain text, loss on every token;
//! - `{"messages": [...], "tools": [...]}`: a conversation rendered with the model's chat
//!   template, loss on assistant turns only (tool calls included; tool results and user
//!   turns are context);
//! - `{"input_ids": [...], "labels": [...]}`: pre-tokenized (`labels` optional, `-100` =
//!   no loss).

use std::path::Path;

use serde_json::Value;

use crate::error::{Result, ZayaError};

/// Label value that carries no loss (the reference's `ignore_index`).
pub const IGNORE: i64 = -100;

/// One tokenized example: `labels[i]` is the target *at* position `i` (the loss shifts).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Turns text and conversations into token ids; implemented by the text layer (tokenizer +
/// chat template) so the data code does not depend on how that is done.
pub trait Encoder {
    /// Plain text with the model's special tokens (BOS/EOS as its tokenizer adds them).
    fn encode_text(&self, text: &str) -> Result<Vec<u32>>;
    /// A conversation: ids and, per id, whether it belongs to an assistant turn.
    fn encode_conversation(
        &self,
        messages: &Value,
        tools: Option<&Value>,
    ) -> Result<(Vec<u32>, Vec<bool>)>;
}

fn line_error(path: &Path, line: usize, msg: impl std::fmt::Display) -> ZayaError {
    ZayaError::Input(format!("{}:{line}: {msg}", path.display()))
}

/// Parses one JSONL line.
pub fn parse_example(
    v: &Value,
    encoder: &dyn Encoder,
    vocab_size: usize,
) -> std::result::Result<Example, String> {
    let obj = v.as_object().ok_or("expected a JSON object")?;
    let ex = if let Some(ids) = obj.get("input_ids") {
        let ids: Vec<u32> = ids
            .as_array()
            .ok_or("input_ids must be a list")?
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64()
                    .filter(|&x| (x as usize) < vocab_size)
                    .map(|x| x as u32)
                    .ok_or(format!(
                        "input_ids[{i}] = {x} is not a token id below vocab_size {vocab_size}"
                    ))
            })
            .collect::<std::result::Result<_, _>>()?;
        let labels: Vec<i64> = match obj.get("labels") {
            None | Some(Value::Null) => ids.iter().map(|&x| x as i64).collect(),
            Some(l) => l
                .as_array()
                .ok_or("labels must be a list")?
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_i64()
                        .filter(|&x| x == IGNORE || (x >= 0 && (x as usize) < vocab_size))
                        .ok_or(format!("labels[{i}] = {x} is neither -100 nor a token id"))
                })
                .collect::<std::result::Result<_, _>>()?,
        };
        if labels.len() != ids.len() {
            return Err(format!(
                "labels has {} entries, input_ids {}",
                labels.len(),
                ids.len()
            ));
        }
        Example {
            input_ids: ids,
            labels,
        }
    } else if let Some(messages) = obj.get("messages") {
        if !messages.is_array() {
            return Err("messages must be a list".into());
        }
        let (ids, assistant) = encoder
            .encode_conversation(messages, obj.get("tools").filter(|t| !t.is_null()))
            .map_err(|e| e.to_string())?;
        let labels = ids
            .iter()
            .zip(&assistant)
            .map(|(&id, &a)| if a { id as i64 } else { IGNORE })
            .collect();
        Example {
            input_ids: ids,
            labels,
        }
    } else if let Some(text) = obj.get("text") {
        let text = text.as_str().ok_or("text must be a string")?;
        check_text_size("text", text.len()).map_err(|e| e.to_string())?;
        let ids = encoder.encode_text(text).map_err(|e| e.to_string())?;
        Example {
            labels: ids.iter().map(|&x| x as i64).collect(),
            input_ids: ids,
        }
    } else {
        return Err("expected one of `text`, `messages` or `input_ids`".into());
    };
    if ex.input_ids.len() < 2 {
        return Err("an example needs at least two tokens".into());
    }
    Ok(ex)
}

/// Reads a JSONL file; errors name the file and line.
pub fn read_jsonl(path: &Path, encoder: &dyn Encoder, vocab_size: usize) -> Result<Vec<Example>> {
    let bytes = std::fs::read(path).map_err(|e| ZayaError::io(path, e))?;
    parse_jsonl(path, &bytes, encoder, vocab_size)
}

/// Parses the bytes of a JSONL file (`path` names it in errors): one example per non-empty
/// line; a line that is not UTF-8 or not a valid example is an error naming the line.
pub fn parse_jsonl(
    path: &Path,
    bytes: &[u8],
    encoder: &dyn Encoder,
    vocab_size: usize,
) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = std::str::from_utf8(line).map_err(|e| {
            line_error(
                path,
                i + 1,
                format!(
                    "not valid UTF-8 (at byte {} of the line)",
                    e.valid_up_to() + 1
                ),
            )
        })?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| line_error(path, i + 1, e))?;
        out.push(parse_example(&v, encoder, vocab_size).map_err(|e| line_error(path, i + 1, e))?);
    }
    if out.is_empty() {
        return Err(ZayaError::Input(format!("{}: no examples", path.display())));
    }
    Ok(out)
}

/// Largest text (UTF-8 bytes) tokenized as one example. Byte-pair encoding works on a
/// "word" at a time, and the ZAYA1 tokenizer does not split text into words (spaces become
/// `▁` inside one word), so an example's whole text is one BPE word costing ~200 bytes of
/// memory per byte: 1 MiB keeps that near 200 MB. Longer documents must be split into
/// several examples (packing cuts them into `seq_len` rows anyway).
pub const MAX_EXAMPLE_TEXT_BYTES: usize = 1 << 20;

/// Refuses text longer than [`MAX_EXAMPLE_TEXT_BYTES`] before it reaches the tokenizer.
pub fn check_text_size(what: &str, len: usize) -> Result<()> {
    if len > MAX_EXAMPLE_TEXT_BYTES {
        return Err(ZayaError::Input(format!(
            "{what} has {len} bytes, more than the {MAX_EXAMPLE_TEXT_BYTES} one example may have \
             (tokenizing it would need ~200 bytes of memory per byte); split it into several examples"
        )));
    }
    Ok(())
}

/// A packed training row: several documents back to back, then padding.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedRow {
    pub input_ids: Vec<u32>,
    /// Already aligned for the causal loss of the reference: position `i` is the label of
    /// token `i` (the loss shifts by one), `-100` at padding and at each document's first
    /// token (a document never predicts from the previous one).
    pub labels: Vec<i64>,
    /// Document index per position (padding continues the last document).
    pub document_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
}

/// Packs examples into rows of `seq_len` tokens, first-fit in the given order; an example
/// longer than `seq_len` is cut into `seq_len` pieces.
pub fn pack(examples: &[Example], seq_len: usize, pad_id: u32) -> Result<Vec<PackedRow>> {
    if seq_len < 2 {
        return Err(ZayaError::Input(format!(
            "seq_len must be at least 2, got {seq_len}"
        )));
    }
    if let Some((i, ex)) = examples
        .iter()
        .enumerate()
        .find(|(_, ex)| ex.labels.len() != ex.input_ids.len())
    {
        return Err(ZayaError::Input(format!(
            "example {i}: {} labels for {} input ids",
            ex.labels.len(),
            ex.input_ids.len()
        )));
    }
    let mut pieces: Vec<Example> = Vec::new();
    for ex in examples {
        for start in (0..ex.input_ids.len()).step_by(seq_len) {
            let end = (start + seq_len).min(ex.input_ids.len());
            if end - start >= 2 {
                pieces.push(Example {
                    input_ids: ex.input_ids[start..end].to_vec(),
                    labels: ex.labels[start..end].to_vec(),
                });
            }
        }
    }
    let mut rows: Vec<Vec<Example>> = Vec::new();
    let mut used: Vec<usize> = Vec::new();
    for p in pieces {
        let n = p.input_ids.len();
        match used.iter().position(|&u| u + n <= seq_len) {
            Some(r) => {
                used[r] += n;
                rows[r].push(p);
            }
            None => {
                used.push(n);
                rows.push(vec![p]);
            }
        }
    }
    Ok(rows
        .into_iter()
        .map(|docs| {
            let mut row = PackedRow {
                input_ids: Vec::with_capacity(seq_len),
                labels: Vec::with_capacity(seq_len),
                document_ids: Vec::with_capacity(seq_len),
                attention_mask: Vec::with_capacity(seq_len),
            };
            for (d, doc) in docs.iter().enumerate() {
                for (i, (&id, &l)) in doc.input_ids.iter().zip(&doc.labels).enumerate() {
                    row.input_ids.push(id);
                    row.labels.push(if i == 0 { IGNORE } else { l });
                    row.document_ids.push(d as u32);
                    row.attention_mask.push(1);
                }
            }
            let last = docs.len().saturating_sub(1) as u32;
            while row.input_ids.len() < seq_len {
                row.input_ids.push(pad_id);
                row.labels.push(IGNORE);
                row.document_ids.push(last);
                row.attention_mask.push(0);
            }
            row
        })
        .collect())
}

/// Convenience for tests and pre-tokenized data: an encoder that refuses text.
pub struct PretokenizedOnly;

impl Encoder for PretokenizedOnly {
    fn encode_text(&self, _: &str) -> Result<Vec<u32>> {
        Err(ZayaError::Input(
            "this dataset needs a tokenizer (text found)".into(),
        ))
    }
    fn encode_conversation(&self, _: &Value, _: Option<&Value>) -> Result<(Vec<u32>, Vec<bool>)> {
        Err(ZayaError::Input(
            "this dataset needs a tokenizer and chat template (messages found)".into(),
        ))
    }
}

/// Reads a dataset file that only holds pre-tokenized examples.
pub fn read_pretokenized(path: &Path, vocab_size: usize) -> Result<Vec<Example>> {
    read_jsonl(path, &PretokenizedOnly, vocab_size)
}

/// The model's tokenizer and chat template as an [`Encoder`]. A conversation's assistant
/// turns are found by rendering its prefixes (the template must render incrementally, as
/// chat templates do): the text that message `i` adds after the generation prompt of the
/// messages before it is the assistant's, end-of-turn included, so the model learns to stop.
impl Encoder for crate::text::ZayaTokenizer {
    fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode(text, true)?)
    }

    fn encode_conversation(
        &self,
        messages: &Value,
        tools: Option<&Value>,
    ) -> Result<(Vec<u32>, Vec<bool>)> {
        use crate::text::ChatRequest;
        let msgs = messages
            .as_array()
            .ok_or_else(|| ZayaError::Input("messages must be a list".into()))?;
        let tools: Option<Vec<Value>> = match tools {
            None => None,
            Some(Value::Array(t)) => Some(t.clone()),
            Some(_) => return Err(ZayaError::Input("tools must be a list".into())),
        };
        let render = |upto: usize, generation_prompt: bool| -> Result<String> {
            let mut req = ChatRequest::new(msgs[..upto].to_vec());
            req.tools = tools.clone();
            req.add_generation_prompt = generation_prompt;
            Ok(self.apply_chat_template(&req)?)
        };
        let full = render(msgs.len(), false)?;
        check_text_size("the rendered conversation", full.len())?;
        let mut spans = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            if m.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let before = render(i, true)?;
            let after = render(i + 1, false)?;
            if !after.starts_with(&before) || !full.starts_with(&after) {
                return Err(ZayaError::Input(format!(
                    "the chat template does not render message {i} incrementally; cannot find the assistant's tokens"
                )));
            }
            spans.push(before.len()..after.len());
        }
        let enc = self
            .inner()
            .encode(full.as_str(), false)
            .map_err(|e| ZayaError::Input(format!("tokenizing a conversation: {e}")))?;
        let ids = enc.get_ids().to_vec();
        let assistant = enc
            .get_offsets()
            .iter()
            .map(|(start, _)| spans.iter().any(|s| s.contains(start)))
            .collect();
        Ok((ids, assistant))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Chars;
    impl Encoder for Chars {
        fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
            Ok(text.bytes().map(|b| b as u32).collect())
        }
        fn encode_conversation(
            &self,
            messages: &Value,
            _: Option<&Value>,
        ) -> Result<(Vec<u32>, Vec<bool>)> {
            let mut ids = vec![];
            let mut mask = vec![];
            for m in messages.as_array().unwrap() {
                let a = m["role"] == "assistant";
                for b in m["content"].as_str().unwrap().bytes() {
                    ids.push(b as u32);
                    mask.push(a);
                }
            }
            Ok((ids, mask))
        }
    }

    #[test]
    fn formats_give_ids_and_labels() {
        let e = parse_example(&json!({"text": "hi!"}), &Chars, 256).unwrap();
        assert_eq!(e.input_ids, vec![104, 105, 33]);
        assert_eq!(e.labels, vec![104, 105, 33]);
        let e = parse_example(
            &json!({"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]}),
            &Chars,
            256,
        )
        .unwrap();
        assert_eq!(e.labels, vec![IGNORE, IGNORE, 99, 100]);
        let e = parse_example(
            &json!({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}),
            &Chars,
            256,
        )
        .unwrap();
        assert_eq!(e.labels, vec![IGNORE, 2, 3]);
        assert!(parse_example(&json!({"input_ids": [1, 999]}), &Chars, 256)
            .unwrap_err()
            .contains("input_ids[1]"));
        assert!(parse_example(&json!({"input_ids": [1, 2], "labels": [1]}), &Chars, 256).is_err());
        assert!(parse_example(&json!({"foo": 1}), &Chars, 256).is_err());
    }

    #[test]
    fn packing_keeps_documents_apart_and_fills_rows() {
        let ex = |n: usize, base: u32| Example {
            input_ids: (0..n as u32).map(|i| base + i).collect(),
            labels: (0..n as i64).map(|i| base as i64 + i).collect(),
        };
        let rows = pack(&[ex(5, 10), ex(6, 20), ex(3, 30), ex(12, 40)], 8, 0).unwrap();
        // first fit: 5+3 fill row 0, 6 opens row 1, 12 is cut into 8 (row 2) and 4 (6+4 > 8: row 3)
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].input_ids, vec![10, 11, 12, 13, 14, 30, 31, 32]);
        assert_eq!(rows[0].labels, vec![IGNORE, 11, 12, 13, 14, IGNORE, 31, 32]);
        assert_eq!(rows[0].document_ids, vec![0, 0, 0, 0, 0, 1, 1, 1]);
        assert_eq!(rows[1].attention_mask, vec![1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(rows[1].labels[6..], [IGNORE, IGNORE]);
        let total: usize = rows
            .iter()
            .map(|r| r.attention_mask.iter().filter(|&&m| m == 1).count())
            .sum();
        assert_eq!(total, 5 + 6 + 3 + 12);
    }
}
