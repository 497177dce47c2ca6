//! `GET /api/events`: the live events as server-sent events, in-process and over
//! loopback (where stopping the server ends the stream).

use crate::loopback::{connect, loopback, IO_TIMEOUT};
use crate::{fixture, options, ADDR};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use furnace_exp::events::{self, Event};
use furnace_exp::RunStatus;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tower::ServiceExt;

fn metric(step: i64) -> Event {
    Event::Metric { experiment: "exp".into(), run_id: 1, step, name: "loss".into(), value: step as f64 / 2.0 }
}

/// Reads the event stream until `want` arrives (text up to and including it).
async fn read_until(stream: &mut (impl tokio_stream::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin), want: &str) -> String {
    let mut text = String::new();
    let read = async {
        while !text.contains(want) {
            let chunk = stream.next().await.expect("stream ended").unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.unwrap_or_else(|_| panic!("no {want:?} in {text:?}"));
    text
}

#[tokio::test]
async fn event_stream_skips_what_a_slow_client_missed_and_goes_on() {
    let f = fixture();
    let tx = tokio::sync::broadcast::channel(2).0;
    let app = furnace_server::app(f.db.clone(), tx.clone(), options(None));
    let resp = app.oneshot(Request::get("/api/events").header("host", ADDR).body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(tx.receiver_count(), 1);
    for step in 1..=5 {
        tx.send(metric(step)).unwrap();
    }
    let mut body = resp.into_body().into_data_stream();
    let text = read_until(&mut body, r#""step":5"#).await;
    assert!(text.contains("skipped 3 events"), "{text}");
    assert!(!text.contains(r#""step":1"#) && text.contains(r#""step":4"#), "{text}");
    assert!(text.contains("event: metric\n"), "{text}");

    tx.send(Event::Status { experiment: "exp".into(), run_id: 2, status: RunStatus::Stopped, message: Some("asha".into()) }).unwrap();
    let text = read_until(&mut body, "asha").await;
    assert!(text.contains("event: status\n"), "{text}");
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let v: Value = serde_json::from_str(data).unwrap();
    assert_eq!(v, json!({ "type": "status", "experiment": "exp", "run_id": 2, "status": "stopped", "message": "asha" }));

    // An evals shard's interval: its own event name, which the dashboard listens to.
    tx.send(Event::Interval {
        experiment: "ev".into(),
        run_id: 3,
        step: 2,
        name: "em".into(),
        value: 0.5,
        lower: 0.25,
        upper: 0.75,
        primary: true,
    })
    .unwrap();
    let text = read_until(&mut body, "0.75").await;
    assert!(text.contains("event: interval\n"), "{text}");
    let data = text.lines().filter_map(|l| l.strip_prefix("data: ")).next_back().unwrap();
    let v: Value = serde_json::from_str(data).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["lower"].as_f64(), v["upper"].as_f64(), v["primary"].as_bool()),
        (Some("interval"), Some(0.25), Some(0.75), Some(true))
    );
}

#[test]
fn loopback_streams_events_and_shutdown_ends_the_stream() {
    let f = fixture();
    let tx = events::channel();
    let h = furnace_server::start(f.db.clone(), loopback(), tx.clone()).unwrap();
    let mut s = connect(h.addr);
    write!(s, "GET /api/events HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n", h.addr).unwrap();

    // Wait for the response head: the stream is subscribed by then.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut read_more = |got: &mut Vec<u8>| {
        assert!(Instant::now() < deadline, "timed out; got {:?}", String::from_utf8_lossy(got));
        let n = s.read(&mut buf).unwrap_or_else(|e| panic!("read: {e}; got {:?}", String::from_utf8_lossy(got)));
        got.extend_from_slice(&buf[..n]);
        n
    };
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        assert!(read_more(&mut got) > 0, "closed early");
    }
    let head = String::from_utf8_lossy(&got).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
    assert_eq!(tx.receiver_count(), 1);

    let ev = Event::Op {
        experiment: "exp".into(),
        op_id: 7,
        run_id: 1,
        op: "clone".into(),
        status: "applied".into(),
        message: None,
        new_run_id: Some(4),
    };
    tx.send(ev.clone()).unwrap();
    let want = serde_json::to_string(&ev).unwrap();
    while !String::from_utf8_lossy(&got).contains(&want) {
        assert!(read_more(&mut got) > 0, "closed early");
    }
    assert!(String::from_utf8_lossy(&got).contains("event: op\n"));

    // Shutdown ends the open stream promptly rather than waiting on it.
    let t = Instant::now();
    h.shutdown();
    assert!(t.elapsed() < Duration::from_secs(4), "shutdown took {:?}", t.elapsed());
    while read_more(&mut got) > 0 {}
    assert_eq!(tx.receiver_count(), 0);
}
