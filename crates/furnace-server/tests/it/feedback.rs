//! `POST /v1/feedback`: a rating for a logged conversation; unknown ids are 404s and bad
//! bodies 400s, in OpenAI's error shape.

use crate::{call, fixture};
use axum::http::StatusCode;
use furnace_exp::{ChoiceRecord, ConversationRecord};
use serde_json::json;

#[tokio::test]
async fn feedback_rates_a_logged_conversation_and_refuses_unknown_ids_and_fields() {
    let f = fixture();
    f.store()
        .log_conversation(&ConversationRecord {
            id: "chatcmpl-abc".into(),
            created: 1_700_000_000,
            model: "base".into(),
            adapter: None,
            messages: json!([{"role": "user", "content": "hi"}]),
            response: vec![ChoiceRecord { text: "hello".into(), tool_calls: None }],
            rag_sources: None,
            prompt_tokens: 3,
            completion_tokens: 2,
            latency_ms: 10,
        })
        .unwrap();
    let app = f.router(None);
    let post = |body: &'static str| {
        let app = app.clone();
        async move { call(&app, "POST", "/v1/feedback", None, Some(body)).await }
    };

    let (s, v) = post(r#"{"id": "chatcmpl-abc", "rating": 4, "comment": "good"}"#).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"object": "feedback", "id": "chatcmpl-abc", "rating": 4, "comment": "good"}));
    let row = f.store().conversation("chatcmpl-abc").unwrap();
    assert_eq!((row.rating, row.comment.as_deref()), (Some(4), Some("good")));

    let (s, v) = post(r#"{"id": "chatcmpl-nope", "rating": 5}"#).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "conversation_not_found", "{v}");
    assert_eq!(v["error"]["param"], "id", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");

    for (body, param) in [
        (r#"{"id": "chatcmpl-abc", "rating": 4, "stars": 4}"#, "stars"),
        (r#"{"id": "chatcmpl-abc", "rating": 0}"#, "rating"),
        (r#"{"id": "chatcmpl-abc", "rating": 4.5}"#, "rating"),
        (r#"{"id": "chatcmpl-abc"}"#, "rating"),
        (r#"{"rating": 3}"#, "id"),
        (r#"{"id": "chatcmpl-abc", "rating": 3, "comment": 7}"#, "comment"),
    ] {
        let (s, v) = post(body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    assert_eq!(f.store().conversation("chatcmpl-abc").unwrap().rating, Some(4), "refused feedback changes nothing");
}
