//! GGUF metadata parsing and the tokenizer rebuilt from it, on arbitrary bytes: errors, never a
//! panic; a tokenizer that builds must encode and decode.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut cur = std::io::Cursor::new(data);
    let Ok(ct) = candle_core::quantized::gguf_file::Content::read(&mut cur) else { return };
    let _ = refrag::model::gguf_tokenizer::digest(&ct);
    if let Ok(tok) = refrag::model::gguf_tokenizer::from_gguf(&ct) {
        if let Ok(enc) = tok.encode("Hello, <|im_start|> world 1745", false) {
            let _ = tok.decode(enc.get_ids(), false);
        }
    }
});
