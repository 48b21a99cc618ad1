//! The trainable Llama-family decoder with LoRA (being written).
