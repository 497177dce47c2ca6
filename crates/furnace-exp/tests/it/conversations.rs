//! Logged conversations (`Store::log_conversation`, `add_feedback`, `conversations`): a
//! round trip, idempotence, feedback on an unknown id, the filters, and a crash at the
//! commit (`furnace_hub::failpoint`) that leaves the row whole or absent.

use furnace_exp::{ChoiceRecord, ConversationFilter, ConversationRecord, Error, Store};
use serde_json::json;
use std::path::Path;

fn record(id: &str, created: i64, model: &str) -> ConversationRecord {
    ConversationRecord {
        id: id.to_string(),
        created,
        model: model.to_string(),
        adapter: (model != "base").then(|| model.to_string()),
        messages: json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": format!("question {id}")}]),
        response: vec![
            ChoiceRecord { text: format!("answer {id}"), tool_calls: None },
            ChoiceRecord {
                text: String::new(),
                tool_calls: Some(json!([{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}])),
            },
        ],
        rag_sources: (created % 2 == 0).then(|| json!([{"source": "doc.md", "chunk": 3}])),
        prompt_tokens: 12,
        completion_tokens: 7,
        latency_ms: 250,
    }
}

fn ids(rows: &[furnace_exp::ConversationRow]) -> Vec<&str> {
    rows.iter().map(|r| r.record.id.as_str()).collect()
}

#[test]
fn a_logged_conversation_reads_back_as_it_was_logged() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open_in(d.path()).unwrap();
    let a = record("chatcmpl-a", 1_700_000_000, "base");
    let b = record("chatcmpl-b", 1_700_000_001, "tuned");
    store.log_conversation(&a).unwrap();
    store.log_conversation(&b).unwrap();
    let rows = store.conversations(&ConversationFilter::default()).unwrap();
    assert_eq!(ids(&rows), ["chatcmpl-b", "chatcmpl-a"], "newest first");
    assert_eq!(rows[1].record, a);
    assert_eq!(rows[0].record, b);
    assert_eq!((rows[0].rating, rows[0].comment.as_deref(), rows[0].feedback_time), (None, None, None));
    // Another connection (another process) sees it too.
    assert_eq!(Store::open_in(d.path()).unwrap().conversation("chatcmpl-a").unwrap().record, a);
    // The training row: role and content of each message, the first choice's text last.
    assert_eq!(
        rows[1].training_row().unwrap(),
        json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "question chatcmpl-a"},
            {"role": "assistant", "content": "answer chatcmpl-a"}]})
    );
}

#[test]
fn logging_an_id_again_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open_in(d.path()).unwrap();
    let a = record("chatcmpl-a", 1_700_000_000, "base");
    store.log_conversation(&a).unwrap();
    store.add_feedback("chatcmpl-a", 4, Some("good")).unwrap();
    let mut other = a.clone();
    other.response = vec![ChoiceRecord { text: "something else".into(), tool_calls: None }];
    store.log_conversation(&other).unwrap();
    store.log_conversation(&a).unwrap();
    let rows = store.conversations(&ConversationFilter::default()).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].record, a, "the first log stays");
    assert_eq!((rows[0].rating, rows[0].comment.as_deref()), (Some(4), Some("good")), "its feedback stays");
}

#[test]
fn feedback_is_recorded_replaced_and_refused_for_an_unknown_id_or_rating() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open_in(d.path()).unwrap();
    store.log_conversation(&record("chatcmpl-a", 1_700_000_000, "base")).unwrap();
    let e = store.add_feedback("chatcmpl-nope", 5, None).unwrap_err();
    assert!(matches!(&e, Error::ConversationNotFound { id } if id == "chatcmpl-nope"), "{e}");
    assert!(matches!(store.conversation("chatcmpl-nope").unwrap_err(), Error::ConversationNotFound { .. }));
    for bad in [0, 6, -1] {
        let e = store.add_feedback("chatcmpl-a", bad, None).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{bad}: {e}");
    }
    store.add_feedback("chatcmpl-a", 2, Some("meh")).unwrap();
    store.add_feedback("chatcmpl-a", 5, None).unwrap();
    let row = store.conversation("chatcmpl-a").unwrap();
    assert_eq!((row.rating, row.comment), (Some(5), None), "the latest feedback replaces the earlier");
    assert!(row.feedback_time.unwrap() > 1_700_000_000.0);
}

#[test]
fn the_filters_narrow_by_rating_time_model_and_count() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open_in(d.path()).unwrap();
    for (i, model) in ["base", "tuned", "base", "tuned", "base"].iter().enumerate() {
        store.log_conversation(&record(&format!("chatcmpl-{i}"), 1_700_000_000 + i as i64 * 100, model)).unwrap();
    }
    store.add_feedback("chatcmpl-0", 5, None).unwrap();
    store.add_feedback("chatcmpl-1", 1, None).unwrap();
    store.add_feedback("chatcmpl-2", 4, None).unwrap();
    store.add_feedback("chatcmpl-3", 3, None).unwrap();
    let q = |f: ConversationFilter| ids(&store.conversations(&f).unwrap()).into_iter().map(String::from).collect::<Vec<_>>();
    assert_eq!(q(ConversationFilter::default()).len(), 5);
    assert_eq!(q(ConversationFilter { min_rating: Some(4), ..Default::default() }), ["chatcmpl-2", "chatcmpl-0"]);
    assert_eq!(q(ConversationFilter { since: Some(1_700_000_200), ..Default::default() }), ["chatcmpl-4", "chatcmpl-3", "chatcmpl-2"]);
    assert_eq!(q(ConversationFilter { model: Some("tuned".into()), ..Default::default() }), ["chatcmpl-3", "chatcmpl-1"]);
    assert_eq!(q(ConversationFilter { limit: Some(2), ..Default::default() }), ["chatcmpl-4", "chatcmpl-3"]);
    assert_eq!(
        q(ConversationFilter { min_rating: Some(3), since: Some(1_700_000_100), model: Some("base".into()), limit: Some(10) }),
        ["chatcmpl-2"]
    );
    assert!(q(ConversationFilter { model: Some("other".into()), ..Default::default() }).is_empty());
}

/// Set in the child process of the crash test: the store folder it logs into.
const CHILD_DIR: &str = "FURNACE_TEST_CONVERSATION_CRASH_DIR";

#[test]
fn a_crash_at_the_commit_leaves_the_conversation_whole_or_absent() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        // The child: the armed failpoint aborts the process inside one of these calls.
        let store = Store::open_in(Path::new(&dir)).unwrap();
        store.log_conversation(&record("chatcmpl-crash", 1_700_000_000, "base")).unwrap();
        store.add_feedback("chatcmpl-crash", 5, Some("great")).unwrap();
        panic!("the failpoint did not fire");
    }
    for (point, logged, rated) in [
        ("store.log_conversation.before_commit", false, false),
        ("store.log_conversation.after_commit", true, false),
        ("store.add_feedback.before_commit", true, false),
        ("store.add_feedback.after_commit", true, true),
    ] {
        let d = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "conversations::a_crash_at_the_commit_leaves_the_conversation_whole_or_absent", "--nocapture"])
            .env(CHILD_DIR, d.path())
            .env("FURNACE_FAILPOINT", point)
            .env_remove("FURNACE_FAILPOINT_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(&format!("failpoint {point} hit 1, aborting")), "{point}: {out:?}");
        let store = Store::open_in(d.path()).unwrap();
        let rows = store.conversations(&ConversationFilter::default()).unwrap();
        assert_eq!(rows.len(), logged as usize, "{point}");
        if let Some(row) = rows.first() {
            assert_eq!(row.record, record("chatcmpl-crash", 1_700_000_000, "base"), "{point}: whole");
            assert_eq!(row.rating.is_some(), rated, "{point}");
            assert_eq!(row.comment.is_some(), rated, "{point}");
        }
    }
}
