//! A pipeline's prompt: retrieved chunks rendered into a context, few-shot examples
//! picked (fixed, by similarity or by MMR), and the system and user templates rendered
//! into chat messages.

use crate::dataset::Example;
use crate::error::{Error, Result};
use crate::generator::Message;
use crate::spec::PromptSection;
use furnace_rag::collection::SearchHit;
use furnace_rag::SentenceEncoder;
use serde_json::{json, Value};

/// One few-shot example.
#[derive(Debug, Clone, PartialEq)]
pub struct Shot {
    /// The question.
    pub question: String,
    /// The answer.
    pub answer: String,
}

/// A few-shot pool with the embeddings of its questions (for similarity selection).
#[derive(Debug, Clone)]
pub struct ShotPool {
    /// The examples, in file order.
    pub shots: Vec<Shot>,
    /// Unit vectors of their questions (empty for `fixed` selection).
    pub vectors: Vec<Vec<f32>>,
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

impl ShotPool {
    /// Reads the few-shot file (rows with `question` and `answer`); embeds the questions
    /// when an encoder is given.
    pub fn load(path: &std::path::Path, encoder: Option<&SentenceEncoder>) -> Result<Self> {
        let rows = furnace_train::data::read_rows(path).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut shots = Vec::new();
        for (line, row) in rows {
            let row = row.map_err(|m| Error::Invalid(format!("{}:{line}: {m}", path.display())))?;
            let get = |k: &str| row.get(k).and_then(Value::as_str).map(str::to_string);
            let (Some(question), Some(answer)) = (get("question"), get("answer")) else {
                return Err(Error::Invalid(format!("{}:{line}: a few-shot row needs string 'question' and 'answer'", path.display())));
            };
            shots.push(Shot { question, answer });
        }
        let vectors = match encoder {
            Some(enc) if !shots.is_empty() => {
                let texts: Vec<&str> = shots.iter().map(|s| s.question.as_str()).collect();
                enc.embed(&texts)
                    .map_err(|e| Error::Invalid(format!("embedding few-shot questions: {e}")))?
                    .vectors
                    .into_iter()
                    .map(unit)
                    .collect()
            }
            _ => Vec::new(),
        };
        Ok(ShotPool { shots, vectors })
    }

    /// The examples for one question.
    pub fn select(&self, p: &PromptSection, question: &str, encoder: Option<&SentenceEncoder>) -> Result<Vec<Shot>> {
        let k = p.fewshot_k.min(self.shots.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        let (Some(enc), false) = (encoder, p.fewshot_selector == "fixed" || self.vectors.is_empty()) else {
            return Ok(self.shots[..k].to_vec());
        };
        let q = enc.embed(&[question]).map_err(|e| Error::Invalid(format!("embedding a question: {e}")))?;
        let q = unit(q.vectors.into_iter().next().unwrap_or_default());
        let picked: Vec<usize> = if p.fewshot_selector == "mmr" {
            let cands: Vec<&[f32]> = self.vectors.iter().map(Vec::as_slice).collect();
            furnace_rag::index::maximal_marginal_relevance(&q, &cands, 0.5, k).map_err(|e| Error::Invalid(e.to_string()))?
        } else {
            let mut scored: Vec<(usize, f32)> =
                self.vectors.iter().enumerate().map(|(i, v)| (i, v.iter().zip(&q).map(|(a, b)| a * b).sum())).collect();
            scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            scored.into_iter().take(k).map(|(i, _)| i).collect()
        };
        Ok(picked.into_iter().filter_map(|i| self.shots.get(i).cloned()).collect())
    }
}

/// Renders templates of one pipeline.
pub struct Renderer {
    env: minijinja::Environment<'static>,
    has_system: bool,
    fewshot_messages: bool,
    separator: String,
}

impl Renderer {
    /// Compiles the pipeline's templates.
    pub fn new(p: &PromptSection, document_template: Option<&str>, separator: Option<&str>) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
        let bad = |key: &'static str| move |e: minijinja::Error| Error::Spec { key: key.into(), msg: format!("not a valid template: {e}") };
        env.add_template_owned("user", p.template.clone()).map_err(bad("prompt.template"))?;
        if let Some(s) = &p.system {
            env.add_template_owned("system", s.clone()).map_err(bad("prompt.system"))?;
        }
        env.add_template_owned("doc", document_template.unwrap_or("{{ text }}").to_string()).map_err(bad("rag.document_template"))?;
        Ok(Renderer {
            env,
            has_system: p.system.as_deref().is_some_and(|s| !s.trim().is_empty()),
            fewshot_messages: p.fewshot_style == "messages",
            separator: separator.unwrap_or("\n\n").to_string(),
        })
    }

    fn render(&self, name: &str, ctx: &Value) -> Result<String> {
        let t = self.env.get_template(name).map_err(|e| Error::Invalid(e.to_string()))?;
        t.render(furnace_text::json_to_value(ctx)).map_err(|e| Error::Invalid(format!("rendering the {name} template: {e}")))
    }

    /// The context text of retrieved chunks.
    pub fn context(&self, hits: &[SearchHit]) -> Result<String> {
        let parts: Vec<String> = hits
            .iter()
            .map(|h| {
                let ctx = json!({
                    "text": h.chunk.text, "doc_id": h.chunk.doc_id, "rank": h.rank, "score": h.score,
                    "metadata": h.chunk.metadata,
                });
                self.render("doc", &ctx)
            })
            .collect::<Result<_>>()?;
        Ok(parts.join(&self.separator))
    }

    /// The messages for one question.
    pub fn messages(&self, ex: &Example, context: &str, shots: &[Shot]) -> Result<Vec<Message>> {
        let examples: Vec<Value> = shots.iter().map(|s| json!({"question": s.question, "answer": s.answer})).collect();
        let ctx = json!({"question": ex.question, "context": context, "examples": examples, "row": ex.row, "id": ex.id});
        let mut out = Vec::new();
        if self.has_system {
            out.push(Message { role: "system".into(), content: self.render("system", &ctx)? });
        }
        if self.fewshot_messages {
            for s in shots {
                let c = json!({"question": s.question, "context": "", "examples": [], "row": {}, "id": ""});
                out.push(Message { role: "user".into(), content: self.render("user", &c)? });
                out.push(Message { role: "assistant".into(), content: s.answer.clone() });
            }
        }
        out.push(Message { role: "user".into(), content: self.render("user", &ctx)? });
        Ok(out)
    }
}
