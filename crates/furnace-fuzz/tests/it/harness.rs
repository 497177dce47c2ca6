//! The harness can fail: a target that panics, runs long, asks for a huge allocation or
//! gives an empty error is a finding.

use furnace_fuzz::rng::Rng;
use furnace_fuzz::{run_one, run_target, Kind, Limits, Outcome, Target};
use std::time::Duration;

fn seeds() -> Vec<Vec<u8>> {
    vec![b"seed".to_vec()]
}

fn target(run: fn(&[u8]) -> Outcome) -> Target {
    Target { name: "test", entry: "test", run, seeds, generate: None, dict: &[] }
}

#[test]
fn a_panic_is_a_finding_with_its_message() {
    let t = target(|b| if b.first() == Some(&b's') { panic!("index out of bounds") } else { Outcome::Ok });
    let r = run_one(&t, b"seed", &Limits::default());
    match r.result {
        Err(Kind::Panic(m)) => assert!(m.contains("index out of bounds") && m.contains("harness.rs"), "{m}"),
        other => panic!("{other:?}"),
    }
    let stats = run_target(&t, 50, 1, &Limits::default(), None, |_| {});
    assert!(stats.finding_count >= 1);
    assert_eq!(stats.findings[0].input, b"seed");
}

#[test]
fn a_slow_input_is_a_finding() {
    let t = target(|_| {
        std::thread::sleep(Duration::from_millis(30));
        Outcome::Ok
    });
    let r = run_one(&t, b"x", &Limits { time: Duration::from_millis(10), ..Limits::default() });
    assert!(matches!(r.result, Err(Kind::Slow(_))), "{:?}", r.result);
}

#[test]
fn a_huge_allocation_is_a_finding() {
    let t = target(|b| {
        let v = vec![0u8; 300 << 20];
        Outcome::Err(format!("{} {}", v.len(), b.len()))
    });
    let r = run_one(&t, b"x", &Limits::default());
    assert!(matches!(r.result, Err(Kind::Alloc(n)) if n >= 300 << 20), "{:?}", r.result);
    assert!(r.largest_alloc >= 300 << 20);
}

#[test]
fn an_empty_error_is_a_finding() {
    let t = target(|_| Outcome::Err("  ".into()));
    assert_eq!(run_one(&t, b"x", &Limits::default()).result, Err(Kind::EmptyError));
}

#[test]
fn inputs_are_deterministic_and_varied() {
    let t = furnace_fuzz::all().into_iter().find(|t| t.name == "gguf").unwrap();
    let seeds = (t.seeds)();
    let gen = |seed| {
        let mut rng = Rng::new(seed);
        (0..50).map(|_| t.input(&mut rng, &seeds)).collect::<Vec<_>>()
    };
    let (a, b) = (gen(7), gen(7));
    assert_eq!(a, b);
    let distinct: std::collections::HashSet<_> = a.iter().collect();
    assert!(distinct.len() > 40);
}
