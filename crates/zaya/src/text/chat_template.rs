//! Chat templates rendered the way transformers 5.23 `apply_chat_template(..., tokenize=False)`
//! renders them (see `design/chat-template-notes.md`):
//!
//! * Jinja with `trim_blocks` and `lstrip_blocks`, loop controls, Python string methods
//!   (MiniJinja + `minijinja-contrib` pycompat);
//! * `tojson` is Python's `json.dumps(..., ensure_ascii=False)` (no HTML escaping, Python float
//!   spelling, key order kept, `indent` / `separators` / `sort_keys` / `ensure_ascii` honoured);
//! * `{{ value }}` and `|string` print Python's `str()` (`True`, `None`, `{'a': [1, 2.0]}`);
//! * `raise_exception(msg)` aborts with `msg`; `strftime_now(fmt)` formats the local time;
//! * message keys whose value is `null` are dropped, `reasoning` / `thinking` are copied to
//!   `reasoning_content` (and `thinking`), and the template sees `messages`, `tools`,
//!   `documents`, `add_generation_prompt`, the tokenizer's named special tokens (`bos_token`,
//!   `eos_token`, ...) and the extra keyword arguments; an omitted `enable_thinking` is
//!   undefined.
//!
//! Known differences from Jinja2: the `~` operator and `join` stringify with MiniJinja's
//! spelling (`true`, `none`), not Python's; `strftime_now("%Z")` prints the UTC offset.

use std::fmt::Write as _;
use std::path::Path;

use minijinja::value::{ArgType, Kwargs, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use super::pyfmt::{json_dumps, py_str, JsonDumpsOptions};
use super::{Result, TextError};

/// What to render: the arguments of `apply_chat_template`. Deserializes from the
/// `{"messages": [...], "tools": [...], ...}` conversation files of the CLI; unknown top-level
/// keys become template keyword arguments.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatRequest {
    /// OpenAI / HF messages (`role`, `content`, `tool_calls`, `reasoning_content`, ...).
    pub messages: Vec<Json>,
    /// Tool JSON schemas; `None` renders `tools` as Python `None`.
    #[serde(default)]
    pub tools: Option<Vec<Json>>,
    /// RAG documents (dicts); `None` renders `documents` as `None`.
    #[serde(default)]
    pub documents: Option<Vec<Json>>,
    #[serde(default)]
    pub add_generation_prompt: bool,
    /// `None` leaves `enable_thinking` undefined in the template. Not read from JSON: an
    /// `"enable_thinking"` key of a conversation file lands in `kwargs` with its value as is
    /// (`null` included, which Python passes as a defined `None`).
    #[serde(skip_deserializing)]
    pub enable_thinking: Option<bool>,
    /// Extra keyword arguments, visible as top-level template variables.
    #[serde(flatten)]
    pub kwargs: Map<String, Json>,
}

impl ChatRequest {
    pub fn new(messages: Vec<Json>) -> Self {
        ChatRequest {
            messages,
            ..Default::default()
        }
    }

    /// Read a conversation file: `{"messages": [...], "tools": [...], ...}`.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TextError::io(path, e))?;
        serde_json::from_str(&text).map_err(|source| TextError::Json {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// The chat templates of a tokenizer: one template, or several named ones (a
/// `tokenizer_config.json` list of `{name, template}`, or `chat_template.jinja` plus
/// `additional_chat_templates/*.jinja`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplates {
    Single(String),
    Named(Vec<(String, String)>),
}

impl ChatTemplates {
    /// The template transformers would use: the one named `name` if given; otherwise the only
    /// one, or `tool_use` when tools are passed and it exists, else `default`.
    pub fn select(&self, name: Option<&str>, with_tools: bool) -> Result<(&str, &str)> {
        match self {
            ChatTemplates::Single(src) => match name {
                None | Some("default") => Ok(("default", src)),
                Some(other) => Err(TextError::UnknownChatTemplate {
                    name: other.into(),
                    available: vec!["default".into()],
                }),
            },
            ChatTemplates::Named(list) => {
                let find = |n: &str| list.iter().find(|(k, _)| k == n);
                let found = match name {
                    Some(n) => find(n),
                    None if with_tools => find("tool_use").or_else(|| find("default")),
                    None => find("default"),
                };
                found.map(|(k, v)| (k.as_str(), v.as_str())).ok_or_else(|| {
                    TextError::UnknownChatTemplate {
                        name: name.unwrap_or("default").into(),
                        available: list.iter().map(|(k, _)| k.clone()).collect(),
                    }
                })
            }
        }
    }

    pub fn names(&self) -> Vec<String> {
        match self {
            ChatTemplates::Single(_) => vec!["default".into()],
            ChatTemplates::Named(list) => list.iter().map(|(k, _)| k.clone()).collect(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    name: String,
    source: String,
    env: Environment<'static>,
    special_tokens: Vec<(String, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

/// Marker carried by the error of `raise_exception`, so the message comes back unchanged.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

const TEMPLATE_NAME: &str = "chat_template";

/// Default work limit of one render (minijinja fuel, about one unit per instruction).
pub const DEFAULT_FUEL: u64 = 50_000_000;

impl ChatTemplate {
    /// Compile `source`; `name` is only used in error messages.
    pub fn new(name: &str, source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            out.write_str(&py_str(value))
                .map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write template output"))
        });
        // A template comes from a model directory (outside input): bound the work of one
        // render so `{% for i in range(100000) %}{% for j in range(100000) %}` ends with an
        // error instead of hanging. Real templates use a tiny fraction of this.
        env.set_fuel(Some(DEFAULT_FUEL));
        env.add_filter("tojson", tojson);
        env.add_filter("string", |v: Value| py_str(&v));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| TextError::TemplateSyntax {
                name: name.into(),
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            name: name.into(),
            source: source.into(),
            env,
            special_tokens: Vec::new(),
        })
    }

    /// Named special tokens (`bos_token` -> `<bos>`, ...) visible to the template, as
    /// transformers passes `tokenizer.special_tokens_map`.
    pub fn with_special_tokens(mut self, tokens: Vec<(String, String)>) -> Self {
        self.special_tokens = tokens;
        self
    }

    /// Limits the work (minijinja instructions) of one render; past it the render fails.
    pub fn with_fuel(mut self, fuel: u64) -> Self {
        self.env.set_fuel(Some(fuel));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// `apply_chat_template(messages, tools=..., documents=..., add_generation_prompt=...,
    /// enable_thinking=..., **kwargs, tokenize=False)`.
    pub fn render(&self, req: &ChatRequest) -> Result<String> {
        let ctx = self.context(req)?;
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("template added in new()");
        tmpl.render(Value::from_serialize(&ctx))
            .map_err(|e| match raised_message(&e) {
                Some(message) => TextError::TemplateRaised { message },
                None => TextError::TemplateRender {
                    name: self.name.clone(),
                    message: describe(&e),
                },
            })
    }

    fn context(&self, req: &ChatRequest) -> Result<Map<String, Json>> {
        let mut ctx = Map::new();
        ctx.insert(
            "messages".into(),
            Json::Array(prepare_messages(&req.messages)?),
        );
        ctx.insert("tools".into(), object_list("tool", req.tools.as_deref())?);
        ctx.insert(
            "documents".into(),
            object_list("document", req.documents.as_deref())?,
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(req.add_generation_prompt),
        );
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), Json::String(v.clone()));
        }
        let reserved = ["messages", "tools", "documents", "add_generation_prompt"];
        for (k, v) in &req.kwargs {
            if reserved.contains(&k.as_str()) {
                return Err(TextError::Conversation(format!(
                    "keyword argument `{k}` given twice (it is a field of the request)"
                )));
            }
            if k == "enable_thinking" && req.enable_thinking.is_some() {
                return Err(TextError::Conversation(
                    "`enable_thinking` given both as a field and as a keyword argument".into(),
                ));
            }
            ctx.insert(k.clone(), v.clone());
        }
        if let Some(t) = req.enable_thinking {
            ctx.insert("enable_thinking".into(), Json::Bool(t));
        }
        Ok(ctx)
    }
}

/// Messages as transformers hands them to the template: every message a dict, `None`-valued
/// keys dropped, reasoning aliased to `thinking` / `reasoning_content`.
fn prepare_messages(messages: &[Json]) -> Result<Vec<Json>> {
    if messages.is_empty() {
        return Err(TextError::Conversation(
            "cannot apply a chat template to an empty conversation; give at least one message"
                .into(),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let obj = m.as_object().ok_or_else(|| {
                TextError::Conversation(format!(
                    "message {i} must be a JSON object with `role` and `content`, got {m}"
                ))
            })?;
            let kept: Map<String, Json> = obj
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Ok(Json::Object(alias_reasoning(kept)))
        })
        .collect()
}

/// transformers' `_alias_reasoning_fields`: with `r` the first of `reasoning_content`,
/// `thinking`, `reasoning` present, the message becomes
/// `{"thinking": r, **message, "reasoning_content": r}` (Python dict order).
fn alias_reasoning(msg: Map<String, Json>) -> Map<String, Json> {
    let Some(r) = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| msg.get(*k).cloned())
    else {
        return msg;
    };
    let mut out = Map::new();
    out.insert("thinking".into(), r.clone());
    for (k, v) in msg {
        out.insert(k, v);
    }
    out.insert("reasoning_content".into(), r);
    out
}

fn object_list(what: &str, items: Option<&[Json]>) -> Result<Json> {
    let Some(items) = items else {
        return Ok(Json::Null);
    };
    if let Some((i, bad)) = items.iter().enumerate().find(|(_, t)| !t.is_object()) {
        return Err(TextError::Conversation(format!(
            "{what} {i} must be a JSON object (a JSON schema / dict), got {bad}"
        )));
    }
    Ok(Json::Array(items.to_vec()))
}

fn raised_message(e: &Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Raised>() {
            return Some(r.0.clone());
        }
        cur = err.source();
    }
    None
}

/// `kind: detail (line N)` and the error's causes; MiniJinja's own Display names the internal
/// template instead of the line alone.
fn describe(e: &Error) -> String {
    let mut s = e.kind().to_string();
    if let Some(detail) = e.detail() {
        let _ = write!(s, ": {detail}");
    }
    if let Some(line) = e.line() {
        let _ = write!(s, " (line {line})");
    }
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        let _ = write!(s, ": {err}");
        cur = err.source();
    }
    s
}

fn raise_exception(message: Value) -> std::result::Result<Value, Error> {
    let msg = py_str(&message);
    Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
}

fn strftime_now(format: String) -> std::result::Result<String, Error> {
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format string {format:?}"),
        )
    })?;
    Ok(out)
}

/// `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: Value, args: Rest<Value>) -> std::result::Result<String, Error> {
    let mut positional: Vec<Value> = args.0;
    let kwargs = match positional.last() {
        Some(last) if last.is_kwargs() => {
            let last = positional.pop().expect("checked");
            Kwargs::from_value(Some(&last))?
        }
        _ => Kwargs::from_iter(std::iter::empty::<(&str, Value)>()),
    };
    if positional.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 positional arguments",
        ));
    }
    let mut positional = positional.into_iter();
    let (ensure_ascii, indent, separators, sort_keys) = (
        positional.next(),
        positional.next(),
        positional.next(),
        positional.next(),
    );
    let pick = |pos: Option<Value>, key: &str| -> std::result::Result<Option<Value>, Error> {
        let kw: Option<Value> = kwargs.get(key)?;
        Ok(kw.or(pos).filter(|v| !v.is_none() && !v.is_undefined()))
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let sort_keys = pick(sort_keys, "sort_keys")?.is_some_and(|v| v.is_true());
    let indent = match pick(indent, "indent")? {
        None => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().into()),
        Some(v) if v.is_integer() => {
            let n = i64::try_from(v.clone()).unwrap_or(0).max(0) as usize;
            Some(" ".repeat(n))
        }
        Some(v) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: indent must be an integer or a string, got {v}"),
            ))
        }
    };
    let separators = match pick(separators, "separators")? {
        None => None,
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.kind() == ValueKind::String && b.kind() == ValueKind::String => Some((
                    a.as_str().unwrap_or_default().to_string(),
                    b.as_str().unwrap_or_default().to_string(),
                )),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: separators must be two strings, got {v}"),
                    ))
                }
            }
        }
    };
    kwargs.assert_all_used()?;
    let opts = JsonDumpsOptions {
        ensure_ascii,
        indent,
        separators,
        sort_keys,
    };
    json_dumps(&value, &opts).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, req: ChatRequest) -> Result<String> {
        ChatTemplate::new("test", src)?.render(&req)
    }

    fn req(messages: Json) -> ChatRequest {
        ChatRequest::new(messages.as_array().unwrap().clone())
    }

    #[test]
    fn tojson_options() {
        let r = req(json!([{"role": "user", "content": "x"}]));
        let mut r2 = r.clone();
        r2.kwargs
            .insert("data".into(), json!({"b": 1, "a": [1.0, "é"]}));
        let out = render(
            "{{ data|tojson }}|{{ data|tojson(indent=1) }}|{{ data|tojson(separators=(',', ':'), sort_keys=true) }}|{{ data|tojson(ensure_ascii=true) }}|{{ data|tojson(false, '\t') }}",
            r2,
        )
        .unwrap();
        assert_eq!(
            out,
            "{\"b\": 1, \"a\": [1.0, \"é\"]}|{\n \"b\": 1,\n \"a\": [\n  1.0,\n  \"é\"\n ]\n}|{\"a\":[1.0,\"é\"],\"b\":1}|{\"b\": 1, \"a\": [1.0, \"\\u00e9\"]}|{\n\t\"b\": 1,\n\t\"a\": [\n\t\t1.0,\n\t\t\"é\"\n\t]\n}"
        );
        let err = render("{{ nothing|tojson }}", r.clone()).unwrap_err();
        assert!(err.to_string().contains("not JSON serializable"), "{err}");
        let err = render("{{ messages|tojson(bogus=1) }}", r).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn python_str_printing_and_variables() {
        let mut r = req(json!([{"role": "user", "content": "hi", "extra": null}]));
        r.kwargs.insert("flag".into(), json!(true));
        let out = render(
            "{{ flag }} {{ none }} {{ messages[0] }} {{ messages[0].extra is defined }} {{ tools }} {{ documents }} {{ enable_thinking is defined }} {{ 7/2 }} {{ [1, 'a']|string }}",
            r,
        )
        .unwrap();
        assert_eq!(
            out,
            "True None {'role': 'user', 'content': 'hi'} False None None False 3.5 [1, 'a']"
        );
    }

    #[test]
    fn reasoning_aliases_keep_python_key_order() {
        let r = req(json!([
            {"role": "assistant", "content": "a", "reasoning": "r1"},
            {"role": "assistant", "thinking": "t", "content": "b", "reasoning_content": "rc"},
            {"role": "assistant", "content": "c", "reasoning_content": null, "thinking": "t2"}
        ]));
        let out = render("{% for m in messages %}{{ m }}\n{% endfor %}", r).unwrap();
        assert_eq!(
            out,
            "{'thinking': 'r1', 'role': 'assistant', 'content': 'a', 'reasoning': 'r1', 'reasoning_content': 'r1'}\n\
             {'thinking': 't', 'role': 'assistant', 'content': 'b', 'reasoning_content': 'rc'}\n\
             {'thinking': 't2', 'role': 'assistant', 'content': 'c', 'reasoning_content': 't2'}\n"
        );
    }

    #[test]
    fn raise_exception_message_and_errors() {
        let r = req(json!([{"role": "user", "content": "x"}]));
        match render(
            "{{ raise_exception('bad role: ' ~ messages[0].role) }}",
            r.clone(),
        ) {
            Err(TextError::TemplateRaised { message }) => assert_eq!(message, "bad role: user"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            render("{% if %}", r.clone()),
            Err(TextError::TemplateSyntax { .. })
        ));
        assert!(matches!(
            render("x", ChatRequest::default()),
            Err(TextError::Conversation(_))
        ));
        let mut bad = r.clone();
        bad.messages.push(json!("not an object"));
        let e = render("x", bad).unwrap_err().to_string();
        assert!(e.contains("message 1"), "{e}");
        let mut dup = r;
        dup.kwargs.insert("messages".into(), json!([]));
        assert!(matches!(render("x", dup), Err(TextError::Conversation(_))));
    }

    #[test]
    fn whitespace_control_and_loop_controls() {
        let r = req(json!([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]));
        let src = "<s>\n  {% for m in messages %}\n    {% if loop.index > 1 %}{% break %}{% endif %}\n{{ m.content.upper() }}\n  {% endfor %}\nend";
        assert_eq!(render(src, r).unwrap(), "<s>\nX\nend");
    }

    #[test]
    fn strftime_now_formats_local_time() {
        // The `date` command is the independent oracle (same TZ rules as Python's strftime).
        let date = |fmt: &str| -> String {
            let out = std::process::Command::new("date")
                .arg(format!("+{fmt}"))
                .output();
            String::from_utf8(out.expect("date runs").stdout)
                .unwrap()
                .trim_end()
                .to_string()
        };
        let fmt = "%Y-%m-%d %H:%M|%d %b %Y|%A %j";
        let r = req(json!([{"role": "user", "content": "x"}]));
        let before = date(fmt);
        let out = render(&format!("{{{{ strftime_now('{fmt}') }}}}"), r).unwrap();
        let after = date(fmt);
        assert!(out == before || out == after, "{out} vs {before} / {after}");
    }

    #[test]
    fn select_named_templates() {
        let t = ChatTemplates::Named(vec![
            ("default".into(), "D".into()),
            ("tool_use".into(), "T".into()),
        ]);
        assert_eq!(t.select(None, false).unwrap(), ("default", "D"));
        assert_eq!(t.select(None, true).unwrap(), ("tool_use", "T"));
        assert_eq!(t.select(Some("default"), true).unwrap(), ("default", "D"));
        assert!(t.select(Some("rag"), false).is_err());
        let only = ChatTemplates::Named(vec![("rag".into(), "R".into())]);
        assert!(only.select(None, false).is_err());
        assert_eq!(
            ChatTemplates::Single("S".into())
                .select(None, true)
                .unwrap(),
            ("default", "S")
        );
    }
}
