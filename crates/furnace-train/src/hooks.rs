//! User functions: code a host program (the furnace Python package) registers under a
//! name, which a spec refers to as `"python:<name>"` (or any `"<scheme>:<name>"` the host
//! chose) — a formatting function, a metric function, a GRPO reward, an evals pre- or
//! post-processing step, a metric accumulator.
//!
//! A spec stays plain text: it holds the name, never the code. The function is looked up
//! when the run needs it, so a host that registers the same name again (a notebook cell run
//! twice) continues an experiment with the new code. A run whose function is not
//! registered (the experiment continued by the CLI) fails with an error saying so; the
//! experiment goes on.
//!
//! Calls are batched: one call takes a JSON value holding a whole batch (the shape is the
//! caller's contract, documented where it calls) and returns one JSON value. A function's
//! failure (a Python exception, with its traceback) is an `Err` with the message to
//! store; the caller fails that run only.

use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// A registered user function: one batch in, one batch out; `Err` holds the message
/// (a traceback) to store as the run's failure.
pub type HookFn = Arc<dyn Fn(Value) -> std::result::Result<Value, String> + Send + Sync>;

static REGISTRY: RwLock<Option<HashMap<String, HookFn>>> = RwLock::new(None);

/// Whether a spec value names a user function (`"python:fmt"`).
pub fn is_hook_name(s: &str) -> bool {
    s.split_once(':')
        .is_some_and(|(scheme, name)| !scheme.is_empty() && !name.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// Registers (or replaces) the function called `name` (the full `"python:fmt"` form).
pub fn register(name: &str, f: HookFn) {
    let mut reg = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    reg.get_or_insert_with(HashMap::new).insert(name.to_string(), f);
}

/// Removes the function called `name`; whether it was registered.
pub fn unregister(name: &str) -> bool {
    let mut reg = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    reg.as_mut().is_some_and(|m| m.remove(name).is_some())
}

/// The function called `name`, if registered.
pub fn get(name: &str) -> Option<HookFn> {
    let reg = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
    reg.as_ref().and_then(|m| m.get(name).cloned())
}

/// Checks that `name` is registered (before a run starts using it); `what` says what the
/// function is for (`trainer.formatting`), for the error.
pub fn require(name: &str, what: &str) -> Result<HookFn> {
    get(name).ok_or_else(|| Error::Hook {
        name: name.to_string(),
        msg: format!(
            "{what} names the user function '{name}', which is not registered in this process; \
             user functions exist only while the program that defined them (the furnace Python \
             package) runs the experiment: continue it from there"
        ),
    })
}

/// Calls the function called `name` with one batch; `what` says what it is for (in errors).
pub fn call(name: &str, what: &str, arg: Value) -> Result<Value> {
    let f = require(name, what)?;
    f(arg).map_err(|msg| Error::Hook { name: name.to_string(), msg: format!("{what}: {msg}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn registered_functions_are_called_replaced_and_removed() {
        let name = "test:double";
        assert!(get(name).is_none());
        register(name, Arc::new(|v: Value| Ok(json!(v.as_i64().unwrap_or(0) * 2))));
        assert_eq!(call(name, "x", json!(21)).unwrap(), json!(42));
        register(name, Arc::new(|v: Value| Ok(json!(v.as_i64().unwrap_or(0) * 3))));
        assert_eq!(call(name, "x", json!(2)).unwrap(), json!(6));
        assert!(unregister(name));
        let err = call(name, "trainer.formatting", json!(1)).unwrap_err().to_string();
        assert!(err.contains("not registered") && err.contains("trainer.formatting"), "{err}");
    }

    #[test]
    fn a_failing_function_is_an_error_with_its_message() {
        register("test:fails", Arc::new(|_| Err("Traceback ...\nValueError: bad row".into())));
        let err = call("test:fails", "trainer.formatting", json!([])).unwrap_err().to_string();
        assert!(err.contains("ValueError: bad row") && err.contains("test:fails"), "{err}");
        unregister("test:fails");
    }

    #[test]
    fn hook_names_have_a_scheme_and_a_name() {
        assert!(is_hook_name("python:fmt"));
        assert!(is_hook_name("python:mod.f#2"));
        assert!(!is_hook_name("fmt"));
        assert!(!is_hook_name(":fmt"));
        assert!(!is_hook_name("python:"));
    }
}
