//! The document loader (text and JSONL) and the passage chunker on arbitrary bytes: no panic,
//! and passages keep every word of a document, in order, within the size limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    for name in ["in.jsonl", "in.txt"] {
        let Ok(docs) = refrag::index::corpus::documents_from_bytes(Path::new(name), name, data.to_vec()) else { continue };
        for d in docs {
            let (min, max) = (1 + data.len() % 7, 8 + data.len() % 13);
            let ps = refrag::index::corpus::passages(&d.text, min, max);
            let got: Vec<&str> = ps.iter().flat_map(|p| p.split_whitespace()).collect();
            let want: Vec<&str> = d.text.split_whitespace().collect();
            assert_eq!(got, want, "passages lost or reordered words");
            for p in &ps {
                assert!(p.split_whitespace().count() <= max, "passage over {max} words");
                assert!(!p.trim().is_empty(), "empty passage");
            }
        }
    }
});
