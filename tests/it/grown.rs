//! The chunk encoder grown from the decoder: its vectors (real SmolLM2 layers on CPU), a short
//! training run that ships it, and the index and answers that read it.

use crate::common::*;
use refrag::model::grown::GrownEncoder;

fn ids(text: &str) -> Vec<u32> {
    decoder().tokenizer.encode(text, false).unwrap().get_ids().to_vec()
}

/// One unit-RMS vector of the decoder's width per chunk, the same alone as in a batch with
/// chunks of other lengths (padding is not pooled), and different chunks give different vectors.
#[test]
fn grown_vectors_are_per_chunk_and_batch_independent() {
    let g = GrownEncoder::new(decoder(), 4).unwrap();
    let a = ids("Marie Curie was the first woman to win a Nobel Prize, in 1903.");
    let b = ids("The Eiffel Tower");
    let c = ids("Warsaw is the capital and largest city of Poland.");
    let v = g.encode(&[&a, &b, &c]).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!((v.len(), v[0].len()), (3, decoder().cfg.hidden));
    for row in &v {
        let rms = (row.iter().map(|x| x * x).sum::<f32>() / row.len() as f32).sqrt();
        assert!((rms - 1.0).abs() < 1e-3, "rms {rms}");
    }
    let alone = g.encode(&[&b]).unwrap().to_vec2::<f32>().unwrap();
    let diff = alone[0].iter().zip(&v[1]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-3, "a chunk's vector depends on its batch: {diff}");
    let far = v[0].iter().zip(&v[2]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(far > 0.1, "two chunks gave one vector");
    assert!(GrownEncoder::new(decoder(), 31).is_err());
}

/// `train reconstruct --chunk-layers 2` ships the grown encoder's adapters with a card that
/// names it; `refrag index` then stores 576-d chunk vectors made by it and `ask --mode refrag`
/// reads them; an index built with MiniLM chunk vectors is refused in refrag mode with the fix.
#[test]
fn grown_encoder_trains_indexes_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w");
    let card = json_out(
        refrag()
            .args(["train", "reconstruct", "--device", "cpu", "-q", "--steps", "2", "--tokens-per-step", "64"])
            .args(["--max-chunks", "1", "--chunk-layers", "2", "--chunk-lora", "2", "--text"])
            .arg(fixture("alice_ch1-3.txt"))
            .arg("--out")
            .arg(&w),
    );
    assert_eq!(card["chunk_encoder"]["layers"], 2, "{card}");
    assert_eq!(card["config"]["encoder_layers"], 0, "{card}");
    assert_eq!(card["config"]["input_scale"], 1.0, "{card}");
    assert!(w.join("chunk_encoder.safetensors").exists() && !w.join("encoder.safetensors").exists());
    let adapters =
        candle_core::safetensors::load(w.join("chunk_encoder.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(adapters.len(), 2 * 7 * 2, "two layers, seven matrices, A and B");
    assert!(adapters.contains_key("blk.1.ffn_down.lora_b") && !adapters.contains_key("blk.2.attn_q.lora_a"));
    let trained = refrag::model::weights::find(std::slice::from_ref(&w), encoder(), decoder()).unwrap().unwrap();
    assert!(trained.chunk_encoder.id().contains("+trained@"), "{}", trained.chunk_encoder.id());
    assert_eq!(trained.chunk_encoder.dim(), decoder().cfg.hidden);

    let db = dir.path().join("db");
    let idx = |weights: &std::path::Path| {
        let mut c = refrag();
        c.args(["index", "--device", "cpu", "-q", "--json", "--db"]).arg(&db).arg("--weights").arg(weights);
        c.arg(fixture("corpus"));
        c
    };
    let sum = json_out(&mut idx(&w));
    assert!(sum["chunks"].as_u64().unwrap() > 0, "{sum}");
    let o = refrag()
        .args(["ask", "--device", "cpu", "--mode", "refrag", "--policy", "none", "--max-tokens", "4", "--db"])
        .arg(&db)
        .arg("--weights")
        .arg(&w)
        .arg("Who was the first female Nobel laureate?")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // the same index read with MiniLM's chunk vectors: refused with the fix
    let o = refrag()
        .args(["ask", "--device", "cpu", "--mode", "refrag", "--max-tokens", "4", "--db"])
        .arg(&db)
        .arg("--weights")
        .arg(env!("CARGO_MANIFEST_DIR").to_string() + "/weights/qa-minilm")
        .arg("Who was the first female Nobel laureate?")
        .output()
        .unwrap();
    let err = one_line_error(&o);
    assert!(err.contains("re-index"), "{err}");
    // without --mode, ask over an index of other chunk vectors (the shipped weights/qa are not
    // these) reads the passages in full and says why
    let o = refrag()
        .args(["ask", "--device", "cpu", "--json", "--max-tokens", "4", "--db"])
        .arg(&db)
        .arg("Who was the first female Nobel laureate?")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mode"], "full", "{v}");
    assert!(err.contains("reading the passages in full") && err.contains("chunk vectors were made by"), "{err}");
}
