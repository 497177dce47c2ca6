//! The spec's `[tracking]` section: optional, checked key by key, bounded, and carried
//! into every leaf.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_train::knobs::expand;
use furnace_train::spec::{check_tracking_url, Spec, MAX_URL_LEN};
use std::path::PathBuf;

fn spec_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/extract.toml")
}

fn with(tail: &str) -> String {
    format!("{}\n{tail}\n", std::fs::read_to_string(spec_path()).unwrap())
}

fn err(tail: &str) -> String {
    Spec::parse(&with(tail), &spec_path()).unwrap_err().to_string()
}

#[test]
fn tracking_is_optional_and_reaches_every_leaf() {
    let plain = Spec::parse(&with(""), &spec_path()).unwrap();
    assert!(plain.tracking.is_none());
    // Absent stays absent in the stored config (old configs read the same).
    assert!(serde_json::to_value(&plain).unwrap().get("tracking").is_none());

    let text = with("[tracking]\nmlflow = \"http://127.0.0.1:5000\"\ntensorboard = \"tb\"\nmlflow_experiment = \"my exp\"")
        .replace("r = 16", "r = { list = [8, 16] }");
    let leaves = expand(&text, &spec_path()).unwrap();
    assert_eq!(leaves.len(), 2);
    for leaf in &leaves {
        let t = leaf.spec.tracking.as_ref().unwrap();
        assert_eq!(t.mlflow.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(t.mlflow_experiment.as_deref(), Some("my exp"));
        // Relative to the spec's folder, like data paths.
        assert_eq!(t.tensorboard.as_ref().unwrap(), &spec_path().parent().unwrap().join("tb"));
    }
    let json = serde_json::to_value(&leaves[0].spec).unwrap();
    assert_eq!(json["tracking"]["mlflow"], "http://127.0.0.1:5000");
}

#[test]
fn tracking_values_are_checked() {
    assert!(err("[tracking]\nmlflow = \"ftp://x\"").contains("tracking.mlflow:"));
    assert!(err("[tracking]\nmlflow = \"127.0.0.1:5000\"").contains("tracking.mlflow:"));
    assert!(err("[tracking]\nmlflow = \"http://\"").contains("tracking.mlflow:"));
    assert!(err("[tracking]\nmlflow = \"http://a b\"").contains("tracking.mlflow:"));
    assert!(err("[tracking]\nmlflow = \"http://h/?x=1\"").contains("tracking.mlflow:"));
    let long = format!("[tracking]\nmlflow = \"http://h/{}\"", "a".repeat(MAX_URL_LEN));
    assert!(err(&long).contains("at most 2048"));
    assert!(err("[tracking]\ntensorboard = \"\"").contains("tracking.tensorboard:"));
    assert!(err(&format!("[tracking]\ntensorboard = \"{}\"", "d".repeat(5000))).contains("tracking.tensorboard:"));
    assert!(err("[tracking]\nmlflow_experiment = \"\"").contains("tracking.mlflow_experiment:"));
    assert!(err("[tracking]\nwandb = \"x\"").contains("wandb"));
    // https and paths under a prefix are fine.
    check_tracking_url("https://mlflow.example/prefix").unwrap();
    check_tracking_url("http://[::1]:5000").unwrap();
}
