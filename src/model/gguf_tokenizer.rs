//! The decoder's tokenizer, rebuilt from GGUF metadata.
//!
//! SmolLM2's GGUF carries a GPT-2 style byte-level BPE (`tokenizer.ggml.model = gpt2`,
//! `pre = smollm`): digits are split one by one, then byte-level pre-tokenization without a
//! prefix space. We write the equivalent Hugging Face `tokenizer.json` in memory and load it
//! with `tokenizers`, so encoding and decoding are the library's, not ours.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{json, Map};
use tokenizers::Tokenizer;

/// GGUF token type of control tokens (`<|im_start|>` and friends).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

fn strings(ct: &Content, key: &str) -> Result<Vec<String>> {
    let v = ct.metadata.get(key).with_context(|| format!("GGUF metadata has no {key}"))?;
    v.to_vec()
        .with_context(|| format!("GGUF metadata {key} is not an array"))?
        .iter()
        .map(|s| Ok(s.to_string().with_context(|| format!("{key}: not a string"))?.clone()))
        .collect()
}

fn int_value(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(*x as i64),
        Value::I8(x) => Some(*x as i64),
        Value::U16(x) => Some(*x as i64),
        Value::I16(x) => Some(*x as i64),
        Value::U32(x) => Some(*x as i64),
        Value::I32(x) => Some(*x as i64),
        Value::U64(x) => Some(*x as i64),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

/// Build the tokenizer described by a GGUF file's metadata.
pub fn from_gguf(ct: &Content) -> Result<Tokenizer> {
    let model =
        ct.metadata.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("");
    if model != "gpt2" {
        bail!("unsupported GGUF tokenizer model {model:?} (only byte-level BPE, `gpt2`)");
    }
    let tokens = strings(ct, "tokenizer.ggml.tokens")?;
    let merges = strings(ct, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec()?.iter().map(|t| int_value(t).unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let mut vocab = Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert(tok.clone(), json!(id));
        let ty = types.get(id).copied().unwrap_or(1) as i32;
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]
        },
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        }
    });
    Tokenizer::from_bytes(serde_json::to_vec(&spec)?)
        .map_err(|e| anyhow::anyhow!("cannot build the tokenizer from GGUF metadata: {e}"))
}

/// Short digest identifying the tokenizer (vocabulary and merges) of a GGUF file.
pub fn digest(ct: &Content) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"] {
        if let Some(Ok(v)) = ct.metadata.get(key).map(|v| v.to_vec()) {
            for s in v.iter().filter_map(|s| s.to_string().ok()) {
                h.update(s.as_bytes());
                h.update([0u8]);
            }
        }
    }
    format!("gguf-bpe@{}", crate::model::cache::hex(&h.finalize()[..8]))
}
