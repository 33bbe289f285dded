//! `refrag top1` (hidden): teacher-forced top-1 next-token ids over a text, as JSON, to compare
//! devices or builds (e.g. CUDA bf16 against CPU f32).

use super::Global;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct Top1Args {
    /// Text file to read.
    pub text: PathBuf,
    /// Positions to score.
    #[arg(long, default_value_t = 512, env = "REFRAG_TOP1_TOKENS")]
    pub tokens: usize,
    /// Compare with a JSON array written by an earlier run; prints the agreement.
    #[arg(long, env = "REFRAG_TOP1_AGAINST")]
    pub against: Option<PathBuf>,
}

pub fn run(g: &Global, a: Top1Args) -> Result<ExitCode> {
    let ld = g.loader()?;
    let decoder = ld.decoder()?;
    let text = crate::index::corpus::read_text(&a.text)?;
    let mut ids = crate::read::prompt::tokenize(&decoder, &text)?;
    ids.truncate(a.tokens);
    let emb = decoder.embed_tokens(&ids)?.unsqueeze(0)?;
    let mut st = decoder.new_state(ids.len());
    let h = decoder.forward(&emb, &mut st)?;
    let top: Vec<u32> = decoder.logits(&h.squeeze(0)?)?.argmax(1)?.to_vec1()?;
    match a.against {
        Some(p) => {
            let other: Vec<u32> = serde_json::from_slice(&std::fs::read(&p)?)?;
            let n = other.len().min(top.len());
            let same = (0..n).filter(|&i| other[i] == top[i]).count();
            outln!("{}", serde_json::json!({"positions": n, "agree": same, "rate": same as f64 / n.max(1) as f64}));
        }
        None => outln!("{}", serde_json::to_string(&top)?),
    }
    Ok(ExitCode::SUCCESS)
}
