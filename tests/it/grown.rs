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
/// names it; `refrag index` then stores 576-d chunk vectors made by it (and MiniLM vectors of
/// the chunks' texts, which `sim-span` reads) and `ask --mode refrag` reads them; an index built
/// with MiniLM chunk vectors is refused in refrag mode with the fix.
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

    // the index stores MiniLM's vectors of the chunks' texts beside the grown chunk vectors
    let q = "Who was the first female Nobel laureate?";
    let (store, info) = refrag::index::store::Store::open_index(db.to_str().unwrap(), &[]).unwrap();
    assert!(info.chunk_sims, "{info:?}");
    let qv = encoder().encode(&[q]).unwrap().to_vec2::<f32>().unwrap().remove(0);
    let hit = store.search(&qv, q, 1, refrag::options::SearchKind::Vector).unwrap().remove(0).passage;
    let chunks: Vec<&[u32]> = refrag::model::compressor::chunks(&hit.tokens, 16).collect();
    let want = refrag::model::compressor::minilm_vectors(encoder(), &decoder().tokenizer, &chunks).unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(hit.sims.len(), want.len(), "{} chunks of {} values", chunks.len(), encoder().dim);
    let err = hit.sims.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err < 2e-3, "stored chunk text vectors differ from MiniLM's by {err}");
    drop(store);
    // sim-span reads them instead of encoding the chunks again: the same choice and answer as
    // over an index without them (`--no-chunk-sims`, where they are computed at question time)
    let bare = dir.path().join("bare");
    let mut c = refrag();
    c.args(["index", "--device", "cpu", "-q", "--json", "--no-chunk-sims", "--db"]).arg(&bare).arg("--weights").arg(&w);
    json_out(c.arg(fixture("corpus")));
    assert!(!refrag::index::store::Store::open_index(bare.to_str().unwrap(), &[]).unwrap().1.chunk_sims);
    let ask = |db: &std::path::Path| {
        json_out(
            refrag()
                .args(["ask", "--device", "cpu", "--json", "--mode", "refrag", "--policy", "sim-span"])
                .args(["--expand", "0.25", "--max-tokens", "4", "--db"])
                .arg(db)
                .arg("--weights")
                .arg(&w)
                .arg(q),
        )
    };
    let (stored, computed) = (ask(&db), ask(&bare));
    assert!(stored["expanded_chunks"].as_u64().unwrap() > 0, "{stored}");
    assert_eq!(stored["expanded_chunks"], computed["expanded_chunks"], "{stored} {computed}");
    assert_eq!(stored["answer"], computed["answer"], "{stored} {computed}");

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

/// `--recon-marker`: reconstruction reads `<jupyter_output>` after the chunk vectors; the card
/// records it, weights found from it carry it, a later stage started from them keeps it, and a
/// card whose field is not a boolean is refused naming the card.
#[test]
fn the_reconstruction_marker_is_trained_recorded_and_inherited() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, cpt) = (dir.path().join("rec"), dir.path().join("cpt"));
    let train = |stage: &str, out: &std::path::Path, extra: &[&str]| {
        json_out(
            refrag()
                .args(["train", stage, "--device", "cpu", "-q", "--steps", "1", "--tokens-per-step", "64"])
                .args(["--max-chunks", "1", "--predict-tokens", "16", "--text"])
                .arg(fixture("alice_ch1-3.txt"))
                .args(extra)
                .arg("--out")
                .arg(out),
        )
    };
    let card = train("reconstruct", &rec, &["--chunk-layers", "2", "--chunk-lora", "2", "--recon-marker"]);
    assert_eq!(card["recon_marker"], true, "{card}");
    assert_eq!(card["config"]["recon_marker"], true, "{card}");
    let found = refrag::model::weights::find(std::slice::from_ref(&rec), encoder(), decoder()).unwrap().unwrap();
    assert!(found.recon_marker);
    // cpt from them with the reconstruction term, the flag not given: kept
    let init = rec.to_str().unwrap();
    let card = train("cpt", &cpt, &["--init", init, "--recon-weight", "0.5"]);
    assert_eq!(card["recon_marker"], true, "{card}");
    // without the flag anywhere: off, and the card says nothing
    let plain = dir.path().join("plain");
    let card = train("reconstruct", &plain, &["--chunk-layers", "2", "--chunk-lora", "2"]);
    assert!(card["recon_marker"].is_null() && card["config"]["recon_marker"] == false, "{card}");
    assert!(!refrag::model::weights::find(&[plain], encoder(), decoder()).unwrap().unwrap().recon_marker);

    // the marker is one more position, the embedding of the marker token
    let d = decoder();
    let v = d.embed_tokens(&ids("two tokens")).unwrap();
    let marked = d.recon_prefix(&v, true).unwrap();
    assert_eq!(marked.dim(0).unwrap(), v.dim(0).unwrap() + 1);
    let id = d.tokenizer.token_to_id(refrag::model::decoder::RECON_MARKER).unwrap();
    let last = marked.narrow(0, v.dim(0).unwrap(), 1).unwrap();
    let want = d.embed_tokens(&[id]).unwrap();
    let diff = (last - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
    assert_eq!(d.recon_prefix(&v, false).unwrap().dim(0).unwrap(), v.dim(0).unwrap());

    let bad = serde_json::json!({"k": 16, "recon_marker": "yes"});
    let err = refrag::model::weights::Card::parse(&bad, std::path::Path::new("w/card.json")).unwrap_err();
    assert!(format!("{err}").contains("w/card.json") && format!("{err}").contains("recon_marker"), "{err}");
}
