//! Running out of GPU memory: a pass runs again after the pool is trimmed, and an error that
//! ends a run names the checkpoint to resume from.

use super::checkpoint::read_checkpoint;
use anyhow::Result;
use std::path::Path;

/// Passes run again after running out of memory, since the start (train.jsonl logs each
/// step's share as `oom_retries`).
pub(super) static OOM_RETRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub(super) fn is_out_of_memory(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("OUT_OF_MEMORY")
}

/// Seconds waited before each retry of a pass that ran out of GPU memory: the first retry at
/// once (after trimming this process's pool), the later ones after a wait, for memory that
/// other processes on a shared device give back.
pub(super) const OOM_RETRY_WAITS: [u64; 3] = [0, 3, 15];

/// Run one forward/backward pass; if the GPU runs out of memory, wait for the queued work,
/// give the memory pool's unused blocks back, and run the pass again, up to
/// `OOM_RETRY_WAITS.len()` more times (a pass changes nothing until it succeeds: same rows,
/// same random state, gradients added all or nothing). CUDA's stream-ordered allocator can
/// fail where the same allocation succeeds after the stream is synchronised: TensorFlow's and
/// XLA's allocators retry the same way. On the H200, long LoRA runs failed with half the device
/// free (README "GPU memory in training"); on a device shared with other runs, a retry at once
/// fails again while another process holds the memory.
pub(super) fn with_oom_retry<T>(dev: &candle_core::Device, pass: impl FnMut() -> Result<T>) -> Result<T> {
    oom_retry_waiting(dev, &OOM_RETRY_WAITS, pass)
}

pub(super) fn oom_retry_waiting<T>(
    dev: &candle_core::Device,
    waits: &[u64],
    mut pass: impl FnMut() -> Result<T>,
) -> Result<T> {
    let mut r = pass();
    for &wait in waits {
        match &r {
            Err(e) if is_out_of_memory(e) => {
                OOM_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_secs(wait));
                let trimmed = crate::device::release_unused(dev);
                tracing::warn!(
                    "out of GPU memory in a pass ({e:#}); pool trimmed: {trimmed}; retrying the pass after {wait} s"
                );
                r = pass();
            }
            _ => break,
        }
    }
    r
}

/// A CUDA out-of-memory error says where to go on from: the step of the last checkpoint in
/// `out` and the `--resume` that continues there (on the GPU, memory use grows over a long run
/// and can end it; a restarted process starts from a clean memory pool).
pub fn out_of_memory_hint(e: anyhow::Error, out: &Path) -> anyhow::Error {
    if !is_out_of_memory(&e) {
        return e;
    }
    let at = match read_checkpoint(out).map(|c| c.step) {
        Some(s) => format!(
            "the last checkpoint in {} is step {s}: run the same command again with --resume to go on from there",
            out.display()
        ),
        None => {
            "no checkpoint was written yet (a smaller --micro-tokens, or --batch for sft, lowers the peak)".to_string()
        }
    };
    e.context(format!("the GPU ran out of memory; {at}"))
}
