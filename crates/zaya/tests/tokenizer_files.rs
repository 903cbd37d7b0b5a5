//! Loading a tokenizer directory: which file provides what, and clear errors for bad files.

use std::path::{Path, PathBuf};

use serde_json::json;
use zaya::text::{ChatRequest, ChatTemplates, TextError, ZayaTokenizer};

fn fixture_tokenizer_json() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/text/tokenizer/tokenizer.json")
}

/// A fresh directory holding the fixture's tokenizer.json and the given files.
fn tokenizer_dir(name: &str, files: &[(&str, String)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zaya-text-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture_tokenizer_json(), dir.join("tokenizer.json")).unwrap();
    for (file, content) in files {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    dir
}

fn user(text: &str) -> ChatRequest {
    ChatRequest::new(vec![json!({"role": "user", "content": text})])
}

fn cleanup(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn chat_template_string_in_tokenizer_config() {
    let cfg = json!({"bos_token": "<bos>", "chat_template": "{{ bos_token }}[{{ messages[0].content }}]"});
    let dir = tokenizer_dir("cfg-string", &[("tokenizer_config.json", cfg.to_string())]);
    let tok = ZayaTokenizer::from_dir(&dir).unwrap();
    assert!(matches!(
        tok.chat_templates(),
        Some(ChatTemplates::Single(_))
    ));
    assert_eq!(tok.apply_chat_template(&user("hi")).unwrap(), "<bos>[hi]");
    cleanup(&dir);
}

#[test]
fn named_templates_pick_tool_use_when_tools_are_given() {
    let cfg = json!({"chat_template": [
        {"name": "default", "template": "D{{ messages|length }}"},
        {"name": "tool_use", "template": "T{{ tools|length }}"}
    ]});
    let dir = tokenizer_dir("cfg-list", &[("tokenizer_config.json", cfg.to_string())]);
    let tok = ZayaTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.apply_chat_template(&user("x")).unwrap(), "D1");
    let mut with_tools = user("x");
    with_tools.tools = Some(vec![json!({"name": "f"}), json!({"name": "g"})]);
    assert_eq!(tok.apply_chat_template(&with_tools).unwrap(), "T2");
    assert_eq!(
        tok.chat_template(Some("default"), true)
            .unwrap()
            .render(&with_tools)
            .unwrap(),
        "D1"
    );
    assert!(matches!(
        tok.chat_template(Some("rag"), false),
        Err(TextError::UnknownChatTemplate { .. })
    ));
    cleanup(&dir);
}

#[test]
fn template_files_take_priority_over_the_config() {
    let cfg = json!({"chat_template": "from config"});
    let dir = tokenizer_dir(
        "jinja-files",
        &[
            ("tokenizer_config.json", cfg.to_string()),
            ("chat_template.jinja", "from file\n".into()),
            (
                "additional_chat_templates/tool_use.jinja",
                "tools file".into(),
            ),
        ],
    );
    let tok = ZayaTokenizer::from_dir(&dir).unwrap();
    assert_eq!(
        tok.chat_templates().unwrap().names(),
        ["default", "tool_use"]
    );
    // Jinja drops the single trailing newline of the source.
    assert_eq!(tok.apply_chat_template(&user("x")).unwrap(), "from file");
    let mut with_tools = user("x");
    with_tools.tools = Some(vec![]);
    assert_eq!(tok.apply_chat_template(&with_tools).unwrap(), "tools file");
    cleanup(&dir);
}

#[test]
fn special_tokens_and_generation_config() {
    // AddedToken dicts; `added_tokens_decoder` present, so special_tokens_map.json is not read.
    let cfg = json!({
        "added_tokens_decoder": {},
        "bos_token": {"content": "<bos>", "special": true},
        "eos_token": "<eos>",
        "pad_token": null,
    });
    let map = json!({"eos_token": "<end_of_turn>"});
    let gen = json!({"eos_token_id": 106});
    let dir = tokenizer_dir(
        "specials",
        &[
            ("tokenizer_config.json", cfg.to_string()),
            ("special_tokens_map.json", map.to_string()),
            ("generation_config.json", gen.to_string()),
        ],
    );
    let tok = ZayaTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.bos_token_id(), Some(2));
    assert_eq!(tok.eos_token_id(), Some(1));
    // Explicit null: no pad token (Gemma's default only fills absent keys).
    assert_eq!(tok.pad_token_id(), None);
    assert_eq!(tok.special_token("unk_token").unwrap().content, "<unk>");
    assert_eq!(tok.eos_token_ids(), vec![106, 1]);
    cleanup(&dir);

    // Legacy path: no added_tokens_decoder, special_tokens_map.json overrides.
    let dir = tokenizer_dir(
        "legacy-map",
        &[
            (
                "tokenizer_config.json",
                json!({"eos_token": "<eos>"}).to_string(),
            ),
            ("special_tokens_map.json", map.to_string()),
        ],
    );
    let tok = ZayaTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.eos_token_id(), Some(106));
    cleanup(&dir);
}

#[test]
fn bad_files_give_errors_that_name_the_file_and_field() {
    let dir = std::env::temp_dir().join(format!("zaya-text-{}-empty", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    assert!(matches!(
        ZayaTokenizer::from_dir(&dir),
        Err(TextError::MissingFile { .. })
    ));
    std::fs::write(dir.join("tokenizer.json"), "{\"not\": \"a tokenizer\"}").unwrap();
    let e = ZayaTokenizer::from_dir(&dir).unwrap_err();
    assert!(matches!(e, TextError::TokenizerLoad { .. }), "{e}");
    cleanup(&dir);

    let cases = [
        (
            "tokenizer_config.json",
            json!({"chat_template": 5}).to_string(),
            "chat_template",
        ),
        (
            "tokenizer_config.json",
            json!({"chat_template": [{"name": "x"}]}).to_string(),
            "chat_template[0]",
        ),
        (
            "tokenizer_config.json",
            json!({"eos_token": 3}).to_string(),
            "eos_token",
        ),
        (
            "tokenizer_config.json",
            json!({"clean_up_tokenization_spaces": "yes"}).to_string(),
            "clean_up_tokenization_spaces",
        ),
        (
            "generation_config.json",
            json!({"eos_token_id": [1, "two"]}).to_string(),
            "eos_token_id",
        ),
        (
            "generation_config.json",
            json!({"eos_token_id": -1}).to_string(),
            "eos_token_id",
        ),
    ];
    for (i, (file, content, field)) in cases.iter().enumerate() {
        let dir = tokenizer_dir(&format!("bad-{i}"), &[(file, content.clone())]);
        match ZayaTokenizer::from_dir(&dir) {
            Err(TextError::Config { path, field: f, .. }) => {
                assert!(path.ends_with(file), "{path:?}");
                assert_eq!(&f, field);
            }
            other => panic!("{file} {content}: {other:?}"),
        }
        cleanup(&dir);
    }

    let dir = tokenizer_dir("bad-json", &[("tokenizer_config.json", "{oops".into())]);
    assert!(matches!(
        ZayaTokenizer::from_dir(&dir),
        Err(TextError::Json { .. })
    ));
    cleanup(&dir);
}

#[test]
fn template_problems_surface_when_rendering() {
    let dir = tokenizer_dir("no-template", &[]);
    let tok = ZayaTokenizer::from_dir(&dir).unwrap();
    assert!(matches!(
        tok.apply_chat_template(&user("x")),
        Err(TextError::NoChatTemplate { .. })
    ));
    // Encoding still works without a template.
    assert_eq!(tok.encode("", true).unwrap(), vec![2, 106]);
    cleanup(&dir);

    let dir = tokenizer_dir(
        "broken-template",
        &[("chat_template.jinja", "{% for m in messages %}".into())],
    );
    let tok = ZayaTokenizer::from_dir(&dir).unwrap();
    match tok.apply_chat_template(&user("x")) {
        Err(TextError::TemplateSyntax { name, message }) => {
            assert_eq!(name, "default");
            assert!(message.contains("line 1"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    cleanup(&dir);

    let dir = tokenizer_dir(
        "render-error",
        &[(
            "chat_template.jinja",
            "{{ messages[0].content + 1 }}".into(),
        )],
    );
    let tok = ZayaTokenizer::from_dir(&dir).unwrap();
    assert!(matches!(
        tok.apply_chat_template(&user("x")),
        Err(TextError::TemplateRender { .. })
    ));
    cleanup(&dir);
}

#[test]
fn conversation_files() {
    let dir = tokenizer_dir(
        "conv",
        &[(
            "chat_template.jinja",
            "{{ messages[0].content }}|{{ tools[0].name }}|{{ custom }}".into(),
        )],
    );
    let conv = dir.join("conv.json");
    std::fs::write(
        &conv,
        json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}], "custom": 1.0}).to_string(),
    )
    .unwrap();
    let tok = ZayaTokenizer::from_dir(&dir).unwrap();
    let req = ChatRequest::from_json_file(&conv).unwrap();
    assert_eq!(tok.apply_chat_template(&req).unwrap(), "hi|f|1.0");

    std::fs::write(&conv, "[1, 2]").unwrap();
    assert!(matches!(
        ChatRequest::from_json_file(&conv),
        Err(TextError::Json { .. })
    ));
    assert!(matches!(
        ChatRequest::from_json_file(dir.join("missing.json")),
        Err(TextError::Io { .. })
    ));
    cleanup(&dir);
}
