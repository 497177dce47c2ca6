//! Chat templates rendered in worker processes (`furnace_text::sandbox`): the same text as
//! in-process, and a crafted template that would abort or exhaust the process fails its
//! render with a clear error while the program goes on.
//!
//! Its own test binary: installing the sandbox is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use furnace_text::{ChatMessage, ChatTemplate, Error};

fn install() {
    furnace_text::sandbox::install(PathBuf::from(env!("CARGO_BIN_EXE_furnace-template-worker")));
    assert!(furnace_text::sandbox::installed());
}

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", text)]
}

#[test]
fn fixture_cases_render_the_same_in_a_worker() {
    install();
    let template = ChatTemplate::from_hf_dir(&testdata().join("tiny-llama")).unwrap().unwrap();
    let text = std::fs::read_to_string(testdata().join("chat_template_cases.jsonl")).unwrap();
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let got = template.render(&messages, add, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
        assert_eq!(got, case["rendered"].as_str().unwrap());
        n += 1;
    }
    assert!(n >= 4, "only {n} cases");
}

#[test]
fn a_namespace_inside_itself_fails_the_render_not_the_process() {
    install();
    let bad = ChatTemplate::new("{% set s = namespace(v=1) %}{% set s.v = s %}{{ s.v ~ '' }}").unwrap();
    let err = bad.render(&user("hi"), true, None, None).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Template(_)), "{err:?}");
    assert!(message.contains("crashed its renderer") && message.contains("fix or replace it"), "{message}");
    // The next render (of another template, and of the same one) starts a fresh worker.
    let good = ChatTemplate::new("{{ messages[0].content }}!").unwrap();
    assert_eq!(good.render(&user("hi"), true, None, None).unwrap(), "hi!");
    assert!(bad.render(&user("again"), true, None, None).is_err());
    assert_eq!(good.render(&user("still"), true, None, None).unwrap(), "still!");
}

#[test]
fn a_string_doubled_without_end_fails_at_the_memory_cap() {
    install();
    let bad = ChatTemplate::new(
        "{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x|length }}",
    )
    .unwrap();
    let err = bad.render(&user("hi"), true, None, None).unwrap_err().to_string();
    // Either the worker is stopped at the cap, or the engine refuses the allocation first.
    assert!(err.contains("renderer") || err.contains("too long"), "{err}");
    let good = ChatTemplate::new("[{{ messages|length }}]").unwrap();
    assert_eq!(good.render(&user("hi"), true, None, None).unwrap(), "[1]");
}

#[test]
fn raise_exception_and_syntax_errors_come_back_as_in_process() {
    install();
    let raising = ChatTemplate::new("{{ raise_exception('only user turns, please') }}").unwrap();
    match raising.render(&user("hi"), true, None, None) {
        Err(Error::TemplateRaised(message)) => assert_eq!(message, "only user turns, please"),
        other => panic!("{other:?}"),
    }
    let looping = ChatTemplate::new("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}").unwrap();
    let err = looping.render(&user("hi"), true, None, None).unwrap_err().to_string();
    assert!(err.contains("fuel"), "{err}");
}

#[test]
fn threads_render_at_once_each_with_its_answer() {
    install();
    let template = ChatTemplate::new("{% for m in messages %}<{{ m.role }}:{{ m.content }}>{% endfor %}").unwrap();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let template = template.clone();
            scope.spawn(move || {
                for i in 0..50 {
                    let text = format!("thread {t} turn {i}");
                    assert_eq!(template.render(&user(&text), false, None, None).unwrap(), format!("<user:{text}>"));
                }
            });
        }
    });
}
