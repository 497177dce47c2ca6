//! Placeholder until the OpenAI generator lands.
#![allow(missing_docs)]
use crate::error::Result;
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
