//! Knob expansion: grid, random, config groups and their errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_train::knobs::expand;
use std::path::PathBuf;

fn spec_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/extract.toml")
}

/// The shipped spec with its learning rate line replaced by `lr` (when given) and `tail`
/// appended.
fn spec(lr: &str, tail: &str) -> String {
    let mut base = std::fs::read_to_string(spec_path()).unwrap();
    if !lr.is_empty() {
        base = base.replace("learning_rate = 1e-3", lr);
    }
    format!("{base}\n{tail}\n")
}

fn err(text: &str) -> String {
    expand(text, &spec_path()).unwrap_err().to_string()
}

#[test]
fn grid_is_the_cartesian_product_of_lists() {
    let text = spec("learning_rate = { list = [1e-4, 3e-4] }", "").replace("r = 16", "r = { list = [8, 16, 32] }");
    let leaves = expand(&text, &spec_path()).unwrap();
    assert_eq!(leaves.len(), 6);
    let mut seen: Vec<(usize, f64)> = leaves.iter().map(|l| (l.spec.lora.r, l.spec.trainer.learning_rate)).collect();
    seen.dedup();
    assert_eq!(seen.len(), 6);
    assert!(seen.contains(&(32, 3e-4)) && seen.contains(&(8, 1e-4)));
    // Everything else comes from the spec, and plain arrays stay values.
    assert!(leaves.iter().all(|l| l.spec.lora.targets == ["all-linear"] && l.spec.trainer.batch_size == 4));
    assert_eq!(leaves[0].knobs.len(), 2);
    // No knobs: one leaf.
    assert_eq!(expand(&std::fs::read_to_string(spec_path()).unwrap(), &spec_path()).unwrap().len(), 1);
}

#[test]
fn random_search_samples_distinct_configs_from_lists_and_ranges() {
    let text = spec("learning_rate = { range = [1e-5, 1e-3], log = true }", "[search]\nkind = \"random\"\nnum_runs = 5\nseed = 7")
        .replace("batch_size = 4", "batch_size = { range = [2, 8], dtype = \"int\", step = 2 }");
    let a = expand(&text, &spec_path()).unwrap();
    assert_eq!(a.len(), 5);
    for l in &a {
        let lr = l.spec.trainer.learning_rate;
        assert!((1e-5..=1e-3).contains(&lr), "{lr}");
        assert!([2, 4, 6, 8].contains(&l.spec.trainer.batch_size));
    }
    let keys: Vec<String> = a.iter().map(|l| format!("{:?}", l.knobs)).collect();
    let mut uniq = keys.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 5, "no duplicate configs");
    // Seeded: the same seed draws the same configs.
    let b = expand(&text, &spec_path()).unwrap();
    assert_eq!(keys, b.iter().map(|l| format!("{:?}", l.knobs)).collect::<Vec<_>>());
    // Fewer distinct configs than asked.
    let small = spec("", "[search]\nkind = \"random\"\nnum_runs = 4").replace("r = 16", "r = { list = [8, 16] }");
    assert!(err(&small).contains("only 2 exist"), "{}", err(&small));
}

#[test]
fn bad_knobs_and_groups_name_the_exact_path() {
    let range_in_grid = spec("learning_rate = { range = [1e-5, 1e-3] }", "");
    assert!(err(&range_in_grid).starts_with("trainer.learning_rate: a range cannot be in a grid"), "{}", err(&range_in_grid));
    let bad_leaf = spec("", "").replace("r = 16", "r = { list = [8, 0] }");
    assert_eq!(err(&bad_leaf), "lora.r: must be > 0");
    let groups = spec("", "[[group]]\n[group.lora]\nr = 8\n\n[[group]]\n[group.lora]\nr = { list = [4, 0] }\n");
    assert_eq!(err(&groups), "group[1].lora.r: must be > 0");
    let bad_key = spec("", "").replace("r = 16", "r = { lst = [8] }");
    assert!(err(&bad_key).starts_with("lora.r: unknown knob key 'lst'"), "{}", err(&bad_key));
    let random_no_runs = spec("", "[search]\nkind = \"random\"");
    assert!(err(&random_no_runs).starts_with("search.num_runs"), "{}", err(&random_no_runs));
}

#[test]
fn groups_join_one_experiment_with_their_own_overrides() {
    let text = spec(
        "",
        "[[group]]\n[group.lora]\nr = { list = [8, 16] }\n\n[[group]]\n[group.lora]\nr = 32\n[group.trainer]\nlearning_rate = 5e-4\n",
    );
    let leaves = expand(&text, &spec_path()).unwrap();
    let got: Vec<(usize, usize, f64)> = leaves.iter().map(|l| (l.group, l.spec.lora.r, l.spec.trainer.learning_rate)).collect();
    assert_eq!(got, vec![(0, 8, 1e-3), (0, 16, 1e-3), (1, 32, 5e-4)]);
}

#[test]
fn experiment_names_that_are_not_plain_folder_names_are_refused() {
    for bad in ["..", ".", ".hidden", "a/b", "a\\\\b", "a\\u0000b", "", "has space", &"x".repeat(65)] {
        let text = spec("", "").replace("name = \"extract\"", &format!("name = \"{bad}\""));
        let e = err(&text);
        assert!(e.starts_with("experiment.name: "), "{bad:?}: {e}");
    }
    for good in ["extract", "run-2.v3", "A_b-C", &"x".repeat(64)] {
        let text = spec("", "").replace("name = \"extract\"", &format!("name = \"{good}\""));
        assert!(expand(&text, &spec_path()).is_ok(), "{good:?}");
    }
}
