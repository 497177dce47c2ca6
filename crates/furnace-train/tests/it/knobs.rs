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

#[test]
fn every_size_has_an_upper_bound_named_by_its_key() {
    let base = spec("", "");
    let cases: [(&str, &str, &str); 13] = [
        ("r = 16", "r = 4097", "lora.r: must be at most 4096"),
        ("max_seq_len = 128", "max_seq_len = 1048577", "trainer.max_seq_len: must be at most 1048576"),
        ("batch_size = 4", "batch_size = 65537", "trainer.batch_size: must be at most 65536"),
        ("batch_size = 4", "batch_size = 4\ngrad_accum = 65537", "trainer.grad_accum: must be at most 65536"),
        ("epochs = 1", "epochs = 100001", "trainer.epochs: must be at most 100000"),
        ("epochs = 1", "epochs = 1\nmax_steps = 100000001", "trainer.max_steps: must be at most 100000000"),
        ("warmup_steps = 4", "warmup_steps = 100000001", "trainer.warmup_steps: must be at most 100000000"),
        ("eval_every = 24", "eval_every = 100000001", "trainer.eval_every: must be at most 100000000"),
        ("log_every = 4", "log_every = 100000001", "trainer.log_every: must be at most 100000000"),
        ("save_every = 24", "save_every = 100000001", "trainer.save_every: must be at most 100000000"),
        ("seed = 42", "seed = 42\nnum_chunks = 100001", "experiment.num_chunks: must be at most 100000"),
        ("seed = 42", "seed = 42\neta = 10001", "experiment.eta: must be at most 10000"),
        ("seed = 42", "seed = 42\neta = 1", "experiment.eta: must be >= 2"),
    ];
    for (from, to, want) in cases {
        let e = err(&base.replace(from, to));
        assert!(e.starts_with(want), "{to}: {e}");
    }
    // At the bounds: accepted.
    for (from, to) in
        [("r = 16", "r = 4096"), ("batch_size = 4", "batch_size = 65536\ngrad_accum = 65536"), ("epochs = 1", "epochs = 100000")]
    {
        assert!(expand(&base.replace(from, to), &spec_path()).is_ok(), "{to}");
    }
    // The product of the three is computed with checked arithmetic (it fits on 64 bits
    // at the bounds, so this holds there too).
    let at_bounds =
        base.replace("batch_size = 4", "batch_size = 65536\ngrad_accum = 65536").replace("max_seq_len = 128", "max_seq_len = 1048576");
    let r = expand(&at_bounds, &spec_path());
    assert!(r.is_ok() || r.unwrap_err().to_string().contains("overflows"));
}

#[test]
fn knobs_grids_and_searches_are_bounded() {
    // A grid of 101 x 100 = 10,100 leaves: refused before any is built, naming the count.
    let list = |n: usize| (1..=n).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let big = spec("", "")
        .replace("r = 16", &format!("r = {{ list = [{}] }}", list(101)))
        .replace("batch_size = 4", &format!("batch_size = {{ list = [{}] }}", list(100)));
    let e = err(&big);
    assert!(e.starts_with("search: the grid expands to 10100 configs"), "{e}");
    // Lists are bounded; huge products do not overflow.
    let long = spec("", "").replace("r = 16", &format!("r = {{ list = [{}] }}", list(10_001)));
    assert!(err(&long).starts_with("lora.r: a list knob holds at most 10000 values"), "{}", err(&long));
    // Over all groups together.
    let groups = format!(
        "[[group]]\n[group.lora]\nr = 8\n\n[[group]]\n[group.lora]\nr = {{ list = [{}] }}\n[group.trainer]\nbatch_size = {{ list = [{}] }}\n",
        list(100),
        list(100)
    );
    let e = err(&spec("", &groups));
    assert!(e.starts_with("group[1].search: the grid expands to 10000 configs (after 1 of earlier groups)"), "{e}");
    // Random search: num_runs and range bounds.
    let runs = spec("", "[search]\nkind = \"random\"\nnum_runs = 10001");
    assert_eq!(err(&runs), "search.num_runs: must be at most 10000");
    for bad in ["range = [0, inf]", "range = [nan, 1.0]", "range = [1.0, 1e300]", "range = [1.0, 2.0], step = inf"] {
        let text = spec(&format!("learning_rate = {{ {bad} }}"), "[search]\nkind = \"random\"\nnum_runs = 1");
        let e = err(&text);
        assert!(e.starts_with("trainer.learning_rate: "), "{bad}: {e}");
    }
    // A range with a tiny step counts its values without overflowing.
    let fine = spec("learning_rate = { range = [0.0, 1e15], step = 1e-300 }", "[search]\nkind = \"random\"\nnum_runs = 2");
    assert!(expand(&fine, &spec_path()).is_ok_and(|l| l.len() == 2));
}

#[test]
fn check_against_bounds_rank_and_context_by_the_model() {
    let path = furnace_testutil::testdata().join("tiny-llama/config.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cfg = furnace_model::LlamaConfig::from_hf_json(&v).unwrap();
    // tiny-llama: hidden 64, intermediate 128, 4 heads and 2 kv heads of 16, context 512.
    let leaf = |from: &str, to: &str| expand(&spec("", "").replace(from, to), &spec_path()).unwrap().remove(0).spec;
    assert!(leaf("r = 16", "r = 32").check_against(&cfg).is_ok());
    let e = leaf("r = 16", "r = 33").check_against(&cfg).unwrap_err().to_string();
    assert!(e.starts_with("lora.r: must be at most 32 (the smaller dimension of k_proj"), "{e}");
    // Only the targeted projections count: q_proj is 64x64.
    let q = leaf("targets = [\"all-linear\"]", "targets = [\"q_proj\"]");
    let mut q64 = q.clone();
    q64.lora.r = 64;
    assert!(q64.check_against(&cfg).is_ok());
    q64.lora.r = 65;
    assert!(q64.check_against(&cfg).unwrap_err().to_string().starts_with("lora.r: must be at most 64"));
    let e = leaf("max_seq_len = 128", "max_seq_len = 513").check_against(&cfg).unwrap_err().to_string();
    assert!(e.starts_with("trainer.max_seq_len: must be at most 512"), "{e}");
    assert!(leaf("max_seq_len = 128", "max_seq_len = 512").check_against(&cfg).is_ok());
}
