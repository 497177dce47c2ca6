//! furnace-export against PEFT, transformers and llama.cpp references.

mod combine;
mod gguf;
mod merge;
