use crate::common::*;

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Mean-pooled, normalised MiniLM vectors reproduce sentence-transformers' published cosines
/// for its README examples, whatever the batch and padding.
#[test]
fn encoder_matches_sentence_transformers() {
    let e = encoder();
    // sentence-transformers' README example: published cosines 0.6660, 0.1046, 0.1411.
    let texts = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.", "A"];
    let v = e.encode(&texts).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(v.len(), 4);
    assert_eq!(v[0].len(), 384);
    let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4);
    assert!((cos(&v[0], &v[1]) - 0.6660).abs() < 0.005, "{}", cos(&v[0], &v[1]));
    assert!((cos(&v[0], &v[2]) - 0.1046).abs() < 0.005, "{}", cos(&v[0], &v[2]));
    assert!((cos(&v[1], &v[2]) - 0.1411).abs() < 0.005, "{}", cos(&v[1], &v[2]));
    // Alone (no padding) equals in a batch.
    let alone = e.encode(&texts[2..3]).unwrap().to_vec2::<f32>().unwrap();
    assert!((cos(&alone[0], &v[2]) - 1.0).abs() < 1e-4);
}

/// Many texts of mixed lengths span several forward passes (row and character caps); every row
/// still comes back in input order and equals the text encoded alone.
#[test]
fn encoder_keeps_input_order_across_passes() {
    let e = encoder();
    let owned: Vec<String> = (0..1300)
        .map(|i| match i % 5 {
            0 => format!("Passage {i}: {}", "the river ran past the old mill and on to the sea. ".repeat(1 + i % 40)),
            _ => format!("chunk number {i} about {}", ["whales", "tea", "stars", "trains"][i % 4]),
        })
        .collect();
    let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let v = e.encode(&texts).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(v.len(), texts.len());
    for i in [0, 1, 7, 640, 1299, 1295] {
        let alone = e.encode(&texts[i..i + 1]).unwrap().to_vec2::<f32>().unwrap();
        assert!((cos(&alone[0], &v[i]) - 1.0).abs() < 1e-4, "row {i}: {}", cos(&alone[0], &v[i]));
    }
    // neighbours differ (not one vector copied everywhere)
    assert!(cos(&v[1], &v[2]) < 0.999);
}
