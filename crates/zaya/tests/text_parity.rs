//! Tokenizer, detokenizer, streaming and chat-template parity with transformers 5.23 on the
//! fixtures written by `scripts/make_text_fixtures.py` (tests/fixtures/text/).

use std::path::PathBuf;

use serde_json::{Map, Value};
use zaya::text::{ChatRequest, OutputParser, StreamDecoder, TextError, ZayaTokenizer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/text")
}

fn load_json(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn tokenizer() -> ZayaTokenizer {
    ZayaTokenizer::from_dir(fixtures().join("tokenizer")).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn special_token_ids_match_transformers() {
    let tok = tokenizer();
    let f = load_json("tokenize.json");
    assert_eq!(
        tok.bos_token_id(),
        Some(f["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.eos_token_id(),
        Some(f["eos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.pad_token_id(),
        Some(f["pad_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(tok.vocab_size(), f["vocab_size"].as_u64().unwrap() as usize);
    // ZAYA1 layout.
    assert_eq!(
        (tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id()),
        (Some(2), Some(106), Some(0))
    );
    for (text, id) in [
        ("<zyphra_tool_call>", 101),
        ("</zyphra_tool_call>", 102),
        ("<zyphra_tool_response>", 103),
        ("</zyphra_tool_response>", 104),
        ("<start_of_turn>", 105),
        ("<end_of_turn>", 106),
    ] {
        assert_eq!(tok.token_to_id(text), Some(id), "{text}");
        assert!(tok.is_special_id(id));
    }
    assert!(tok
        .token_to_id("<think>")
        .is_some_and(|id| tok.is_special_id(id)));
    // generation_config.json says [1, 106]; the tokenizer's eos (106) is already there.
    assert_eq!(tok.eos_token_ids(), vec![1, 106]);
    assert_eq!(tok.stop_token_ids(&[106, 7]), vec![1, 106, 7]);
    let map = tok.special_tokens_map();
    assert_eq!(
        map.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>(),
        [
            "bos_token=<bos>",
            "eos_token=<end_of_turn>",
            "unk_token=<unk>",
            "pad_token=<pad>",
            "mask_token=<mask>"
        ]
    );
}

#[test]
fn encode_and_decode_match_transformers() {
    let tok = tokenizer();
    let f = load_json("tokenize.json");
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let with = ids(&case["ids_with_special"]);
        let without = ids(&case["ids_without_special"]);
        assert_eq!(
            tok.encode(text, true).unwrap(),
            with,
            "{text:?} with special tokens"
        );
        assert_eq!(
            tok.encode(text, false).unwrap(),
            without,
            "{text:?} without special tokens"
        );
        assert_eq!(
            tok.decode(&with, false).unwrap(),
            case["decode"].as_str().unwrap(),
            "{text:?}"
        );
        assert_eq!(
            tok.decode(&with, true).unwrap(),
            case["decode_skip_special"].as_str().unwrap(),
            "{text:?}"
        );
        let tokens: Vec<String> = without
            .iter()
            .map(|&i| tok.id_to_token(i).unwrap())
            .collect();
        let want: Vec<String> = case["tokens_without_special"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        assert_eq!(tokens, want, "{text:?}");
    }
    for d in f["decodes"].as_array().unwrap() {
        let i = ids(&d["ids"]);
        assert_eq!(
            tok.decode(&i, false).unwrap(),
            d["decode"].as_str().unwrap(),
            "{i:?}"
        );
        assert_eq!(
            tok.decode(&i, true).unwrap(),
            d["decode_skip_special"].as_str().unwrap(),
            "{i:?}"
        );
    }
}

#[test]
fn bos_and_end_of_turn_come_from_the_post_processor() {
    let tok = tokenizer();
    let ids = tok
        .encode("Hello! How can I assist you today?", true)
        .unwrap();
    assert_eq!(ids.first(), Some(&2));
    assert_eq!(ids.last(), Some(&106));
    assert_eq!(tok.encode("", true).unwrap(), vec![2, 106]);
}

#[test]
fn unknown_ids_are_reported_by_check_ids() {
    let tok = tokenizer();
    let n = tok.vocab_size() as u32;
    assert!(tok.check_ids(&[2, 5, n - 1]).is_ok());
    match tok.check_ids(&[2, n + 5]) {
        Err(TextError::UnknownTokenId { id, position, .. }) => {
            assert_eq!((id, position), (n + 5, 1))
        }
        other => panic!("{other:?}"),
    }
    // Like transformers, decode itself skips them.
    assert_eq!(tok.decode(&[n + 5], false).unwrap(), "");
}

/// Chunks of the stream decoder concatenate to the full decode, and no chunk carries a
/// replacement character the full text does not have.
fn check_stream(tok: &ZayaTokenizer, ids: &[u32], skip: bool) {
    let full = tok.decode(ids, skip).unwrap();
    let mut dec = StreamDecoder::new(skip);
    let mut chunks = Vec::new();
    for &id in ids {
        if let Some(c) = dec.step(tok, id).unwrap() {
            chunks.push(c);
        }
    }
    if let Some(c) = dec.finish(tok).unwrap() {
        chunks.push(c);
    }
    assert_eq!(chunks.concat(), full, "{ids:?} skip={skip}");
    if !full.contains('\u{FFFD}') {
        for c in &chunks {
            assert!(!c.contains('\u{FFFD}'), "chunk {c:?} of {full:?}");
        }
    }
}

#[test]
fn streaming_concatenates_to_full_decode() {
    let tok = tokenizer();
    let f = load_json("tokenize.json");
    for case in f["cases"].as_array().unwrap() {
        for key in ["ids_with_special", "ids_without_special"] {
            let i = ids(&case[key]);
            check_stream(&tok, &i, false);
            check_stream(&tok, &i, true);
        }
    }
    for case in load_json("templates.json")["conversations"]
        .as_array()
        .unwrap()
    {
        check_stream(&tok, &ids(&case["ids"]), false);
    }
}

#[test]
fn streaming_holds_back_split_multibyte_characters() {
    let tok = tokenizer();
    // 🙏 is four byte-fallback tokens in this vocabulary.
    let bytes: Vec<u32> = "🙏"
        .bytes()
        .map(|b| tok.token_to_id(&format!("<0x{b:02X}>")).unwrap())
        .collect();
    assert_eq!(bytes.len(), 4);
    let hello = tok.encode("Hi", false).unwrap();
    let mut dec = StreamDecoder::new(false);
    let mut out = Vec::new();
    for &id in hello.iter().chain(&bytes) {
        out.push(dec.step(&tok, id).unwrap());
    }
    let n = hello.len();
    assert_eq!(out[..n].iter().flatten().cloned().collect::<String>(), "Hi");
    assert_eq!(&out[n..n + 3], &[None, None, None]);
    assert_eq!(out[n + 3].as_deref(), Some("🙏"));
    assert_eq!(dec.pending(), 0);
    assert_eq!(dec.finish(&tok).unwrap(), None);

    // Generation that stops inside a character: finish() gives what the full decode has.
    let mut dec = StreamDecoder::new(false);
    assert_eq!(dec.step(&tok, bytes[0]).unwrap(), None);
    assert_eq!(dec.step(&tok, bytes[1]).unwrap(), None);
    assert_eq!(dec.pending(), 2);
    assert_eq!(
        dec.finish(&tok).unwrap().as_deref(),
        Some("\u{FFFD}\u{FFFD}")
    );
    assert_eq!(tok.decode(&bytes[..2], false).unwrap(), "\u{FFFD}\u{FFFD}");
}

#[test]
fn streaming_keeps_spaces_at_token_boundaries() {
    let tok = tokenizer();
    let text = "The quick brown fox jumps over the lazy dog.";
    let ids = tok.encode(text, false).unwrap();
    let mut dec = StreamDecoder::new(true);
    let chunks: Vec<String> = ids
        .iter()
        .filter_map(|&i| dec.step(&tok, i).unwrap())
        .collect();
    assert_eq!(chunks.len(), ids.len());
    assert_eq!(chunks[1], " quick");
    assert_eq!(chunks.concat(), text);
}

/// The fixture's kwargs as a request: `add_generation_prompt` and a boolean `enable_thinking`
/// are fields, everything else (including `enable_thinking: null`) keyword arguments.
fn request(case: &Value) -> ChatRequest {
    let mut kwargs: Map<String, Value> = case["kwargs"].as_object().unwrap().clone();
    let add_generation_prompt = kwargs
        .remove("add_generation_prompt")
        .map(|v| v.as_bool().unwrap())
        .unwrap_or(false);
    let enable_thinking = match kwargs.get("enable_thinking") {
        Some(Value::Bool(b)) => {
            let b = *b;
            kwargs.remove("enable_thinking");
            Some(b)
        }
        _ => None,
    };
    ChatRequest {
        messages: case["messages"].as_array().unwrap().clone(),
        tools: case.get("tools").map(|t| t.as_array().unwrap().clone()),
        documents: None,
        add_generation_prompt,
        enable_thinking,
        kwargs,
    }
}

#[test]
fn chat_template_renders_byte_identical() {
    let tok = tokenizer();
    let f = load_json("templates.json");
    let convs = f["conversations"].as_array().unwrap();
    assert!(convs.len() >= 10);
    for case in convs {
        let name = case["name"].as_str().unwrap();
        let req = request(case);
        let rendered = tok
            .apply_chat_template(&req)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = case["rendered"].as_str().unwrap();
        if rendered != want {
            let at = rendered
                .char_indices()
                .zip(want.chars())
                .find(|((_, a), b)| a != b)
                .map(|((i, _), _)| i)
                .unwrap_or(rendered.len().min(want.len()));
            panic!(
                "{name}: differs at byte {at}\n--- got ---\n{rendered}\n--- want ---\n{want}\n--- got from there: {:?}\n--- want from there: {:?}",
                &rendered[at..],
                &want[at..]
            );
        }
        assert_eq!(tok.encode_chat(&req).unwrap(), ids(&case["ids"]), "{name}");
    }
}

#[test]
fn chat_template_errors_match_raise_exception() {
    let tok = tokenizer();
    for case in load_json("templates.json")["errors"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        match tok.apply_chat_template(&request(case)) {
            Err(TextError::TemplateRaised { message }) => {
                assert_eq!(message, case["error"].as_str().unwrap(), "{name}")
            }
            other => panic!("{name}: expected the template's exception, got {other:?}"),
        }
    }
}

#[test]
fn conversation_file_format_deserializes() {
    // The CLI's CONV.json: {"messages": [...], "tools": [...]} plus optional fields.
    let conv: ChatRequest = serde_json::from_str(
        r#"{"messages": [{"role": "user", "content": "Hi"}], "tools": [{"name": "f"}],
            "add_generation_prompt": true, "custom": [1, 2], "enable_thinking": null}"#,
    )
    .unwrap();
    assert_eq!(conv.messages.len(), 1);
    assert_eq!(conv.tools.as_ref().unwrap().len(), 1);
    assert!(conv.add_generation_prompt);
    assert_eq!(conv.enable_thinking, None);
    assert_eq!(conv.kwargs["custom"], serde_json::json!([1, 2]));
    assert_eq!(conv.kwargs["enable_thinking"], Value::Null);
}

/// The parser reads back what the template wrote: the assistant turn of the tool-call fixture
/// parses to the conversation's calls, arguments and their order included.
#[test]
fn parser_reads_back_rendered_tool_calls() {
    let f = load_json("templates.json");
    let case = f["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tools_and_calls")
        .unwrap();
    let rendered = case["rendered"].as_str().unwrap();
    let start = rendered
        .find("<start_of_turn>model\n<zyphra_tool_call>")
        .unwrap()
        + "<start_of_turn>model\n".len();
    let turn = &rendered[start..start + rendered[start..].find("<end_of_turn>").unwrap()];
    let tools = case["tools"].as_array().unwrap();
    let parsed = OutputParser::new().with_tools(tools).parse(turn);
    assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
    assert_eq!(parsed.content, "");
    assert_eq!(parsed.reasoning, None);
    let want = case["messages"][2]["tool_calls"].as_array().unwrap();
    assert_eq!(parsed.tool_calls.len(), want.len());
    for (got, want) in parsed.tool_calls.iter().zip(want) {
        assert_eq!(got.name, want["function"]["name"].as_str().unwrap());
        let want_args = want["function"]["arguments"].as_object().unwrap();
        assert_eq!(&got.arguments, want_args);
        assert!(got.arguments.keys().eq(want_args.keys()));
    }
}
