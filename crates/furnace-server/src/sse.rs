//! Server-sent events: a broadcast channel of serializable events as an SSE stream. Each
//! event is named by its JSON `type` field (`event: metric`) and carries the JSON as its
//! data; a client too slow for the channel gets a comment saying how many events it
//! missed, and the stream goes on; the stream ends when the server stops.

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use serde::Serialize;
use std::convert::Infallible;
use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, WatchStream};
use tokio_stream::{Stream, StreamExt};

/// One item of an event stream.
enum Item {
    Event(SseEvent),
    Skip,
    End,
}

fn sse_event<T: Serialize>(ev: &T) -> Item {
    let Ok(v) = serde_json::to_value(ev) else {
        return Item::Skip;
    };
    let ty = v.get("type").and_then(|t| t.as_str()).unwrap_or("event").to_string();
    match SseEvent::default().event(ty).json_data(&v) {
        Ok(e) => Item::Event(e),
        Err(_) => Item::Skip,
    }
}

/// The events received on `rx` as an SSE response, until `shutdown` turns true.
pub(crate) fn stream<T>(
    rx: broadcast::Receiver<T>,
    shutdown: watch::Receiver<bool>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>>
where
    T: Serialize + Clone + Send + 'static,
{
    let live = BroadcastStream::new(rx).map(|r| match r {
        Ok(ev) => sse_event(&ev),
        // A slow client skips what it missed; the stream goes on.
        Err(BroadcastStreamRecvError::Lagged(n)) => Item::Event(SseEvent::default().comment(format!("skipped {n} events"))),
    });
    let stop = WatchStream::new(shutdown).map(|down| if down { Item::End } else { Item::Skip });
    let stream = live.merge(stop).take_while(|i| !matches!(i, Item::End)).filter_map(|i| match i {
        Item::Event(e) => Some(Ok(e)),
        Item::Skip | Item::End => None,
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
