//! Placeholder until the OpenAI generator lands.
#![allow(missing_docs)]
use crate::error::{Error, Result};
use crate::generator::{GenOutput, GenRequest};
#[derive(Debug, Clone, serde::Deserialize)]
pub struct OpenAiConfig {
    pub base_url: String,
    pub model: String,
}
impl OpenAiConfig {
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}
pub struct OpenAiGenerator;
impl OpenAiGenerator {
    pub fn new(_c: OpenAiConfig) -> Result<Self> {
        Ok(Self)
    }
    pub fn generate(&self, r: &[GenRequest], _f: &mut dyn FnMut(usize)) -> Vec<Result<GenOutput>> {
        r.iter().map(|_| Err(Error::Generator("x".into()))).collect()
    }
    pub fn cost(&self, _o: &GenOutput) -> Option<f64> {
        None
    }
}
