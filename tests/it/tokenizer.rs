use crate::common::*;
use candle_core::quantized::gguf_file;

#[test]
fn gguf_tokenizer_round_trips_and_matches_the_vocabulary() {
    let d = decoder();
    let tok = &d.tokenizer;
    // Special tokens of the chat template are single ids.
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    let enc = tok.encode("<|im_start|>system\nHi<|im_end|>", false).unwrap();
    assert_eq!(enc.get_ids()[0], 1);
    assert_eq!(*enc.get_ids().last().unwrap(), 2);

    // Text round-trips, including digits (split one by one), accents and emoji.
    for text in [
        "Hello world! The year 1745 had 365 days.",
        "  leading spaces, tabs\tand\nnew lines",
        "Maria Skłodowska-Curie, Frédéric Chopin, Żelazowa Wola 🙂",
        &std::fs::read_to_string(fixture("alice_ch1-3.txt")).unwrap()[..4000],
    ] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    let ids = tok.encode("1745", false).unwrap().get_ids().to_vec();
    assert_eq!(ids.len(), 4, "digits are split individually");

    // Every id maps to the GGUF vocabulary entry with the same index.
    let mut f = std::fs::File::open(decoder_path()).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let vocab = ct.metadata["tokenizer.ggml.tokens"].to_vec().unwrap();
    assert_eq!(vocab.len(), tok.get_vocab_size(true));
    for (id, v) in vocab.iter().enumerate() {
        let s = v.to_string().unwrap();
        assert_eq!(tok.token_to_id(s), Some(id as u32), "token {s:?}");
        assert_eq!(tok.id_to_token(id as u32).as_deref(), Some(s.as_str()));
    }
}
