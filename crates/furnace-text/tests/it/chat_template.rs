//! Chat templates render byte-exact like Hugging Face's Jinja2 environment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::{read_jsonl, testdata};
use furnace_text::{ChatMessage, ChatTemplate, Error};
use serde_json::json;

fn messages_of(case: &serde_json::Value) -> Vec<ChatMessage> {
    serde_json::from_value(case["messages"].clone()).unwrap()
}

#[test]
fn fixture_cases_render_exactly() {
    let dir = testdata().join("tiny-llama");
    let template = ChatTemplate::from_hf_dir(&dir).unwrap().unwrap();
    let source = std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap();
    assert_eq!(template.source(), source);
    let cases = read_jsonl("chat_template_cases.jsonl");
    assert!(!cases.is_empty());
    for case in &cases {
        let messages = messages_of(case);
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let want = case["rendered"].as_str().unwrap();
        let got = template.render(&messages, add, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
        assert_eq!(got, want);
        // The same through an arbitrary JSON context.
        let context = json!({
            "messages": case["messages"],
            "add_generation_prompt": add,
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
        });
        assert_eq!(template.render_value(context).unwrap(), want);
    }
}

#[test]
fn from_hf_dir_tokenizer_config_string_and_list() {
    let dir = tempfile::tempdir().unwrap();
    assert!(ChatTemplate::from_hf_dir(dir.path()).unwrap().is_none());

    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(&config, r#"{"chat_template": "S{{ messages[0].content }}"}"#).unwrap();
    let template = ChatTemplate::from_hf_dir(dir.path()).unwrap().unwrap();
    assert_eq!(template.render(&[ChatMessage::new("user", "x")], false, None, None).unwrap(), "Sx");

    std::fs::write(
        &config,
        r#"{"chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D{{ messages|length }}"}
        ]}"#,
    )
    .unwrap();
    let template = ChatTemplate::from_hf_dir(dir.path()).unwrap().unwrap();
    assert_eq!(template.source(), "D{{ messages|length }}");
    assert_eq!(template.render(&[ChatMessage::new("user", "x")], false, None, None).unwrap(), "D1");

    // chat_template.jinja takes precedence.
    std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
    let template = ChatTemplate::from_hf_dir(dir.path()).unwrap().unwrap();
    assert_eq!(template.render(&[], false, None, None).unwrap(), "J");

    // A config without a template.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("tokenizer_config.json"), r#"{"eos_token": "x"}"#).unwrap();
    assert!(ChatTemplate::from_hf_dir(other.path()).unwrap().is_none());
}

#[test]
fn raise_exception_is_a_clear_error() {
    let template = ChatTemplate::new(
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
         {{ raise_exception('Conversation roles must be user/assistant, got ' + m.role) }}\
         {% endif %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let ok = template.render(&[ChatMessage::new("user", "hi")], false, None, None).unwrap();
    assert_eq!(ok, "hi");
    let err = template.render(&[ChatMessage::new("system", "x")], false, None, None).unwrap_err();
    match &err {
        Error::TemplateRaised(message) => {
            assert_eq!(message, "Conversation roles must be user/assistant, got system")
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("Conversation roles must be user/assistant"));
}

#[test]
fn syntax_errors_are_clear() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}").unwrap_err();
    match &err {
        Error::Template(message) => assert!(message.contains("syntax error"), "{message}"),
        other => panic!("unexpected error {other:?}"),
    }
    assert!(matches!(ChatTemplate::new("{{ a + }}"), Err(Error::Template(_))));
    // Runtime errors other than raise_exception are Error::Template too.
    let template = ChatTemplate::new("{{ messages[0].content.missing.deeper }}").unwrap();
    let err = template.render(&[ChatMessage::new("user", "x")], false, None, None).unwrap_err();
    assert!(matches!(err, Error::Template(_)), "{err:?}");
}

fn render(source: &str, context: serde_json::Value) -> String {
    ChatTemplate::new(source).unwrap().render_value(context).unwrap()
}

#[test]
fn tojson_like_python() {
    let context = json!({
        "tools": [{"name": "get_weather", "parameters": {"z": 1, "a": 2.5, "b": [true, null], "e": {}}}],
        "text": "<b> & 'é'\n\"q\"",
    });
    assert_eq!(
        render("{{ tools | tojson }}", context.clone()),
        r#"[{"name": "get_weather", "parameters": {"z": 1, "a": 2.5, "b": [true, null], "e": {}}}]"#
    );
    assert_eq!(
        render("{{ tools[0].parameters | tojson(indent=2) }}", context.clone()),
        "{\n  \"z\": 1,\n  \"a\": 2.5,\n  \"b\": [\n    true,\n    null\n  ],\n  \"e\": {}\n}"
    );
    assert_eq!(render("{{ text | tojson }}", context.clone()), r#""<b> & 'é'\n\"q\"""#);
    assert_eq!(render("{{ text | tojson(ensure_ascii=true) }}", context.clone()), r#""<b> & '\u00e9'\n\"q\"""#);
    assert_eq!(
        render("{{ tools[0].parameters | tojson(sort_keys=true, separators=[',', ':']) }}", context),
        r#"{"a":2.5,"b":[true,null],"e":{},"z":1}"#
    );
    assert_eq!(render("{{ {'x': 1.0, 'y': 3} | tojson }}", json!({})), r#"{"x": 1.0, "y": 3}"#);
}

#[test]
fn python_string_methods_and_loops() {
    let context = json!({
        "messages": [
            {"role": "system", "content": "  be brief  "},
            {"role": "user", "content": "a,b,c"},
            {"role": "assistant", "content": "<think>x</think>done"},
        ],
    });
    assert_eq!(render("[{{ messages[0].content.strip() }}]", context.clone()), "[be brief]");
    assert_eq!(
        render("{% for m in messages %}{{ m.role.upper() }}{% if not loop.last %},{% endif %}{% endfor %}", context.clone()),
        "SYSTEM,USER,ASSISTANT"
    );
    assert_eq!(render("{{ messages[1].content.split(',') | join('|') }}", context.clone()), "a|b|c");
    assert_eq!(
        render(
            "{% if messages[2].content.startswith('<think>') %}{{ messages[2].content.split('</think>')[-1] }}{% endif %}",
            context.clone()
        ),
        "done"
    );
    assert_eq!(
        render(
            "{% for m in messages %}{% if loop.first %}F{% endif %}{{ loop.index0 }}{% if loop.last %}L{% endif %}{% endfor %}",
            context.clone()
        ),
        "F012L"
    );
    assert_eq!(
        render("{% for m in messages %}{% if m.role == 'user' %}{% break %}{% endif %}{{ m.role }}{% endfor %}", context.clone()),
        "system"
    );
    assert_eq!(
        render(
            "{% set ns = namespace(found=false) %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.found = true %}{% endif %}{% endfor %}{{ ns.found }} {{ none }}",
            context.clone()
        ),
        "True None"
    );
    assert_eq!(render("{{ messages[1:] | length }}", context), "2");
}

#[test]
fn undefined_is_lenient() {
    let template = ChatTemplate::new(
        "{% if tools is defined %}T{% else %}N{% endif %}[{{ foo }}][{{ messages[0].missing }}]\
         {% if bos_token is defined %}B{% endif %}{% for x in nothing %}x{% endfor %}",
    )
    .unwrap();
    let messages = [ChatMessage::new("user", "hi")];
    assert_eq!(template.render(&messages, false, None, None).unwrap(), "N[][]");
    assert_eq!(template.render(&messages, false, Some("<s>"), None).unwrap(), "N[][]B");
    let with_tools = json!({"messages": [{"role": "user", "content": "hi"}], "tools": []});
    assert_eq!(template.render_value(with_tools).unwrap(), "T[][]");
}

#[test]
fn whitespace_control_like_hf() {
    // trim_blocks + lstrip_blocks, and a single trailing newline is dropped.
    let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n<{{ m.content }}>\n    {% endif %}\n{% endfor %}\n";
    let messages = [ChatMessage::new("user", "a"), ChatMessage::new("bot", "b"), ChatMessage::new("user", "c")];
    let template = ChatTemplate::new(source).unwrap();
    assert_eq!(template.render(&messages, false, None, None).unwrap(), "<a>\n<c>\n");
    assert_eq!(render("x\n", json!({})), "x");
    assert_eq!(render("{{- '  a  ' -}}\n\n", json!({})), "  a  ");
}

#[test]
fn strftime_now_and_generation_prompt() {
    let year: i32 = render("{{ strftime_now('%Y') }}", json!({})).parse().unwrap();
    assert!(year >= 2024);
    let date = render("{{ strftime_now('%d %b %Y') }}", json!({}));
    assert_eq!(date.len(), 11, "{date}");
    let template = ChatTemplate::new("{% if add_generation_prompt %}G{% endif %}{{ eos_token }}").unwrap();
    assert_eq!(template.render(&[], true, None, Some("</s>")).unwrap(), "G</s>");
    assert_eq!(template.render(&[], false, None, None).unwrap(), "");
}

#[test]
fn render_value_needs_an_object() {
    let template = ChatTemplate::new("x").unwrap();
    assert!(matches!(template.render_value(json!([1])), Err(Error::Template(_))));
}

#[test]
fn a_template_that_loops_for_ever_runs_out_of_fuel() {
    // Found by furnace-fuzz: nested loops over large ranges rendered for hours.
    let t = ChatTemplate::new("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}").unwrap();
    let start = std::time::Instant::now();
    let e = t.render(&[ChatMessage::new("user", "hi")], true, None, None).unwrap_err();
    assert!(e.to_string().contains("fuel"), "{e}");
    assert!(start.elapsed() < std::time::Duration::from_secs(20), "{:?}", start.elapsed());
}

#[test]
fn a_template_that_prints_without_bound_is_an_error_not_gigabytes() {
    // Found by furnace-fuzz: a long literal inside a million loop iterations printed 4 GiB
    // in a million instructions (within the fuel).
    let body = "x".repeat(4096);
    let t =
        ChatTemplate::new(&format!("{{% for i in range(10) %}}{{% for j in range(100000) %}}{body}{{% endfor %}}{{% endfor %}}")).unwrap();
    let e = t.render(&[ChatMessage::new("user", "hi")], true, None, None).unwrap_err();
    assert!(e.to_string().contains("over 64 MiB"), "{e}");
}

#[test]
fn chained_tojson_is_bounded() {
    // Found by furnace-fuzz: each `tojson` of a string doubles its backslashes, so a chain
    // of them grows exponentially.
    let chain = "| tojson ".repeat(60);
    let t = ChatTemplate::new(&format!("{{{{ messages {chain} }}}}")).unwrap();
    let e = t.render(&[ChatMessage::new("user", "a \"quoted\" text")], true, None, None).unwrap_err();
    assert!(e.to_string().contains("limit of one value"), "{e}");
    let e = ChatTemplate::new("{{ messages | tojson(indent=1000000000000) }}").unwrap().render(&[], false, None, None).unwrap_err();
    assert!(e.to_string().contains("indent"), "{e}");
}
