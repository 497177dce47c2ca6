//! Bearer-token auth: every request carries the token when one is set, and a server off
//! loopback must have one.

use crate::loopback::{http, loopback};
use crate::{call, error_of, fixture};
use axum::http::StatusCode;
use furnace_exp::events;
use furnace_server::{Error, ServerOptions};
use std::path::PathBuf;

#[tokio::test]
async fn token_guards_every_request() {
    let f = fixture();
    let app = f.router(Some("s3cret"));
    let a = f.runs[0];

    for uri in ["/api/health", "/api/experiments", "/api/nothing"] {
        let (s, v) = call(&app, "GET", uri, None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(error_of(&v), "missing or wrong token: send Authorization: Bearer <token>, or log in");
        for wrong in ["s3cre", "s3cret!", "S3CRET", ""] {
            let (s, _) = call(&app, "GET", uri, Some(wrong), None).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri} with {wrong:?}");
        }
    }
    let stop = format!(r#"{{"run": {a}, "op": "stop"}}"#);
    let (s, _) = call(&app, "POST", "/api/ops", Some("nope"), Some(&stop)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(f.store().ops(f.exp.id).unwrap().is_empty(), "an unauthorized op is not recorded");

    let (s, v) = call(&app, "GET", "/api/experiments", Some("s3cret"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["name"], "exp");
    let (s, _) = call(&app, "POST", "/api/ops", Some("s3cret"), Some(&stop)).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, _) = call(&app, "GET", "/api/nothing", Some("s3cret"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Without a token nothing is asked.
    let (s, _) = call(&f.router(None), "GET", "/api/experiments", None, None).await;
    assert_eq!(s, StatusCode::OK);
}

#[test]
fn loopback_with_token_refuses_requests_without_it() {
    let f = fixture();
    let opts = ServerOptions { token: Some("tok".into()), ..loopback() };
    let h = furnace_server::start(f.db.clone(), opts, events::channel()).unwrap();
    let (s, v) = http(h.addr, "GET", "/api/experiments", None, None);
    assert_eq!(s, 401);
    assert!(error_of(&v).contains("Authorization: Bearer"), "{v}");
    let (s, _) = http(h.addr, "GET", "/api/experiments", Some("wrong"), None);
    assert_eq!(s, 401);
    let (s, v) = http(h.addr, "GET", "/api/experiments", Some("tok"), None);
    assert_eq!(s, 200);
    assert_eq!(v[0]["name"], "exp");
    h.shutdown();
}

#[test]
fn check_options_needs_a_token_off_loopback() {
    let open = ServerOptions {
        addr: "0.0.0.0:8851".parse().unwrap(),
        token: None,
        allow_model_paths: false,
        launcher: None,
        serving: None,
        cors_origins: Vec::new(),
    };
    match furnace_server::check_options(&open) {
        Err(Error::Invalid(m)) => {
            assert!(m.contains("0.0.0.0:8851") && m.contains("--token"), "{m}")
        }
        o => panic!("{o:?}"),
    }
    assert!(matches!(furnace_server::start(PathBuf::from("unused.db"), open.clone(), events::channel()), Err(Error::Invalid(_))));
    furnace_server::check_options(&ServerOptions { token: Some("t".into()), ..open.clone() }).unwrap();
    assert!(furnace_server::check_options(&ServerOptions { token: Some(" ".into()), ..open }).is_err());
    furnace_server::check_options(&ServerOptions {
        addr: "127.0.0.1:8851".parse().unwrap(),
        token: None,
        allow_model_paths: false,
        launcher: None,
        serving: None,
        cors_origins: Vec::new(),
    })
    .unwrap();
    furnace_server::check_options(&ServerOptions {
        addr: "[::1]:8851".parse().unwrap(),
        token: None,
        allow_model_paths: false,
        launcher: None,
        serving: None,
        cors_origins: Vec::new(),
    })
    .unwrap();
    assert_eq!(furnace_server::DEFAULT_PORT, 8851);
}

#[test]
fn token_resolution_precedence_and_errors() {
    use furnace_server::resolve_token;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "from-file\n").unwrap();
    let s = |v: &str| Some(v.to_string());

    assert_eq!(resolve_token(None, None, None).unwrap(), None);
    assert_eq!(resolve_token(s("flag"), Some(&file), s("env")).unwrap(), s("flag"));
    assert_eq!(resolve_token(None, Some(&file), s("env")).unwrap(), s("from-file"), "the file's newline is dropped");
    assert_eq!(resolve_token(None, None, s("env")).unwrap(), s("env"));
    std::fs::write(&file, "  crlf-token \r\n").unwrap();
    assert_eq!(resolve_token(None, Some(&file), None).unwrap(), s("crlf-token"));

    // Empty tokens are errors, wherever they come from.
    std::fs::write(&file, "\n").unwrap();
    match resolve_token(None, Some(&file), s("env")) {
        Err(Error::Invalid(m)) => assert!(m.contains("--token-file") && m.contains(&file.display().to_string()), "{m}"),
        o => panic!("{o:?}"),
    }
    match resolve_token(None, None, s("")) {
        Err(Error::Invalid(m)) => assert!(m.contains("FURNACE_TOKEN"), "{m}"),
        o => panic!("{o:?}"),
    }
    assert!(matches!(resolve_token(s(" "), None, None), Err(Error::Invalid(_))));
    let missing = dir.path().join("missing");
    match resolve_token(None, Some(&missing), s("env")) {
        Err(e @ Error::TokenFile { .. }) => assert!(e.to_string().contains(&missing.display().to_string()), "{e}"),
        o => panic!("{o:?}"),
    }
    assert_eq!(furnace_server::TOKEN_ENV, "FURNACE_TOKEN");
}

#[tokio::test]
async fn the_token_is_never_shown() {
    let secret = "tok-4f1c9a";
    let opts = ServerOptions { token: Some(secret.into()), ..loopback() };
    let shown = format!("{opts:?}");
    assert!(!shown.contains(secret) && shown.contains("<redacted>") && shown.contains("127.0.0.1"), "{shown}");

    // Not in the answers to wrong tokens either.
    let f = fixture();
    let app = f.router(Some(secret));
    for given in ["tok-4f1c9", "tok-4f1c9a-", secret.to_uppercase().as_str()] {
        let (s, v) = call(&app, "GET", "/api/experiments", Some(given), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(!v.to_string().contains("tok-4f1c9"), "{v}");
    }
}
