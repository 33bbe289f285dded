//! Unit tests of the training plumbing (curriculum, passes, AdamW, checkpoints, out of memory).

use super::checkpoint::*;
use super::data::*;
use super::oom::*;
use super::optim::*;
use super::*;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

#[test]
fn lower_rank_adapters_grow_without_changing_the_model() {
    let dev = Device::Cpu;
    let a8 = Tensor::randn(0f32, 1.0, (8, 6), &dev).unwrap();
    let b8 = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
    let (a16, b16) =
        (Tensor::randn(0f32, 1.0, (16, 6), &dev).unwrap(), Tensor::ones((5, 16), DType::F32, &dev).unwrap());
    let a = grown_adapter("blk.0.attn_q.lora_a", &a8, &a16).unwrap();
    let b = grown_adapter("blk.0.attn_q.lora_b", &b8, &b16).unwrap();
    assert_eq!((a.dims(), b.dims()), (&[16, 6][..], &[5, 16][..]));
    let diff = (b.matmul(&a).unwrap() - b8.matmul(&a8).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    // the new rows of A are the run's own (trainable from the start), not zeros
    assert!(a.narrow(0, 8, 8).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    assert!(grown_adapter("blk.0.attn_q.lora_a", &a16, &a8).is_err(), "a rank cannot shrink");
    let w = Tensor::ones((3, 3), DType::F32, &dev).unwrap();
    assert_eq!(grown_adapter("fc1.weight", &w, &w).unwrap().dims(), &[3, 3]);
}

#[test]
fn an_out_of_memory_pass_runs_again_and_other_errors_do_not() {
    let dev = candle_core::Device::Cpu;
    let oom = || anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
    let retries = OOM_RETRIES.load(std::sync::atomic::Ordering::Relaxed);
    let mut calls = 0;
    let r = with_oom_retry(&dev, || {
        calls += 1;
        if calls == 1 {
            Err(oom())
        } else {
            Ok(7)
        }
    });
    assert_eq!((r.unwrap(), calls), (7, 2));
    // (no waits here: the real ones are seconds long)
    let mut calls = 0;
    let r = oom_retry_waiting(&dev, &[0, 0, 0], || {
        calls += 1;
        if calls < 3 {
            Err(oom())
        } else {
            Ok(8)
        }
    });
    assert_eq!((r.unwrap(), calls), (8, 3));
    let mut calls = 0;
    let r: Result<()> = oom_retry_waiting(&dev, &[0, 0, 0], || {
        calls += 1;
        Err(oom())
    });
    assert!(is_out_of_memory(&r.unwrap_err()) && calls == 4);
    let mut calls = 0;
    let r: Result<()> = with_oom_retry(&dev, || {
        calls += 1;
        bail!("shape mismatch")
    });
    assert!(r.is_err() && calls == 1);
    // counted for train.jsonl: the 1 + 2 + 3 out-of-memory retries above (no other test
    // runs out)
    assert_eq!(OOM_RETRIES.load(std::sync::atomic::Ordering::Relaxed) - retries, 6);
}

/// The flat update is AdamW per variable, written out here one variable at a time; a
/// variable without a gradient keeps its value and moments; the moments survive save/load.
#[test]
fn flat_adamw_matches_a_per_variable_update_and_resumes() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let shapes: [&[usize]; 3] = [&[3, 4], &[5], &[2, 2, 2]];
    for (i, sh) in shapes.iter().enumerate() {
        varmap.get(*sh, &format!("v{i}"), candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 }, DType::F32, &dev).unwrap();
    }
    let vars: Vec<Var> = (0..3).map(|i| varmap.data().lock().unwrap()[&format!("v{i}")].clone()).collect();
    let mut opt = AdamW::new(&varmap, 0.01).unwrap();
    // reference state: weights and moments per variable
    let mut w: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let mut m: Vec<Tensor> = w.iter().map(|t| t.zeros_like().unwrap()).collect();
    let mut vv = m.clone();
    let (b1, b2, eps, wd, lr, clip) = (0.9f64, 0.999f64, 1e-8, 0.01, 0.1, 1.0);
    let dir = std::env::temp_dir().join(format!("refrag-adamw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for step in 1..=4 {
        let grads: Vec<Option<Tensor>> = shapes
            .iter()
            .enumerate()
            .map(|(i, sh)| (step != 2 || i != 1).then(|| Tensor::randn(0f32, 2.0, *sh, &dev).unwrap()))
            .collect();
        let norm = opt.step_sum(&GradSum(grads.clone()), lr, clip).unwrap();
        let sq: f32 =
            grads.iter().flatten().map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sum();
        assert!((norm - (sq as f64).sqrt()).abs() < 1e-4 * norm);
        let scale = if norm > clip { clip / norm } else { 1.0 };
        let (bc1, bc2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
        for i in 0..3 {
            let Some(g) = &grads[i] else { continue };
            let g = (g * scale).unwrap();
            m[i] = ((&m[i] * b1).unwrap() + (&g * (1.0 - b1)).unwrap()).unwrap();
            vv[i] = ((&vv[i] * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
            let upd = ((&m[i] / bc1).unwrap() / ((&vv[i] / bc2).unwrap().sqrt().unwrap() + eps).unwrap()).unwrap();
            w[i] = ((&w[i] * (1.0 - lr * wd)).unwrap() - (upd * lr).unwrap()).unwrap();
        }
        for i in 0..3 {
            let d =
                (vars[i].as_tensor() - &w[i]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "step {step} variable {i}: {d}");
        }
        if step == 2 {
            // a fresh optimizer from the saved moments carries on identically
            opt.save(&dir.join("opt.safetensors")).unwrap();
            let mut again = AdamW::new(&varmap, 0.01).unwrap();
            again.load(&dir.join("opt.safetensors"), &dev).unwrap();
            again.step = opt.step;
            opt = again;
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn curriculum_moves_from_one_chunk_to_many() {
    assert_eq!(stages(16), vec![1, 2, 4, 8, 16]);
    let mut r = Rng(7);
    let early: Vec<usize> = (0..200).map(|_| curriculum_chunks(16, 0.0, &mut r)).collect();
    assert!(early.iter().all(|&l| l == 1));
    let late: Vec<usize> = (0..2000).map(|_| curriculum_chunks(16, 0.99, &mut r)).collect();
    let share16 = late.iter().filter(|&&l| l == 16).count() as f64 / late.len() as f64;
    assert!((share16 - 16.0 / 31.0).abs() < 0.05, "{share16}");
    assert!(late.contains(&1));
}

fn small_config() -> TrainConfig {
    TrainConfig {
        stage: Stage::Reconstruct,
        k: 16,
        steps: 100,
        tokens_per_step: 1,
        max_chunks: 1,
        predict_tokens: 1,
        mixed: 0.0,
        lr: 1e-3,
        warmup: 0.04,
        weight_decay: 0.0,
        clip: 1.0,
        seed: 1,
        checkpoint_every: 10,
        encoder_layers: 0,
        decoder_lora: 0,
        chunk_layers: 0,
        chunk_lora: 0,
        distill: 0.0,
        batch: 0,
        recon_weight: 0.0,
        recon_marker: false,
        bow_weight: 0.0,
        input_scale: 1.0,
        teacher_weights: None,
    }
}

#[test]
fn out_of_memory_names_the_checkpoint_to_resume() {
    let dir = std::env::temp_dir().join(format!("refrag-oom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let oom = || anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
    let msg = format!("{:#}", out_of_memory_hint(oom(), &dir));
    assert!(msg.contains("no checkpoint") && msg.contains("OUT_OF_MEMORY"), "{msg}");
    let ck = Checkpoint { step: 140, rng: Rng(3), config: small_config(), tokens_seen: 9 };
    std::fs::write(dir.join("checkpoint.json"), serde_json::to_vec(&ck).unwrap()).unwrap();
    let msg = format!("{:#}", out_of_memory_hint(oom(), &dir));
    assert!(msg.contains("step 140") && msg.contains("--resume"), "{msg}");
    // other errors pass unchanged
    assert_eq!(format!("{:#}", out_of_memory_hint(anyhow::anyhow!("bad file"), &dir)), "bad file");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn passes_cover_every_row_once_within_the_token_budget() {
    let row = |i: u32| vec![i; 48];
    let b = Batch {
        keep: vec![false, true],
        contexts: (0..5).map(|i| row(i)[..32].to_vec()).collect(),
        targets: (0..5).map(|i| row(i)[..16].to_vec()).collect(),
        l: 2,
        marker: false,
    };
    assert_eq!(b.passes(0), vec![0..5]);
    assert_eq!(b.passes(100), vec![0..2, 2..4, 4..5]);
    assert_eq!(b.passes(10), (0..5).map(|i| i..i + 1).collect::<Vec<_>>(), "at least one row each");
    assert_eq!(passes(&[3, 9, 2, 2, 5], 10), vec![0..1, 1..2, 2..5]);
    assert!(passes(&[], 10).is_empty());
    let p = b.rows(2..4);
    // the rows' contexts are what their chunks are made of
    assert_eq!(p.contexts, [row(2)[..32].to_vec(), row(3)[..32].to_vec()]);
    assert_eq!((p.contexts[0][0], p.targets[1][0], p.keep.clone(), p.l), (2, 3, vec![false, true], 2));
}

#[test]
fn schedule_warms_up_then_decays() {
    let cfg = small_config();
    assert!(lr_at(&cfg, 0) < lr_at(&cfg, 3));
    assert!((lr_at(&cfg, 4) - 1e-3).abs() < 1e-9);
    assert!(lr_at(&cfg, 99) < 2e-4 && lr_at(&cfg, 99) >= 1e-4 - 1e-12);
}

#[test]
fn only_reconstruction_batches_of_a_marked_run_read_the_marker() {
    let pool = TextPool::from_docs(vec![(0..400).collect()]);
    let mut rng = Rng(3);
    let cfg = |stage, recon_marker| TrainConfig {
        stage,
        recon_marker,
        k: 4,
        tokens_per_step: 64,
        predict_tokens: 8,
        max_chunks: 2,
        ..small_config()
    };
    let marked = |stage, on| make_batch(&pool, &cfg(stage, on), 2, &mut Rng(3)).unwrap().marker;
    assert!(marked(Stage::Reconstruct, true));
    assert!(!marked(Stage::Reconstruct, false));
    assert!(!marked(Stage::Cpt, true), "continuation never reads it");
    // the reconstruction term of a marked cpt run does, and its rows keep it
    let b = recon_batch(&pool, &cfg(Stage::Cpt, true), 0.5, &mut rng).unwrap();
    assert!(b.marker && b.targets[0] == b.contexts[0]);
    assert!(b.rows(0..1).marker);
    assert!(!recon_batch(&pool, &cfg(Stage::Cpt, false), 0.5, &mut rng).unwrap().marker);
}
