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
