//! Tool calling and structured output for chat completions: `tools`, `tool_choice`,
//! `parallel_tool_calls` and `response_format` checked and turned into what the engine and
//! the chat template need.
//!
//! - Tools are given to the chat template as `tools` (the list as sent) when the template
//!   knows them (it mentions `tools`); otherwise furnace describes them in the system message
//!   in the `<tool_call>` format (Hermes / Qwen2), which it then parses.
//! - The call format follows the template: `[TOOL_CALLS]` (Mistral), `<|python_tag|>` or
//!   `ipython` (Llama 3), else `<tool_call>` (Qwen2 / Hermes).
//! - `tool_choice: "required"` or a named function constrains decoding with a grammar of that
//!   format whose arguments follow each function's JSON schema (llguidance), so even a small
//!   model returns a valid call; `"auto"` lets the model choose and parses what it wrote;
//!   `"none"` hides the tools.
//! - `response_format` `json_object` / `json_schema` constrains decoding the same way, so the
//!   text always parses (and validates, for a schema), unless `max_tokens` cuts it.

use super::OpenAiError;
use furnace_generate::{Grammar, ToolCallStyle};
use serde_json::{json, Map, Value};

/// What the request lets the model do with its tools.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ToolChoice {
    /// The tools are hidden.
    None,
    /// The model may call tools or answer.
    Auto,
    /// The model must call at least one tool.
    Required,
    /// The model must call this one.
    Named(String),
}

/// The tools of a request.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    /// As sent (`[{"type": "function", "function": {...}}]`), for the chat template.
    pub raw: Vec<Value>,
    /// (name, parameters schema) of each function.
    pub functions: Vec<(String, Value)>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl Tools {
    /// Whether the model sees the tools (and its output is parsed for calls).
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The grammar that forces a call, for `required` or a named function.
    pub fn grammar(&self, style: ToolCallStyle) -> Option<Grammar> {
        let functions: Vec<(String, Value)> = match &self.choice {
            ToolChoice::Required => self.functions.clone(),
            ToolChoice::Named(n) => self.functions.iter().filter(|(name, _)| name == n).cloned().collect(),
            ToolChoice::None | ToolChoice::Auto => return None,
        };
        let parallel = self.parallel && self.choice == ToolChoice::Required;
        Some(furnace_generate::tool_call_grammar(style, &functions, parallel))
    }
}

/// Closes every object of a schema that does not say otherwise (`additionalProperties:
/// false`, as OpenAI's strict mode requires): constrained by the open schema, a small model
/// may invent keys without end.
pub(crate) fn close_objects(schema: &mut Value) {
    let Some(obj) = schema.as_object_mut() else { return };
    let is_object = obj.get("type").and_then(Value::as_str) == Some("object") || obj.contains_key("properties");
    if is_object && !obj.contains_key("additionalProperties") {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    for key in ["properties", "$defs", "definitions", "patternProperties"] {
        if let Some(Value::Object(children)) = obj.get_mut(key) {
            children.values_mut().for_each(close_objects);
        }
    }
    for key in ["items", "additionalProperties", "not", "if", "then", "else"] {
        if let Some(child) = obj.get_mut(key) {
            close_objects(child);
        }
    }
    for key in ["anyOf", "oneOf", "allOf", "prefixItems"] {
        if let Some(Value::Array(children)) = obj.get_mut(key) {
            children.iter_mut().for_each(close_objects);
        }
    }
}

fn valid_function_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The request's tools and choice; `None` without tools.
pub(crate) fn tools_of(body: &Map<String, Value>) -> Result<Option<Tools>, OpenAiError> {
    let raw = match body.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(_) => return Err(OpenAiError::bad_param("tools", "tools must be a list of {\"type\": \"function\", \"function\": {...}}")),
    };
    let mut functions = Vec::with_capacity(raw.len());
    for (i, tool) in raw.iter().enumerate() {
        let param = format!("tools[{i}]");
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(OpenAiError::bad_param(&param, format!("{param}.type must be \"function\"")));
        }
        let Some(f) = tool.get("function").and_then(Value::as_object) else {
            return Err(OpenAiError::bad_param(&param, format!("{param}.function is required")));
        };
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        if !valid_function_name(name) {
            return Err(OpenAiError::bad_param(&param, format!("{param}.function.name must be 1 to 64 of a-z A-Z 0-9 _ -, got {name:?}")));
        }
        if functions.iter().any(|(n, _)| n == name) {
            return Err(OpenAiError::bad_param(&param, format!("two tools are named {name}")));
        }
        let mut parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return Err(OpenAiError::bad_param(&param, format!("{param}.function.parameters must be a JSON schema object"))),
        };
        close_objects(&mut parameters);
        functions.push((name.to_string(), parameters));
    }
    let choice = match body.get("tool_choice") {
        None | Some(Value::Null) => {
            if functions.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) if s == "none" => ToolChoice::None,
        Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
        Some(Value::String(s)) if s == "required" => ToolChoice::Required,
        Some(Value::Object(o)) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).unwrap_or_default();
            if !functions.iter().any(|(n, _)| n == name) {
                return Err(OpenAiError::bad_param("tool_choice", format!("tool_choice names {name:?}, which is not among the tools")));
            }
            ToolChoice::Named(name.to_string())
        }
        Some(other) => {
            return Err(OpenAiError::bad_param(
                "tool_choice",
                format!("tool_choice must be none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\"}}}}, got {other}"),
            ))
        }
    };
    if functions.is_empty() {
        if !matches!(choice, ToolChoice::None) {
            return Err(OpenAiError::bad_param("tool_choice", "tool_choice needs tools"));
        }
        if body.get("parallel_tool_calls").is_some_and(|v| !v.is_null()) {
            return Err(OpenAiError::bad_param("parallel_tool_calls", "parallel_tool_calls needs tools"));
        }
        return Ok(None);
    }
    let parallel = match body.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(OpenAiError::bad_param("parallel_tool_calls", "parallel_tool_calls must be true or false")),
    };
    Ok(Some(Tools { raw, functions, choice, parallel }))
}

/// The grammar `response_format` asks for, if any.
pub(crate) fn format_of(body: &Map<String, Value>) -> Result<Option<Grammar>, OpenAiError> {
    let Some(f) = body.get("response_format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => {
            let Some(schema) = f.get("json_schema").and_then(|j| j.get("schema")).filter(|s| s.is_object()) else {
                return Err(OpenAiError::bad_param("response_format", "json_schema needs {\"name\", \"schema\": {...}}"));
            };
            let mut schema = schema.clone();
            close_objects(&mut schema);
            Ok(Some(Grammar::JsonSchema(schema)))
        }
        _ => Err(OpenAiError::bad_param("response_format", "response_format type must be text, json_object or json_schema")),
    }
}

/// The call format of a chat template.
pub(crate) fn style_of(template: &str) -> ToolCallStyle {
    if template.contains("[TOOL_CALLS]") {
        ToolCallStyle::Mistral
    } else if template.contains("<|python_tag|>") || template.contains("ipython") {
        ToolCallStyle::Llama3
    } else {
        ToolCallStyle::Qwen2
    }
}

/// Whether the chat template renders `tools` itself.
pub(crate) fn template_knows_tools(template: &str) -> bool {
    template.contains("tools")
}

/// The system message text that describes tools to a template that does not.
pub(crate) fn tools_prompt(tools: &Tools) -> String {
    let mut text = String::from(
        "You can call functions to help with the user's request. The functions, one JSON signature per line, are between <tools> and </tools>:\n<tools>\n",
    );
    for t in &tools.raw {
        text.push_str(&t.to_string());
        text.push('\n');
    }
    text.push_str(
        "</tools>\n\nTo call a function, write a JSON object with its name and arguments between <tool_call> and </tool_call>:\n<tool_call>\n{\"name\": \"<function name>\", \"arguments\": {<arguments>}}\n</tool_call>",
    );
    text
}

/// Puts the tools description into the messages (into the system message, or as a new first
/// one).
pub(crate) fn inject_tools_prompt(messages: &mut Vec<Value>, tools: &Tools) {
    let prompt = tools_prompt(tools);
    match messages.first_mut().filter(|m| m.get("role").and_then(Value::as_str) == Some("system")) {
        Some(system) => {
            let content = system.get("content").and_then(Value::as_str).unwrap_or_default();
            system["content"] = Value::from(if content.is_empty() { prompt } else { format!("{content}\n\n{prompt}") });
        }
        None => messages.insert(0, json!({"role": "system", "content": prompt})),
    }
}

/// Makes assistant `tool_calls` what chat templates expect: `arguments` as an object
/// (clients send it as a JSON string).
pub(crate) fn normalize_tool_calls(messages: &mut [Value]) {
    for m in messages {
        let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) else { continue };
        for call in calls {
            if let Some(args) = call.pointer_mut("/function/arguments") {
                if let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
                    *args = parsed;
                }
            }
        }
    }
}

/// The calls parsed from a choice's text as OpenAI's `tool_calls`, if it made any.
pub(crate) fn calls_of(style: ToolCallStyle, text: &str) -> Option<Vec<Value>> {
    // A last call cut by `max_tokens` is dropped; the complete ones before it count.
    let text = match (style, text.rfind("</tool_call>")) {
        (ToolCallStyle::Qwen2, Some(end)) => &text[..end + "</tool_call>".len()],
        _ => text,
    };
    let calls = furnace_generate::parse_tool_calls(style, text)?;
    if calls.is_empty() {
        return None;
    }
    Some(
        calls
            .into_iter()
            .map(|(name, arguments)| {
                json!({"id": super::new_id("call"), "type": "function", "function": {"name": name, "arguments": arguments.to_string()}})
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn tools_and_choices_are_checked() {
        let tool = json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}});
        let t = tools_of(&body(json!({"tools": [tool.clone()]}))).ok().flatten().map(|t| t.choice);
        assert_eq!(t, Some(ToolChoice::Auto));
        let named = json!({"tools": [tool.clone()], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
        assert_eq!(tools_of(&body(named)).ok().flatten().map(|t| t.choice), Some(ToolChoice::Named("get_weather".into())));
        for bad in [
            json!({"tools": [tool.clone()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            json!({"tool_choice": "required"}),
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            json!({"tools": [tool.clone(), tool.clone()]}),
            json!({"tools": [tool.clone()], "tool_choice": "sometimes"}),
        ] {
            assert!(tools_of(&body(bad.clone())).is_err(), "{bad}");
        }
        assert!(tools_of(&body(json!({}))).ok().flatten().is_none());
    }

    #[test]
    fn open_objects_are_closed_unless_they_say_otherwise() {
        let mut schema = json!({
            "type": "object",
            "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}, "c": {"type": "array", "items": {"type": "object"}}},
            "$defs": {"d": {"type": "object", "additionalProperties": true}}
        });
        close_objects(&mut schema);
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(schema["properties"]["a"]["additionalProperties"], false);
        assert_eq!(schema["properties"]["c"]["items"]["additionalProperties"], false);
        assert_eq!(schema["$defs"]["d"]["additionalProperties"], true);
        assert!(schema["properties"]["a"]["properties"]["b"].get("additionalProperties").is_none());
    }

    #[test]
    fn styles_follow_the_template_and_calls_parse() {
        assert_eq!(style_of("{{ '[TOOL_CALLS]' }}"), ToolCallStyle::Mistral);
        assert_eq!(style_of("<|python_tag|>"), ToolCallStyle::Llama3);
        assert_eq!(style_of("<|im_start|>"), ToolCallStyle::Qwen2);
        let calls = calls_of(ToolCallStyle::Qwen2, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>");
        let calls = calls.unwrap_or_default();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["function"]["name"], "f");
        assert_eq!(calls[0]["function"]["arguments"], "{\"x\":1}");
        assert!(calls_of(ToolCallStyle::Qwen2, "no call here").is_none());
        let cut = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"f\", \"argu";
        assert_eq!(calls_of(ToolCallStyle::Qwen2, cut).map(|c| c.len()), Some(1));
        let mut messages = vec![json!({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{\"x\": 1}"}}]})];
        normalize_tool_calls(&mut messages);
        assert_eq!(messages[0]["tool_calls"][0]["function"]["arguments"], json!({"x": 1}));
    }
}
