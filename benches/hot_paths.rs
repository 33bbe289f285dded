//! `cargo bench`: micro-benchmarks of the hot paths with the real models on CPU: a decoder
//! step through the KV cache, a 512-position prefill, the projector over 128 chunk vectors,
//! training's cross-entropy (fused vs candle's), and retrieval + chunk-vector loading from a
//! real LanceDB index of the fixture corpus.
//! Median, min and max over repeats after a warm-up (std only: no harness dependency).

use candle_core::{Device, Tensor};
use refrag::model::decoder::{Decoder, Ops};
use std::time::Instant;

fn time(name: &str, repeats: usize, mut f: impl FnMut()) {
    f(); // warm-up
    let mut v: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    println!(
        "{name:<44} median {:>9.3} ms   min {:>9.3}   max {:>9.3}   (n = {repeats})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    );
}

fn main() {
    // `cargo bench -- NAME` runs the benchmarks whose name contains NAME.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let on = |n: &str| filter.as_deref().is_none_or(|f| n.contains(f));
    let home = refrag::model::cache::home_dir();
    let dev = Device::Cpu;
    let gguf = refrag::model::cache::resolve_decoder(None, &home, true).expect("decoder");
    let dec = Decoder::load(&gguf, &dev, Ops::Fused, true).expect("load decoder");
    let enc_dir = refrag::model::cache::resolve_encoder(None, &home, true).expect("encoder");
    let enc = refrag::model::encoder::Encoder::load(&enc_dir, &dev).expect("load encoder");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/alice_ch1-3.txt")).unwrap();
    let ids = refrag::read::prompt::tokenize(&dec, &text).unwrap();

    if on("decoder_step") {
        let mut st = dec.new_state(600);
        dec.forward(&dec.embed_tokens(&ids[..512]).unwrap().unsqueeze(0).unwrap(), &mut st).unwrap();
        let e = dec.embed_tokens(&ids[512..513]).unwrap().unsqueeze(0).unwrap();
        time("decoder_step (1 token after 512+, quantized)", 20, || {
            let h = dec.forward(&e, &mut st).unwrap();
            let _ = dec.logits(&h).unwrap();
        });
    }
    if on("decoder_prefill") {
        let e = dec.embed_tokens(&ids[..512]).unwrap().unsqueeze(0).unwrap();
        time("decoder_prefill (512 positions)", 5, || {
            let mut st = dec.new_state(512);
            let _ = dec.forward(&e, &mut st).unwrap();
        });
    }
    if on("projector") {
        let dirs = refrag::model::weights::weights_dirs(None, &home, refrag::model::weights::Purpose::Text);
        let proj = match refrag::model::weights::find(&dirs, &enc, &dec).unwrap() {
            Some(t) => t.projector,
            None => refrag::model::projector::Projector::init(&candle_nn::VarMap::new(), &dev, enc.dim, dec.cfg.hidden)
                .unwrap(),
        };
        let x = Tensor::randn(0f32, 0.05, (128, proj.in_dim), &dev).unwrap();
        time("projector (128 chunk vectors)", 50, || {
            let _ = proj.forward(&x).unwrap();
        });
    }
    if on("encoder") {
        let texts: Vec<String> = ids[..512].chunks(16).map(|c| dec.tokenizer.decode(c, false).unwrap()).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        time("encoder (32 chunks of 16 tokens)", 10, || {
            let _ = enc.encode(&refs).unwrap();
        });
        // the chunk encoder grown from the decoder's first 8 layers, on the same chunks
        let grown = refrag::model::grown::GrownEncoder::new(&dec, 8).unwrap();
        let chunks: Vec<&[u32]> = ids[..512].chunks(16).collect();
        time("grown chunk encoder, 8 decoder layers (32 chunks of 16 tokens)", 10, || {
            let _ = grown.encode(&chunks).unwrap();
        });
    }
    if on("cross_entropy") {
        // training's loss over 4096 target tokens: forward and backward, the fused version
        // first and candle's op-by-op one second, with the process's peak memory after each
        // (VmHWM only grows: a second peak above the first is the op-by-op version's own)
        let v = dec.cfg.vocab;
        let logits = candle_core::Var::randn(0f32, 2.0, (4096, v), &dev).unwrap();
        let tgt = Tensor::arange(0u32, 4096, &dev).unwrap();
        let hwm = || {
            let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<f64>().unwrap_or(0.0) / 1024.0)
                .unwrap_or(0.0)
        };
        let before = hwm();
        time("cross_entropy fused (4096 x vocab, fwd+bwd)", 5, || {
            let l = refrag::model::diffops::cross_entropy(logits.as_tensor(), &tgt).unwrap();
            let _ = l.backward().unwrap();
        });
        let fused = hwm();
        time("cross_entropy candle (4096 x vocab, fwd+bwd)", 5, || {
            let l = candle_nn::loss::cross_entropy(logits.as_tensor(), &tgt).unwrap();
            let _ = l.backward().unwrap();
        });
        println!(
            "cross_entropy peak memory above the start: fused {:.0} MB, candle {:.0} MB",
            fused - before,
            hwm() - before
        );
    }
    #[cfg(feature = "store")]
    if on("store") {
        let tmp = std::env::temp_dir().join(format!("refrag-bench-{}", std::process::id()));
        let db = tmp.join("db");
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_refrag"))
            .args(["-q", "index", "--device", "cpu", "--db"])
            .arg(&db)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/corpus"))
            .status()
            .expect("run refrag index");
        assert!(st.success());
        let store = refrag::index::store::Store::open(db.to_str().unwrap()).unwrap();
        let q = enc.encode(&["Where was Chopin born?"]).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        time("store_search (top-3 + tokens + chunk vectors)", 30, || {
            let hits = store.search(&q, "Where was Chopin born?", 3, refrag::options::SearchKind::Vector).unwrap();
            assert!(!hits.is_empty());
        });
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
